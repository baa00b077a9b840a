//! The gateway end: accepting tunnelled connections and connecting them to
//! services.
//!
//! A [`Gateway`] is one QUIC endpoint. For every connection it accepts it
//! runs one task, and for every stream on it one more:
//!
//! 1. **Handshake.** Mutual TLS with the server config it was given
//!    (`zt_identity::tls::server_config_with_revocation`): the client's
//!    device certificate must chain to our CA and its SPIFFE id and serial
//!    must not be revoked. A refused client never gets a stream.
//! 2. **Peer check.** The [`Authorizer`] may refuse the peer as a whole
//!    ([`Authorizer::check_peer`]), e.g. for a revocation newer than the
//!    verifier's list.
//! 3. **Per stream:** read the [`OpenRequest`] (bounded in size and time),
//!    ask [`Authorizer::authorize`] about (device, user, process,
//!    destination), connect to the service if allowed, answer, and splice.
//!    Nothing past the request is read before that: bytes a pipelining
//!    client sent early wait in the stream's flow-control window, reach the
//!    service only once it is allowed and connected, and are discarded with
//!    the stream (`STOP_SENDING`) on a refusal. A malformed request resets
//!    only that stream.
//! 4. **Records.** Every decision is sent to the agent as a
//!    [`GatewayDecision`] with `try_send`: a slow consumer loses records
//!    (counted in [`GatewayHandle::dropped_decisions`]), never delays a
//!    connection.
//!
//! **Re-evaluation.** Authorization is not only checked at open: after a
//! policy or revocation update the agent calls [`GatewayHandle::reevaluate`],
//! which asks the authorizer again about every live stream and closes those
//! no longer allowed, and closes the whole connection of a peer now refused
//! as revoked. A stream is registered *before* its first authorization, so
//! one being opened while policy changes is either authorized under the new
//! policy or seen, and closed, by the re-evaluation.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};

use crate::authorizer::{Authorization, Authorizer, DecisionKind, GatewayDecision, PeerCheck};
use crate::config::{self, Tuning};
use crate::error::TunnelError;
use crate::live::LiveSet;
use crate::peer::PeerIdentity;
use crate::protocol::{encode_header, read_header, DenyReason, ErrorCode, OpenRequest};
use crate::splice;

/// Settings of a [`Gateway`].
#[derive(Clone)]
pub struct GatewayOptions {
    /// QUIC transport tuning.
    pub tuning: Tuning,
    /// Limit for a client's QUIC/TLS handshake.
    pub handshake_timeout: Duration,
    /// Limit for a stream's request header to arrive.
    pub header_timeout: Duration,
    /// Limit for connecting to the service.
    pub service_connect_timeout: Duration,
    /// How long [`Gateway::run`] waits, after its shutdown signal, for
    /// connections to wind down before aborting their tasks.
    pub drain_timeout: Duration,
    /// Secret keying the QUIC stateless reset tokens. Give one that is
    /// stable across restarts (e.g. derived from the device key): then a
    /// restarted gateway can tell clients at once that their pooled
    /// connection is gone, and they reconnect on their next open. With
    /// `None` (a random key per start), clients notice only at the idle
    /// timeout, and opens on the stale connection time out until then.
    pub stateless_reset_key: Option<[u8; 32]>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            tuning: Tuning::default(),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            service_connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(2),
            stateless_reset_key: None,
        }
    }
}

