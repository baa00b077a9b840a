//! The agents' side of the control plane (`zt.control.v1.Fleet`):
//! heartbeats into `zt.agents`, and the control channel that pushes the
//! revocation list to every agent as it changes. Also [`ConnectedDevices`],
//! which telemetry streams register in, so a revocation can say how many it
//! cut and the device list which devices are online.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use proto::control::{
    control_update::Update, fleet_server::Fleet, AgentHeartbeat, ControlUpdate, HeartbeatReply,
    PolicyAck, PolicyAckReply, PolicyBundle, RevocationList as WireRevocations, WatchRequest,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};
use zt_identity::SpiffeId;

use crate::{
    control_plane::ControlPlane,
    detection::DetectionHandle,
    enrollment::caller_device,
    storage::{AgentRow, Storage},
};

/// Open telemetry streams per device (SPIFFE id).
#[derive(Debug, Clone, Default)]
pub struct ConnectedDevices(Arc<Mutex<HashMap<String, usize>>>);

impl ConnectedDevices {
    /// Registers a stream of `id` until the guard is dropped.
    pub fn connect(&self, id: &SpiffeId) -> ConnectedGuard {
        let key = id.to_string();
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        ConnectedGuard {
            devices: self.clone(),
            key,
        }
    }

    pub fn count(&self, id: &str) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or(0)
    }
}

pub struct ConnectedGuard {
    devices: ConnectedDevices,
    key: String,
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        let mut map = self.devices.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[derive(Clone)]
pub struct FleetService {
    plane: Arc<ControlPlane>,
    storage: Storage,
    /// Turning true ends every control channel (graceful shutdown).
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Heartbeats feed the absence rules (agent silent).
    detection: DetectionHandle,
}

impl FleetService {
    pub fn new(
        plane: Arc<ControlPlane>,
        storage: Storage,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        FleetService {
            plane,
            storage,
            shutdown,
            detection: DetectionHandle::disabled(),
        }
    }

    /// Heartbeats go to detection too.
    pub fn with_detection(mut self, detection: DetectionHandle) -> Self {
        self.detection = detection;
        self
    }
}

fn revocation_update(plane: &ControlPlane) -> ControlUpdate {
    let list = plane.revocation_list();
    ControlUpdate {
        update: Some(Update::Revocations(WireRevocations {
            version: list.version(),
            revoked_ids: list.devices().map(ToString::to_string).collect(),
            revoked_serials: list.serials().map(str::to_owned).collect(),
        })),
    }
}

/// The bundle `id` should run, as an update, when it is newer than `have`;
/// nothing before the first push (agents keep their local policy).
fn policy_update(plane: &ControlPlane, id: &SpiffeId, have: u64) -> Option<ControlUpdate> {
    if !plane.policy().store().anything_pushed() {
        return None;
    }
    match plane.policy().bundle_for(id) {
        Ok(bundle) => (bundle.serial > have).then(|| ControlUpdate {
            update: Some(Update::Policy(PolicyBundle {
                serial: bundle.serial,
                signed_json: bundle.signed_json.clone(),
            })),
        }),
        Err(err) => {
            warn!(device = %id, error = %err, "no policy bundle for the device");
            None
        }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<ControlUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn heartbeat(
        &self,
        request: Request<AgentHeartbeat>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let id = caller_device(&request, &self.plane)?;
        let remote = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let beat = request.into_inner();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let hostname = self
            .plane
            .device(&id)
            .map(|d| d.hostname)
            .unwrap_or_default();
        let row = AgentRow {
            org_id: id.org().to_owned(),
            time: u32::try_from(now).unwrap_or(u32::MAX),
            device_id: id.device_id().unwrap_or_default().to_owned(),
            hostname,
            boot_id: beat.boot_id,
            agent_version: beat.agent_version,
            kernel: beat.kernel,
            active_sensors: beat.active_sensors,
            policy_version: beat.policy_version,
            certificate_not_after: u32::try_from(beat.certificate_not_after_unix.max(0))
                .unwrap_or(u32::MAX),
            certificate_renewals: beat.certificate_renewals,
            certificate_renewal_failures: beat.certificate_renewal_failures,
            spool_events: beat.spool_events,
            spool_bytes: beat.spool_bytes,
            kernel_drops: beat.kernel_drops,
            bulk_sampled: beat.bulk_sampled,
            queue_dropped: beat.queue_dropped,
            events_acked: beat.events_acked,
            uptime_seconds: beat.uptime_seconds,
            remote_addr: remote,
        };
        // The agent sends the next one anyway: a failed store is its retry.
        self.storage
            .insert(std::slice::from_ref(&row))
            .await
            .map_err(|e| Status::unavailable(format!("heartbeat not stored: {e}")))?;
        if self.detection.is_enabled() {
            let now_ns = crate::detection::now_ns();
            let beat = crate::detection::events::from_heartbeat(&row, now_ns);
            self.detection.feed(vec![beat]).await;
        }
        debug!(device = %id, "heartbeat");
        Ok(Response::new(HeartbeatReply {
            server_time_unix: i64::try_from(now).unwrap_or(i64::MAX),
        }))
    }

    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = caller_device(&request, &self.plane)?;
        let request = request.into_inner();
        let have = request.revocation_version;
        let mut policy_sent = request.policy_serial;
        let plane = self.plane.clone();
        let mut versions = plane.watch_revocations();
        let mut policies = plane.policy().watch();
        let mut shutdown = self.shutdown.clone();
        let watching = plane.policy().watching(&id);
        let stream = async_stream::try_stream! {
            // Counted as watching while the stream lives.
            let _watching = watching;
            if plane.revocation_list().version() != have {
                yield revocation_update(&plane);
            }
            if let Some(update) = policy_update(&plane, &id, policy_sent) {
                if let Some(Update::Policy(bundle)) = &update.update {
                    policy_sent = bundle.serial;
                }
                yield update;
            }
            loop {
                let (revocations, policy) = tokio::select! {
                    changed = versions.changed() => (changed.is_ok(), false),
                    changed = policies.changed() => (false, changed.is_ok()),
                    _ = shutdown.wait_for(|stop| *stop) => (false, false),
                };
                if !revocations && !policy {
                    break;
                }
                if plane.is_revoked(&id) {
                    warn!(device = %id, "closing the control channel of a revoked device");
                    Err(Status::permission_denied(format!("{id} is revoked")))?;
                }
                if revocations {
                    yield revocation_update(&plane);
                }
                if policy {
                    if let Some(update) = policy_update(&plane, &id, policy_sent) {
                        if let Some(Update::Policy(bundle)) = &update.update {
                            policy_sent = bundle.serial;
                        }
                        yield update;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack_policy(
        &self,
        request: Request<PolicyAck>,
    ) -> Result<Response<PolicyAckReply>, Status> {
        let id = caller_device(&request, &self.plane)?;
        let ack = request.into_inner();
        if ack.applied {
            debug!(device = %id, serial = ack.serial, "policy applied");
        } else {
            warn!(device = %id, serial = ack.serial, error = %ack.error, "policy refused by the agent");
        }
        self.plane
            .policy()
            .report(&id, ack.serial, ack.applied, &ack.error);
        Ok(Response::new(PolicyAckReply {}))
    }
}
