//! The client end: opening tunnelled connections to gateways.
//!
//! A [`TunnelClient`] is one QUIC endpoint (one UDP socket) with a pool of at
//! most one connection per gateway. Every [`TunnelClient::open`] opens a new
//! bidirectional stream on the gateway's pooled connection, so a tunnelled TCP
//! connect costs one round trip on a warm connection instead of a QUIC and
//! TLS handshake each time.
//!
//! **One connection per gateway, made once.** Each gateway has a pool slot
//! holding a `tokio::sync::OnceCell`: the first opener runs the handshake and
//! every concurrent opener for that gateway waits on the same cell, so a
//! burst of connects (a browser opening twenty) makes one connection, and if
//! the handshake fails they all get that one failure instead of retrying in
//! a storm. If the opener running the handshake is cancelled, the next waiter
//! takes over. A slot whose connection has closed, or whose handshake
//! failed, is replaced by the next open.
//!
//! **A dead pooled connection is retried once.** If a connection taken from
//! the pool turns out to be gone before the gateway answers (the gateway
//! restarted, the path changed and the idle timeout has not yet fired), the
//! open is retried on a new connection; the gateway had not yet connected
//! anything on the client's behalf that it would not clean up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;

use crate::config::{self, Tuning};
use crate::error::TunnelError;
use crate::live::{LiveSet, Registration};
use crate::peer::PeerIdentity;
use crate::protocol::{
    encode_header, read_header, ErrorCode, HeaderError, OpenAnswer, OpenRequest,
};
use crate::splice::{self, SpliceError, SpliceFailure, SpliceStats};

/// Settings of a [`TunnelClient`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// QUIC transport tuning.
    pub tuning: Tuning,
    /// Limit for the QUIC/TLS handshake with a gateway.
    pub connect_timeout: Duration,
    /// Limit for a whole [`TunnelClient::open`]: connection (if needed),
    /// stream, request and the gateway's answer (which includes the gateway
    /// connecting to the service).
    pub open_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            tuning: Tuning::default(),
            connect_timeout: Duration::from_secs(5),
            open_timeout: Duration::from_secs(10),
        }
    }
}

/// Opens tunnelled connections to gateways over pooled QUIC connections.
/// Cheap to clone; clones share the endpoint and the pool.
#[derive(Clone)]
pub struct TunnelClient {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    /// What new connections authenticate with; replaced when the device's
    /// certificate is renewed.
    quic: std::sync::RwLock<quinn::ClientConfig>,
    options: ClientOptions,
    pool: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
    live: Arc<LiveSet<OpenRequest>>,
}

/// One gateway's pooled connection, made at most once.
type Slot = OnceCell<Result<Pooled, ConnectFailure>>;

/// A connection to a gateway and the identity the gateway proved in its
/// handshake.
#[derive(Clone)]
struct Pooled {
    connection: quinn::Connection,
    gateway: Arc<PeerIdentity>,
}

/// A failed connection attempt, shared by everyone who waited for it.
#[derive(Clone, Debug)]
enum ConnectFailure {
    Start(quinn::ConnectError),
    Handshake(quinn::ConnectionError),
    Identity(String),
    Timeout(Duration),
}

impl ConnectFailure {
    fn into_error(self, gateway: SocketAddr) -> TunnelError {
        match self {
            ConnectFailure::Start(source) => TunnelError::Connect { gateway, source },
            ConnectFailure::Handshake(source) => TunnelError::Handshake {
                peer: gateway,
                source,
            },
            ConnectFailure::Identity(detail) => TunnelError::PeerIdentity(detail),
            ConnectFailure::Timeout(after) => TunnelError::Timeout {
                what: "QUIC handshake with the gateway",
                after,
            },
        }
    }
}

impl TunnelClient {
    /// A client on a UDP socket bound to `bind` (e.g. `0.0.0.0:0`),
    /// authenticating with `tls` (from `zt_identity::tls::spiffe_client_config`;
    /// its ALPN is set here). Must be called within a tokio runtime.
    pub fn new(bind: SocketAddr, tls: rustls::ClientConfig) -> Result<Self, TunnelError> {
        Self::with_options(bind, tls, ClientOptions::default())
    }

