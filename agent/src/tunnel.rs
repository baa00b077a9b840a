//! The agent's two halves of the zero-trust tunnel, on top of the `tunnel`
//! crate's QUIC transport.
//!
//! * **Calling side.** The kernel redirects a connection the policy wants
//!   tunnelled to the loopback listener here. The listener recovers where
//!   it was going and who made it (pid, uid from the kernel at `connect()`;
//!   the executable and its hash through `/proc/<pid>/exe`; the user name),
//!   and carries it to the rule's gateway over the pooled QUIC connection,
//!   one stream per TCP connection. A refusal resets the caller's
//!   connection. Each connection is a decision record.
//! * **Gateway side.** Peers' streams are authorised against the policy's
//!   services and access rules (device, user, process, destination), the
//!   revocation list, and the control channel's health (fail closed or open
//!   per service class); each decision is a record.
//!
//! A new policy or revocation list re-checks every live stream, closing the
//! ones no longer allowed.

use std::{
    net::{Ipv6Addr, SocketAddr},
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use agent_common::{TunnelOrigin, VerdictAction};
use proto::telemetry::{event::Kind, Decision as WireDecision, Event};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tracing::{debug, info, warn};
use zt_identity::SharedRevocationList;
use zt_tunnel::{
    Authorization, Authorizer, DecisionKind, DenyReason, GatewayDecision, OpenRequest, PeerCheck,
    PeerIdentity, TunnelClient, TunnelError,
};

use crate::{
    access::{Flow, ServiceClass},
    exe_hash::{Lookup, SharedExeHasher},
    guard::{self, SharedPolicy, TunnelOrigins},
    metrics::AgentMetrics,
    sensors::Sequencer,
    users::UserNames,
};

/// The loopback listener redirected connections arrive at: 127.0.0.1 and,
/// where the host has IPv6, ::1, on one port.
pub struct TunnelListener {
    v4: TcpListener,
    v6: Option<TcpListener>,
}

impl TunnelListener {
    /// Binds `port` (0: a free one) on 127.0.0.1, then the same on ::1.
    pub async fn bind(port: u16) -> std::io::Result<Self> {
        let v4 = listen(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)))?;
        let port = v4.local_addr()?.port();
        let v6 = match listen(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
            Ok(listener) => Some(listener),
            Err(err) => {
                warn!(port, error = %err, "no IPv6 tunnel listener: tunnelled IPv6 connections will be refused");
                None
            }
        };
        Ok(Self { v4, v6 })
    }

    pub fn port(&self) -> u16 {
        self.v4.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        match &self.v6 {
            Some(v6) => tokio::select! {
                accepted = self.v4.accept() => accepted,
                accepted = v6.accept() => accepted,
            },
            None => self.v4.accept().await,
        }
    }
}

/// Every connection of the guarded processes to a tunnelled destination
/// arrives here at once, so the accept queue is as long as the kernel
/// allows (`net.core.somaxconn` caps it).
const LISTEN_BACKLOG: u32 = 65_535;

fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Decision records into the event stream, numbered with the sensors'
/// events. Never blocks a connection: a full queue drops the record and
/// counts it.
#[derive(Clone)]
pub struct DecisionSink {
    pub events: mpsc::Sender<Event>,
    pub sequencer: Sequencer,
    pub metrics: Arc<AgentMetrics>,
}

impl DecisionSink {
    pub fn record(&self, decision: WireDecision) {
        let event = Event {
            seq: self.sequencer.next(),
            time_unix_ns: crate::clock::unix_now_ns(),
            ancestors: Vec::new(),
            kind: Some(Kind::Decision(decision)),
        };
        if self.events.try_send(event).is_err() {
            AgentMetrics::add(&self.metrics.decisions_dropped, 1);
        }
    }
}

/// Who made a redirected connection, beyond the kernel's ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub exe: String,
    pub exe_sha256: String,
    pub user: String,
}

