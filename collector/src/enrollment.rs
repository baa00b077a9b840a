//! The `zt.enrollment.v1.Enrollment` gRPC service: one-time enrollment with a
//! token, and renewal authenticated by the device's current certificate.

use std::{sync::Arc, time::UNIX_EPOCH};

use proto::enrollment::{enrollment_server::Enrollment, Certificate, EnrollRequest, RenewRequest};
use tonic::{Request, Response, Status};
use tracing::warn;
use zt_identity::{SpiffeId, TokenError};

use crate::control_plane::{ControlPlane, EnrollError, IssuedDeviceCertificate};

#[derive(Debug, Clone)]
pub struct EnrollmentService {
    plane: Arc<ControlPlane>,
}

impl EnrollmentService {
    pub fn new(plane: Arc<ControlPlane>) -> EnrollmentService {
        EnrollmentService { plane }
    }
}

/// The caller's identity from its verified client certificate.
// `Status` is what every handler returns; boxing it here would only move
// the unboxing into each of them.
#[allow(clippy::result_large_err)]
pub fn caller_identity<T>(request: &Request<T>) -> Result<SpiffeId, Status> {
    // A console session, put there by the HTTP layer after it checked the
    // cookie (and, for changes, the CSRF token); never from the wire.
    if let Some(session) = request
        .extensions()
        .get::<crate::console::SessionIdentity>()
    {
        return Ok(session.0.clone());
    }
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    zt_identity::peer_identity_from_chain(&certs)
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))
}

/// The caller, which must be a device whose identity is not revoked (the
/// handshake already refused revoked certificates; this catches a device
/// revoked since, and users calling device services).
#[allow(clippy::result_large_err)] // as above
pub fn caller_device<T>(request: &Request<T>, plane: &ControlPlane) -> Result<SpiffeId, Status> {
    let id = caller_identity(request)?;
    if id.device_id().is_none() {
        return Err(Status::permission_denied(format!(
            "{id} is not a device; only devices use this service"
        )));
    }
    if plane.is_revoked(&id) {
        return Err(Status::permission_denied(format!("{id} is revoked")));
    }
    Ok(id)
}

fn status(error: EnrollError) -> Status {
    match &error {
        EnrollError::BadRequest(_) | EnrollError::NotADevice(_) => {
            Status::invalid_argument(error.to_string())
        }
        EnrollError::Token(TokenError::Malformed) => Status::invalid_argument(error.to_string()),
        EnrollError::Token(_) | EnrollError::Revoked(_) => {
            Status::permission_denied(error.to_string())
        }
        EnrollError::Issue(_) | EnrollError::Registry(_) => Status::internal(error.to_string()),
    }
}

fn reply(issued: IssuedDeviceCertificate, policy_signing_key: Vec<u8>) -> Certificate {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    };
    Certificate {
        certificate_pem: issued.certificate_pem,
        ca_bundle_pem: issued.ca_bundle_pem,
        spiffe_id: issued.id.to_string(),
        org_id: issued.id.org().to_owned(),
        device_id: issued.id.device_id().unwrap_or_default().to_owned(),
        not_before_unix: unix(issued.not_before),
        not_after_unix: unix(issued.not_after),
        policy_signing_key,
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<Certificate>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let plane = self.plane.clone();
        // Token redemption writes and fsyncs the token store.
        let issued = tokio::task::spawn_blocking(move || {
            plane.enroll(&req.token, &req.csr_pem, &req.hostname, &req.agent_version)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|err| {
            warn!(?peer, error = %err, "enrollment refused");
            status(err)
        })?;
        Ok(Response::new(reply(
            issued,
            self.plane.policy().public_key(),
        )))
    }

    async fn renew(&self, request: Request<RenewRequest>) -> Result<Response<Certificate>, Status> {
        let caller = caller_identity(&request)?;
        let csr_pem = request.into_inner().csr_pem;
        let plane = self.plane.clone();
        let issued = tokio::task::spawn_blocking(move || plane.renew(&caller, &csr_pem))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|err| {
                warn!(error = %err, "renewal refused");
                status(err)
            })?;
        Ok(Response::new(reply(
            issued,
            self.plane.policy().public_key(),
        )))
    }
}
