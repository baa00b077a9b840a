//! Identities for tests: device certificates signed by a collector's CA
//! (for tests that speak gRPC to the collector themselves), and enrollment
//! of a real agent the way an installer does it.

use std::{
    path::Path,
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{ensure, Context as _, Result};
use zt_identity::{CertificateAuthority, DeviceKey, SpiffeId};

/// A TLS client configuration for device `device` of `org`, with a
/// certificate from the CA in `collector_state` (the collector's
/// `identity.state_dir`), as enrollment would have issued.
pub fn device_tls(collector_state: &Path, org: &str, device: &str) -> Result<rustls::ClientConfig> {
    device_tls_issued(
        collector_state,
        org,
        device,
        SystemTime::now(),
        Duration::from_secs(3600),
    )
}

/// [`device_tls`] with a certificate issued at `issued` for `ttl` (in the
/// past, for an expired one).
pub fn device_tls_issued(
    collector_state: &Path,
    org: &str,
    device: &str,
    issued: SystemTime,
    ttl: Duration,
) -> Result<rustls::ClientConfig> {
    let ca = CertificateAuthority::load(&collector_state.join("ca"))
        .with_context(|| format!("loading the CA in {}", collector_state.display()))?;
    let id = SpiffeId::device(ca.trust_domain(), org, device)?;
    let key = DeviceKey::generate()?;
    let issued = ca.sign_csr(&key.csr_pem()?, &id, ttl, issued)?;
    Ok(zt_identity::tls::client_config_from_pem(
        ca.bundle_pem().as_bytes(),
        issued.pem.as_bytes(),
        key.to_pem().as_bytes(),
    )?)
}

/// A tunnel peer's TLS client configuration for device `device` of `org`:
/// trusting the CA in `collector_state` (the gateway's), and presenting a
/// certificate from that CA, or, with `foreign_ca_dir`, from a CA of its own
/// made there (same trust domain name, another key).
pub fn tunnel_peer_tls(
    collector_state: &Path,
    foreign_ca_dir: Option<&Path>,
    org: &str,
    device: &str,
) -> Result<rustls::ClientConfig> {
    let ours = CertificateAuthority::load(&collector_state.join("ca"))
        .with_context(|| format!("loading the CA in {}", collector_state.display()))?;
    let issuer = match foreign_ca_dir {
        Some(dir) => CertificateAuthority::load_or_create(&dir.join("ca"), ours.trust_domain())?,
        None => CertificateAuthority::load(&collector_state.join("ca"))?,
    };
    let id = SpiffeId::device(issuer.trust_domain(), org, device)?;
    let key = DeviceKey::generate()?;
    let issued = issuer.sign_csr(
        &key.csr_pem()?,
        &id,
        Duration::from_secs(3600),
        SystemTime::now(),
    )?;
    let identity =
        zt_identity::TlsIdentity::from_pem(issued.pem.as_bytes(), key.to_pem().as_bytes())?;
    Ok(zt_identity::tls::spiffe_client_config(
        &zt_identity::pem::certificates_from_pem(ours.bundle_pem().as_bytes())?,
        identity.chain,
        identity.key,
        zt_identity::PeerMatcher::TrustDomain(ours.trust_domain().clone()),
        None,
    )?)
}

/// Creates a one-time token with `collector_binary token create`.
pub fn create_token(
    collector_binary: &Path,
    collector_state: &Path,
    org: &str,
    device: &str,
) -> Result<String> {
    let output = Command::new(collector_binary)
        .arg("--state-dir")
        .arg(collector_state)
        .args([
            "token", "create", "--org", org, "--device", device, "--ttl", "10m",
        ])
        .env_remove("ZT_COLLECTOR_CONFIG")
        .output()
        .context("running zt-collector token create")?;
    ensure!(
        output.status.success(),
        "zt-collector token create failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// Enrolls an agent state directory with `agent_binary enroll`.
pub fn enroll(
    agent_binary: &Path,
    agent_state: &Path,
    collector_url: &str,
    token: &str,
) -> Result<()> {
    let output = Command::new(agent_binary)
        .arg("--state-dir")
        .arg(agent_state)
        .args(["enroll", "--collector", collector_url, "--token", token])
        .output()
        .context("running zt-agent enroll")?;
    ensure!(
        output.status.success(),
        "zt-agent enroll failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
