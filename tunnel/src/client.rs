//! The client end: opening tunnelled connections to gateways.
//!
//! A [`TunnelClient`] is one QUIC endpoint (one UDP socket) with a pool of at
//! most one connection per gateway. Every tunnelled connection is a new
//! bidirectional stream on the gateway's pooled connection, so a tunnelled TCP
//! connect costs no QUIC and TLS handshake on a warm connection.
//!
//! **Two ways to open.** [`TunnelClient::carry`] is *pipelined*: it sends the
//! request and at once starts forwarding the caller's bytes, and reads the
//! gateway's answer before the first byte coming back: the caller's first
//! byte pays no extra round trip. It is what the agent uses. The gateway
//! reads none of those bytes before it has authorized the request and
//! connected to the service, and discards them on a refusal (they wait in
//! the stream's QUIC flow-control window meanwhile; the client sends at most
//! [`ClientOptions::max_bytes_before_answer`] of them). [`TunnelClient::open`]
//! waits for the answer first and returns a [`TunnelStream`] to splice: for
//! callers that need the verdict before they touch the connection.
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
//! anything on the client's behalf that it would not clean up. A pipelined
//! connection is retried only if none of the caller's bytes had been sent:
//! the lost gateway may have passed them on to the service before it went,
//! and sending them again could deliver them twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::pin::pin;

use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, OnceCell};
use tokio::time::Instant;
use zt_identity::SpiffeId;

use crate::config::{self, Tuning};
use crate::error::TunnelError;
use crate::live::{LiveSet, Registration};
use crate::peer::PeerIdentity;
use crate::protocol::{
    encode_header, read_header, ErrorCode, HeaderError, OpenAnswer, OpenRequest,
};
use crate::splice::{self, Ends, Gate, Pipelined, SpliceError, SpliceFailure, SpliceStats};