/// Resolves callers: executable through `/proc/<pid>/exe` (the running
/// image, even when the file was replaced), its hash from the agent's cache
/// by file version (the exec sensor hashed it when the program started),
/// user names from the passwd file.
pub struct CallerResolver {
    hasher: SharedExeHasher,
    users: Mutex<UserNames>,
}

impl CallerResolver {
    pub fn new(hasher: SharedExeHasher) -> Self {
        Self {
            hasher,
            users: Mutex::new(UserNames::default()),
        }
    }

    pub async fn resolve(&self, pid: u32, uid: u32) -> Caller {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let user = self
            .users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .name(uid)
            .unwrap_or_default()
            .to_owned();
        let lookup = self
            .hasher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lookup(pid, &exe);
        let exe_sha256 = match lookup {
            Lookup::Cached(hash) => hash,
            Lookup::New(file) => {
                // A binary not seen before is read off the runtime's workers.
                match tokio::task::spawn_blocking(move || file.compute()).await {
                    Ok((version, Some(hash))) => {
                        self.hasher
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remember(version, &hash);
                        hash
                    }
                    _ => String::new(),
                }
            }
            Lookup::Unreadable => String::new(),
        };
        Caller {
            exe,
            exe_sha256,
            user,
        }
    }
}

/// The calling side: accepts redirected connections and tunnels them.
pub struct TunnelCaller {
    pub policy: SharedPolicy,
    pub origins: TunnelOrigins,
    pub client: TunnelClient,
    pub callers: CallerResolver,
    pub decisions: DecisionSink,
}

impl TunnelCaller {
    /// Accepts redirected connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TunnelListener) {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    let caller = self.clone();
                    tokio::spawn(async move { caller.carry(tcp, peer).await });
                }
                Err(err) => {
                    warn!(error = %err, "tunnel listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn carry(&self, tcp: TcpStream, peer: SocketAddr) {
        let Some(origin) = self.origins.take_origin(peer) else {
            // Someone connected to the listener directly: nothing to carry.
            debug!(%peer, "connection to the tunnel listener that the guard did not redirect");
            zt_tunnel::reset(tcp);
            return;
        };
        let destination = guard::destination(&origin);
        let (rule_id, route) = {
            let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
            (
                policy.rule_id(origin.rule).to_owned(),
                policy.tunnel_routes.get(&origin.rule).cloned(),
            )
        };
        let caller = self.callers.resolve(origin.pid, origin.uid).await;
        let connection_id = uuid::Uuid::new_v4().simple().to_string();
        let mut record = caller_record(&origin, destination, &caller, &connection_id, &rule_id);
        let Some(route) = route else {
            // The policy changed between connect() and accept().
            zt_tunnel::reset(tcp);
            record.verdict = "denied".into();
            record.reason = "policy".into();
            self.decisions.record(record);
            return;
        };
        record.gateway = route.gateway.to_string();
        let mut request = OpenRequest {
            connection_id,
            uid: origin.uid,
            user: caller.user,
            pid: origin.pid,
            exe: caller.exe,
            exe_sha256: caller.exe_sha256,
            policy_version: origin.policy_version,
            rule_id,
            ..OpenRequest::default()
        };
        request.set_destination(destination);
        let metrics = &self.decisions.metrics;
        // Pipelined: the caller's bytes start towards the gateway at once;
        // the decision is recorded the moment the answer arrives, before any
        // byte from the gateway reaches the caller. The gateway's identity is
        // checked on the pooled connection before the stream is opened.
        let carried = self
            .client
            .carry(
                route.gateway,
                route.gateway_id.as_ref(),
                request,
                tcp,
                |answer| match answer {
                    Ok((_, gateway)) => {
                        record.peer_id = gateway.id.to_string();
                        record.verdict = "tunnelled".into();
                        self.decisions.record(record);
                        AgentMetrics::add(&metrics.tunnel_opened, 1);
                    }
                    Err(TunnelError::Denied {
                        reason,
                        rule_id: gateway_rule,
                        detail,
                        ..
                    }) => {
                        info!(%destination, pid = origin.pid, exe = %record.exe, %reason, gateway_rule = %gateway_rule, detail = %detail, "gateway refused a tunnelled connection");
                        record.verdict = "denied".into();
                        record.reason = reason_name(*reason).into();
                        self.decisions.record(record);
                        AgentMetrics::add(&metrics.tunnel_refused, 1);
                    }
                    Err(TunnelError::UnexpectedPeer {
                        presented,
                        expected,
                        ..
                    }) => {
                        warn!(gateway = %route.gateway, %presented, %expected, "gateway presented another identity; connection refused");
                        record.peer_id = presented.to_string();
                        record.verdict = "denied".into();
                        record.reason = "gateway_unreachable".into();
                        self.decisions.record(record);
                        AgentMetrics::add(&metrics.tunnel_failed, 1);
                    }
                    Err(TunnelError::Aborted(_)) => {
                        // The policy changed before the gateway answered, as when
                        // the route is gone by the time of accept().
                        record.verdict = "denied".into();
                        record.reason = "policy".into();
                        self.decisions.record(record);
                    }
                    Err(err) => {
                        warn!(%destination, gateway = %route.gateway, error = %err, "tunnel to the gateway failed; connection refused");
                        record.verdict = "denied".into();
                        record.reason = "gateway_unreachable".into();
                        self.decisions.record(record);
                        AgentMetrics::add(&metrics.tunnel_failed, 1);
                    }
                },
            )
            .await;
        if let Err(err @ TunnelError::Splice(_)) = carried {
            debug!(%destination, error = %err, "tunnelled connection ended with an error");
        }
    }

    /// Closes live tunnelled streams the policy in force no longer sends to
    /// the same gateway; returns how many.
    pub fn reevaluate(&self) -> usize {
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.client.reevaluate(|request| {
            let Ok(destination) = request.destination() else {
                return false;
            };
            let verdict = policy.verdict_for(destination);
            VerdictAction::from_u32(verdict.action) == Some(VerdictAction::Tunnel)
                && policy.rule_id(verdict.rule) == request.rule_id
        })
    }
}

