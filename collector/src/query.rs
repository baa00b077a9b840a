//! The SOC's API, `zt.query.v1.Query`: incidents and their triage, event
//! search, the fleet and the zero-incident KPI — over gRPC, and the same
//! calls as HTTP/JSON ([`http`]) on the same port.
//!
//! Every call is authenticated by the caller's user certificate and
//! answered only within the organisations the caller may read ([`Scope`]):
//! its own, or every one for the prefecture's SOC. An incident of another
//! organisation is "not found", never "forbidden", so its existence does
//! not leak. Filters reach ClickHouse only as bound values (the client
//! escapes them) after they are checked here; no text of a request is ever
//! spliced into SQL.

pub mod http;
mod read;

use std::{collections::BTreeMap, sync::Arc};

use detect::{IncidentAction, TransitionError};
use proto::query::{
    query_server::Query, AuditList, AuditRequest, EventList, FleetList, GetIncidentRequest,
    Incident as WireIncident, IncidentDetail, IncidentList, Kpi, KpiRequest, ListFleetRequest,
    ListIncidentsRequest, SearchEventsRequest, Trend, TrendRequest, UpdateIncidentRequest,
};
use tonic::{Request, Response, Status};
use tracing::warn;
use zt_identity::SpiffeId;

use crate::{
    control_plane::{ControlPlane, Role, UserRecord},
    detection::{IncidentBook, TransitionFailure},
    enrollment::caller_identity,
    fleet::ConnectedDevices,
    storage::{AuditRow, Storage, StorageError},
};

/// Largest page.
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Longest note on an incident.
pub const MAX_TEXT_FILTER: usize = 256;

/// Why a query was refused; one kind per gRPC code and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// ClickHouse is unreachable or refused the query.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

impl QueryError {
    pub fn code(&self) -> &'static str {
        match self {
            QueryError::Unauthenticated(_) => "unauthenticated",
            QueryError::PermissionDenied(_) => "permission_denied",
            QueryError::InvalidArgument(_) => "invalid_argument",
            QueryError::NotFound(_) => "not_found",
            QueryError::FailedPrecondition(_) => "failed_precondition",
            QueryError::Unavailable(_) => "unavailable",
        }
    }

    fn bad(message: impl Into<String>) -> QueryError {
        QueryError::InvalidArgument(message.into())
    }
}

impl From<StorageError> for QueryError {
    fn from(e: StorageError) -> QueryError {
        QueryError::Unavailable(e.to_string())
    }
}

impl From<QueryError> for Status {
    fn from(e: QueryError) -> Status {
        let message = e.to_string();
        match e {
            QueryError::Unauthenticated(_) => Status::unauthenticated(message),
            QueryError::PermissionDenied(_) => Status::permission_denied(message),
            QueryError::InvalidArgument(_) => Status::invalid_argument(message),
            QueryError::NotFound(_) => Status::not_found(message),
            QueryError::FailedPrecondition(_) => Status::failed_precondition(message),
            QueryError::Unavailable(_) => Status::unavailable(message),
        }
    }
}

impl From<Status> for QueryError {
    fn from(s: Status) -> QueryError {
        match s.code() {
            tonic::Code::PermissionDenied => QueryError::PermissionDenied(s.message().to_owned()),
            _ => QueryError::Unauthenticated(s.message().to_owned()),
        }
    }
}

/// The organisations an answer may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The SOC asking without naming one.
    All,
    Orgs(Vec<String>),
}

impl Scope {
    /// Binds for `(? = 1 OR has(?, org_id))`.
    pub(crate) fn binds(&self) -> (u8, Vec<String>) {
        match self {
            Scope::All => (1, vec![String::new()]),
            Scope::Orgs(orgs) => (0, orgs.clone()),
        }
    }

    pub fn contains(&self, org: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Orgs(orgs) => orgs.iter().any(|o| o == org),
        }
    }
}

/// An authenticated, registered person.
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: SpiffeId,
    pub user: UserRecord,
    pub source: String,
}

impl Caller {
    /// The organisations this call may see: `requested` if the caller may
    /// read it, else its own (every one for the SOC).
    pub fn scope(&self, requested: &str) -> Result<Scope, QueryError> {
        if requested.is_empty() {
            return Ok(match self.user.role {
                Role::Soc => Scope::All,
                _ => Scope::Orgs(vec![self.user.org.clone()]),
            });
        }
        if self.user.role.may_read(&self.user.org, requested) {
            Ok(Scope::Orgs(vec![requested.to_owned()]))
        } else {
            Err(QueryError::PermissionDenied(format!(
                "{} ({} of {}) may not read organisation {requested}",
                self.id,
                self.user.role.as_str(),
                self.user.org
            )))
        }
    }
}