/// Settings of a [`TunnelClient`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// QUIC transport tuning.
    pub tuning: Tuning,
    /// Limit for the QUIC/TLS handshake with a gateway.
    pub connect_timeout: Duration,
    /// Limit for a whole [`TunnelClient::open`], and for a
    /// [`TunnelClient::carry`] until the answer: connection (if needed),
    /// stream, request and the gateway's answer (which includes the gateway
    /// connecting to the service).
    pub open_timeout: Duration,
    /// How many of the caller's bytes [`TunnelClient::carry`] sends before
    /// the gateway's answer; beyond that it stops reading the caller until
    /// the answer allows the connection. Enough for a first flight (a TLS
    /// ClientHello, an HTTP request); it bounds how much of the QUIC
    /// connection's flow-control window streams still waiting for their
    /// answer can hold, so they cannot stall the connections already open.
    pub max_bytes_before_answer: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            tuning: Tuning::default(),
            connect_timeout: Duration::from_secs(5),
            open_timeout: Duration::from_secs(10),
            max_bytes_before_answer: 64 * 1024,
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

    /// Carries `tcp` (the caller's connection) through `gateway` to
    /// `request`'s destination, pipelined: the request goes out on a new
    /// stream of the pooled connection and the caller's bytes follow at once
    /// (at most [`ClientOptions::max_bytes_before_answer`] of them before
    /// the answer), while the way back waits for the gateway's answer.
    ///
    /// * `expected_peer`: the identity the gateway must have proved. It is
    ///   checked on the pooled connection before the stream is opened;
    ///   another one → [`TunnelError::UnexpectedPeer`], and the gateway gets
    ///   nothing.
    /// * `on_answer` is called once, as soon as the outcome of the open is
    ///   known and before any byte from the gateway reaches the caller: with
    ///   the answer and the gateway's identity if the gateway allowed the
    ///   connection, else with the error this call then returns (denied,
    ///   gateway unreachable, handshake refused, timeout, closed by a
    ///   re-evaluation before the answer, ...). It runs on the connection's
    ///   task, so it should be quick (record the decision and return).
    ///   Not called if this future is dropped first.
    ///
    /// Returns once both directions have ended: Ok with what was carried;
    /// on error the caller's connection has been reset (`SO_LINGER` 0) and
    /// the stream too. A failure after the allow is [`TunnelError::Splice`].
    /// A pooled connection found dead before the answer is replaced and the
    /// open retried once, if none of the caller's bytes had been sent yet.
    /// The part until the answer is bounded by
    /// [`ClientOptions::open_timeout`]; a client re-evaluation
    /// ([`TunnelClient::reevaluate`]) closes the connection from the start,
    /// before the answer too ([`TunnelError::Aborted`]).
    pub async fn carry<F>(
        &self,
        gateway: SocketAddr,
        expected_peer: Option<&SpiffeId>,
        request: OpenRequest,
        mut tcp: TcpStream,
        on_answer: F,
    ) -> Result<SpliceStats, TunnelError>
    where
        F: FnOnce(Result<(&OpenAnswer, &PeerIdentity), &TunnelError>) + Send,
    {
        let mut on_answer = Some(on_answer);
        let result = self
            .carry_on(gateway, expected_peer, request, &mut tcp, &mut on_answer)
            .await;
        if let Err(error) = &result {
            // The caller learns first.
            splice::reset(tcp);
            if let Some(report) = on_answer.take() {
                report(Err(error));
            }
        }
        result
    }

    async fn carry_on<F>(
        &self,
        gateway: SocketAddr,
        expected_peer: Option<&SpiffeId>,
        request: OpenRequest,
        tcp: &mut TcpStream,
        on_answer: &mut Option<F>,
    ) -> Result<SpliceStats, TunnelError>
    where
        F: FnOnce(Result<(&OpenAnswer, &PeerIdentity), &TunnelError>) + Send,
    {
        request.destination()?;
        let header = encode_header(&request)?;
        // Interactive protocols must not wait for Nagle (as in the splice).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY failed");
        }
        // Registered from the start: a re-evaluation also closes connections
        // still waiting for their answer.
        let mut registration = self.inner.live.register(Arc::new(request));
        let mut abort = registration.take_abort();
        let limit = self.inner.options.open_timeout;
        let carrying = Carrying {
            gateway,
            header: &header,
            deadline: Instant::now() + limit,
            limit,
        };
        let timed_out = || carrying.timed_out();
        let mut retried = false;
        loop {
            let (pooled, fresh) =
                tokio::time::timeout_at(carrying.deadline, self.connection(gateway))
                    .await
                    .map_err(|_| timed_out())??;
            if let Some(expected) = expected_peer {
                if pooled.gateway.id != *expected {
                    return Err(TunnelError::UnexpectedPeer {
                        gateway,
                        expected: Box::new(expected.clone()),
                        presented: Box::new(pooled.gateway.id.clone()),
                    });
                }
            }
            // Not a handshake refusal: `from_connection` files those under
            // `Handshake`, and they are not retried.
            let may_retry = |error: &TunnelError| {
                !fresh && !retried && matches!(error, TunnelError::Connection { .. })
            };
            let streams =
                match tokio::time::timeout_at(carrying.deadline, pooled.connection.open_bi()).await
                {
                    Ok(Ok(streams)) => streams,
                    Ok(Err(e)) => {
                        let error = TunnelError::from_connection(gateway, e);
                        if may_retry(&error) {
                            retried = true;
                            continue;
                        }
                        return Err(error);
                    }
                    Err(_) => return Err(timed_out()),
                };
            match self
                .pipeline(
                    &carrying,
                    streams,
                    tcp,
                    &pooled.gateway,
                    &mut abort,
                    on_answer,
                )
                .await
            {
                Attempt::Retry(error) if may_retry(&error) => {
                    tracing::debug!(%gateway, %error,
                        "pooled connection lost before the answer; retrying on a new connection");
                    retried = true;
                }
                Attempt::Retry(error) => return Err(error),
                Attempt::Done(result) => return result,
            }
        }
    }

    /// One attempt of [`TunnelClient::carry`] on an open stream.
    async fn pipeline<F>(
        &self,
        carrying: &Carrying<'_>,
        (send, recv): (SendStream, RecvStream),
        tcp: &mut TcpStream,
        peer: &PeerIdentity,
        abort: &mut Option<oneshot::Receiver<ErrorCode>>,
        on_answer: &mut Option<F>,
    ) -> Attempt
    where
        F: FnOnce(Result<(&OpenAnswer, &PeerIdentity), &TunnelError>) + Send,
    {
        let copy_buffer = self.inner.options.tuning.copy_buffer;
        // Reset, stream and caller, if this is dropped half-way.
        let mut ends = Ends::new(send, recv, tcp);
        let gate = Gate::closed();
        let (mut up_count, mut down_count) = (0u64, 0u64);
        // Whether the caller's side failed before the answer.
        let mut caller_failed = false;
        let outcome: Result<(), Failure> = 'carry: {
            let (mut tcp_read, mut tcp_write) = ends.tcp.split();
            let mut up = pin!(splice::tcp_to_quic(
                &mut tcp_read,
                &mut ends.send,
                copy_buffer,
                &mut up_count,
                Some(Pipelined {
                    header: carrying.header,
                    gate: &gate,
                    limit: self.inner.options.max_bytes_before_answer,
                }),
            ));
            let mut up_done = false;
            let mut up_failure = None;
            // Until the answer: the caller's bytes go (up to the limit),
            // nothing comes back.
            let answer = {
                let mut answer = pin!(read_header::<OpenAnswer>(&mut ends.recv));
                let mut expired = pin!(tokio::time::sleep_until(carrying.deadline));
                loop {
                    tokio::select! {
                        read = &mut answer => {
                            break read.map_err(|e| answer_error(carrying.gateway, e));
                        }
                        result = &mut up, if !up_done => {
                            // Failed or finished, the answer is still what
                            // the connection is reported with. (A refusal
                            // stops the stream, so the caller's side may
                            // fail with `PeerStopped` just before it.)
                            up_done = true;
                            if let Err(failure) = result {
                                caller_failed = matches!(failure, SpliceFailure::Tcp(_));
                                up_failure = Some(failure);
                            }
                        }
                        code = splice::aborted(abort) => break Err(TunnelError::Aborted(code)),
                        () = &mut expired => break Err(carrying.timed_out()),
                    }
                }
            };
            let answer = match answer {
                Ok(answer) => answer,
                Err(error) => break 'carry Err(Failure::Open(error)),
            };
            if !answer.allowed {
                break 'carry Err(Failure::Open(TunnelError::Denied {
                    reason: answer.reason(),
                    rule_id: answer.rule_id,
                    detail: answer.detail,
                    policy_version: answer.policy_version,
                }));
            }
            if let Some(report) = on_answer.take() {
                report(Ok((&answer, peer)));
            }
            if let Some(failure) = up_failure {
                break 'carry Err(Failure::Splice(failure));
            }
            // Allowed: the rest of the caller's bytes may go, and the
            // service's come back.
            gate.open();
            let mut down = pin!(splice::quic_to_tcp(
                &mut ends.recv,
                &mut tcp_write,
                copy_buffer,
                &mut down_count
            ));
            let mut down_done = false;
            while !(up_done && down_done) {
                tokio::select! {
                    result = &mut up, if !up_done => match result {
                        Ok(()) => up_done = true,
                        Err(failure) => break 'carry Err(Failure::Splice(failure)),
                    },
                    result = &mut down, if !down_done => match result {
                        Ok(()) => down_done = true,
                        Err(failure) => break 'carry Err(Failure::Splice(failure)),
                    },
                    code = splice::aborted(abort) => {
                        break 'carry Err(Failure::Splice(SpliceFailure::Aborted(code)));
                    }
                }
            }
            Ok(())
        };
        let stats = SpliceStats {
            tcp_to_tunnel: up_count,
            tunnel_to_tcp: down_count,
        };
        let failure = match outcome {
            Ok(()) => {
                ends.ended();
                return Attempt::Done(Ok(stats));
            }
            Err(failure) => failure,
        };
        let code = match &failure {
            Failure::Open(TunnelError::Denied { .. }) => ErrorCode::Denied,
            Failure::Open(TunnelError::Aborted(code))
            | Failure::Splice(SpliceFailure::Aborted(code)) => *code,
            _ => ErrorCode::TcpReset,
        };
        // The caller's connection is reset by `carry`, unless this is tried
        // again.
        ends.abandon(code);
        match failure {
            // Nothing of the caller's was sent (or lost): may go again.
            Failure::Open(error) if up_count == 0 && !caller_failed => Attempt::Retry(error),
            Failure::Open(error) => Attempt::Done(Err(error)),
            Failure::Splice(failure) => {
                Attempt::Done(Err(TunnelError::Splice(SpliceError { failure, stats })))
            }
        }
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

    /// Closes the pooled connections to gateways that `refused` names (a
    /// gateway whose device was just revoked): every stream on them ends at
    /// once (the callers' TCP connections are reset), and the next stream to
    /// that address needs a new connection, whose handshake checks the
    /// gateway again. Returns how many connections were closed.
    pub fn close_gateways(&self, refused: impl Fn(&PeerIdentity) -> bool) -> usize {
        let slots: Vec<(SocketAddr, Arc<Slot>)> = self
            .pool()
            .iter()
            .map(|(gateway, slot)| (*gateway, Arc::clone(slot)))
            .collect();
        let mut closed = 0;
        for (gateway, slot) in slots {
            let Some(Ok(pooled)) = slot.get() else {
                continue;
            };
            if refused(&pooled.gateway) {
                self.evict(gateway, &slot);
                pooled
                    .connection
                    .close(ErrorCode::Revoked.varint(), b"gateway revoked");
                closed += 1;
            }
        }
        closed
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

/// What every attempt of one [`TunnelClient::carry`] shares.
struct Carrying<'a> {
    gateway: SocketAddr,
    /// The encoded request.
    header: &'a [u8],
    /// When the answer must have come.
    deadline: Instant,
    /// [`ClientOptions::open_timeout`].
    limit: Duration,
}

