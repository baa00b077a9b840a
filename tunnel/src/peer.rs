//! Who is on the other end of a QUIC connection.

use std::fmt;

use rustls_pki_types::CertificateDer;
use zt_identity::{CertificateInfo, RevocationList, SpiffeId};

use crate::error::TunnelError;

/// The verified identity of a tunnel peer: the SPIFFE id and serial of the
/// device certificate it presented in the (mutual) TLS handshake.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The device's SPIFFE id.
    pub id: SpiffeId,
    /// The certificate serial, canonical lowercase hex (as in revocation
    /// lists).
    pub serial_hex: String,
    /// The certificate serial, big-endian bytes without leading zeros.
    pub serial: Vec<u8>,
}

impl PeerIdentity {
    /// The identity in a certificate chain (leaf first) that the TLS layer
    /// has already verified.
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Result<Self, TunnelError> {
        let id = zt_identity::peer_identity_from_chain(chain)
            .map_err(|e| TunnelError::PeerIdentity(e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| TunnelError::PeerIdentity("no certificate".into()))?;
        let info =
            CertificateInfo::parse(leaf).map_err(|e| TunnelError::PeerIdentity(e.to_string()))?;
        Ok(Self {
            id,
            serial_hex: info.serial_hex(),
            serial: info.serial,
        })
    }

    /// The identity a QUIC connection's peer authenticated with.
    pub fn from_connection(connection: &quinn::Connection) -> Result<Self, TunnelError> {
        let presented = connection
            .peer_identity()
            .ok_or_else(|| TunnelError::PeerIdentity("the peer presented no certificate".into()))?;
        let chain = presented
            .downcast::<Vec<CertificateDer<'static>>>()
            .map_err(|_| TunnelError::PeerIdentity("not an X.509 certificate chain".into()))?;
        Self::from_chain(&chain)
    }

    /// Whether `list` revokes this device or this certificate.
    pub fn is_revoked(&self, list: &RevocationList) -> bool {
        list.is_revoked(&self.id, &self.serial)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (serial {})", self.id, self.serial_hex)
    }
}
