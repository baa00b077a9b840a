//! What the loopback tests share: a CA in a temporary directory issuing
//! device certificates, a recording policy, TCP services, and a gateway run
//! in the background.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zt_identity::{
    tls, CertificateAuthority, DeviceKey, PeerMatcher, RevocationList, SharedRevocationList,
    SpiffeId, TrustDomain,
};
use zt_tunnel::{
    Authorization, Authorizer, DenyReason, Gateway, GatewayDecision, GatewayHandle, GatewayOptions,
    OpenAnswer, OpenRequest, PeerCheck, PeerIdentity, SpliceError, SpliceStats, TunnelClient,
    TunnelError,
};

pub const TRUST_DOMAIN: &str = "pref.example";
/// Upper bound for anything a test waits for.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "zt_tunnel=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Awaits `future` for at most [`PATIENCE`].
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {PATIENCE:?}"))
}

/// A CA made in a temporary directory.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
}

/// A device key and the certificate the CA issued for it.
pub struct Device {
    pub id: SpiffeId,
    pub key: DeviceKey,
    pub cert: zt_identity::IssuedCertificate,
}

impl Pki {
    pub fn new() -> Self {
        Self::with_trust_domain(TRUST_DOMAIN)
    }

    pub fn with_trust_domain(trust_domain: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new(trust_domain).unwrap();
        let ca = CertificateAuthority::create(&dir.path().join("ca"), &td).unwrap();
        Self { _dir: dir, ca }
    }

    pub fn device(&self, org: &str, name: &str) -> Device {
        let id = SpiffeId::device(self.ca.trust_domain(), org, name).unwrap();
        let key = DeviceKey::generate().unwrap();
        let cert = self
            .ca
            .sign_csr(
                &key.csr_pem().unwrap(),
                &id,
                Duration::from_secs(3600),
                std::time::SystemTime::now(),
            )
            .unwrap();
        Device { id, key, cert }
    }

    /// An agent's client config: `device`'s certificate, the gateway
    /// verified by SPIFFE id `gateway`.
    pub fn client_tls(&self, device: &Device, gateway: &SpiffeId) -> rustls::ClientConfig {
        tls::spiffe_client_config(
            &self.ca.bundle_der(),
            vec![device.cert.der.clone()],
            device.key.private_key_der(),
            PeerMatcher::Exact(gateway.clone()),
            None,
        )
        .unwrap()
    }

    /// A gateway's server config: client certificates required, checked
    /// against `revocations` at each handshake.
    pub fn gateway_tls(
        &self,
        device: &Device,
        revocations: SharedRevocationList,
    ) -> rustls::ServerConfig {
        tls::server_config_with_revocation(
            &self.ca.bundle_der(),
            vec![device.cert.der.clone()],
            device.key.private_key_der(),
            true,
            revocations,
        )
        .unwrap()
    }
}

/// A policy that allows everything except what the test says, and records
/// every question.
#[derive(Default)]
pub struct TestPolicy {
    pub seen: Mutex<Vec<(PeerIdentity, OpenRequest)>>,
    /// Connection ids to deny.
    pub denied: Mutex<HashSet<String>>,
    /// Devices refused as revoked.
    pub revoked: Mutex<HashSet<SpiffeId>>,
    /// Where to send allowed connections instead of their destination.
    pub target: Mutex<Option<SocketAddr>>,
    /// Connection ids whose authorization takes this long.
    pub slow: Mutex<HashMap<String, Duration>>,
}

pub const ALLOW_RULE: &str = "allow-test";
pub const DENY_RULE: &str = "deny-test";

impl TestPolicy {
    pub fn deny(&self, connection_id: &str) {
        self.denied.lock().unwrap().insert(connection_id.to_owned());
    }

    pub fn revoke(&self, id: &SpiffeId) {
        self.revoked.lock().unwrap().insert(id.clone());
    }

    pub fn seen(&self) -> Vec<(PeerIdentity, OpenRequest)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Authorizer for TestPolicy {
    fn authorize(&self, peer: &PeerIdentity, request: &OpenRequest) -> Authorization {
        self.seen
            .lock()
            .unwrap()
            .push((peer.clone(), request.clone()));
        let slow = self
            .slow
            .lock()
            .unwrap()
            .get(&request.connection_id)
            .copied();
        if let Some(delay) = slow {
            // A slow policy backend; the worker hands its other tasks on.
            tokio::task::block_in_place(|| std::thread::sleep(delay));
        }
        if self.revoked.lock().unwrap().contains(&peer.id) {
            return Authorization::deny(DenyReason::Revoked, DENY_RULE, 2, "device revoked");
        }
        if self.denied.lock().unwrap().contains(&request.connection_id) {
            return Authorization::deny(DenyReason::Policy, DENY_RULE, 2, "test says no");
        }
        let allow = Authorization::allow(ALLOW_RULE, 1);
        match *self.target.lock().unwrap() {
            Some(target) => allow.with_target(target),
            None => allow,
        }
    }

    fn check_peer(&self, peer: &PeerIdentity) -> PeerCheck {
        if self.revoked.lock().unwrap().contains(&peer.id) {
            PeerCheck::Refuse {
                reason: DenyReason::Revoked,
                detail: "device revoked".into(),
            }
        } else {
            PeerCheck::Admit
        }
    }
}

/// How a test service treats a connection.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Echo everything as it arrives; shut down writing after EOF.
    Echo,
    /// Read the whole request until EOF, then answer `got <n>\n` followed by
    /// the request reversed, then shut down writing (needs half-close).
    ReplyAfterEof,
    /// Accept and hold the connection until the peer closes it.
    Hold,
}