    /// [`TunnelClient::new`] with explicit options.
    pub fn with_options(
        bind: SocketAddr,
        tls: rustls::ClientConfig,
        options: ClientOptions,
    ) -> Result<Self, TunnelError> {
        let quic = config::client_config(tls, &options.tuning)?;
        let endpoint = config::endpoint(bind, None, &options.tuning, None)?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                quic: std::sync::RwLock::new(quic),
                options,
                pool: Mutex::new(HashMap::new()),
                live: Arc::new(LiveSet::new()),
            }),
        })
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, TunnelError> {
        Ok(self.inner.endpoint.local_addr()?)
    }

    /// Opens a tunnelled connection to `request`'s destination through
    /// `gateway`: a new stream on the pooled connection (made if there is
    /// none), the request, and the gateway's answer. Allowed → a stream
    /// ready to [`TunnelStream::splice`]; denied → [`TunnelError::Denied`];
    /// our certificate refused → [`TunnelError::Handshake`]. A pooled
    /// connection found dead before the answer is replaced and the open
    /// retried once. Bounded by [`ClientOptions::open_timeout`].
    pub async fn open(
        &self,
        gateway: SocketAddr,
        request: &OpenRequest,
    ) -> Result<TunnelStream, TunnelError> {
        request.destination()?;
        let header = encode_header(request)?;
        let limit = self.inner.options.open_timeout;
        tokio::time::timeout(limit, self.open_unbounded(gateway, request, &header))
            .await
            .map_err(|_| TunnelError::Timeout {
                what: "opening a tunnelled connection",
                after: limit,
            })?
    }

    async fn open_unbounded(
        &self,
        gateway: SocketAddr,
        request: &OpenRequest,
        header: &[u8],
    ) -> Result<TunnelStream, TunnelError> {
        let (mut pooled, fresh) = self.connection(gateway).await?;
        let (answer, send, recv) = match exchange(&pooled.connection, gateway, header).await {
            // Not a handshake refusal: `from_connection` files those under
            // `Handshake`, and they are not retried.
            Err(TunnelError::Connection { source, .. }) if !fresh => {
                tracing::debug!(%gateway, error = %source,
                    "pooled connection lost before the answer; retrying on a new connection");
                (pooled, _) = self.connection(gateway).await?;
                exchange(&pooled.connection, gateway, header).await?
            }
            other => other?,
        };
        if !answer.allowed {
            return Err(TunnelError::Denied {
                reason: answer.reason(),
                rule_id: answer.rule_id,
                detail: answer.detail,
                policy_version: answer.policy_version,
            });
        }
        Ok(TunnelStream {
            answer,
            peer: pooled.gateway,
            streams: Some((send, recv)),
            registration: self.inner.live.register(Arc::new(request.clone())),
            gateway,
            copy_buffer: self.inner.options.tuning.copy_buffer,
        })
    }

    /// The pooled connection to `gateway`, and whether it was made just now.
    async fn connection(&self, gateway: SocketAddr) -> Result<(Pooled, bool), TunnelError> {
        // Two rounds: a stale pooled connection is replaced once; a new one
        // that is already closed again is an error.
        let mut last_error = None;
        for _ in 0..2 {
            let slot = self.slot(gateway);
            let mut fresh = false;
            let made = slot
                .get_or_init(|| {
                    fresh = true;
                    self.connect(gateway)
                })
                .await;
            match made {
                Ok(pooled) => match pooled.connection.close_reason() {
                    None => return Ok((pooled.clone(), fresh)),
                    Some(reason) => {
                        self.evict(gateway, &slot);
                        last_error = Some(TunnelError::from_connection(gateway, reason));
                    }
                },
                Err(failure) => {
                    self.evict(gateway, &slot);
                    return Err(failure.clone().into_error(gateway));
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            TunnelError::Protocol("connection closed right after the handshake".into())
        }))
    }

    async fn connect(&self, gateway: SocketAddr) -> Result<Pooled, ConnectFailure> {
        // The gateway is verified by SPIFFE id, not by name; rustls still
        // wants a server name, and an IP address sends no SNI.
        let quic = self
            .inner
            .quic
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let connecting = self
            .inner
            .endpoint
            .connect_with(quic, gateway, &gateway.ip().to_string())
            .map_err(ConnectFailure::Start)?;
        let limit = self.inner.options.connect_timeout;
        match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(connection)) => {
                // The verifier has checked the chain and the SPIFFE id; this
                // only reads it back for the caller.
                let identity = PeerIdentity::from_connection(&connection).map_err(|e| {
                    connection.close(ErrorCode::Protocol.varint(), b"no usable identity");
                    ConnectFailure::Identity(e.to_string())
                })?;
                tracing::debug!(%gateway, peer = %identity.id,
                    "QUIC connection to gateway established");
                Ok(Pooled {
                    connection,
                    gateway: Arc::new(identity),
                })
            }
            Ok(Err(e)) => {
                tracing::info!(%gateway, error = %e, "QUIC handshake with gateway failed");
                Err(ConnectFailure::Handshake(e))
            }
            Err(_) => Err(ConnectFailure::Timeout(limit)),
        }
    }

    fn pool(&self) -> MutexGuard<'_, HashMap<SocketAddr, Arc<Slot>>> {
        // Single map operations only: a poisoned pool is still consistent.
        self.inner.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, gateway: SocketAddr) -> Arc<Slot> {
        Arc::clone(self.pool().entry(gateway).or_default())
    }

    /// Drops `slot` from the pool unless someone has replaced it already.
    fn evict(&self, gateway: SocketAddr, slot: &Arc<Slot>) {
        let mut pool = self.pool();
        if pool.get(&gateway).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            pool.remove(&gateway);
        }
    }

    /// Authenticates with `tls` from now on (after a certificate renewal).
    /// Pooled connections are retired: new streams go over a new connection
    /// made with the new certificate, while streams already open finish on
    /// the old one, which closes when its last stream does.
    pub fn set_tls(&self, tls: rustls::ClientConfig) -> Result<(), TunnelError> {
        let quic = config::client_config(tls, &self.inner.options.tuning)?;
        *self.inner.quic.write().unwrap_or_else(|e| e.into_inner()) = quic;
        self.inner
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(())
    }

    /// How many pooled connections are up.
    pub fn connections(&self) -> usize {
        let mut pool = self.pool();
        pool.retain(|_, slot| match slot.get() {
            Some(Ok(pooled)) => pooled.connection.close_reason().is_none(),
            Some(Err(_)) => false,
            None => true, // being made
        });
        pool.values()
            .filter(|slot| matches!(slot.get(), Some(Ok(_))))
            .count()
    }

    /// How many tunnelled connections are open (opened and not yet ended).
    pub fn live_streams(&self) -> usize {
        self.inner.live.len()
    }

    /// Closes every open tunnelled connection whose request no longer
    /// passes `still_allowed` (after a policy change on the client). Each is
    /// aborted within the call; its splice then resets the QUIC stream and
    /// the caller's TCP connection. Returns how many were closed.
    pub fn reevaluate(&self, still_allowed: impl Fn(&OpenRequest) -> bool) -> usize {
        self.inner
            .live
            .snapshot()
            .into_iter()
            .filter(|(_, request)| !still_allowed(request))
            .filter(|(id, _)| self.inner.live.abort(*id, ErrorCode::PolicyClosed))
            .count()
    }

    /// Closes every connection (streams are reset) and stops the endpoint.
    pub fn close(&self) {
        self.inner
            .endpoint
            .close(ErrorCode::Shutdown.varint(), b"client closing");
        self.pool().clear();
    }
}

