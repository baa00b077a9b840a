//! PEM in and out, on top of `rustls-pki-types`.

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// Parses every `CERTIFICATE` block in `pem` (other blocks are skipped).
/// Fails if there is none or if a block is malformed.
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem(format!("certificates: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Pem("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub fn private_key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::Pem(format!("private key: {e}")))
}

/// Encodes certificates as concatenated `CERTIFICATE` PEM blocks.
pub fn certificates_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    let mut out = String::new();
    for cert in certs {
        encode_block(&mut out, "CERTIFICATE", cert.as_ref());
    }
    out
}

fn encode_block(out: &mut String, label: &str, der: &[u8]) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // Base64 output is ASCII, so slicing at any byte offset is a char boundary.
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_round_trip_through_pem() {
        let a = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let b = CertificateDer::from((0..200u8).collect::<Vec<_>>());
        let pem = certificates_to_pem([&a, &b]);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let parsed = certificates_from_pem(pem.as_bytes()).unwrap();
        assert_eq!(parsed, vec![a, b]);
    }

    #[test]
    fn missing_or_broken_pem_is_an_error() {
        assert!(certificates_from_pem(b"").is_err());
        assert!(certificates_from_pem(
            b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"
        )
        .is_err());
        assert!(private_key_from_pem(b"no key here").is_err());
    }
}