impl std::fmt::Debug for GatewayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayOptions")
            .field("tuning", &self.tuning)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("header_timeout", &self.header_timeout)
            .field("service_connect_timeout", &self.service_connect_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field(
                "stateless_reset_key",
                &self.stateless_reset_key.map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// A tunnel gateway: a QUIC endpoint that accepts tunnelled connections from
/// peers and connects the allowed ones to their services.
pub struct Gateway {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    handle: GatewayHandle,
}

/// A cheap, cloneable handle on a running [`Gateway`], for re-evaluation
/// and statistics from other tasks.
#[derive(Clone)]
pub struct GatewayHandle {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
}

struct Shared {
    authorizer: Arc<dyn Authorizer>,
    decisions: mpsc::Sender<GatewayDecision>,
    dropped_decisions: AtomicU64,
    options: GatewayOptions,
    streams: Arc<LiveSet<LiveStream>>,
    connections: Mutex<HashMap<usize, LiveConnection>>,
}

/// A live stream, as re-evaluation needs it.
struct LiveStream {
    peer: Arc<PeerIdentity>,
    peer_addr: SocketAddr,
    request: OpenRequest,
    connection: quinn::Connection,
}

/// A live connection, as re-evaluation needs it.
#[derive(Clone)]
struct LiveConnection {
    connection: quinn::Connection,
    peer: Arc<PeerIdentity>,
}

impl Gateway {
    /// A gateway listening on UDP `listen`, with `tls` from
    /// `zt_identity::tls::server_config_with_revocation` (client
    /// certificates required; its ALPN is set here and 0-RTT refused).
    /// Must be called within a tokio runtime; serves once [`Gateway::run`]
    /// is polled.
    pub fn bind(
        listen: SocketAddr,
        tls: rustls::ServerConfig,
        authorizer: Arc<dyn Authorizer>,
        decisions: mpsc::Sender<GatewayDecision>,
    ) -> Result<Self, TunnelError> {
        Self::bind_with_options(
            listen,
            tls,
            authorizer,
            decisions,
            GatewayOptions::default(),
        )
    }

    /// [`Gateway::bind`] with explicit options.
    pub fn bind_with_options(
        listen: SocketAddr,
        tls: rustls::ServerConfig,
        authorizer: Arc<dyn Authorizer>,
        decisions: mpsc::Sender<GatewayDecision>,
        options: GatewayOptions,
    ) -> Result<Self, TunnelError> {
        let server = config::server_config(tls, &options.tuning)?;
        let endpoint = config::endpoint(
            listen,
            Some(server),
            &options.tuning,
            options.stateless_reset_key.as_ref(),
        )?;
        let local_addr = endpoint.local_addr()?;
        Ok(Self {
            endpoint: endpoint.clone(),
            local_addr,
            handle: GatewayHandle {
                endpoint,
                shared: Arc::new(Shared {
                    authorizer,
                    decisions,
                    dropped_decisions: AtomicU64::new(0),
                    options,
                    streams: Arc::new(LiveSet::new()),
                    connections: Mutex::new(HashMap::new()),
                }),
            },
        })
    }

    /// The UDP address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle for re-evaluation and statistics while [`Gateway::run`] runs.
    pub fn handle(&self) -> GatewayHandle {
        self.handle.clone()
    }

    /// See [`GatewayHandle::reevaluate`].
    pub fn reevaluate(&self) -> usize {
        self.handle.reevaluate()
    }

    /// Accepts and serves connections until `shutdown` completes; then closes
    /// every connection (peers see [`ErrorCode::Shutdown`], service
    /// connections are reset) and returns once their tasks have ended (or
    /// after [`GatewayOptions::drain_timeout`], aborting them).
    pub async fn run(&self, shutdown: impl Future) {
        let mut shutdown = pin!(shutdown);
        let mut connections = JoinSet::new();
        tracing::info!(addr = %self.local_addr, "tunnel gateway listening");
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => {
                        connections.spawn(Arc::clone(&self.handle.shared).serve_connection(incoming));
                    }
                    None => break,
                },
                Some(joined) = connections.join_next() => log_task_end(joined),
            }
        }
        tracing::info!(addr = %self.local_addr, "tunnel gateway shutting down");
        self.endpoint
            .close(ErrorCode::Shutdown.varint(), b"gateway shutting down");
        let drain = async {
            while let Some(joined) = connections.join_next().await {
                log_task_end(joined);
            }
            // Until the peers have been told (CONNECTION_CLOSE sent).
            self.endpoint.wait_idle().await;
        };
        let limit = self.handle.shared.options.drain_timeout;
        if tokio::time::timeout(limit, drain).await.is_err() {
            tracing::warn!(
                ?limit,
                "connections did not wind down in time; aborting them"
            );
            connections.shutdown().await;
        }
    }
}

impl GatewayHandle {
    /// Presents and verifies with `tls` from now on (after a certificate
    /// renewal or a new trust bundle); connections already open keep the
    /// session they authenticated.
    pub fn set_tls(&self, tls: rustls::ServerConfig) -> Result<(), TunnelError> {
        let server = config::server_config(tls, &self.shared.options.tuning)?;
        self.endpoint.set_server_config(Some(server));
        Ok(())
    }