/// The calling side's record of a connection, before the gateway answers.
fn caller_record(
    origin: &TunnelOrigin,
    destination: SocketAddr,
    caller: &Caller,
    connection_id: &str,
    rule_id: &str,
) -> WireDecision {
    WireDecision {
        connection_id: connection_id.to_owned(),
        pid: origin.pid,
        uid: origin.uid,
        gid: origin.gid,
        cgroup_id: origin.cgroup_id,
        exe: caller.exe.clone(),
        user_name: caller.user.clone(),
        ip_version: if destination.is_ipv4() { 4 } else { 6 },
        remote_addr: destination.ip().to_string(),
        remote_port: u32::from(destination.port()),
        protocol: "tcp".into(),
        action: "tunnel".into(),
        rule_id: rule_id.to_owned(),
        policy_version: origin.policy_version,
        enforcement_point: "tunnel".into(),
        exe_sha256: caller.exe_sha256.clone(),
        direction: "outbound".into(),
        ..WireDecision::default()
    }
}

/// The gateway's policy check of each tunnelled stream.
pub struct GatewayAuthorizer {
    pub policy: SharedPolicy,
    pub revocations: SharedRevocationList,
    pub metrics: Arc<AgentMetrics>,
    /// How long the revocation list is trusted once the control channel is
    /// down.
    pub revocations_max_age: Duration,
}

impl GatewayAuthorizer {
    /// Whether the revocation list can be taken as current: the control
    /// channel is open, or was within `revocations_max_age`.
    fn revocations_current(&self) -> bool {
        let metrics = &self.metrics;
        if metrics.control_channel_up.load(Ordering::Relaxed) {
            return true;
        }
        let seen = metrics.control_channel_seen_unix.load(Ordering::Relaxed);
        seen != 0
            && crate::clock::unix_now_secs().saturating_sub(seen)
                <= self.revocations_max_age.as_secs()
    }
}