/// The service; shared by the gRPC server and the HTTP routes.
#[derive(Clone)]
pub struct QueryService {
    plane: Arc<ControlPlane>,
    storage: Storage,
    connected: ConnectedDevices,
    book: Option<Arc<IncidentBook>>,
    utc_offset_secs: i32,
}

impl QueryService {
    pub fn new(
        plane: Arc<ControlPlane>,
        storage: Storage,
        connected: ConnectedDevices,
        book: Option<Arc<IncidentBook>>,
        utc_offset_secs: i32,
    ) -> QueryService {
        QueryService {
            plane,
            storage,
            connected,
            book,
            utc_offset_secs,
        }
    }

    /// Who calls: a registered person (not a device).
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Caller, QueryError> {
        let id = caller_identity(request)?;
        let source = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        match self.plane.user(&id) {
            Some(user) => Ok(Caller { id, user, source }),
            None => Err(QueryError::PermissionDenied(format!(
                "{id} is not a registered user; the query API is for analysts, admins and the SOC"
            ))),
        }
    }

    pub async fn list_incidents(
        &self,
        caller: &Caller,
        req: ListIncidentsRequest,
    ) -> Result<IncidentList, QueryError> {
        let scope = caller.scope(&req.org_id)?;
        read::list_incidents(&self.storage, &self.plane, &scope, &req).await
    }

    pub async fn get_incident(
        &self,
        caller: &Caller,
        req: GetIncidentRequest,
    ) -> Result<IncidentDetail, QueryError> {
        let scope = caller.scope("")?;
        check_incident_id(&req.id)?;
        read::incident_detail(&self.storage, &self.plane, &scope, &req.id).await
    }

    pub async fn update_incident(
        &self,
        caller: &Caller,
        req: UpdateIncidentRequest,
    ) -> Result<WireIncident, QueryError> {
        let action = match req.action.as_str() {
            "acknowledge" | "ack" => IncidentAction::Acknowledge,
            "resolve" => IncidentAction::Resolve,
            other => {
                return Err(QueryError::bad(format!(
                    "unknown action {other:?}: acknowledge or resolve"
                )))
            }
        };
        let audit_action = match action {
            IncidentAction::Acknowledge => "incident.acknowledge",
            IncidentAction::Resolve => "incident.resolve",
        };
        check_incident_id(&req.id)?;
        let scope = caller.scope("")?;
        let Some(row) = crate::incidents::find(&self.storage, &scope, &req.id).await? else {
            self.write_audit(
                caller,
                &caller.user.org,
                audit_action,
                &req.id,
                "denied",
                "no such incident in the caller's organisations",
            )
            .await;
            return Err(QueryError::NotFound(format!("no incident {}", req.id)));
        };
        let Some(book) = &self.book else {
            return Err(QueryError::FailedPrecondition(
                "detection is off on this collector; incidents cannot change".to_owned(),
            ));
        };
        let stored = row
            .to_incident()
            .map_err(|e| QueryError::Unavailable(e.to_string()))?;
        let org = stored.org.clone();
        match book
            .transition(stored, action, &caller.id.to_string(), &req.note)
            .await
        {
            Ok(changed) => {
                self.write_audit(caller, &org, audit_action, &req.id, "ok", &req.note)
                    .await;
                Ok(read::wire_incident(&crate::incidents::IncidentRow::of(
                    &changed,
                )))
            }
            Err(TransitionFailure::Refused(e)) => {
                self.write_audit(
                    caller,
                    &org,
                    audit_action,
                    &req.id,
                    "denied",
                    &e.to_string(),
                )
                .await;
                Err(match e {
                    // The request is wrong whatever the incident's status.
                    TransitionError::NoteRequired
                    | TransitionError::NoteTooLong { .. }
                    | TransitionError::NoActor => QueryError::InvalidArgument(e.to_string()),
                    TransitionError::AlreadyResolved | TransitionError::AlreadyAcknowledged => {
                        QueryError::FailedPrecondition(e.to_string())
                    }
                })
            }
            Err(TransitionFailure::NotStored(e)) => {
                self.write_audit(caller, &org, audit_action, &req.id, "error", &e.to_string())
                    .await;
                Err(QueryError::Unavailable(e.to_string()))
            }
        }
    }

    pub async fn search_events(
        &self,
        caller: &Caller,
        req: SearchEventsRequest,
    ) -> Result<EventList, QueryError> {
        let scope = caller.scope(&req.org_id)?;
        read::search_events(&self.storage, &scope, &req).await
    }