    /// Re-evaluates every live stream against the authorizer (after a policy
    /// change or a revocation update) and closes those no longer allowed:
    /// their QUIC stream is reset with [`ErrorCode::PolicyClosed`] and the
    /// service connection reset. Connections of peers the authorizer now
    /// refuses ([`Authorizer::check_peer`], or a stream denied as
    /// [`DenyReason::Revoked`]) are closed whole, within the call.
    ///
    /// Each closed stream is recorded as [`DecisionKind::ClosedByPolicy`].
    /// Returns the number of streams closed. Safe to call concurrently with
    /// [`Gateway::run`] and with itself.
    pub fn reevaluate(&self) -> usize {
        let shared = &self.shared;
        // Connections to close, with the refusal their streams are recorded
        // with. They are closed last: closing first would let their stream
        // tasks end on their own before being counted and recorded.
        let mut refused: HashMap<usize, (quinn::Connection, Authorization)> = HashMap::new();
        for live in shared.connection_snapshot() {
            if let PeerCheck::Refuse { reason, detail } = shared.authorizer.check_peer(&live.peer) {
                tracing::info!(peer = %live.peer, %reason, %detail,
                    "closing the connection of a peer no longer admitted");
                let refusal = Authorization::deny(reason, "", 0, detail);
                refused.insert(live.connection.stable_id(), (live.connection, refusal));
            }
        }
        let mut closed = 0;
        for (id, stream) in shared.streams.snapshot() {
            let connection_id = stream.connection.stable_id();
            let authorization = match refused.get(&connection_id) {
                Some((_, refusal)) => refusal.clone(),
                None => {
                    let authorization = shared.authorizer.authorize(&stream.peer, &stream.request);
                    if authorization.allowed {
                        continue;
                    }
                    if authorization.reason == DenyReason::Revoked {
                        tracing::info!(peer = %stream.peer,
                            "closing the connection of a revoked peer");
                        refused.insert(
                            connection_id,
                            (stream.connection.clone(), authorization.clone()),
                        );
                    }
                    authorization
                }
            };
            if shared.streams.abort(id, ErrorCode::PolicyClosed) {
                closed += 1;
                tracing::info!(peer = %stream.peer.id,
                    connection_id = %stream.request.connection_id,
                    rule = %authorization.rule_id, reason = %authorization.reason,
                    "tunnelled connection closed by policy re-evaluation");
                shared.record(
                    &stream.peer,
                    stream.peer_addr,
                    stream.request.clone(),
                    authorization,
                    DecisionKind::ClosedByPolicy,
                );
            }
        }
        for (connection, refusal) in refused.into_values() {
            connection.close(
                close_code(refusal.reason).varint(),
                refusal.detail.as_bytes(),
            );
        }
        closed
    }

    /// Streams open (being set up or carrying bytes).
    pub fn live_streams(&self) -> usize {
        self.shared.streams.len()
    }

    /// Peer connections established.
    pub fn connections(&self) -> usize {
        self.shared.connections().len()
    }