impl Authorizer for GatewayAuthorizer {
    /// At every new connection and every re-check: a revoked peer's whole
    /// connection goes.
    fn check_peer(&self, peer: &PeerIdentity) -> PeerCheck {
        if peer.is_revoked(&self.revocations.read().unwrap_or_else(|e| e.into_inner())) {
            PeerCheck::Refuse {
                reason: DenyReason::Revoked,
                detail: format!("{} is revoked", peer.id),
            }
        } else {
            PeerCheck::Admit
        }
    }

    fn authorize(&self, peer: &PeerIdentity, request: &OpenRequest) -> Authorization {
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let refuse = |reason, rule_id: &str, detail: String| Authorization {
            allowed: false,
            rule_id: rule_id.to_owned(),
            policy_version: policy.version(),
            reason,
            detail,
            target: None,
            service: None,
            nearest: Vec::new(),
        };
        let Ok(destination) = request.destination() else {
            return refuse(DenyReason::BadRequest, "", "bad destination".into());
        };
        let revoked = peer.is_revoked(&self.revocations.read().unwrap_or_else(|e| e.into_inner()));
        if revoked {
            return refuse(DenyReason::Revoked, "", format!("{} is revoked", peer.id));
        }
        let decision = policy.gateway.evaluate(&Flow {
            device: &peer.id,
            user: &request.user,
            exe: &request.exe,
            exe_sha256: &request.exe_sha256,
            destination,
        });
        let reason = match (&decision.service, decision.allowed) {
            (_, true) => DenyReason::Unspecified,
            (None, false) => DenyReason::NoService,
            (Some(_), false) => DenyReason::Policy,
        };
        let mut authorization = Authorization {
            allowed: decision.allowed,
            rule_id: decision.rule_id.clone(),
            policy_version: policy.version(),
            reason,
            detail: String::new(),
            target: Some(decision.target),
            service: decision.service.clone(),
            nearest: decision.nearest.clone(),
        };
        if decision.allowed && !self.revocations_current() {
            match decision.class {
                ServiceClass::Protected => {
                    authorization.allowed = false;
                    authorization.reason = DenyReason::FailClosed;
                    authorization.detail =
                        "the control plane is unreachable and this service fails closed".into();
                }
                ServiceClass::Standard => {
                    authorization.detail =
                        "admitted unverified: the control plane is unreachable".into();
                }
            }
        }
        authorization
    }
}

/// Turns the gateway's decisions into records until the gateway stops.
pub async fn record_gateway_decisions(
    mut decisions: mpsc::Receiver<GatewayDecision>,
    sink: DecisionSink,
    gateway: SocketAddr,
) {
    while let Some(decision) = decisions.recv().await {
        sink.record(gateway_record(&decision, gateway));
    }
}

fn gateway_record(d: &GatewayDecision, gateway: SocketAddr) -> WireDecision {
    let request = &d.request;
    let destination = request.destination().ok();
    // A closed record is of a connection that had been allowed; its rule
    // and reason are the re-check's, which no longer allows it.
    let (action, verdict) = match d.kind {
        DecisionKind::Opened => ("allow", "allowed"),
        DecisionKind::Refused => ("deny", "denied"),
        DecisionKind::ClosedByPolicy => ("allow", "closed"),
    };
    let reason = match d.kind {
        DecisionKind::Opened if !d.authorization.detail.is_empty() => "fail_open",
        DecisionKind::Opened => "",
        _ => reason_name(d.authorization.reason),
    };
    if verdict != "allowed" {
        info!(peer = %d.peer.id, user = %request.user, exe = %request.exe, rule = %d.authorization.rule_id, %reason, verdict, "gateway decision");
    }
    WireDecision {
        connection_id: request.connection_id.clone(),
        pid: request.pid,
        uid: request.uid,
        exe: request.exe.clone(),
        user_name: request.user.clone(),
        ip_version: match destination {
            Some(SocketAddr::V6(_)) => 6,
            _ => 4,
        },
        remote_addr: destination
            .map(|d| d.ip().to_string())
            .unwrap_or_else(|| "0.0.0.0".into()),
        remote_port: destination.map(|d| u32::from(d.port())).unwrap_or(0),
        protocol: "tcp".into(),
        action: action.into(),
        verdict: verdict.into(),
        rule_id: d.authorization.rule_id.clone(),
        policy_version: d.authorization.policy_version,
        enforcement_point: "gateway".into(),
        exe_sha256: request.exe_sha256.clone(),
        peer_id: d.peer.id.to_string(),
        service: d.authorization.service.clone().unwrap_or_default(),
        direction: "inbound".into(),
        reason: reason.into(),
        nearest_rules: d.authorization.nearest.clone(),
        gateway: gateway.to_string(),
        ..WireDecision::default()
    }
}

