//! Who this agent is on the wire: the organisation and device id of its
//! certificate's SPIFFE id, the host name, and the id of this agent run
//! (`boot_id`: a fresh UUID at every start; events are numbered from 1 within
//! it, so `(device_id, boot_id, seq)` names an event and holes in `seq` are
//! lost events). The collector trusts only the certificate; the organisation
//! and device id here are for logs and must agree with it.

use proto::telemetry::AgentIdentity;
use zt_identity::SpiffeId;

/// The identity batches carry, for the device `id`.
pub fn for_device(id: &SpiffeId) -> AgentIdentity {
    AgentIdentity {
        org_id: id.org().to_owned(),
        device_id: id.device_id().unwrap_or_default().to_owned(),
        hostname: hostname(),
        boot_id: uuid::Uuid::new_v4().to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// This host's name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buffer and its length are valid.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_comes_from_the_spiffe_id_and_each_run_has_its_own_boot_id() {
        let td = zt_identity::TrustDomain::new("pref.example").unwrap();
        let id = SpiffeId::device(&td, "city-a", "pc-0042").unwrap();
        let first = for_device(&id);
        let second = for_device(&id);
        assert_eq!(
            (first.org_id.as_str(), first.device_id.as_str()),
            ("city-a", "pc-0042")
        );
        assert_ne!(
            first.boot_id, second.boot_id,
            "every agent run has its own id"
        );
        assert_eq!(first.boot_id.len(), 36);
        assert!(!first.hostname.is_empty());
    }
}
