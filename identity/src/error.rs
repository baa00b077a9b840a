//! The crate's error type for key, certificate, file and TLS operations.
//!
//! Identity parsing ([`SpiffeIdError`]) and token redemption
//! ([`TokenError`](crate::tokens::TokenError)) have their own types, because
//! callers branch on them.

use std::path::PathBuf;

use crate::spiffe::SpiffeIdError;

/// Errors from key, certificate, file and TLS operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A SPIFFE id, trust domain or name is invalid.
    #[error("invalid identity: {0}")]
    SpiffeId(#[from] SpiffeIdError),
    /// PEM input is malformed or holds no object of the expected kind.
    #[error("PEM: {0}")]
    Pem(String),
    /// A private key is malformed or of an unsupported algorithm.
    #[error("private key: {0}")]
    Key(String),
    /// A certificate is malformed or does not meet this crate's profile.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A certificate signing request is malformed, badly signed or unsupported.
    #[error("certificate signing request: {0}")]
    Csr(String),
    /// A certificate does not carry exactly one valid SPIFFE id.
    #[error("peer identity: {0}")]
    PeerIdentity(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A rustls configuration could not be built.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// A rustls certificate verifier could not be built.
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The CA directory is in a state this crate refuses to guess about.
    #[error("CA directory {}: {reason}", dir.display())]
    CaState {
        /// The CA directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA on disk is for another trust domain.
    #[error("the CA is for trust domain {ca}, not {requested}")]
    TrustDomainMismatch {
        /// The CA's trust domain.
        ca: String,
        /// The trust domain asked for.
        requested: String,
    },
    /// A private key file is readable or writable by group or others.
    #[error("private key file {} has mode {mode:04o}; it must not be accessible by group or others (chmod 600)", path.display())]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A validity period or lifetime is out of range.
    #[error("validity: {0}")]
    Validity(String),
    /// Serialising or parsing a JSON document failed.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
