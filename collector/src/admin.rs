//! The `zt.control.v1.Admin` gRPC service: what administrators do through
//! `ztctl` (enrollment tokens, the device list, revocation). Each call is
//! authenticated by the user certificate, authorised by the user's role
//! ([`Role`]) for the organisation it touches, and recorded in
//! `zt.audit_log`, refusals included.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use proto::control::{
    admin_server::Admin, AgentPolicy, CreateEnrollmentTokenRequest, Device, DeviceList,
    EnrollmentTokenReply, GetPolicyRequest, ListDevicesRequest, PolicyLayers, PolicyRollout,
    PolicyStatusReply, PolicyStatusRequest, PushPolicyReply, PushPolicyRequest, ReplayPolicyReply,
    ReplayPolicyRequest, ReplayedFlow, RevokeDeviceReply, RevokeDeviceRequest,
    RollbackPolicyRequest,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use zt_identity::SpiffeId;

use crate::{
    control_plane::{ControlPlane, Role, UserRecord},
    distribution::{CanaryRequest, EnrolledDevice},
    enrollment::caller_identity,
    fleet::ConnectedDevices,
    rollout::Rollout,
    storage::{AuditRow, Storage},
};

/// Default validity of an enrollment token created without one.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest validity of an enrollment token.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);

#[derive(Clone)]
pub struct AdminService {
    plane: Arc<ControlPlane>,
    storage: Storage,
    connected: ConnectedDevices,
}

/// The authenticated, registered caller of an admin call.
struct Caller {
    id: SpiffeId,
    user: UserRecord,
    source: String,
}

impl AdminService {
    pub fn new(plane: Arc<ControlPlane>, storage: Storage, connected: ConnectedDevices) -> Self {
        AdminService {
            plane,
            storage,
            connected,
        }
    }

    /// Who calls: a registered user (devices have no business here).
    async fn caller<T>(&self, request: &Request<T>, action: &str) -> Result<Caller, Status> {
        let id = caller_identity(request)?;
        let source = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        match self.plane.user(&id) {
            Some(user) => Ok(Caller { id, user, source }),
            None => {
                self.audit_unregistered(&id, &source, action).await;
                Err(Status::permission_denied(format!(
                    "{id} is not a registered user"
                )))
            }
        }
    }

    /// The organisation a request names, or the caller's when it names none.
    fn org_of<'a>(caller: &'a Caller, requested: &'a str) -> &'a str {
        if requested.is_empty() {
            &caller.user.org
        } else {
            requested
        }
    }

    /// Refuses (and audits the refusal) unless the caller may change `org`.
    async fn require_change(
        &self,
        caller: &Caller,
        org: &str,
        action: &str,
        target: &str,
    ) -> Result<(), Status> {
        if caller.user.role.may_change(&caller.user.org, org) {
            return Ok(());
        }
        let why = format!(
            "{} ({} of {}) may not change organisation {org}",
            caller.id,
            caller.user.role.as_str(),
            caller.user.org
        );
        self.audit(caller, org, action, target, "denied", &why)
            .await;
        Err(Status::permission_denied(why))
    }

    async fn audit(
        &self,
        caller: &Caller,
        org: &str,
        action: &str,
        target: &str,
        result: &str,
        detail: &str,
    ) {
        self.write_audit(AuditRow {
            org_id: org.to_owned(),
            time: 0,
            time_ns: 0,
            actor: caller.id.to_string(),
            actor_role: caller.user.role.as_str().to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            source: caller.source.clone(),
            result: result.to_owned(),
            detail: detail.to_owned(),
        })
        .await;
    }

    async fn audit_unregistered(&self, id: &SpiffeId, source: &str, action: &str) {
        self.write_audit(AuditRow {
            org_id: id.org().to_owned(),
            time: 0,
            time_ns: 0,
            actor: id.to_string(),
            actor_role: String::new(),
            action: action.to_owned(),
            target: String::new(),
            source: source.to_owned(),
            result: "denied".to_owned(),
            detail: "not a registered user".to_owned(),
        })
        .await;
    }

    async fn write_audit(&self, row: AuditRow) {
        write_audit_row(&self.storage, row).await;
    }
}

