//! Shared helpers: fixtures and an in-memory TLS handshake (no sockets).

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, ServerName};
use zt_identity::{CertificateAuthority, DeviceKey, SpiffeId, TrustDomain};

pub const DAY: Duration = Duration::from_secs(24 * 3600);
pub const HOUR: Duration = Duration::from_secs(3600);

pub fn td() -> TrustDomain {
    TrustDomain::new("pref.example").unwrap()
}

pub fn ca() -> CertificateAuthority {
    CertificateAuthority::generate(&td(), 365 * DAY, SystemTime::now()).unwrap()
}

pub fn device_id(org: &str, device: &str) -> SpiffeId {
    SpiffeId::device(&td(), org, device).unwrap()
}

/// A device key and a certificate for it issued by `ca` at `now`.
pub struct Device {
    pub id: SpiffeId,
    pub key: DeviceKey,
    pub cert: CertificateDer<'static>,
    pub cert_pem: String,
    pub serial: Vec<u8>,
}

pub fn enroll_at(
    ca: &CertificateAuthority,
    org: &str,
    name: &str,
    ttl: Duration,
    now: SystemTime,
) -> Device {
    let id = device_id(org, name);
    let key = DeviceKey::generate().unwrap();
    let issued = ca.sign_csr(&key.csr_pem().unwrap(), &id, ttl, now).unwrap();
    Device {
        id,
        key,
        cert: issued.der,
        cert_pem: issued.pem,
        serial: issued.serial,
    }
}

pub fn enroll(ca: &CertificateAuthority, org: &str, name: &str) -> Device {
    enroll_at(ca, org, name, DAY, SystemTime::now())
}

/// Which side's `process_new_packets` failed.
#[derive(Debug)]
pub enum Failure {
    Client(rustls::Error),
    Server(rustls::Error),
}

impl Failure {
    pub fn server(self) -> rustls::Error {
        match self {
            Failure::Server(e) => e,
            Failure::Client(e) => panic!("expected the server to fail, but the client did: {e}"),
        }
    }

    pub fn client(self) -> rustls::Error {
        match self {
            Failure::Client(e) => e,
            Failure::Server(e) => panic!("expected the client to fail, but the server did: {e}"),
        }
    }
}

fn pump<A, B>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
) -> Result<bool, rustls::Error> {
    let mut moved = false;
    while from.wants_write() {
        let mut buf = Vec::new();
        from.write_tls(&mut buf).unwrap();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets()?;
        }
        moved = true;
    }
    Ok(moved)
}

/// Runs a complete TLS handshake between a client and a server in memory,
/// then sends "ping" client to server and "pong" back, proving the channel
/// works. Returns both connections for inspection.
pub fn handshake(
    client: ClientConfig,
    server: ServerConfig,
    server_name: &str,
) -> Result<(ClientConnection, ServerConnection), Failure> {
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let mut c = ClientConnection::new(Arc::new(client), name).unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..20 {
        let a = pump(&mut c, &mut s).map_err(Failure::Server)?;
        let b = pump(&mut s, &mut c).map_err(Failure::Client)?;
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            break;
        }
        assert!(a || b, "handshake stalled");
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake did not finish"
    );

    c.writer().write_all(b"ping").unwrap();
    pump(&mut c, &mut s).map_err(Failure::Server)?;
    let mut got = [0u8; 4];
    s.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    s.writer().write_all(b"pong").unwrap();
    pump(&mut s, &mut c).map_err(Failure::Client)?;
    c.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    Ok((c, s))
}

/// The collector's TLS material: a server certificate for `collector.pref.example`.
pub fn collector_identity(ca: &CertificateAuthority) -> zt_identity::TlsIdentity {
    let server = ca
        .issue_server_certificate(
            &["collector.pref.example".to_owned()],
            &["127.0.0.1".parse().unwrap()],
            30 * DAY,
        )
        .unwrap();
    zt_identity::TlsIdentity::from_pem(server.chain_pem.as_bytes(), server.key_pem.as_bytes())
        .unwrap()
}