/// How a service connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceEnd {
    /// Clean EOF from the tunnel side.
    Eof,
    /// An error (reset) from the tunnel side.
    Error(std::io::ErrorKind),
}

/// A TCP service on loopback.
pub struct Service {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub ends: mpsc::UnboundedReceiver<ServiceEnd>,
    task: JoinHandle<()>,
}

impl Service {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = listen_wide("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (end_tx, ends) = mpsc::unbounded_channel();
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let end_tx = end_tx.clone();
                tokio::spawn(async move {
                    let end = serve(socket, behaviour).await;
                    let _ = end_tx.send(end);
                });
            }
        });
        Self {
            addr,
            accepted,
            ends,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback listener whose backlog takes a burst of a thousand connects
/// (tokio's default is 1,024 in all). With a smaller one, a burst that
/// arrives while the accept loop is starved of CPU overflows the SYN queue;
/// the kernel then answers with SYN cookies, and a connection whose first
/// data segment was dropped for want of room in the accept queue cannot
/// prove its cookie with the next one and is reset by the listener.
fn listen_wide(addr: SocketAddr) -> TcpListener {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(4096).unwrap();
    socket.set_nonblocking(true).unwrap();
    TcpListener::from_std(socket.into()).unwrap()
}

async fn serve(mut socket: TcpStream, behaviour: Behaviour) -> ServiceEnd {
    let result: std::io::Result<()> = async {
        match behaviour {
            Behaviour::Echo => {
                let (mut read, mut write) = socket.split();
                tokio::io::copy(&mut read, &mut write).await?;
                write.shutdown().await?;
            }
            Behaviour::ReplyAfterEof => {
                let mut request = Vec::new();
                socket.read_to_end(&mut request).await?;
                let mut reply = format!("got {}\n", request.len()).into_bytes();
                reply.extend(request.iter().rev());
                socket.write_all(&reply).await?;
                socket.shutdown().await?;
            }
            Behaviour::Hold => {
                let mut sink = Vec::new();
                socket.read_to_end(&mut sink).await?;
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => ServiceEnd::Eof,
        Err(e) => ServiceEnd::Error(e.kind()),
    }
}

/// A gateway running in the background.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub handle: GatewayHandle,
    pub decisions: mpsc::Receiver<GatewayDecision>,
    pub policy: Arc<TestPolicy>,
    pub revocations: SharedRevocationList,
    pub device: Device,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RunningGateway {
    pub async fn start(pki: &Pki) -> Self {
        let device = pki.device("city-a", "gateway-1");
        Self::start_with(
            pki,
            device,
            "127.0.0.1:0".parse().unwrap(),
            GatewayOptions::default(),
        )
        .await
    }

    /// A gateway with identity `device` on `listen`.
    pub async fn start_with(
        pki: &Pki,
        device: Device,
        listen: SocketAddr,
        options: GatewayOptions,
    ) -> Self {
        Self::try_start_with(pki, device, listen, options).unwrap()
    }

    /// [`RunningGateway::start_with`], failing if the address is taken.
    pub fn try_start_with(
        pki: &Pki,
        device: Device,
        listen: SocketAddr,
        options: GatewayOptions,
    ) -> Result<Self, TunnelError> {
        let revocations = RevocationList::new().shared();
        let policy = Arc::new(TestPolicy::default());
        let (decision_tx, decisions) = mpsc::channel(4096);
        let gateway = Gateway::bind_with_options(
            listen,
            pki.gateway_tls(&device, revocations.clone()),
            Arc::clone(&policy) as Arc<dyn Authorizer>,
            decision_tx,
            options,
        )?;
        let (shutdown, stop) = oneshot::channel::<()>();
        let addr = gateway.local_addr();
        let handle = gateway.handle();
        let task = tokio::spawn(async move { gateway.run(stop).await });
        Ok(Self {
            addr,
            handle,
            decisions,
            policy,
            revocations,
            device,
            shutdown: Some(shutdown),
            task: Some(task),
        })
    }

    /// A client for a new device of `org`, verifying this gateway.
    pub fn client(&self, pki: &Pki, name: &str) -> (TunnelClient, Device) {
        let device = pki.device("city-a", name);
        let client = TunnelClient::new(
            "127.0.0.1:0".parse().unwrap(),
            pki.client_tls(&device, &self.device.id),
        )
        .unwrap();
        (client, device)
    }

    /// The next decision record.
    pub async fn decision(&mut self) -> GatewayDecision {
        within("gateway decision", self.decisions.recv())
            .await
            .expect("decision channel closed")
    }

    /// Stops the gateway and waits for it.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            within("gateway shutdown", task).await.unwrap();
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A request as the agent would make it for the redirected connection.
pub fn request(connection_id: &str, destination: SocketAddr) -> OpenRequest {
    OpenRequest {
        connection_id: connection_id.into(),
        uid: 1000,
        user: "alice".into(),
        pid: 4242,
        exe: "/usr/bin/curl".into(),
        exe_sha256: "ab".repeat(32),
        policy_version: 7,
        rule_id: "tunnel-intranet".into(),
        ..OpenRequest::to(destination)
    }
}

/// Opens a tunnelled connection and splices it to a fresh TCP connection,
/// as the agent does with the redirected caller: returns the caller's end
/// and the splice task.
pub async fn tunnel(
    client: &TunnelClient,
    gateway: SocketAddr,
    request: &OpenRequest,
) -> Result<(TcpStream, JoinHandle<Result<SpliceStats, SpliceError>>), TunnelError> {
    let stream = client.open(gateway, request).await?;
    let (caller, agent_side) = tcp_pair().await;
    let splice = tokio::spawn(stream.splice(agent_side));
    Ok((caller, splice))
}

/// What a pipelined connection's `on_answer` was told, and when: the
/// answer and the gateway's identity, or the error as text.
pub type Told = (Result<(OpenAnswer, PeerIdentity), String>, Instant);

/// A connection carried through the pipelined path, as the agent does.
pub struct Carried {
    /// The caller's end.
    pub caller: TcpStream,
    /// What `on_answer` was told.
    pub told: oneshot::Receiver<Told>,
    /// The `carry` call.
    pub task: JoinHandle<Result<SpliceStats, TunnelError>>,
}

/// Carries a fresh TCP connection through `client.carry`, the caller having
/// sent `early` before (so it is there when the request goes).
pub async fn carried(
    client: &TunnelClient,
    gateway: SocketAddr,
    expected: Option<SpiffeId>,
    request: OpenRequest,
    early: &[u8],
) -> Carried {
    let (mut caller, agent_side) = tcp_pair().await;
    if !early.is_empty() {
        caller.write_all(early).await.unwrap();
    }
    let (tell, told) = oneshot::channel();
    let client = client.clone();
    let task = tokio::spawn(async move {
        client
            .carry(
                gateway,
                expected.as_ref(),
                request,
                agent_side,
                move |answer| {
                    let answer = answer
                        .map(|(answer, peer)| (answer.clone(), peer.clone()))
                        .map_err(|e| e.to_string());
                    let _ = tell.send((answer, Instant::now()));
                },
            )
            .await
    });
    Carried { caller, told, task }
}

/// Two ends of a loopback TCP connection.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

/// Deterministic pseudo-random bytes (xorshift), distinct per `seed`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// A UDP relay between a client and a gateway whose far end can be switched
/// to another gateway: to the client, the gateway it was talking to has lost
/// all its state at once, without a word (as after a crash and restart).
pub struct Relay {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    /// When the client last sent a datagram.
    client_spoke: Arc<Mutex<Instant>>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let current = Arc::clone(&target);
        let client_spoke = Arc::new(Mutex::new(Instant::now()));
        let spoke = Arc::clone(&client_spoke);
        let task = tokio::spawn(async move {
            let mut client = None;
            let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        *spoke.lock().unwrap() = Instant::now();
                        let to = *current.lock().unwrap();
                        let _ = back.send_to(&up[..n], to).await;
                    }
                    Ok((n, from)) = back.recv_from(&mut down) => {
                        // Whatever the old gateway still says is lost.
                        let to = *current.lock().unwrap();
                        if let (true, Some(client)) = (from == to, client) {
                            let _ = front.send_to(&down[..n], client).await;
                        }
                    }
                }
            }
        });
        Self {
            addr,
            target,
            client_spoke,
            task,
        }
    }

    /// From now on, relays to `target`; first waits until the client has
    /// been silent for well over QUIC's acknowledgement delay, so that
    /// nothing it still owed the old gateway (a late ACK) reaches the new
    /// one and tells the client early that its connection is gone: the
    /// client's next datagram is the next thing the test makes it send.
    pub async fn switch(&self, target: SocketAddr) {
        const QUIET: Duration = Duration::from_millis(200);
        within("client silent", async {
            loop {
                let since = self.client_spoke.lock().unwrap().elapsed();
                if since >= QUIET {
                    break;
                }
                tokio::time::sleep(QUIET - since).await;
            }
        })
        .await;
        *self.target.lock().unwrap() = target;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
