//! Who this agent is: its organisation, a device id kept in the state
//! directory across restarts, the host name, and the id of this agent run
//! (`boot_id`: a fresh UUID at every start; events are numbered from 1 within
//! it, so `(device_id, boot_id, seq)` names an event and holes in `seq` are
//! lost events).

use std::{fs, io, path::Path};

use proto::telemetry::AgentIdentity;

const DEVICE_ID_FILE: &str = "device_id";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create state directory {path}: {source}")]
    StateDir { path: String, source: io::Error },
    #[error("cannot read or write device id in {path}: {source}")]
    DeviceId { path: String, source: io::Error },
    #[error("device id in {path} is not a UUID: {value:?}")]
    BadDeviceId { path: String, value: String },
}

/// Loads the identity, creating the device id on first start.
pub fn load(org_id: &str, state_dir: &Path) -> Result<AgentIdentity, IdentityError> {
    fs::create_dir_all(state_dir).map_err(|source| IdentityError::StateDir {
        path: state_dir.display().to_string(),
        source,
    })?;
    let device_id = load_or_create_device_id(state_dir)?;
    let boot_id = uuid::Uuid::new_v4().to_string();
    Ok(AgentIdentity {
        org_id: org_id.to_owned(),
        device_id,
        hostname: hostname(),
        boot_id,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

fn load_or_create_device_id(state_dir: &Path) -> Result<String, IdentityError> {
    let path = state_dir.join(DEVICE_ID_FILE);
    let io_err = |source| IdentityError::DeviceId {
        path: path.display().to_string(),
        source,
    };
    match fs::read_to_string(&path) {
        Ok(value) => {
            let value = value.trim();
            uuid::Uuid::parse_str(value).map_err(|_| IdentityError::BadDeviceId {
                path: path.display().to_string(),
                value: value.to_owned(),
            })?;
            Ok(value.to_owned())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            let tmp = path.with_extension("tmp");
            fs::write(&tmp, format!("{id}\n")).map_err(io_err)?;
            fs::rename(&tmp, &path).map_err(io_err)?;
            Ok(id)
        }
        Err(e) => Err(io_err(e)),
    }
}

fn hostname() -> String {
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
    fn device_id_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load("org-a", dir.path()).unwrap();
        let second = load("org-a", dir.path()).unwrap();
        assert_eq!(first.device_id, second.device_id);
        assert_ne!(
            first.boot_id, second.boot_id,
            "every agent run has its own id"
        );
        assert!(uuid::Uuid::parse_str(&first.device_id).is_ok());
        assert_eq!(first.org_id, "org-a");
        assert_eq!(first.boot_id.len(), 36);
        assert!(!first.hostname.is_empty());
    }

    #[test]
    fn corrupt_device_id_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DEVICE_ID_FILE), "garbage").unwrap();
        let err = load("org-a", dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::BadDeviceId { .. }), "{err}");
    }
}
