//! Reading what a certificate says: SPIFFE id, validity, serial.
//!
//! These functions *parse*; they do not verify signatures or chains. Call
//! them on certificates that rustls has already verified (for example
//! `ServerConnection::peer_certificates()` or tonic's `Request::peer_certs()`),
//! or on certificates this process issued itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use crate::error::{Error, Result};
use crate::spiffe::{SpiffeId, SCHEME_PREFIX};

/// What this crate reads from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Serial number, big-endian, without leading zero bytes.
    pub serial: Vec<u8>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The SPIFFE id, when the certificate carries exactly one valid one.
    pub spiffe_id: Option<SpiffeId>,
    /// Whether basicConstraints says `CA:TRUE`.
    pub is_ca: bool,
}

impl CertificateInfo {
    /// Parses a DER certificate.
    pub fn parse(cert_der: &[u8]) -> Result<Self> {
        let cert = parse(cert_der)?;
        Ok(Self {
            serial: canonical_serial(cert.raw_serial()).to_vec(),
            not_before: to_system_time(cert.validity().not_before),
            not_after: to_system_time(cert.validity().not_after),
            spiffe_id: spiffe_id_of(&cert).ok(),
            is_ca: cert.is_ca(),
        })
    }

    /// The serial number as lowercase hex (the form used in revocation lists).
    pub fn serial_hex(&self) -> String {
        serial_hex(&self.serial)
    }

    /// Whether `now` lies within the validity period.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// The identity of a peer, from its (already verified) end-entity certificate.
///
/// As the X.509-SVID specification requires, the certificate must carry
/// exactly one URI SAN, and it must be a valid [`SpiffeId`]; a CA certificate
/// is never an identity.
pub fn peer_identity(cert_der: &[u8]) -> Result<SpiffeId> {
    let cert = parse(cert_der)?;
    if cert.is_ca() {
        return Err(Error::PeerIdentity(
            "a CA certificate is not a peer identity".into(),
        ));
    }
    spiffe_id_of(&cert)
}

/// [`peer_identity`] of the first (end-entity) certificate of a presented chain.
pub fn peer_identity_from_chain(chain: &[CertificateDer<'_>]) -> Result<SpiffeId> {
    let leaf = chain
        .first()
        .ok_or_else(|| Error::PeerIdentity("the peer presented no certificate".into()))?;
    peer_identity(leaf)
}

/// End of a certificate's validity period.
pub fn not_after(cert_der: &[u8]) -> Result<SystemTime> {
    Ok(to_system_time(parse(cert_der)?.validity().not_after))
}

/// Start of a certificate's validity period.
pub fn not_before(cert_der: &[u8]) -> Result<SystemTime> {
    Ok(to_system_time(parse(cert_der)?.validity().not_before))
}

/// A serial number as lowercase hex without leading zero bytes, so the same
/// serial always has one spelling.
pub fn serial_hex(serial: &[u8]) -> String {
    canonical_serial(serial)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The DER SubjectPublicKeyInfo of a certificate.
pub fn subject_public_key_info(cert_der: &[u8]) -> Result<Vec<u8>> {
    Ok(parse(cert_der)?.public_key().raw.to_vec())
}

pub(crate) fn parse(cert_der: &[u8]) -> Result<X509Certificate<'_>> {
    let (rest, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| Error::Certificate(format!("cannot parse: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::Certificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    Ok(cert)
}

/// URI SANs of a parsed certificate (an error if the SAN extension is malformed
/// or duplicated).
pub(crate) fn uri_sans<'a>(cert: &X509Certificate<'a>) -> Result<Vec<&'a str>> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::Certificate(format!("subjectAltName: {e}")))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId> {
    let uris = uri_sans(cert).map_err(|e| Error::PeerIdentity(e.to_string()))?;
    match uris.as_slice() {
        [] => Err(Error::PeerIdentity("the certificate has no URI SAN".into())),
        [uri] if !uri.starts_with(SCHEME_PREFIX) => Err(Error::PeerIdentity(format!(
            "the URI SAN {uri:?} is not a SPIFFE id"
        ))),
        [uri] => SpiffeId::parse(uri)
            .map_err(|e| Error::PeerIdentity(format!("the URI SAN {uri:?}: {e}"))),
        more => Err(Error::PeerIdentity(format!(
            "the certificate has {} URI SANs; an identity has exactly one",
            more.len()
        ))),
    }
}

fn canonical_serial(serial: &[u8]) -> &[u8] {
    let start = serial
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(serial.len().saturating_sub(1));
    &serial[start..]
}

pub(crate) fn to_system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    let offset = Duration::from_secs(secs.unsigned_abs());
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    };
    t.unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_have_one_spelling() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[]), "");
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            peer_identity(b"not der"),
            Err(Error::Certificate(_))
        ));
        assert!(matches!(
            peer_identity_from_chain(&[]),
            Err(Error::PeerIdentity(_))
        ));
    }
}
