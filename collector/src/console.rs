//! The SOC web console (docs/console.md): its static files, embedded in
//! the binary and served at `/console/`, sign-in with a local account
//! ([`accounts`]) or the browser's client certificate, and sessions
//! ([`sessions`]). The console reads and writes through the query API's
//! HTTP/JSON routes ([`crate::query::http`]) and a few admin routes here.
//!
//! Who calls an HTTP route ([`authenticate`]): the TLS client certificate
//! when there is one, else the session cookie; a change (`POST`,
//! `DELETE`) made with the cookie needs the session's CSRF token in
//! `X-ZT-CSRF`, and one made with a certificate must be a JSON request
//! (browsers present certificates to other sites' requests too; a JSON
//! request from another site needs a CORS preflight, never granted). The session's user is handed to the services as a
//! [`SessionIdentity`] in the request's extensions, where
//! [`crate::enrollment::caller_identity`] finds it: the same role checks,
//! organisation scoping and audit as for `ztctl`.

pub mod accounts;
pub mod sessions;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));
}

use std::sync::Arc;

use axum::{
    extract::{Path, Request, State},
    http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
    Json, Router,
};
use proto::control::{
    admin_server::Admin, GetPolicyRequest, PolicyStatusRequest, RevokeDeviceRequest,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use zt_identity::SpiffeId;

use self::{accounts::Accounts, sessions::Sessions};
use crate::{
    admin::AdminService,
    control_plane::{ControlPlane, Role},
    query::{QueryError, QueryService},
    storage::{AuditRow, Storage},
};

/// The session cookie.
pub const COOKIE: &str = "zt_session";
/// The header that carries the CSRF token on changes.
pub const CSRF_HEADER: &str = "x-zt-csrf";
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'self'";

/// A signed-in console user, for the services (see the module docs).
#[derive(Debug, Clone)]
pub struct SessionIdentity(pub SpiffeId);

/// The console's state, shared by its routes.
#[derive(Clone)]
pub struct Console {
    plane: Arc<ControlPlane>,
    storage: Storage,
    admin: AdminService,
    query: QueryService,
    accounts: Accounts,
    sessions: Arc<Sessions>,
}

impl Console {
    pub fn new(
        plane: Arc<ControlPlane>,
        storage: Storage,
        admin: AdminService,
        query: QueryService,
        state_dir: &std::path::Path,
        sessions: Arc<Sessions>,
    ) -> Console {
        Console {
            plane,
            storage,
            admin,
            query,
            accounts: Accounts::new(state_dir),
            sessions,
        }
    }

    /// The console's routes: its files, sign-in, and the admin routes.
    pub fn router(self) -> Router {
        Router::new()
            .route(
                "/console",
                get(|| async { Redirect::permanent("/console/") }),
            )
            .route("/console/", get(index))
            .route("/console/:file", get(asset))
            .route("/console/api/session", post(sign_in).delete(sign_out))
            .route("/console/api/me", get(me))
            .route("/v1/policy/status", get(policy_status))
            .route("/v1/policy", get(policy_layers))
            .route("/v1/policy/history", get(policy_history))
            .route("/v1/devices/:org/:device/revoke", post(revoke_device))
            .with_state(self)
    }

    /// Writes an audit record of a console act; `actor` is (who, role),
    /// `outcome` (result, detail).
    async fn audit(
        &self,
        org: &str,
        actor: (&str, &str),
        action: &str,
        outcome: (&str, &str),
        source: &str,
    ) {
        crate::admin::write_audit_row(
            &self.storage,
            AuditRow {
                org_id: org.to_owned(),
                time: 0,
                time_ns: 0,
                actor: actor.0.to_owned(),
                actor_role: actor.1.to_owned(),
                action: action.to_owned(),
                target: String::new(),
                source: source.to_owned(),
                result: outcome.0.to_owned(),
                detail: outcome.1.to_owned(),
            },
        )
        .await;
    }
}

/// The value of the session cookie, if the request has one.
fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The request as the services see it: its connection (and so the client
/// certificate) and, without a certificate, the session's user.
pub fn authenticate(sessions: &Sessions, parts: &Parts) -> Result<tonic::Request<()>, QueryError> {
    let mut probe = axum::http::Request::new(());
    *probe.extensions_mut() = parts.extensions.clone();
    let mut request = tonic::Request::from_http(probe);
    let changes = !matches!(parts.method, Method::GET | Method::HEAD);
    if request.peer_certs().is_some_and(|certs| !certs.is_empty()) {
        // A browser presents its certificate to any site's request too:
        // a change must be a JSON request, which another site's page can
        // only send after a CORS preflight this server never grants.
        let json = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if changes && !json {
            return Err(QueryError::PermissionDenied(
                "a change made with a client certificate must be a JSON request \
                 (content-type: application/json)"
                    .to_owned(),
            ));
        }
        return Ok(request);
    }
    let Some(token) = session_token(&parts.headers) else {
        return Ok(request);
    };
    let Some(session) = sessions.get(&token) else {
        return Err(QueryError::Unauthenticated(
            "the session has ended; sign in again".to_owned(),
        ));
    };
    if changes {
        let sent = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if sent.is_empty() || sent != session.csrf {
            return Err(QueryError::PermissionDenied(format!(
                "a change made with the session cookie needs its CSRF token in {CSRF_HEADER}"
            )));
        }
    }
    request.extensions_mut().insert(SessionIdentity(session.id));
    Ok(request)
}

fn security_headers(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") | Some("mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

fn serve_asset(name: &str) -> Response {
    let Some((_, bytes)) = assets::ASSETS.iter().find(|(n, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let mut response =
        ([(header::CONTENT_TYPE, content_type(name))], bytes.to_vec()).into_response();
    security_headers(&mut response);
    response
}

async fn index() -> Response {
    serve_asset("index.html")
}

async fn asset(Path(file): Path<String>) -> Response {
    serve_asset(&file)
}

/// What the console knows of its user.
#[derive(Debug, Serialize, Deserialize)]
pub struct Me {
    pub user: String,
    pub org_id: String,
    pub role: String,
    pub spiffe_id: String,
    /// `password` or `certificate`.
    pub auth: String,
    /// Send back in `X-ZT-CSRF` on changes (empty for certificates).
    pub csrf: String,
    /// The organisations the user may read.
    pub orgs: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SignIn {
    user: String,
    password: String,
}

fn orgs_of(plane: &ControlPlane, org: &str, role: Role) -> Vec<String> {
    match role {
        Role::Soc => plane.organisations(),
        _ => vec![org.to_owned()],
    }
}

fn source_of(parts: &Parts) -> String {
    let probe = tonic::Request::from_http({
        let mut r = axum::http::Request::new(());
        *r.extensions_mut() = parts.extensions.clone();
        r
    });
    probe
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

fn cookie(token: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("zt_session=; Path=/; Max-Age=0"))
}

async fn sign_in(State(console): State<Console>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let source = source_of(&parts);
    let bytes = match axum::body::to_bytes(body, 16 * 1024).await {
        Ok(bytes) => bytes,
        Err(e) => return QueryError::InvalidArgument(format!("request body: {e}")).into_response(),
    };
    let form: SignIn = match serde_json::from_slice(&bytes) {
        Ok(form) => form,
        Err(e) => {
            return QueryError::InvalidArgument(format!(
                "the body must be JSON like {{\"user\": \"...\", \"password\": \"...\"}}: {e}"
            ))
            .into_response()
        }
    };
    if form.user.is_empty() || form.user.len() > 128 || form.password.len() > 1024 {
        return QueryError::InvalidArgument("a user name and a password, please".to_owned())
            .into_response();
    }
    if let Some(left) = console.sessions.locked(&form.user) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(serde_json::json!({
                "code": "locked",
                "message": format!(
                    "too many wrong passwords for {}; try again in {} s",
                    form.user,
                    left.as_secs() + 1
                ),
            })),
        )
            .into_response();
    }
    // Argon2 takes tens of milliseconds of CPU: off the async threads.
    let accounts = console.accounts.clone();
    let (user, password) = (form.user.clone(), form.password);
    let verified = tokio::task::spawn_blocking(move || accounts.verify(&user, &password)).await;
    let account = match verified {
        Ok(Ok(account)) => account,
        Ok(Err(e)) => {
            warn!(error = %e, "console accounts unreadable");
            return QueryError::Unavailable(e.to_string()).into_response();
        }
        Err(e) => return QueryError::Unavailable(e.to_string()).into_response(),
    };
    // The registry decides the role, now: an account whose user was
    // re-registered or removed follows.
    let registered = account.as_ref().and_then(|a| {
        let id = SpiffeId::user(console.plane.trust_domain(), &a.org, &a.name).ok()?;
        let user = console.plane.user(&id)?;
        Some((id, user))
    });
    let Some((id, user)) = registered else {
        let locked = console.sessions.failed(&form.user);
        // Refusals go to the named account's organisation, whose
        // analysts may need to know someone is guessing.
        let org = console.accounts.org_of(&form.user).unwrap_or_default();
        let detail = if locked {
            "wrong user name or password; the account is locked for 5 minutes"
        } else {
            "wrong user name or password"
        };
        console
            .audit(
                &org,
                (&form.user, ""),
                "console.sign_in",
                ("denied", detail),
                &source,
            )
            .await;
        return QueryError::Unauthenticated("wrong user name or password".to_owned())
            .into_response();
    };
    console.sessions.succeeded(&form.user);
    let (token, session) = console
        .sessions
        .open(id.clone(), &user.name, &user.org, user.role);
    console
        .audit(
            &user.org,
            (&id.to_string(), user.role.as_str()),
            "console.sign_in",
            ("ok", "password"),
            &source,
        )
        .await;
    info!(user = %id, "console sign-in");
    let me = Me {
        user: user.name.clone(),
        org_id: user.org.clone(),
        role: user.role.as_str().to_owned(),
        spiffe_id: id.to_string(),
        auth: "password".to_owned(),
        csrf: session.csrf,
        orgs: orgs_of(&console.plane, &user.org, user.role),
    };
    let mut response = Json(me).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        cookie(&token, sessions::MAX_AGE.as_secs()),
    );
    response
}

async fn sign_out(State(console): State<Console>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // Read (and drop) any body before answering (HTTP/2 stream reset).
    let _ = axum::body::to_bytes(body, 16 * 1024).await;
    let source = source_of(&parts);
    let Some(token) = session_token(&parts.headers) else {
        return QueryError::Unauthenticated("not signed in".to_owned()).into_response();
    };
    let session = match authenticate(&console.sessions, &parts) {
        Ok(request) => request.extensions().get::<SessionIdentity>().cloned(),
        Err(e) => return e.into_response(),
    };
    let Some(SessionIdentity(id)) = session else {
        return QueryError::Unauthenticated("not signed in".to_owned()).into_response();
    };
    console.sessions.close(&token);
    console
        .audit(
            id.org(),
            (&id.to_string(), ""),
            "console.sign_out",
            ("ok", ""),
            &source,
        )
        .await;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie("", 0));
    response
}

async fn me(State(console): State<Console>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let result = (|| {
        let request = authenticate(&console.sessions, &parts)?;
        let caller = console.query.caller(&request)?;
        let session = request.extensions().get::<SessionIdentity>().is_some();
        let csrf = if session {
            session_token(&parts.headers)
                .and_then(|t| console.sessions.get(&t))
                .map(|s| s.csrf)
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok::<Me, QueryError>(Me {
            user: caller.user.name.clone(),
            org_id: caller.user.org.clone(),
            role: caller.user.role.as_str().to_owned(),
            spiffe_id: caller.id.to_string(),
            auth: if session { "password" } else { "certificate" }.to_owned(),
            csrf,
            orgs: orgs_of(&console.plane, &caller.user.org, caller.user.role),
        })
    })();
    match result {
        Ok(me) => Json(me).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A tonic status as the HTTP API's error.
fn status_error(status: tonic::Status) -> QueryError {
    let message = status.message().to_owned();
    match status.code() {
        tonic::Code::Unauthenticated => QueryError::Unauthenticated(message),
        tonic::Code::PermissionDenied => QueryError::PermissionDenied(message),
        tonic::Code::InvalidArgument => QueryError::InvalidArgument(message),
        tonic::Code::NotFound => QueryError::NotFound(message),
        tonic::Code::FailedPrecondition => QueryError::FailedPrecondition(message),
        _ => QueryError::Unavailable(message),
    }
}

/// Runs an admin call for the HTTP request's caller.
async fn as_admin<M, R, F, Fut>(console: &Console, parts: &Parts, message: M, call: F) -> Response
where
    R: Serialize,
    F: FnOnce(AdminService, tonic::Request<M>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let request = match authenticate(&console.sessions, parts) {
        Ok(request) => request,
        Err(e) => return e.into_response(),
    };
    let (metadata, extensions, ()) = request.into_parts();
    let request = tonic::Request::from_parts(metadata, extensions, message);
    match call(console.admin.clone(), request).await {
        Ok(reply) => Json(reply.into_inner()).into_response(),
        Err(status) => status_error(status).into_response(),
    }
}

fn org_param(parts: &Parts) -> Result<String, QueryError> {
    let mut org = String::new();
    for (name, value) in form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()) {
        if name != "org_id" {
            return Err(QueryError::InvalidArgument(format!(
                "unknown parameter {name:?}; this endpoint takes org_id"
            )));
        }
        org = value.into_owned();
    }
    Ok(org)
}

async fn policy_status(State(console): State<Console>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let org_id = match org_param(&parts) {
        Ok(org) => org,
        Err(e) => return e.into_response(),
    };
    as_admin(
        &console,
        &parts,
        PolicyStatusRequest { org_id },
        |admin, request| async move { admin.policy_status(request).await },
    )
    .await
}

/// `org_id` and `serial` of a policy route.
fn policy_params(parts: &Parts) -> Result<(String, Option<u64>), QueryError> {
    let mut org = String::new();
    let mut serial = None;
    for (name, value) in form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()) {
        match &*name {
            "org_id" => org = value.into_owned(),
            "serial" => {
                serial = Some(value.parse::<u64>().map_err(|_| {
                    QueryError::InvalidArgument(format!("serial {value:?} is not a number"))
                })?)
            }
            _ => {
                return Err(QueryError::InvalidArgument(format!(
                    "unknown parameter {name:?}; this endpoint takes org_id and serial"
                )))
            }
        }
    }
    Ok((org, serial))
}

/// The one organisation a policy read is about: the one named, if the
/// caller may read it, else the caller's own.
fn policy_org(console: &Console, parts: &Parts, requested: &str) -> Result<String, QueryError> {
    let request = authenticate(&console.sessions, parts)?;
    let caller = console.query.caller(&request)?;
    caller.scope(requested)?;
    Ok(if requested.is_empty() {
        caller.user.org
    } else {
        requested.to_owned()
    })
}

/// A serial as the console shows it: who issued it, when, the texts.
#[derive(Debug, Serialize)]
struct IssuedPolicy {
    serial: u64,
    org_id: String,
    issued_unix: u64,
    issued_by: String,
    restores: u64,
    canary: String,
    baseline: String,
    organisation: String,
}

impl IssuedPolicy {
    fn of(bundle: policy::bundle::Bundle) -> IssuedPolicy {
        IssuedPolicy {
            serial: bundle.serial,
            org_id: bundle.org,
            issued_unix: bundle.issued_unix,
            issued_by: bundle.issued_by,
            restores: bundle.restores.unwrap_or(0),
            canary: bundle.canary.unwrap_or_default(),
            baseline: bundle.baseline,
            organisation: bundle.organisation.unwrap_or_default(),
        }
    }
}

/// The serials issued to an organisation, newest first (50 at most), with
/// their texts: what the console diffs.
async fn policy_history(State(console): State<Console>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let result = (|| {
        let (requested, serial) = policy_params(&parts)?;
        if serial.is_some() {
            return Err(QueryError::InvalidArgument(
                "the history takes org_id only".to_owned(),
            ));
        }
        let org = policy_org(&console, &parts, &requested)?;
        let bundles = console
            .plane
            .policy()
            .store()
            .history(&org, 50)
            .map_err(|e| QueryError::Unavailable(e.to_string()))?;
        Ok(serde_json::json!({
            "org_id": org,
            "serials": bundles.into_iter().map(IssuedPolicy::of).collect::<Vec<_>>(),
        }))
    })();
    match result {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn policy_layers(State(console): State<Console>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let (org_id, serial) = match policy_params(&parts) {
        Ok(params) => params,
        Err(e) => return e.into_response(),
    };
    if let Some(serial) = serial {
        // An earlier serial, from the store.
        let result = policy_org(&console, &parts, &org_id).and_then(|org| {
            console
                .plane
                .policy()
                .store()
                .issued(&org, serial)
                .map_err(|e| QueryError::Unavailable(e.to_string()))?
                .ok_or_else(|| QueryError::NotFound(format!("no serial {serial} for {org}")))
        });
        return match result {
            Ok(bundle) => Json(IssuedPolicy::of(bundle)).into_response(),
            Err(e) => e.into_response(),
        };
    }
    as_admin(
        &console,
        &parts,
        GetPolicyRequest { org_id },
        |admin, request| async move { admin.get_policy(request).await },
    )
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RevokeBody {
    reason: String,
}

async fn revoke_device(
    State(console): State<Console>,
    Path((org_id, device_id)): Path<(String, String)>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, 16 * 1024).await {
        Ok(bytes) => bytes,
        Err(e) => return QueryError::InvalidArgument(format!("request body: {e}")).into_response(),
    };
    let body: RevokeBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        RevokeBody::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(body) => body,
            Err(e) => {
                return QueryError::InvalidArgument(format!(
                    "the body must be JSON like {{\"reason\": \"...\"}}: {e}"
                ))
                .into_response()
            }
        }
    };
    as_admin(
        &console,
        &parts,
        RevokeDeviceRequest {
            org_id,
            device_id,
            reason: body.reason,
        },
        |admin, request| async move { admin.revoke_device(request).await },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; zt_session=abc123; lang=ja"),
        );
        assert_eq!(session_token(&headers).as_deref(), Some("abc123"));
        headers.insert(header::COOKIE, HeaderValue::from_static("zt_sessionx=1"));
        assert_eq!(session_token(&headers), None);
    }

    #[test]
    fn assets_have_their_types() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("app.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("x"), "application/octet-stream");
    }
}