/// Stores an audit record, stamped now; a record that cannot be stored is
/// logged in full, so the trail survives in the collector's log.
pub async fn write_audit_row(storage: &Storage, mut row: AuditRow) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    row.time = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
    row.time_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
    info!(actor = %row.actor, action = %row.action, target = %row.target, org = %row.org_id, result = %row.result, detail = %row.detail, "audit");
    if let Err(err) = storage.insert(std::slice::from_ref(&row)).await {
        warn!(error = %err, record = ?row, "audit record not stored in ClickHouse");
    }
}

/// A rollout as `org` sees it.
pub fn rollout_reply(rollout: &Rollout, org: &str) -> PolicyRollout {
    let stage = rollout.orgs.get(org);
    let secs = |ms: u64| i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    let before = rollout.before.unwrap_or_default();
    let during = rollout.during.unwrap_or_default();
    PolicyRollout {
        state: rollout.state.as_str().to_owned(),
        serial: rollout.serial,
        previous_serial: stage.map_or(0, |s| s.previous_serial),
        layer: rollout.layer.as_str().to_owned(),
        pushed_by: rollout.pushed_by.clone(),
        canary_group: rollout.canary_group.clone(),
        canary_devices: stage
            .map(|s| s.canary_devices.iter().cloned().collect())
            .unwrap_or_default(),
        staged: stage.is_some_and(|s| s.staged),
        canary_seconds: rollout.canary_seconds,
        started_unix: secs(rollout.started_unix_ms),
        finished_unix: secs(rollout.finished_unix_ms),
        reason: if rollout.reason.is_empty() {
            rollout.rollback_error.clone()
        } else {
            rollout.reason.clone()
        },
        rollback_serial: rollout.rollback_serial,
        restores: rollout.restores,
        deny_rate_before: before.deny_rate(),
        deny_rate_during: during.deny_rate(),
        error_rate_before: before.error_rate(),
        error_rate_during: during.error_rate(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_enrollment_token(
        &self,
        request: Request<CreateEnrollmentTokenRequest>,
    ) -> Result<Response<EnrollmentTokenReply>, Status> {
        const ACTION: &str = "enroll_token.create";
        let caller = self.caller(&request, ACTION).await?;
        let req = request.into_inner();
        let org = Self::org_of(&caller, &req.org_id).to_owned();
        self.require_change(&caller, &org, ACTION, &req.device_id)
            .await?;
        let ttl = match req.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            secs => Duration::from_secs(secs),
        };
        if ttl > MAX_TOKEN_TTL {
            let why = format!("a token lives at most {} s", MAX_TOKEN_TTL.as_secs());
            self.audit(&caller, &org, ACTION, &req.device_id, "error", &why)
                .await;
            return Err(Status::invalid_argument(why));
        }
        let plane = self.plane.clone();
        let (org_for_token, device) = (org.clone(), req.device_id.clone());
        let created =
            tokio::task::spawn_blocking(move || plane.create_token(&org_for_token, &device, ttl))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        match created {
            Ok(token) => {
                let detail = format!("ttl {} s, expires {}", ttl.as_secs(), token.expires_unix);
                self.audit(&caller, &org, ACTION, &token.spiffe_id, "ok", &detail)
                    .await;
                Ok(Response::new(EnrollmentTokenReply {
                    join_token: token.join_token,
                    spiffe_id: token.spiffe_id,
                    expires_unix: i64::try_from(token.expires_unix).unwrap_or(i64::MAX),
                }))
            }
            Err(err) => {
                self.audit(
                    &caller,
                    &org,
                    ACTION,
                    &req.device_id,
                    "error",
                    &err.to_string(),
                )
                .await;
                Err(Status::invalid_argument(err.to_string()))
            }
        }
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<DeviceList>, Status> {
        const ACTION: &str = "device.list";
        let caller = self.caller(&request, ACTION).await?;
        let req = request.into_inner();
        // Without an organisation the SOC sees every one; others their own.
        let org = match (req.org_id.as_str(), caller.user.role) {
            ("", Role::Soc) => None,
            ("", _) => Some(caller.user.org.clone()),
            (org, _) => Some(org.to_owned()),
        };
        if let Some(org) = &org {
            if !caller.user.role.may_read(&caller.user.org, org) {
                let why = format!("{} may not read organisation {org}", caller.id);
                self.audit(&caller, org, ACTION, "", "denied", &why).await;
                return Err(Status::permission_denied(why));
            }
        }
        let records = self.plane.devices(org.as_deref());
        let heartbeats = self
            .last_heartbeats(org.as_deref())
            .await
            .unwrap_or_else(|err| {
                warn!(error = %err, "last heartbeats unavailable");
                HashMap::new()
            });
        let revocations = self.plane.revocation_list();
        let devices = records
            .into_iter()
            .map(|d| {
                let id = SpiffeId::parse(&d.spiffe_id).ok();
                Device {
                    revoked: id
                        .as_ref()
                        .is_some_and(|id| revocations.is_device_revoked(id)),
                    connected: self.connected.count(&d.spiffe_id) > 0,
                    last_heartbeat_unix: heartbeats
                        .get(&(d.org.clone(), d.device.clone()))
                        .copied()
                        .unwrap_or(0),
                    org_id: d.org,
                    device_id: d.device,
                    spiffe_id: d.spiffe_id,
                    hostname: d.hostname,
                    agent_version: d.agent_version,
                    enrolled_unix: i64::try_from(d.enrolled_unix).unwrap_or(i64::MAX),
                    certificate_serial: d.serial,
                    certificate_not_after_unix: i64::try_from(d.not_after_unix).unwrap_or(i64::MAX),
                }
            })
            .collect::<Vec<_>>();
        let scope = org.clone().unwrap_or_else(|| "*".to_owned());
        let detail = format!("{} devices", devices.len());
        self.audit(&caller, &scope, ACTION, "", "ok", &detail).await;
        Ok(Response::new(DeviceList { devices }))
    }

    async fn revoke_device(
        &self,
        request: Request<RevokeDeviceRequest>,
    ) -> Result<Response<RevokeDeviceReply>, Status> {
        const ACTION: &str = "device.revoke";
        let caller = self.caller(&request, ACTION).await?;
        let req = request.into_inner();
        let org = Self::org_of(&caller, &req.org_id).to_owned();
        self.require_change(&caller, &org, ACTION, &req.device_id)
            .await?;
        let id = SpiffeId::device(self.plane.trust_domain(), &org, &req.device_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.plane.device(&id).is_none() {
            let why = format!("{id} is not enrolled");
            self.audit(&caller, &org, ACTION, &id.to_string(), "error", &why)
                .await;
            return Err(Status::not_found(why));
        }
        let streams = self.connected.count(&id.to_string());
        match self.plane.revoke_device(&id) {
            Ok(version) => {
                let detail = format!(
                    "revocation list v{version}; {streams} open streams cut; reason: {}",
                    req.reason
                );
                self.audit(&caller, &org, ACTION, &id.to_string(), "ok", &detail)
                    .await;
                Ok(Response::new(RevokeDeviceReply {
                    revocation_version: version,
                    streams_closed: u32::try_from(streams).unwrap_or(u32::MAX),
                }))
            }
            Err(err) => {
                self.audit(
                    &caller,
                    &org,
                    ACTION,
                    &id.to_string(),
                    "error",
                    &err.to_string(),
                )
                .await;
                Err(Status::internal(err.to_string()))
            }
        }
    }

    async fn push_policy(
        &self,
        request: Request<PushPolicyRequest>,
    ) -> Result<Response<PushPolicyReply>, Status> {
        self.push_policy_impl(request).await.map(Response::new)
    }

    async fn rollback_policy(
        &self,
        request: Request<RollbackPolicyRequest>,
    ) -> Result<Response<PushPolicyReply>, Status> {
        self.rollback_policy_impl(request).await.map(Response::new)
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PolicyLayers>, Status> {
        let requested = request.get_ref().org_id.clone();
        let org = self.read_org(&request, &requested, "policy.get").await?;
        let policy = self.plane.policy();
        let (baseline, organisation) = policy.store().layers(&org);
        Ok(Response::new(PolicyLayers {
            serial: policy.store().active_serial(&org),
            baseline,
            organisation: organisation.unwrap_or_default(),
        }))
    }

    async fn replay_policy(
        &self,
        request: Request<ReplayPolicyRequest>,
    ) -> Result<Response<ReplayPolicyReply>, Status> {
        const ACTION: &str = "policy.replay";
        /// Decisions read when the request sets no limit.
        const DEFAULT_LIMIT: u64 = 100_000;
        let req = request.get_ref().clone();
        let layer = policy::parse(&req.text)
            .map_err(|d| Status::invalid_argument(format!("the candidate does not parse: {d}")))?;
        let requested = match (&layer.org, req.org_id.is_empty()) {
            (Some(org), true) => org.clone(),
            _ => req.org_id.clone(),
        };
        let org = self.read_org(&request, &requested, ACTION).await?;
        let (baseline, organisation) = self.plane.policy().store().layers(&org);
        let candidate = match layer.kind {
            policy::LayerKind::Baseline => policy::load(&req.text, organisation.as_deref()),
            policy::LayerKind::Organisation => {
                if layer.org.as_deref() != Some(org.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "the candidate is organisation {:?}'s layer; the decisions are {org}'s",
                        layer.org.unwrap_or_default()
                    )));
                }
                policy::load(&baseline, Some(&req.text))
            }
        }
        .map_err(|e| Status::invalid_argument(format!("the candidate does not load: {e}")))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let query = crate::replay::ReplayQuery {
            org: org.clone(),
            since_unix: i64::try_from(now.saturating_sub(req.since_seconds)).unwrap_or(0),
            limit: usize::try_from(if req.limit == 0 {
                DEFAULT_LIMIT
            } else {
                req.limit
            })
            .unwrap_or(usize::MAX),
        };
        let report = crate::replay::replay(
            &self.storage,
            self.plane.trust_domain().as_str(),
            &query,
            &candidate,
        )
        .await
        .map_err(|e| Status::unavailable(format!("cannot read the stored decisions: {e}")))?;
        Ok(Response::new(ReplayPolicyReply {
            org_id: org,
            decisions_read: report.decisions_read,
            skipped: report.skipped,
            distinct_flows: report.distinct_flows,
            truncated: report.truncated,
            changed: report
                .changed
                .into_iter()
                .map(|c| ReplayedFlow {
                    device: c.device,
                    user: c.user,
                    exe: c.exe,
                    destination: c.destination,
                    direction: c.direction.as_str().to_owned(),
                    time_unix: c.time_unix,
                    old_verdict: c.old_verdict.to_string(),
                    old_rule: c.old_rule,
                    new_verdict: c.new_verdict.to_string(),
                    new_rule: c.new_rule,
                    new_dry_run_verdict: c
                        .new_dry_run
                        .as_ref()
                        .map(|(v, _)| v.to_string())
                        .unwrap_or_default(),
                    new_dry_run_rule: c.new_dry_run.map(|(_, r)| r).unwrap_or_default(),
                    count: c.count,
                })
                .collect(),
        }))
    }

    async fn policy_status(
        &self,
        request: Request<PolicyStatusRequest>,
    ) -> Result<Response<PolicyStatusReply>, Status> {
        let requested = request.get_ref().org_id.clone();
        let org = self.read_org(&request, &requested, "policy.status").await?;
        let policy = self.plane.policy();
        let reports = policy.reports(&org);
        let agents = self
            .plane
            .devices(Some(&org))
            .into_iter()
            .filter(|d| SpiffeId::parse(&d.spiffe_id).is_ok_and(|id| !self.plane.is_revoked(&id)))
            .map(|d| {
                let report = reports.get(&d.device).cloned().unwrap_or_default();
                AgentPolicy {
                    connected: policy.is_watching(&d.spiffe_id),
                    device_id: d.device,
                    applied_serial: report.applied_serial,
                    refused_serial: report.refused_serial,
                    error: report.error,
                    reported_unix: i64::try_from(report.reported_unix).unwrap_or(i64::MAX),
                }
            })
            .collect();
        Ok(Response::new(PolicyStatusReply {
            serial: policy.store().active_serial(&org),
            rollout: policy.rollout(&org).map(|r| rollout_reply(&r, &org)),
            org_id: org,
            agents,
        }))
    }
}

/// A refused push: the diagnostics, each with its line and column, as the
/// message (ztctl prints it as it is).
fn push_refused(error: crate::policy_store::PolicyStoreError) -> Status {
    use crate::policy_store::PolicyStoreError as E;
    match error {
        E::Invalid(_) | E::WrongOrganisation { .. } | E::WrongKind(_) => {
            Status::invalid_argument(error.to_string())
        }
        E::Canary(_) => Status::invalid_argument(error.to_string()),
        E::RolloutInProgress { .. } => Status::failed_precondition(error.to_string()),
        E::NoSuchSerial { .. } => Status::not_found(error.to_string()),
        other => Status::internal(other.to_string()),
    }
}

impl AdminService {
    /// The organisations that have enrolled devices: each gets a bundle
    /// when the baseline changes.
    fn organisations(&self) -> Vec<String> {
        let mut orgs: Vec<String> = self
            .plane
            .devices(None)
            .into_iter()
            .map(|d| d.org)
            .collect();
        orgs.sort();
        orgs.dedup();
        orgs
    }

    /// Every enrolled, unrevoked device: a canary group picks among them.
    fn enrolled_devices(&self) -> Vec<EnrolledDevice> {
        self.plane
            .devices(None)
            .into_iter()
            .filter(|d| SpiffeId::parse(&d.spiffe_id).is_ok_and(|id| !self.plane.is_revoked(&id)))
            .map(|d| EnrolledDevice {
                org: d.org,
                device_id: d.device,
                spiffe_id: d.spiffe_id,
            })
            .collect()
    }

    async fn refuse<T>(
        &self,
        caller: &Caller,
        org: &str,
        action: &str,
        target: &str,
        status: Status,
    ) -> Result<T, Status> {
        self.audit(caller, org, action, target, "error", status.message())
            .await;
        Err(status)
    }

    async fn push_policy_impl(
        &self,
        request: Request<PushPolicyRequest>,
    ) -> Result<PushPolicyReply, Status> {
        const ACTION: &str = "policy.push";
        let caller = self.caller(&request, ACTION).await?;
        let PushPolicyRequest {
            text,
            canary_group,
            canary_seconds,
        } = request.into_inner();
        let layer = match policy::parse(&text) {
            Ok(layer) => layer,
            Err(d) => {
                let org = caller.user.org.clone();
                return self
                    .refuse(
                        &caller,
                        &org,
                        ACTION,
                        "",
                        Status::invalid_argument(format!("the policy does not parse: {d}")),
                    )
                    .await;
            }
        };
        let (org, target) = match (&layer.kind, &layer.org) {
            (policy::LayerKind::Baseline, _) => {
                // The baseline binds every organisation: the SOC's alone.
                if caller.user.role != Role::Soc {
                    let why = format!(
                        "{} ({} of {}) may not push the baseline; it binds every organisation and is the SOC's",
                        caller.id,
                        caller.user.role.as_str(),
                        caller.user.org
                    );
                    let org = caller.user.org.clone();
                    self.audit(&caller, &org, ACTION, "baseline", "denied", &why)
                        .await;
                    return Err(Status::permission_denied(why));
                }
                (caller.user.org.clone(), "baseline".to_owned())
            }
            (policy::LayerKind::Organisation, Some(org)) => {
                self.require_change(&caller, org, ACTION, org).await?;
                (org.clone(), org.clone())
            }
            (policy::LayerKind::Organisation, None) => {
                return Err(Status::invalid_argument(
                    "an organisation layer needs `org`",
                ))
            }
        };
        if canary_group.is_empty() && canary_seconds > 0 {
            return self
                .refuse(
                    &caller,
                    &org,
                    ACTION,
                    &target,
                    Status::invalid_argument("canary_seconds without a canary group"),
                )
                .await;
        }
        let orgs = self.organisations();
        let devices = self.enrolled_devices();
        let plane = self.plane.clone();
        let by = caller.id.to_string();
        let pushed = tokio::task::spawn_blocking(move || {
            let canary = (!canary_group.is_empty()).then_some(CanaryRequest {
                group: &canary_group,
                seconds: canary_seconds,
                devices: &devices,
            });
            plane.policy().push(&text, &orgs, &by, canary)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        match pushed {
            Ok(pushed) => {
                let (issued, rollout) = (pushed.issued, pushed.rollout);
                let orgs: Vec<String> = issued
                    .bundles
                    .iter()
                    .filter_map(|b| b.verify(&[self.plane.policy().public_key()]).ok())
                    .map(|b| b.org)
                    .collect();
                let mut detail = format!("serial {} for {}", issued.serial, orgs.join(", "));
                if rollout.is_running() {
                    detail.push_str(&format!(
                        "; canary group {} ({} devices) for {} s",
                        rollout.canary_group,
                        rollout.canary_device_count(),
                        rollout.canary_seconds
                    ));
                }
                self.audit(&caller, &org, ACTION, &target, "ok", &detail)
                    .await;
                Ok(PushPolicyReply {
                    serial: issued.serial,
                    orgs,
                    restores: 0,
                    canary_seconds: rollout.canary_seconds,
                    canary_devices: u32::try_from(rollout.canary_device_count())
                        .unwrap_or(u32::MAX),
                })
            }
            Err(err) => {
                self.refuse(&caller, &org, ACTION, &target, push_refused(err))
                    .await
            }
        }
    }

    async fn rollback_policy_impl(
        &self,
        request: Request<RollbackPolicyRequest>,
    ) -> Result<PushPolicyReply, Status> {
        const ACTION: &str = "policy.rollback";
        let caller = self.caller(&request, ACTION).await?;
        let req = request.into_inner();
        let org = Self::org_of(&caller, &req.org_id).to_owned();
        let target = format!("serial {}", req.serial);
        self.require_change(&caller, &org, ACTION, &target).await?;
        let plane = self.plane.clone();
        let by = caller.id.to_string();
        let org_for = org.clone();
        let rolled =
            tokio::task::spawn_blocking(move || plane.policy().rollback(&org_for, req.serial, &by))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        match rolled {
            Ok(issued) => {
                let detail = format!("serial {} restores {}", issued.serial, req.serial);
                self.audit(&caller, &org, ACTION, &target, "ok", &detail)
                    .await;
                Ok(PushPolicyReply {
                    serial: issued.serial,
                    orgs: vec![org],
                    restores: req.serial,
                    canary_seconds: 0,
                    canary_devices: 0,
                })
            }
            Err(err) => {
                self.refuse(&caller, &org, ACTION, &target, push_refused(err))
                    .await
            }
        }
    }

    async fn read_org<T>(
        &self,
        request: &Request<T>,
        requested: &str,
        action: &str,
    ) -> Result<String, Status> {
        let caller = self.caller(request, action).await?;
        let org = Self::org_of(&caller, requested).to_owned();
        if !caller.user.role.may_read(&caller.user.org, &org) {
            let why = format!("{} may not read organisation {org}", caller.id);
            self.audit(&caller, &org, action, "", "denied", &why).await;
            return Err(Status::permission_denied(why));
        }
        Ok(org)
    }

    /// `(org, device) -> last heartbeat (unix)` from `zt.agents`.
    async fn last_heartbeats(
        &self,
        org: Option<&str>,
    ) -> Result<HashMap<(String, String), i64>, clickhouse::error::Error> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Last {
            org_id: String,
            device_id: String,
            last: u32,
        }
        let rows: Vec<Last> = match org {
            Some(org) => {
                self.storage
                    .client()
                    .query("SELECT org_id, device_id, toUInt32(max(time)) AS last FROM agents WHERE org_id = ? GROUP BY org_id, device_id")
                    .bind(org)
                    .fetch_all()
                    .await?
            }
            None => {
                self.storage
                    .client()
                    .query("SELECT org_id, device_id, toUInt32(max(time)) AS last FROM agents GROUP BY org_id, device_id")
                    .fetch_all()
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|r| ((r.org_id, r.device_id), i64::from(r.last)))
            .collect())
    }
}
