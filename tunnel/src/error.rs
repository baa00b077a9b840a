//! Errors of the tunnel transport.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use zt_identity::SpiffeId;

use crate::protocol::{DenyReason, ErrorCode};
use crate::splice::SpliceError;

/// Everything that can go wrong setting up or opening a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The configuration cannot be used: a rustls configuration without
    /// TLS 1.3 and a QUIC-capable cipher suite, or a tuning value out of range.
    #[error("invalid tunnel configuration: {0}")]
    Config(String),
    /// The UDP socket could not be bound.
    #[error("binding UDP {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
    /// A connection to the gateway could not even be started (bad address,
    /// endpoint closed).
    #[error("connecting to gateway {gateway}: {source}")]
    Connect {
        /// The gateway.
        gateway: SocketAddr,
        /// Why quinn refused.
        source: quinn::ConnectError,
    },
    /// The QUIC/TLS handshake failed: the gateway refused our certificate
    /// (unknown CA, revoked, expired) or we refused the gateway's, or ALPN
    /// did not match.
    #[error("handshake with {peer} failed: {source}")]
    Handshake {
        /// The other end.
        peer: SocketAddr,
        /// The failure as QUIC reported it (the TLS alert is in the code).
        source: quinn::ConnectionError,
    },
    /// An established QUIC connection failed or was closed by the peer.
    #[error("connection to {peer} lost: {source}")]
    Connection {
        /// The other end.
        peer: SocketAddr,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// The gateway denied the connection.
    #[error(
        "denied by gateway ({reason}, rule {rule_id:?}, policy version {policy_version}){}",
        detail_suffix(detail)
    )]
    Denied {
        /// Why.
        reason: DenyReason,
        /// The gateway rule that decided.
        rule_id: String,
        /// Human-readable detail.
        detail: String,
        /// The gateway's policy version.
        policy_version: u64,
    },
    /// The peer reset or stopped the stream before the tunnel was set up.
    #[error("{peer} reset the stream: {}", ErrorCode::describe(*code))]
    Reset {
        /// The other end.
        peer: SocketAddr,
        /// The application error code it gave.
        code: quinn::VarInt,
    },
    /// The peer's certificate carries no usable identity (no single SPIFFE
    /// id), although the TLS verifier accepted it.
    #[error("peer identity: {0}")]
    PeerIdentity(String),
    /// The gateway proved an identity the TLS verifier accepts, but not the
    /// one the caller asked for ([`TunnelClient::carry`]'s
    /// `expected_peer`). Nothing was sent to it.
    ///
    /// [`TunnelClient::carry`]: crate::TunnelClient::carry
    #[error("gateway {gateway} presented {presented}, expected {expected}")]
    UnexpectedPeer {
        /// The gateway's address.
        gateway: SocketAddr,
        /// Who it should have been.
        expected: Box<SpiffeId>,
        /// Who it is.
        presented: Box<SpiffeId>,
    },
    /// Closed locally (a policy re-evaluation on the client) before the
    /// gateway answered.
    #[error("closed locally before the gateway answered: {0}")]
    Aborted(ErrorCode),
    /// A pipelined connection the gateway allowed failed while carrying
    /// bytes (see [`SpliceError`]).
    #[error(transparent)]
    Splice(#[from] SpliceError),
    /// The peer broke the tunnel protocol, or a local message would.
    #[error("tunnel protocol error: {0}")]
    Protocol(String),
    /// A local I/O failure.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// Something took longer than allowed.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl TunnelError {
    /// Classifies a connection error: failures that carry a TLS alert (QUIC
    /// transport codes 0x100–0x1ff) are handshake refusals, the rest are
    /// failures of an established connection.
    ///
    /// With TLS 1.3 the client finishes its side of the handshake before the
    /// server has checked the client certificate, so a refused client learns
    /// of it from the connection close that follows, on its first stream.
    /// This tells that case apart from a connection that died later.
    pub(crate) fn from_connection(peer: SocketAddr, source: quinn::ConnectionError) -> Self {
        if is_handshake_failure(&source) {
            TunnelError::Handshake { peer, source }
        } else {
            TunnelError::Connection { peer, source }
        }
    }

    /// Whether this is a denial by the gateway's policy (as opposed to a
    /// failure of the transport).
    pub fn is_denied(&self) -> bool {
        matches!(self, TunnelError::Denied { .. })
    }
}

/// Whether a connection error is a TLS handshake failure (local or remote).
pub(crate) fn is_handshake_failure(error: &quinn::ConnectionError) -> bool {
    let is_crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match error {
        quinn::ConnectionError::TransportError(e) => is_crypto(e.code),
        quinn::ConnectionError::ConnectionClosed(close) => is_crypto(close.error_code),
        _ => false,
    }
}
