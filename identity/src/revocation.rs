//! The revocation list: revoked device identities and certificate serials,
//! with a version number so that agents only ever move forward.
//!
//! The control plane keeps the authoritative copy, bumps the version on every
//! change, and ships it over the control channel (and in policy bundles).
//! Agents accept a list only if its version is newer than the one they hold
//! ([`RevocationList::replace_if_newer`]), so a replayed old list cannot
//! un-revoke anything.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::cert::{self, CertificateInfo};
use crate::error::{Error, Result};
use crate::files;
use crate::spiffe::SpiffeId;

/// A revocation list shared between a TLS verifier and whoever updates it.
pub type SharedRevocationList = Arc<RwLock<RevocationList>>;

/// Revoked identities and certificate serials, versioned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Wire")]
pub struct RevocationList {
    version: u64,
    /// Revoked identities: every certificate naming one of them is refused.
    devices: BTreeSet<SpiffeId>,
    /// Revoked certificate serials, canonical lowercase hex (see [`cert::serial_hex`]).
    serials: BTreeSet<String>,
}

/// The serialised form, checked before it becomes a [`RevocationList`].
#[derive(Deserialize)]
struct Wire {
    version: u64,
    devices: BTreeSet<SpiffeId>,
    serials: BTreeSet<String>,
}

impl TryFrom<Wire> for RevocationList {
    type Error = String;

    fn try_from(wire: Wire) -> std::result::Result<Self, String> {
        for serial in &wire.serials {
            let canonical = !serial.is_empty()
                && serial.len() % 2 == 0
                && serial
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                && (serial == "00" || !serial.starts_with("00"));
            if !canonical {
                return Err(format!(
                    "serial {serial:?} is not canonical lowercase hex without leading zero bytes"
                ));
            }
        }
        Ok(Self {
            version: wire.version,
            devices: wire.devices,
            serials: wire.serials,
        })
    }
}

impl RevocationList {
    /// An empty list, version 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wraps the list for sharing with a verifier.
    pub fn shared(self) -> SharedRevocationList {
        Arc::new(RwLock::new(self))
    }

    /// The version; it grows by one with every change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Revokes an identity. Returns whether the list changed.
    pub fn revoke_device(&mut self, id: &SpiffeId) -> bool {
        let changed = self.devices.insert(id.clone());
        self.bump_if(changed)
    }

    /// Lifts the revocation of an identity (for example to re-enroll a
    /// device under the same name). Returns whether the list changed.
    pub fn reinstate_device(&mut self, id: &SpiffeId) -> bool {
        let changed = self.devices.remove(id);
        self.bump_if(changed)
    }

    /// Revokes one certificate by serial. Returns whether the list changed.
    pub fn revoke_serial(&mut self, serial: &[u8]) -> bool {
        let changed = self.serials.insert(cert::serial_hex(serial));
        self.bump_if(changed)
    }

    /// Whether the identity is revoked.
    pub fn is_device_revoked(&self, id: &SpiffeId) -> bool {
        self.devices.contains(id)
    }

    /// Whether the serial is revoked.
    pub fn is_serial_revoked(&self, serial: &[u8]) -> bool {
        self.serials.contains(&cert::serial_hex(serial))
    }

    /// Whether a certificate with this identity and serial is revoked.
    pub fn is_revoked(&self, id: &SpiffeId, serial: &[u8]) -> bool {
        self.is_device_revoked(id) || self.is_serial_revoked(serial)
    }

    /// Whether a certificate is revoked, by its identity (if it has one) or serial.
    pub fn is_certificate_revoked(&self, cert_der: &[u8]) -> Result<bool> {
        let info = CertificateInfo::parse(cert_der)?;
        Ok(self.is_serial_revoked(&info.serial)
            || info.spiffe_id.is_some_and(|id| self.is_device_revoked(&id)))
    }

    /// The revoked identities, in order.
    pub fn devices(&self) -> impl Iterator<Item = &SpiffeId> {
        self.devices.iter()
    }

    /// The revoked serials as canonical hex, in order.
    pub fn serials(&self) -> impl Iterator<Item = &str> {
        self.serials.iter().map(String::as_str)
    }

    /// Replaces this list with `newer` if its version is higher; an older or
    /// equal version is ignored. Returns whether the list was replaced.
    pub fn replace_if_newer(&mut self, newer: RevocationList) -> bool {
        if newer.version > self.version {
            *self = newer;
            true
        } else {
            false
        }
    }