/// A refusal's reason as decision records name it (`""` for none).
fn reason_name(reason: DenyReason) -> &'static str {
    match reason {
        DenyReason::Unspecified => "",
        other => other.as_str(),
    }
}

/// What the zero-trust parts need at start.
pub struct ZeroTrustSetup {
    pub config: crate::config::TunnelConfig,
    /// Re-read when it changes, until a policy bundle is in force.
    pub policy_file: Option<std::path::PathBuf>,
    /// Policy bundles from the collector, checked, to put in force.
    pub bundles: Option<mpsc::Receiver<crate::bundles::BundleApply>>,
    /// A bundle is in force already (the last good one, at start).
    pub managed: bool,
    pub guard: crate::guard::KernelGuard,
    /// With a tunnel listener: the redirected sockets' origins.
    pub origins: Option<TunnelOrigins>,
    pub listener: Option<TunnelListener>,
    pub device: crate::enrollment::SharedIdentity,
    pub revocations: SharedRevocationList,
    pub decisions: DecisionSink,
    /// The agent's executable hashes (shared with the exec sensor).
    pub exe_hashes: SharedExeHasher,
    /// Where the gateway keeps its stateless-reset key, so that peers learn
    /// at once that a restarted gateway lost their connection.
    pub state_dir: std::path::PathBuf,
}

