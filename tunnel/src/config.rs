//! QUIC transport tuning and the quinn configurations built from it.
//!
//! The tunnel is a long-lived, multiplexed LAN link: one QUIC connection per
//! peer gateway carries every tunnelled TCP connection to it, each on its own
//! stream. The defaults follow from that:
//!
//! * **Many streams.** quinn's default of 100 concurrent bidirectional
//!   streams would queue the 101st TCP connect behind the others; the gateway
//!   grants [`Tuning::max_concurrent_streams`] (4096). The client grants the
//!   gateway none (the gateway never opens streams), and nobody grants
//!   unidirectional streams.
//! * **Flow-control windows sized for throughput, bounded for memory.** A
//!   stream may have [`Tuning::stream_receive_window`] bytes in flight, enough
//!   to keep a fast LAN path busy; the whole connection is capped at
//!   [`Tuning::connection_receive_window`], so thousands of streams whose TCP
//!   sides stall cannot make one peer buffer gigabytes (quinn's default
//!   connection window is unlimited). Windows are only credit, not
//!   allocations: an idle stream costs no buffer.
//! * **Warm connections.** Keep-alives every 5 s hold NAT bindings open and
//!   detect a dead peer; a connection idle (no keep-alive answered) for 30 s
//!   is dropped and the client reconnects on the next open.
//! * **UDP socket buffers.** A QUIC endpoint is one UDP socket; the Linux
//!   default of ~208 KiB drops bursts at LAN speed, so the endpoint asks for
//!   [`Tuning::udp_buffer`] (the kernel caps it at `net.core.{r,w}mem_max`).
//!
//! The TLS side is taken as given (see `zt_identity::tls`): TLS 1.3 only, the
//! gateway never resumes sessions (a resumed handshake would skip the client
//! certificate and revocation check), and 0-RTT stays off at both ends, since
//! early data could be replayed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::error::TunnelError;
use crate::protocol::ALPN;

/// Transport parameters shared by clients and gateways.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Concurrent tunnelled connections one peer may have open through a
    /// gateway (the gateway's stream limit; further opens wait for a slot).
    pub max_concurrent_streams: u32,
    /// Bytes one stream may have in flight towards the receiver.
    pub stream_receive_window: u32,
    /// Bytes all streams of one connection together may have in flight
    /// towards the receiver.
    pub connection_receive_window: u32,
    /// Bytes the sender buffers for a connection, unacknowledged data
    /// included.
    pub send_window: u64,
    /// How often an otherwise idle connection sends a keep-alive.
    pub keep_alive_interval: Duration,
    /// A connection that hears nothing from its peer this long is dead.
    pub idle_timeout: Duration,
    /// UDP socket send and receive buffer size to ask the kernel for.
    pub udp_buffer: usize,
    /// Largest buffer for copying one direction of a tunnelled connection
    /// (buffers start at 16 KiB and grow while reads fill them).
    pub copy_buffer: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 4096,
            stream_receive_window: 4 * 1024 * 1024,
            connection_receive_window: 16 * 1024 * 1024,
            send_window: 16 * 1024 * 1024,
            keep_alive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            udp_buffer: 4 * 1024 * 1024,
            copy_buffer: 1024 * 1024,
        }
    }
}

/// Which end a transport configuration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Client,
    Gateway,
}

impl Tuning {
    fn transport(&self, role: Role) -> Result<TransportConfig, TunnelError> {
        let mut transport = TransportConfig::default();
        let bidi = match role {
            Role::Gateway => VarInt::from_u32(self.max_concurrent_streams),
            Role::Client => VarInt::from_u32(0),
        };
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| TunnelError::Config("idle timeout out of range".into()))?;
        transport
            .max_concurrent_bidi_streams(bidi)
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.connection_receive_window))
            .send_window(self.send_window)
            .keep_alive_interval(Some(self.keep_alive_interval))
            .max_idle_timeout(Some(idle))
            // No datagrams in this protocol.
            .datagram_receive_buffer_size(None);
        Ok(transport)
    }
}

/// The quinn client configuration for `tls`: ALPN [`ALPN`], no 0-RTT,
/// transport per `tuning`. Also what a test uses to speak raw QUIC to a
/// gateway.
pub fn client_config(
    mut tls: rustls::ClientConfig,
    tuning: &Tuning,
) -> Result<quinn::ClientConfig, TunnelError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport(Role::Client)?));
    Ok(config)
}

/// The quinn server configuration for a gateway: ALPN [`ALPN`], 0-RTT
/// refused, transport per `tuning`.
pub fn server_config(
    mut tls: rustls::ServerConfig,
    tuning: &Tuning,
) -> Result<quinn::ServerConfig, TunnelError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport(Role::Gateway)?));
    Ok(config)
}

/// A quinn endpoint on a UDP socket bound to `addr` with the tuned buffer
/// sizes, serving with `server` if given. `reset_key` keys the stateless
/// reset tokens (random if `None`). What [`crate::Gateway`] and
/// [`crate::TunnelClient`] run on; public for tests and benchmarks that speak
/// raw QUIC with the same tuning. Must be called within a tokio runtime.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    tuning: &Tuning,
    reset_key: Option<&[u8; 32]>,
) -> Result<quinn::Endpoint, TunnelError> {
    let bind_error = |source| TunnelError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind_error)?;
    let sock = socket2::SockRef::from(&socket);
    // Best effort: a smaller buffer than asked for costs throughput, not
    // correctness.
    for (what, result) in [
        ("receive", sock.set_recv_buffer_size(tuning.udp_buffer)),
        ("send", sock.set_send_buffer_size(tuning.udp_buffer)),
    ] {
        if let Err(e) = result {
            tracing::debug!(%addr, error = %e, "could not set the UDP {what} buffer size");
        }
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_error(std::io::Error::other("not called within a tokio runtime")))?;
    let config = match reset_key {
        Some(key) => {
            let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                key,
            )));
            // quinn's default connection ids carry a tag keyed per start, so
            // a restarted endpoint would drop a peer's packets for its old
            // connection as invalid instead of answering them with the
            // stateless reset this key is for.
            config.cid_generator(|| {
                Box::new(RandomCids {
                    rng: ring::rand::SystemRandom::new(),
                })
            });
            config
        }
        None => quinn::EndpointConfig::default(),
    };
    quinn::Endpoint::new(config, server, socket, runtime).map_err(bind_error)
}

/// Random 8-byte connection ids that any start of the endpoint accepts as
/// possibly its own: a packet for a connection it does not know (one from
/// before a restart) gets a stateless reset (rate-limited by quinn, and
/// always smaller than the packet), so the peer learns at once that the
/// connection is gone.
struct RandomCids {
    rng: ring::rand::SystemRandom,
}

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut cid = [0u8; 8];
        if ring::rand::SecureRandom::fill(&self.rng, &mut cid).is_err() {
            // Never on Linux (getrandom); uniqueness is still checked by
            // quinn, which draws again on a collision.
            tracing::error!("no randomness for a connection id");
        }
        quinn::ConnectionId::new(&cid)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}