/// Opens a stream on `connection`, sends the request header and reads the
/// answer.
async fn exchange(
    connection: &quinn::Connection,
    gateway: SocketAddr,
    header: &[u8],
) -> Result<(OpenAnswer, SendStream, RecvStream), TunnelError> {
    let lost = |e| TunnelError::from_connection(gateway, e);
    let (mut send, mut recv) = connection.open_bi().await.map_err(lost)?;
    send.write_all(header).await.map_err(|e| match e {
        quinn::WriteError::Stopped(code) => TunnelError::Reset {
            peer: gateway,
            code,
        },
        quinn::WriteError::ConnectionLost(e) => lost(e),
        other => TunnelError::Protocol(format!("writing the request: {other}")),
    })?;
    let answer = read_header::<OpenAnswer>(&mut recv)
        .await
        .map_err(|e| match e {
            HeaderError::Read(quinn::ReadError::Reset(code)) => TunnelError::Reset {
                peer: gateway,
                code,
            },
            HeaderError::Read(quinn::ReadError::ConnectionLost(e)) => lost(e),
            HeaderError::Truncated => {
                TunnelError::Protocol("the gateway ended the stream without answering".into())
            }
            other => TunnelError::Protocol(format!("reading the gateway's answer: {other}")),
        })?;
    Ok((answer, send, recv))
}

/// A tunnelled connection the gateway has allowed, ready to carry bytes.
///
/// Dropping it without [`splice`](Self::splice) resets the stream.
pub struct TunnelStream {
    /// The gateway's answer (its rule and policy version).
    pub answer: OpenAnswer,
    peer: Arc<PeerIdentity>,
    streams: Option<(SendStream, RecvStream)>,
    registration: Registration<OpenRequest>,
    gateway: SocketAddr,
    copy_buffer: usize,
}

impl TunnelStream {
    /// The address of the gateway this goes through.
    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    /// The gateway's identity, as it proved it in the TLS handshake
    /// (already checked against the client's `PeerMatcher`).
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// Carries `tcp` (the caller's connection) through the tunnel until both
    /// directions have ended. On error the stream and `tcp` have been reset.
    pub async fn splice(mut self, tcp: TcpStream) -> Result<SpliceStats, SpliceError> {
        let abort = self.registration.take_abort();
        match self.streams.take() {
            Some((send, recv)) => splice::splice(send, recv, tcp, abort, self.copy_buffer).await,
            // Only `splice` takes the streams, and it consumes `self`.
            None => {
                splice::reset(tcp);
                Err(SpliceError {
                    failure: SpliceFailure::Aborted(ErrorCode::Internal),
                    stats: SpliceStats::default(),
                })
            }
        }
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        if let Some((mut send, mut recv)) = self.streams.take() {
            let _ = send.reset(ErrorCode::TcpReset.varint());
            let _ = recv.stop(ErrorCode::TcpReset.varint());
        }
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("gateway", &self.gateway)
            .field("peer", &self.peer.id)
            .field("answer", &self.answer)
            .finish_non_exhaustive()
    }
}