/// The running tunnel, gateway and policy watcher; dropping it stops them.
pub struct ZeroTrust {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ZeroTrust {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the calling side (with a listener), the gateway (when
/// configured) and the policy watcher.
pub fn start(setup: ZeroTrustSetup) -> anyhow::Result<ZeroTrust> {
    use anyhow::Context as _;
    let ZeroTrustSetup {
        config,
        policy_file,
        bundles,
        managed,
        guard,
        origins,
        listener,
        device,
        revocations,
        decisions,
        exe_hashes,
        state_dir,
    } = setup;
    let policy = guard.policy();
    let metrics = decisions.metrics.clone();
    let identity = device.read().unwrap_or_else(|e| e.into_inner()).clone();
    let mut tasks = Vec::new();
    let caller = match (listener, origins) {
        (Some(listener), Some(origins)) => {
            let client = TunnelClient::new(
                config.client_bind,
                identity
                    .tunnel_client_tls(revocations.clone())
                    .context("tunnel client TLS configuration")?,
            )
            .context("starting the tunnel's QUIC client")?;
            let caller = Arc::new(TunnelCaller {
                policy: policy.clone(),
                origins,
                client,
                callers: CallerResolver::new(exe_hashes),
                decisions: decisions.clone(),
            });
            info!(port = listener.port(), "tunnel listener ready");
            tasks.push(tokio::spawn(caller.clone().serve(listener)));
            Some(caller)
        }
        _ => None,
    };
    let gateway = match config.gateway_listen {
        Some(listen) => {
            let (decision_tx, decision_rx) = mpsc::channel(4096);
            let authorizer = Arc::new(GatewayAuthorizer {
                policy: policy.clone(),
                revocations: revocations.clone(),
                metrics: metrics.clone(),
                revocations_max_age: Duration::from_secs(config.revocations_max_age_secs),
            });
            let options = zt_tunnel::GatewayOptions {
                stateless_reset_key: Some(stateless_reset_key(&state_dir)?),
                ..zt_tunnel::GatewayOptions::default()
            };
            let gateway = zt_tunnel::Gateway::bind_with_options(
                listen,
                identity
                    .tunnel_server_tls(revocations.clone())
                    .context("gateway TLS configuration")?,
                authorizer,
                decision_tx,
                options,
            )
            .with_context(|| format!("starting the tunnel gateway on {listen}"))?;
            let address = gateway.local_addr();
            info!(%address, services = policy.read().unwrap_or_else(|e| e.into_inner()).gateway.services().len(), "tunnel gateway listening");
            let handle = gateway.handle();
            tasks.push(tokio::spawn(async move {
                gateway.run(std::future::pending::<()>()).await;
            }));
            tasks.push(tokio::spawn(record_gateway_decisions(
                decision_rx,
                decisions.clone(),
                address,
            )));
            Some(handle)
        }
        None => None,
    };
    tasks.push(tokio::spawn(watch_policy(PolicyWatch {
        path: policy_file,
        bundles,
        managed,
        guard,
        caller,
        gateway,
        revocations,
        device,
        metrics,
        interval: Duration::from_millis(config.policy_poll_ms.max(10)),
    })));
    Ok(ZeroTrust { tasks })
}

/// The gateway's stateless-reset key: 32 random bytes made once and kept in
/// the state directory (0600).
fn stateless_reset_key(state_dir: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    use anyhow::Context as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = state_dir.join("tunnel-reset.key");
    if let Ok(bytes) = std::fs::read(&path) {
        if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok(key);
        }
        warn!(path = %path.display(), "stateless-reset key has the wrong size; making a new one");
    }
    let key: [u8; 32] = rand::random();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut file, &key)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

struct PolicyWatch {
    path: Option<std::path::PathBuf>,
    bundles: Option<mpsc::Receiver<crate::bundles::BundleApply>>,
    /// A bundle is in force: the policy file no longer is.
    managed: bool,
    guard: crate::guard::KernelGuard,
    caller: Option<Arc<TunnelCaller>>,
    gateway: Option<zt_tunnel::GatewayHandle>,
    revocations: SharedRevocationList,
    device: crate::enrollment::SharedIdentity,
    metrics: Arc<AgentMetrics>,
    interval: Duration,
}

impl PolicyWatch {
    fn device_id(&self) -> String {
        self.device
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .id
            .to_string()
    }

    /// Puts a checked bundle in force: its tables into the kernel maps and
    /// its gateway side into the authorizer. From then on the policy file
    /// is not read.
    fn apply_bundle(&mut self, accepted: &crate::bundles::AcceptedBundle) -> Result<(), String> {
        let serial = accepted.bundle.serial;
        let policy = crate::guard_policy::from_policy(&accepted.policy, &self.device_id(), serial)
            .map_err(|e| e.to_string())?;
        self.guard
            .apply(Arc::new(policy))
            .map_err(|e| format!("cannot write the policy into the kernel maps: {e}"))?;
        self.metrics.policy_version.store(serial, Ordering::Relaxed);
        if !self.managed {
            if let Some(path) = &self.path {
                info!(path = %path.display(), "a policy bundle is in force; the policy file is no longer read");
            }
        }
        self.managed = true;
        info!(serial, "policy bundle applied to the guard");
        Ok(())
    }

    /// The certificate in use, as far as telling a renewal goes.
    fn certificate(&self) -> zt_identity::Validity {
        self.device
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .validity
    }