    pub async fn list_fleet(
        &self,
        caller: &Caller,
        req: ListFleetRequest,
    ) -> Result<FleetList, QueryError> {
        let scope = caller.scope(&req.org_id)?;
        read::fleet(&self.storage, &self.plane, &self.connected, &scope).await
    }

    pub async fn kpi(&self, caller: &Caller, req: KpiRequest) -> Result<Kpi, QueryError> {
        let scope = caller.scope(&req.org_id)?;
        read::kpi(&self.storage, &scope, self.utc_offset_secs).await
    }

    pub async fn trend(
        &self,
        caller: &Caller,
        org_id: &str,
        days: u32,
    ) -> Result<Trend, QueryError> {
        let scope = caller.scope(org_id)?;
        read::trend(&self.storage, &scope, days, self.utc_offset_secs).await
    }

    pub async fn audit(
        &self,
        caller: &Caller,
        org_id: &str,
        since: &str,
        page_size: u32,
    ) -> Result<AuditList, QueryError> {
        let scope = caller.scope(org_id)?;
        read::audit(&self.storage, &scope, since, page_size).await
    }

    async fn write_audit(
        &self,
        caller: &Caller,
        org: &str,
        action: &str,
        target: &str,
        result: &str,
        detail: &str,
    ) {
        crate::admin::write_audit_row(
            &self.storage,
            AuditRow {
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
            },
        )
        .await;
    }

    /// Runs `call` for the caller of `request`; refusals are logged.
    async fn serve<T, R, F>(
        &self,
        request: Request<T>,
        call: impl FnOnce(Self, Caller, T) -> F,
    ) -> Result<Response<R>, Status>
    where
        F: std::future::Future<Output = Result<R, QueryError>>,
    {
        let caller = self.caller(&request).inspect_err(|e| {
            warn!(error = %e, "query refused");
        })?;
        let reply = call(self.clone(), caller, request.into_inner()).await?;
        Ok(Response::new(reply))
    }
}

/// Incident ids are 16 lowercase hex digits.
fn check_incident_id(id: &str) -> Result<(), QueryError> {
    if id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err(QueryError::bad(format!(
            "{id:?} is not an incident id (16 lowercase hex digits)"
        )))
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn list_incidents(
        &self,
        request: Request<ListIncidentsRequest>,
    ) -> Result<Response<IncidentList>, Status> {
        self.serve(
            request,
            |s, c, r| async move { s.list_incidents(&c, r).await },
        )
        .await
    }

    async fn get_incident(
        &self,
        request: Request<GetIncidentRequest>,
    ) -> Result<Response<IncidentDetail>, Status> {
        self.serve(
            request,
            |s, c, r| async move { s.get_incident(&c, r).await },
        )
        .await
    }

    async fn update_incident(
        &self,
        request: Request<UpdateIncidentRequest>,
    ) -> Result<Response<WireIncident>, Status> {
        self.serve(
            request,
            |s, c, r| async move { s.update_incident(&c, r).await },
        )
        .await
    }

    async fn search_events(
        &self,
        request: Request<SearchEventsRequest>,
    ) -> Result<Response<EventList>, Status> {
        self.serve(
            request,
            |s, c, r| async move { s.search_events(&c, r).await },
        )
        .await
    }

    async fn list_fleet(
        &self,
        request: Request<ListFleetRequest>,
    ) -> Result<Response<FleetList>, Status> {
        self.serve(request, |s, c, r| async move { s.list_fleet(&c, r).await })
            .await
    }

    async fn get_kpi(&self, request: Request<KpiRequest>) -> Result<Response<Kpi>, Status> {
        self.serve(request, |s, c, r| async move { s.kpi(&c, r).await })
            .await
    }

    async fn get_trend(&self, request: Request<TrendRequest>) -> Result<Response<Trend>, Status> {
        self.serve(request, |s, c, r| async move {
            s.trend(&c, &r.org_id, r.days).await
        })
        .await
    }

    async fn list_audit(
        &self,
        request: Request<AuditRequest>,
    ) -> Result<Response<AuditList>, Status> {
        self.serve(request, |s, c, r| async move {
            s.audit(&c, &r.org_id, &r.since, r.page_size).await
        })
        .await
    }
}

/// Counts by severity name, every severity present.
pub(crate) fn severity_counts() -> BTreeMap<String, u64> {
    ["low", "medium", "high", "critical"]
        .into_iter()
        .map(|s| (s.to_owned(), 0))
        .collect()
}