    /// Decision records lost because the channel was full or closed.
    pub fn dropped_decisions(&self) -> u64 {
        self.shared.dropped_decisions.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn connections(&self) -> MutexGuard<'_, HashMap<usize, LiveConnection>> {
        // Single map operations only: a poisoned map is still consistent.
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connection_snapshot(&self) -> Vec<LiveConnection> {
        self.connections().values().cloned().collect()
    }

    fn record(
        &self,
        peer: &PeerIdentity,
        peer_addr: SocketAddr,
        request: OpenRequest,
        authorization: Authorization,
        kind: DecisionKind,
    ) {
        let decision = GatewayDecision {
            peer: peer.clone(),
            peer_addr,
            request,
            authorization,
            at: SystemTime::now(),
            kind,
        };
        if self.decisions.try_send(decision).is_err() {
            let dropped = self.dropped_decisions.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "gateway decision records dropped (channel full or closed)"
                );
            }
        }
    }

    /// One peer connection: handshake, peer check, then a task per stream.
    async fn serve_connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "incoming connection failed");
                return;
            }
        };
        let limit = self.options.handshake_timeout;
        let connection = match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => {
                tracing::info!(%remote, error = %e, "tunnel handshake refused or failed");
                return;
            }
            Err(_) => {
                tracing::info!(%remote, ?limit, "tunnel handshake timed out");
                return;
            }
        };
        let peer = match PeerIdentity::from_connection(&connection) {
            Ok(peer) => Arc::new(peer),
            Err(e) => {
                tracing::warn!(%remote, error = %e, "tunnel peer has no usable identity");
                connection.close(ErrorCode::Protocol.varint(), b"no usable identity");
                return;
            }
        };
        // Registered before the check, as streams are: a re-evaluation
        // running meanwhile either sees it or was already seen by the check.
        let connection_id = connection.stable_id();
        self.connections().insert(
            connection_id,
            LiveConnection {
                connection: connection.clone(),
                peer: Arc::clone(&peer),
            },
        );
        if let PeerCheck::Refuse { reason, detail } = self.authorizer.check_peer(&peer) {
            tracing::info!(%peer, %remote, %reason, %detail, "tunnel peer refused");
            connection.close(close_code(reason).varint(), detail.as_bytes());
            self.connections().remove(&connection_id);
            return;
        }
        tracing::info!(peer = %peer.id, %remote, "tunnel peer connected");

        let mut streams = JoinSet::new();
        let end = loop {
            tokio::select! {
                accepted = connection.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        streams.spawn(Arc::clone(&self).serve_stream(
                            connection.clone(),
                            Arc::clone(&peer),
                            send,
                            recv,
                        ));
                    }
                    Err(e) => break e,
                },
                Some(joined) = streams.join_next() => log_task_end(joined),
            }
        };
        log_connection_end(&peer, remote, &end);
        // The connection is gone, so every stream task ends promptly
        // (resetting its service connection).
        while let Some(joined) = streams.join_next().await {
            log_task_end(joined);
        }
        self.connections().remove(&connection_id);
    }

    /// One tunnelled connection: request, decision, service, splice.
    async fn serve_stream(
        self: Arc<Self>,
        connection: quinn::Connection,
        peer: Arc<PeerIdentity>,
        mut send: SendStream,
        mut recv: RecvStream,
    ) {
        let peer_addr = connection.remote_address();
        let stream = send.id();
        let limit = self.options.header_timeout;
        let request = match tokio::time::timeout(limit, read_header::<OpenRequest>(&mut recv)).await
        {
            Ok(Ok(request)) => request,
            Ok(Err(e)) if e.is_peer_fault() => {
                tracing::warn!(peer = %peer.id, %peer_addr, %stream, error = %e,
                    "malformed tunnel request; resetting the stream");
                abandon(&mut send, &mut recv, ErrorCode::Protocol);
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer.id, %stream, error = %e,
                    "stream ended before its request");
                return;
            }
            Err(_) => {
                tracing::warn!(peer = %peer.id, %peer_addr, %stream, ?limit,
                    "no tunnel request in time; resetting the stream");
                abandon(&mut send, &mut recv, ErrorCode::Protocol);
                return;
            }
        };

        // Registered before the decision: see the module documentation.
        let mut registration = self.streams.register(Arc::new(LiveStream {
            peer: Arc::clone(&peer),
            peer_addr,
            request: request.clone(),
            connection: connection.clone(),
        }));
        let (authorization, service) = self.decide(&peer, &request).await;
        let Some(service) = service else {
            // Refused on its own account: out of re-evaluation's sight first,
            // so it is recorded once.
            drop(registration);
            self.refuse(&connection, &peer, send, recv, request, authorization)
                .await;
            return;
        };
        let mut abort = registration.take_abort();
        if let Some(code) = abort.as_mut().and_then(|abort| abort.try_recv().ok()) {
            // Re-evaluated (and recorded as closed) while being set up.
            tracing::info!(peer = %peer.id, connection_id = %request.connection_id,
                "tunnelled connection closed by policy before it opened");
            splice::reset(service);
            abandon(&mut send, &mut recv, code);
            return;
        }
        let answer = match encode_header(&authorization.answer()) {
            Ok(answer) => answer,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the answer");
                splice::reset(service);
                abandon(&mut send, &mut recv, ErrorCode::Internal);
                return;
            }
        };
        if let Err(e) = send.write_all(&answer).await {
            tracing::debug!(peer = %peer.id, %stream, error = %e, "client left before the answer");
            splice::reset(service);
            abandon(&mut send, &mut recv, ErrorCode::TcpReset);
            return;
        }
        tracing::debug!(peer = %peer.id, connection_id = %request.connection_id,
            rule = %authorization.rule_id, "tunnelled connection opened");
        self.record(
            &peer,
            peer_addr,
            request.clone(),
            authorization,
            DecisionKind::Opened,
        );
        match splice::splice(send, recv, service, abort, self.options.tuning.copy_buffer).await {
            Ok(stats) => tracing::debug!(peer = %peer.id, connection_id = %request.connection_id,
                sent = stats.tunnel_to_tcp, received = stats.tcp_to_tunnel,
                "tunnelled connection closed"),
            Err(e) => tracing::debug!(peer = %peer.id, connection_id = %request.connection_id,
                error = %e, "tunnelled connection aborted"),
        }
        drop(registration);
    }

    /// The authorizer's decision and, if allowed, the connected service.
    async fn decide(
        &self,
        peer: &PeerIdentity,
        request: &OpenRequest,
    ) -> (Authorization, Option<TcpStream>) {
        let destination = match request.destination() {
            Ok(destination) => destination,
            Err(e) => {
                return (
                    Authorization::deny(DenyReason::BadRequest, "", 0, e.to_string()),
                    None,
                )
            }
        };
        let authorization = self.authorizer.authorize(peer, request);
        if !authorization.allowed {
            return (authorization, None);
        }
        let target = authorization.target.unwrap_or(destination);
        let limit = self.options.service_connect_timeout;
        match tokio::time::timeout(limit, splice::connect(target)).await {
            Ok(Ok(service)) => (authorization, Some(service)),
            Ok(Err(e)) => {
                let detail = format!("connecting to {target}: {e}");
                (authorization.unreachable(detail), None)
            }
            Err(_) => {
                let detail = format!("connecting to {target}: no answer within {limit:?}");
                (authorization.unreachable(detail), None)
            }
        }
    }

    /// Answers a refusal, ends the stream and records it.
    async fn refuse(
        &self,
        connection: &quinn::Connection,
        peer: &PeerIdentity,
        mut send: SendStream,
        mut recv: RecvStream,
        request: OpenRequest,
        authorization: Authorization,
    ) {
        tracing::info!(peer = %peer.id, connection_id = %request.connection_id,
            user = %request.user, exe = %request.exe, rule = %authorization.rule_id,
            reason = %authorization.reason, detail = %authorization.detail,
            "tunnelled connection refused");
        let revoked = authorization.reason == DenyReason::Revoked;
        let answered = match encode_header(&authorization.answer()) {
            Ok(answer) => send.write_all(&answer).await.is_ok(),
            Err(_) => false,
        };
        if answered {
            let _ = send.finish();
        } else {
            let _ = send.reset(ErrorCode::Denied.varint());
        }
        let _ = recv.stop(ErrorCode::Denied.varint());
        self.record(
            peer,
            connection.remote_address(),
            request,
            authorization,
            DecisionKind::Refused,
        );
        if revoked {
            // Let the answer reach the client before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            tracing::info!(peer = %peer.id, "closing the connection of a revoked peer");
            connection.close(ErrorCode::Revoked.varint(), b"device revoked");
        }
    }
}

/// The connection close code for refusing a peer for `reason`.
fn close_code(reason: DenyReason) -> ErrorCode {
    if reason == DenyReason::Revoked {
        ErrorCode::Revoked
    } else {
        ErrorCode::Denied
    }
}

/// Gives up on a stream in both directions.
fn abandon(send: &mut SendStream, recv: &mut RecvStream, code: ErrorCode) {
    let _ = send.reset(code.varint());
    let _ = recv.stop(code.varint());
}

fn log_task_end(joined: Result<(), JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            tracing::error!(error = %e, "tunnel gateway task panicked");
        }
    }
}

fn log_connection_end(peer: &PeerIdentity, remote: SocketAddr, end: &quinn::ConnectionError) {
    use quinn::ConnectionError::{ApplicationClosed, LocallyClosed};
    match end {
        ApplicationClosed(close) => {
            tracing::info!(peer = %peer.id, %remote,
                reason = %ErrorCode::describe(close.error_code), "tunnel peer disconnected");
        }
        LocallyClosed => tracing::info!(peer = %peer.id, %remote, "tunnel connection closed"),
        other => tracing::info!(peer = %peer.id, %remote, error = %other, "tunnel connection lost"),
    }
}