impl Carrying<'_> {
    fn timed_out(&self) -> TunnelError {
        TunnelError::Timeout {
            what: "opening a tunnelled connection",
            after: self.limit,
        }
    }
}

/// How one attempt of a [`TunnelClient::carry`] ended.
enum Attempt {
    /// Failed before the answer without having sent any of the caller's
    /// bytes: may be tried again on a new connection.
    Retry(TunnelError),
    /// For good.
    Done(Result<SpliceStats, TunnelError>),
}

/// Why a pipelined connection failed.
enum Failure {
    /// Before (or with) the answer.
    Open(TunnelError),
    /// After the allow.
    Splice(SpliceFailure),
}

/// What a failure to read the gateway's answer means.
fn answer_error(gateway: SocketAddr, error: HeaderError) -> TunnelError {
    match error {
        HeaderError::Read(quinn::ReadError::Reset(code)) => TunnelError::Reset {
            peer: gateway,
            code,
        },
        HeaderError::Read(quinn::ReadError::ConnectionLost(e)) => {
            TunnelError::from_connection(gateway, e)
        }
        HeaderError::Truncated => {
            TunnelError::Protocol("the gateway ended the stream without answering".into())
        }
        other => TunnelError::Protocol(format!("reading the gateway's answer: {other}")),
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
        .map_err(|e| answer_error(gateway, e))?;
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
