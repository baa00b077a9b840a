//! A real tonic server and client over loopback TCP with mutual TLS: the
//! handler sees the client's SPIFFE identity; clients without a valid
//! certificate, or checking the wrong server name, do not get through.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use proto::control::{
    control_client::ControlClient,
    control_server::{Control, ControlServer},
    StatusReply, StatusRequest,
};
use tokio::net::TcpListener;
use tonic::{transport::Server, Request, Response, Status};
use zt_identity::{
    cert::peer_identity_from_chain, tls, CertificateAuthority, DeviceKey, SpiffeId, TrustDomain,
};

const DAY: Duration = Duration::from_secs(86_400);

/// Answers with the caller's SPIFFE id in `version`.
struct WhoAmI;

#[tonic::async_trait]
impl Control for WhoAmI {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let id =
            peer_identity_from_chain(&certs).map_err(|e| Status::unauthenticated(e.to_string()))?;
        Ok(Response::new(StatusReply {
            version: id.to_string(),
            ..StatusReply::default()
        }))
    }
}

struct Pki {
    ca: CertificateAuthority,
    server: rustls::ServerConfig,
}

fn pki() -> Pki {
    let td = TrustDomain::new("pref.example").unwrap();
    let ca = CertificateAuthority::generate(&td, 30 * DAY, SystemTime::now()).unwrap();
    let server = server_config(&ca, &["localhost"], &["127.0.0.1"]);
    Pki { ca, server }
}

fn server_config(ca: &CertificateAuthority, names: &[&str], ips: &[&str]) -> rustls::ServerConfig {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let ips: Vec<std::net::IpAddr> = ips.iter().map(|ip| ip.parse().unwrap()).collect();
    let server = ca.issue_server_certificate(&names, &ips, DAY).unwrap();
    tls::server_config_from_pem(
        ca.bundle_pem().as_bytes(),
        server.chain_pem.as_bytes(),
        server.key_pem.as_bytes(),
        false,
    )
    .unwrap()
}

fn device(ca: &CertificateAuthority, org: &str, name: &str) -> (SpiffeId, rustls::ClientConfig) {
    let id = SpiffeId::device(ca.trust_domain(), org, name).unwrap();
    let key = DeviceKey::generate().unwrap();
    let issued = ca
        .sign_csr(&key.csr_pem().unwrap(), &id, DAY, SystemTime::now())
        .unwrap();
    let config = tls::client_config_from_pem(
        ca.bundle_pem().as_bytes(),
        issued.pem.as_bytes(),
        key.to_pem().as_bytes(),
    )
    .unwrap();
    (id, config)
}

async fn serve(config: rustls::ServerConfig) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = zt_grpc_tls::serve_tls(listener, config);
    tokio::spawn(
        Server::builder()
            .add_service(ControlServer::new(WhoAmI))
            .serve_with_incoming(incoming),
    );
    port
}

#[tokio::test]
async fn the_handler_sees_the_client_identity() {
    let pki = pki();
    let port = serve(pki.server).await;
    let (id, client) = device(&pki.ca, "city-a", "pc-0001");
    for url in [
        format!("https://127.0.0.1:{port}"),
        format!("https://localhost:{port}"),
    ] {
        let channel = zt_grpc_tls::channel(&url, client.clone()).await.unwrap();
        let reply = ControlClient::new(channel)
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.version, id.to_string(), "{url}");
    }
}

#[tokio::test]
async fn a_client_without_certificate_is_unauthenticated_at_the_handler() {
    let pki = pki();
    let bundle = pki.ca.bundle_der();
    let port = serve(pki.server).await;
    let anonymous = tls::client_config_without_certificate(&bundle).unwrap();
    let channel = zt_grpc_tls::channel(&format!("https://127.0.0.1:{port}"), anonymous)
        .await
        .unwrap();
    let err = ControlClient::new(channel)
        .status(StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
}

#[tokio::test]
async fn a_certificate_from_another_ca_or_a_wrong_server_name_is_refused() {
    let pki = pki();
    let port = serve(pki.server).await;

    let rogue = CertificateAuthority::generate(
        &TrustDomain::new("pref.example").unwrap(),
        DAY,
        SystemTime::now(),
    )
    .unwrap();
    // Trusts the real CA, but its own certificate is the rogue CA's.
    let (_, rogue_client) = device(&rogue, "city-a", "pc-0001");
    let rogue_key = DeviceKey::generate().unwrap();
    let rogue_cert = rogue
        .sign_csr(
            &rogue_key.csr_pem().unwrap(),
            &SpiffeId::device(rogue.trust_domain(), "city-a", "pc-0001").unwrap(),
            DAY,
            SystemTime::now(),
        )
        .unwrap();
    let mixed = tls::client_config_from_pem(
        pki.ca.bundle_pem().as_bytes(),
        rogue_cert.pem.as_bytes(),
        rogue_key.to_pem().as_bytes(),
    )
    .unwrap();
    let url = format!("https://127.0.0.1:{port}");
    // The server refuses the client certificate: the call fails.
    let refused = async {
        let channel = zt_grpc_tls::channel(&url, mixed).await?;
        ControlClient::new(channel)
            .status(StatusRequest {})
            .await
            .map_err(|e| -> Box<dyn std::error::Error> { Box::new(e) })?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    assert!(refused.is_err(), "a rogue client certificate got through");

    // The client refuses a server that its CA did not sign.
    assert!(zt_grpc_tls::channel(&url, rogue_client).await.is_err());

    // And a server whose certificate does not name the host used.
    let elsewhere = serve(server_config(&pki.ca, &["collector.example"], &[])).await;
    let (_, client) = device(&pki.ca, "city-a", "pc-0002");
    let by_ip = format!("https://127.0.0.1:{elsewhere}");
    assert!(zt_grpc_tls::channel(&by_ip, client.clone()).await.is_err());
    let by_other_name = format!("https://localhost:{elsewhere}");
    assert!(zt_grpc_tls::channel(&by_other_name, client).await.is_err());
}

#[test]
fn urls_must_be_https_with_a_host() {
    let target = zt_grpc_tls::parse_url("https://collector.pref.example:50051").unwrap();
    assert_eq!(target.authority, "collector.pref.example:50051");
    assert_eq!(
        zt_grpc_tls::parse_url("https://[::1]:7").unwrap().authority,
        "[::1]:7"
    );
    assert_eq!(
        zt_grpc_tls::parse_url("https://h").unwrap().authority,
        "h:443"
    );
    for bad in ["http://h:1", "h:1", "https://", "not a url"] {
        assert!(zt_grpc_tls::parse_url(bad).is_err(), "{bad}");
    }
}