    /// Hands a renewed certificate to the tunnel's two ends.
    fn renew_tls(&self) {
        let identity = self
            .device
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(caller) = &self.caller {
            let result = identity
                .tunnel_client_tls(self.revocations.clone())
                .map_err(|e| e.to_string())
                .and_then(|tls| caller.client.set_tls(tls).map_err(|e| e.to_string()));
            if let Err(err) = result {
                warn!(error = %err, "cannot give the tunnel client the renewed certificate");
            }
        }
        if let Some(gateway) = &self.gateway {
            let result = identity
                .tunnel_server_tls(self.revocations.clone())
                .map_err(|e| e.to_string())
                .and_then(|tls| gateway.set_tls(tls).map_err(|e| e.to_string()));
            if let Err(err) = result {
                warn!(error = %err, "cannot give the gateway the renewed certificate");
            }
        }
        info!("tunnel uses the renewed certificate");
    }
}

/// Applies the policy file whenever it changes, and re-checks live streams
/// after every new policy and revocation list. A changed file that does not
/// compile leaves the policy in force as it is.
async fn watch_policy(mut watch: PolicyWatch) {
    let mut applied = watch
        .path
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let revocation_version = |w: &PolicyWatch| {
        w.revocations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .version()
    };
    let mut revocations_seen = revocation_version(&watch);
    let mut certificate = watch.certificate();
    let mut unreadable = false;
    loop {
        let bundle = match watch.bundles.as_mut() {
            Some(bundles) => tokio::select! {
                bundle = bundles.recv() => bundle,
                _ = tokio::time::sleep(watch.interval) => None,
            },
            None => {
                tokio::time::sleep(watch.interval).await;
                None
            }
        };
        let mut recheck = false;
        if let Some(apply) = bundle {
            let result = watch.apply_bundle(&apply.bundle);
            recheck |= result.is_ok();
            let _ = apply.done.send(result);
        }
        let current = watch.certificate();
        if current != certificate {
            certificate = current;
            watch.renew_tls();
        }
        let file = match (&watch.path, watch.managed) {
            (Some(path), false) => Some(path.clone()),
            _ => None,
        };
        match file
            .as_ref()
            .map(|path| (path, std::fs::read_to_string(path)))
            .map(|(p, r)| (p.clone(), r))
        {
            None => {}
            Some((path, read)) => match read {
                Ok(text) if text != applied => {
                    unreadable = false;
                    applied = text;
                    let device_id = watch.device_id();
                    match crate::guard_policy::compile_file(&applied, &device_id) {
                        Ok(policy) => {
                            let version = policy.version();
                            match watch.guard.apply(Arc::new(policy)) {
                                Ok(()) => {
                                    watch
                                        .metrics
                                        .policy_version
                                        .store(version, Ordering::Relaxed);
                                    info!(path = %path.display(), version, "guard policy applied");
                                    recheck = true;
                                }
                                Err(err) => {
                                    warn!(path = %path.display(), error = %err, "cannot write the new policy into the kernel maps")
                                }
                            }
                        }
                        Err(err) => {
                            warn!(path = %path.display(), error = %err, "the changed policy file does not compile; the policy in force stays")
                        }
                    }
                }
                Ok(_) => unreadable = false,
                Err(err) if !unreadable => {
                    unreadable = true;
                    warn!(path = %path.display(), error = %err, "cannot read the policy file; the policy in force stays");
                }
                Err(_) => {}
            },
        }
        let version = revocation_version(&watch);
        if version != revocations_seen {
            revocations_seen = version;
            recheck = true;
            // A gateway whose device is now revoked: its connections go at
            // once (new ones are refused at the handshake by the verifier).
            if let Some(caller) = watch.caller.as_ref() {
                let list = watch
                    .revocations
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let closed = caller.client.close_gateways(|peer| peer.is_revoked(&list));
                if closed > 0 {
                    info!(closed, "closed the tunnels to revoked gateways");
                }
            }
        }
        if recheck {
            let closed_calling = watch.caller.as_ref().map_or(0, |c| c.reevaluate());
            let closed_gateway = watch.gateway.as_ref().map_or(0, |g| g.reevaluate());
            if closed_calling + closed_gateway > 0 {
                info!(
                    closed_calling,
                    closed_gateway, "closed tunnelled connections the policy no longer allows"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zt_identity::{RevocationList, SpiffeId};

    const POLICY: &str = r#"
        version = 4
        default = "allow"
        [[service]]
        name = "records"
        destinations = ["10.9.0.3"]
        ports = [5432]
        [[service]]
        name = "wiki"
        destinations = ["10.9.0.3"]
        ports = [80]
        class = "standard"
        [[access]]
        id = "clerks-psql"
        service = "records"
        action = "allow"
        exes = ["/usr/bin/psql"]
        [[access]]
        id = "anyone-wiki"
        service = "wiki"
        action = "allow"
    "#;

    fn authorizer(channel_up: bool, seen_secs_ago: Option<u64>) -> GatewayAuthorizer {
        let policy = crate::guard_policy::compile(POLICY).unwrap();
        let metrics = Arc::new(AgentMetrics::default());
        metrics
            .control_channel_up
            .store(channel_up, Ordering::Relaxed);
        if let Some(ago) = seen_secs_ago {
            metrics
                .control_channel_seen_unix
                .store(crate::clock::unix_now_secs() - ago, Ordering::Relaxed);
        }
        GatewayAuthorizer {
            policy: Arc::new(std::sync::RwLock::new(Arc::new(policy))),
            revocations: RevocationList::new().shared(),
            metrics,
            revocations_max_age: Duration::from_secs(300),
        }
    }

    fn peer() -> PeerIdentity {
        PeerIdentity {
            id: SpiffeId::parse("spiffe://pref.example/org/city/device/pc1").unwrap(),
            serial_hex: "01".into(),
            serial: vec![1],
        }
    }

    fn request(port: u16, exe: &str) -> OpenRequest {
        let mut request = OpenRequest {
            exe: exe.into(),
            ..OpenRequest::default()
        };
        request.set_destination(SocketAddr::from(([10, 9, 0, 3], port)));
        request
    }

    #[test]
    fn allows_by_policy_while_the_control_plane_is_reachable() {
        let a = authorizer(true, None).authorize(&peer(), &request(5432, "/usr/bin/psql"));
        assert!(a.allowed);
        assert_eq!(a.rule_id, "clerks-psql");
        assert_eq!(a.policy_version, 4);
        let a = authorizer(true, None).authorize(&peer(), &request(5432, "/usr/bin/nc"));
        assert!(!a.allowed);
        assert_eq!(a.reason, DenyReason::Policy);
        assert_eq!(a.nearest.len(), 1);
        let a = authorizer(true, None).authorize(&peer(), &request(22, "/usr/bin/ssh"));
        assert_eq!((a.allowed, a.reason), (false, DenyReason::NoService));
    }

    #[test]
    fn protected_services_fail_closed_and_standard_ones_open_when_revocations_are_stale() {
        // Down, but seen a minute ago: the list is still trusted.
        let a = authorizer(false, Some(60)).authorize(&peer(), &request(5432, "/usr/bin/psql"));
        assert!(a.allowed, "{a:?}");
        // Down for longer than the list is trusted, or never reached.
        for stale in [authorizer(false, Some(600)), authorizer(false, None)] {
            let a = stale.authorize(&peer(), &request(5432, "/usr/bin/psql"));
            assert_eq!((a.allowed, a.reason), (false, DenyReason::FailClosed));
            let a = stale.authorize(&peer(), &request(80, "/usr/bin/firefox"));
            assert!(a.allowed, "standard services fail open");
            assert!(a.detail.contains("unverified"), "{a:?}");
        }
    }

    #[test]
    fn revoked_devices_are_refused_whatever_the_policy_says() {
        let a = authorizer(true, None);
        a.revocations.write().unwrap().revoke_device(&peer().id);
        let refused = a.authorize(&peer(), &request(80, "/usr/bin/firefox"));
        assert_eq!(
            (refused.allowed, refused.reason),
            (false, DenyReason::Revoked)
        );
    }
}