    /// A list as another party sent it (e.g. over the control channel):
    /// every identity and serial is validated as in [`RevocationList::from_json`].
    pub fn from_parts(
        version: u64,
        devices: impl IntoIterator<Item = String>,
        serials: impl IntoIterator<Item = String>,
    ) -> Result<Self> {
        let devices = devices
            .into_iter()
            .map(|id| SpiffeId::parse(&id))
            .collect::<std::result::Result<BTreeSet<_>, _>>()?;
        let wire = Wire {
            version,
            devices,
            serials: serials.into_iter().collect(),
        };
        Self::try_from(wire).map_err(Error::Certificate)
    }

    /// The list as JSON.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// Parses a list from JSON, validating every identity.
    pub fn from_json(json: &str) -> Result<Self> {
        Ok(serde_json::from_str(json)?)
    }

    /// Loads a list saved with [`RevocationList::save`]; a missing file is an
    /// empty list.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(json) => Self::from_json(&json),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::new()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Saves the list atomically (mode 0644).
    pub fn save(&self, path: &Path) -> Result<()> {
        files::write_file_atomic(path, self.to_json()?.as_bytes(), files::PUBLIC_FILE_MODE)
    }

    fn bump_if(&mut self, changed: bool) -> bool {
        if changed {
            self.version += 1;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::TrustDomain;

    fn id(device: &str) -> SpiffeId {
        SpiffeId::device(&TrustDomain::new("pref.example").unwrap(), "city-a", device).unwrap()
    }

    #[test]
    fn a_list_rebuilt_from_its_parts_is_validated() {
        let mut list = RevocationList::new();
        list.revoke_device(&id("d1"));
        list.revoke_serial(&[0xab, 0xcd]);
        let rebuilt = RevocationList::from_parts(
            list.version(),
            list.devices().map(ToString::to_string),
            list.serials().map(str::to_owned),
        )
        .unwrap();
        assert_eq!(rebuilt, list);
        assert!(RevocationList::from_parts(1, ["not a spiffe id".to_owned()], []).is_err());
        assert!(RevocationList::from_parts(1, [], ["ABCD".to_owned()]).is_err());
    }

    #[test]
    fn revoking_bumps_the_version_once() {
        let mut list = RevocationList::new();
        assert_eq!(list.version(), 0);
        assert!(list.revoke_device(&id("d1")));
        assert!(!list.revoke_device(&id("d1")));
        assert_eq!(list.version(), 1);
        assert!(list.revoke_serial(&[0x00, 0xab, 0xcd]));
        assert_eq!(list.version(), 2);

        assert!(list.is_device_revoked(&id("d1")));
        assert!(!list.is_device_revoked(&id("d2")));
        // Serials compare canonically, whatever leading zeros they carry.
        assert!(list.is_serial_revoked(&[0xab, 0xcd]));
        assert!(list.is_revoked(&id("d2"), &[0x00, 0x00, 0xab, 0xcd]));
        assert!(!list.is_revoked(&id("d2"), &[0x01]));

        assert!(list.reinstate_device(&id("d1")));
        assert!(!list.is_device_revoked(&id("d1")));
        assert_eq!(list.version(), 3);
    }

    #[test]
    fn same_device_in_another_org_is_not_revoked() {
        let mut list = RevocationList::new();
        list.revoke_device(&id("d1"));
        let other =
            SpiffeId::device(&TrustDomain::new("pref.example").unwrap(), "city-b", "d1").unwrap();
        assert!(!list.is_device_revoked(&other));
    }

    #[test]
    fn older_lists_never_replace_newer_ones() {
        let mut agent = RevocationList::new();
        let mut control = RevocationList::new();
        control.revoke_device(&id("d1"));
        let v1 = control.clone();
        control.revoke_device(&id("d2"));
        assert!(agent.replace_if_newer(control.clone()));
        assert!(!agent.replace_if_newer(v1));
        assert!(!agent.replace_if_newer(control.clone()));
        assert!(agent.is_device_revoked(&id("d2")));
    }

    #[test]
    fn serialises_and_persists() {
        let mut list = RevocationList::new();
        list.revoke_device(&id("d1"));
        list.revoke_serial(&[0x42]);
        let json = list.to_json().unwrap();
        assert!(json.contains("spiffe://pref.example/org/city-a/device/d1"));
        assert_eq!(RevocationList::from_json(&json).unwrap(), list);
        assert!(RevocationList::from_json(
            r#"{"version":1,"devices":["spiffe://X/org/o/device/d"],"serials":[]}"#
        )
        .is_err());
        assert!(
            RevocationList::from_json(r#"{"version":1,"devices":[],"serials":["00ab"]}"#).is_err()
        );
        assert!(
            RevocationList::from_json(r#"{"version":1,"devices":[],"serials":["AB"]}"#).is_err()
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.json");
        assert_eq!(RevocationList::load(&path).unwrap(), RevocationList::new());
        list.save(&path).unwrap();
        assert_eq!(RevocationList::load(&path).unwrap(), list);
    }
}
