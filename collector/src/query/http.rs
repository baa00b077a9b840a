//! The query API as HTTP/JSON, on the gRPC port, over the same mutual TLS:
//! the same calls, the same checks, the messages of `query.proto` as JSON.
//!
//! | method and path | call |
//! |---|---|
//! | `GET /v1/incidents?status=&severity=&rule_id=&host=&org_id=&since=&until=&page_size=&page_token=` | ListIncidents |
//! | `GET /v1/incidents/{id}` | GetIncident |
//! | `POST /v1/incidents/{id}/acknowledge`, `/resolve`, body `{"note": "..."}` | UpdateIncident |
//! | `GET /v1/events?host=&kinds=process&kinds=file&since=&until=&text=&pid=&user=&org_id=&page_size=&page_token=` | SearchEvents |
//! | `GET /v1/fleet?org_id=` | ListFleet |
//! | `GET /v1/kpi?org_id=` | GetKpi |
//!
//! Errors are `{"code": "...", "message": "..."}` with 400, 401, 403, 404,
//! 409 or 503. Unknown query parameters are refused (a typo must not widen
//! a search silently).

use axum::{
    extract::{Path, Request, State},
    http::{request::Parts, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use proto::query::{
    GetIncidentRequest, KpiRequest, ListFleetRequest, ListIncidentsRequest, SearchEventsRequest,
    UpdateIncidentRequest,
};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::{Caller, QueryError, QueryService};
use crate::console::sessions::Sessions;

/// The routes' state: the service, and the console's sessions (a
/// signed-in console user calls these routes with the session cookie).
#[derive(Clone)]
pub struct HttpState {
    service: QueryService,
    sessions: Arc<Sessions>,
}

/// The routes, to merge with the gRPC services'.
pub fn router(service: QueryService, sessions: Arc<Sessions>) -> Router {
    Router::new()
        .route("/v1/incidents", get(list_incidents))
        .route("/v1/incidents/:id", get(get_incident))
        .route("/v1/incidents/:id/:action", post(update_incident))
        .route("/v1/events", get(search_events))
        .route("/v1/fleet", get(list_fleet))
        .route("/v1/kpi", get(kpi))
        .route("/v1/trend", get(trend))
        .route("/v1/audit", get(audit))
        .with_state(HttpState { service, sessions })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let status = match &self {
            QueryError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            QueryError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            QueryError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            QueryError::NotFound(_) => StatusCode::NOT_FOUND,
            QueryError::FailedPrecondition(_) => StatusCode::CONFLICT,
            QueryError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = ErrorBody {
            code: self.code().to_owned(),
            message: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

/// The caller of an HTTP request: the TLS connection's client certificate
/// (tonic puts the connection's details in the request), else the console
/// session's user.
fn caller(state: &HttpState, request: &Parts) -> Result<Caller, QueryError> {
    let probe = crate::console::authenticate(&state.sessions, request)?;
    state.service.caller(&probe)
}

/// The query string's parameters, each allowed name checked.
struct Params(Vec<(String, String)>);

impl Params {
    fn of(request: &Parts, allowed: &[&str]) -> Result<Params, QueryError> {
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(request.uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        for (name, _) in &pairs {
            if !allowed.contains(&name.as_str()) {
                return Err(QueryError::InvalidArgument(format!(
                    "unknown parameter {name:?}; this endpoint takes {}",
                    allowed.join(", ")
                )));
            }
        }
        Ok(Params(pairs))
    }

    /// The last value of `name`, or empty.
    fn text(&self, name: &str) -> String {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// Every value of `name`, comma-separated lists split.
    fn list(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(',').map(str::trim).map(str::to_owned))
            .filter(|v| !v.is_empty())
            .collect()
    }

    fn number(&self, name: &str) -> Result<u32, QueryError> {
        let text = self.text(name);
        if text.is_empty() {
            return Ok(0);
        }
        text.parse().map_err(|_| {
            QueryError::InvalidArgument(format!("{name} {text:?} is not a whole number"))
        })
    }
}

fn reply<T: Serialize>(result: Result<T, QueryError>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list_incidents(State(state): State<HttpState>, request: Request) -> Response {
    let (request, _body) = request.into_parts();
    let result = async {
        let caller = caller(&state, &request)?;
        let p = Params::of(
            &request,
            &[
                "org_id",
                "status",
                "severity",
                "rule_id",
                "host",
                "since",
                "until",
                "page_size",
                "page_token",
            ],
        )?;
        let req = ListIncidentsRequest {
            org_id: p.text("org_id"),
            status: p.text("status"),
            severity: p.text("severity"),
            rule_id: p.text("rule_id"),
            host: p.text("host"),
            since: p.text("since"),
            until: p.text("until"),
            page_size: p.number("page_size")?,
            page_token: p.text("page_token"),
        };
        state.service.list_incidents(&caller, req).await
    };
    reply(result.await)
}

async fn get_incident(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (request, _body) = request.into_parts();
    let result = async {
        let caller = caller(&state, &request)?;
        Params::of(&request, &[])?;
        state
            .service
            .get_incident(&caller, GetIncidentRequest { id })
            .await
    };
    reply(result.await)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct NoteBody {
    note: String,
}

async fn update_incident(
    State(state): State<HttpState>,
    Path((id, action)): Path<(String, String)>,
    request: Request,
) -> Response {
    let (request, body) = request.into_parts();
    let result = async {
        // The body first, whatever the answer: answering an HTTP/2 request
        // before reading its body resets the stream under the client.
        let bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .map_err(|e| QueryError::InvalidArgument(format!("request body: {e}")))?;
        let caller = caller(&state, &request)?;
        Params::of(&request, &[])?;
        if action != "acknowledge" && action != "resolve" {
            return Err(QueryError::NotFound(format!(
                "no action {action:?}: POST /v1/incidents/{{id}}/acknowledge or /resolve"
            )));
        }
        let body: NoteBody = if bytes.iter().all(u8::is_ascii_whitespace) {
            NoteBody::default()
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                QueryError::InvalidArgument(format!(
                    "the body must be JSON like {{\"note\": \"...\"}}: {e}"
                ))
            })?
        };
        state
            .service
            .update_incident(
                &caller,
                UpdateIncidentRequest {
                    id,
                    action,
                    note: body.note,
                },
            )
            .await
    };
    reply(result.await)
}

async fn search_events(State(state): State<HttpState>, request: Request) -> Response {
    let (request, _body) = request.into_parts();
    let result = async {
        let caller = caller(&state, &request)?;
        let p = Params::of(
            &request,
            &[
                "org_id",
                "host",
                "kinds",
                "kind",
                "since",
                "until",
                "text",
                "pid",
                "user",
                "page_size",
                "page_token",
            ],
        )?;
        let mut kinds = p.list("kinds");
        kinds.extend(p.list("kind"));
        let req = SearchEventsRequest {
            org_id: p.text("org_id"),
            host: p.text("host"),
            kinds,
            since: p.text("since"),
            until: p.text("until"),
            text: p.text("text"),
            pid: p.number("pid")?,
            user: p.text("user"),
            page_size: p.number("page_size")?,
            page_token: p.text("page_token"),
        };
        state.service.search_events(&caller, req).await
    };
    reply(result.await)
}

async fn list_fleet(State(state): State<HttpState>, request: Request) -> Response {
    let (request, _body) = request.into_parts();
    let result = async {
        let caller = caller(&state, &request)?;
        let p = Params::of(&request, &["org_id"])?;
        state
            .service
            .list_fleet(
                &caller,
                ListFleetRequest {
                    org_id: p.text("org_id"),
                },
            )
            .await
    };
    reply(result.await)
}

async fn kpi(State(state): State<HttpState>, request: Request) -> Response {
    let (request, _body) = request.into_parts();
    let result = async {
        let caller = caller(&state, &request)?;
        let p = Params::of(&request, &["org_id"])?;
        state
            .service
            .kpi(
                &caller,
                KpiRequest {
                    org_id: p.text("org_id"),
                },
            )
            .await
    };
    reply(result.await)
}

async fn trend(State(state): State<HttpState>, request: Request) -> Response {
    let (request, _body) = request.into_parts();
    let result = async {
        let caller = caller(&state, &request)?;
        let p = Params::of(&request, &["org_id", "days"])?;
        let days = match p.number("days")? {
            0 => 30,
            n => n,
        };
        state.service.trend(&caller, &p.text("org_id"), days).await
    };
    reply(result.await)
}

async fn audit(State(state): State<HttpState>, request: Request) -> Response {
    let (request, _body) = request.into_parts();
    let result = async {
        let caller = caller(&state, &request)?;
        let p = Params::of(&request, &["org_id", "since", "page_size"])?;
        state
            .service
            .audit(
                &caller,
                &p.text("org_id"),
                &p.text("since"),
                p.number("page_size")?,
            )
            .await
    };
    reply(result.await)
}
