//! One-time enrollment tokens.
//!
//! A token is 32 random bytes, shown once as `zt1_` + base64url (no padding).
//! Only its SHA-256 is stored, with the organisation and device name it
//! enrolls, its creation and expiry times and when it was used. Redemption
//! binds the enrolling device to that organisation and name: the agent does
//! not choose them.
//!
//! [`TokenBook`] is the sans-IO core. [`TokenStore`] keeps a book in a JSON
//! file (mode 0600, replaced atomically) and serialises every operation with
//! a mutex and an exclusive file lock, re-reading the file under the lock, so
//! a token is redeemed at most once even across threads and processes (for
//! example `ztctl` creating tokens while the collector redeems them).
//! Redemption is durable (fsynced) before it is reported.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::files;
use crate::spiffe::{validate_name, SpiffeIdError};

/// Printed prefix of every token (format version 1).
pub const TOKEN_PREFIX: &str = "zt1_";
/// Default token lifetime (1 hour).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest token lifetime accepted (7 days).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a record is kept after its token expired, so that late attempts
/// still get "expired" or "already used" rather than "unknown".
pub const RECORD_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// File name of the store inside its directory.
pub const TOKENS_FILE: &str = "enrollment-tokens.json";
const LOCK_FILE: &str = "enrollment-tokens.lock";
const SECRET_LEN: usize = 32;
const STORE_VERSION: u32 = 1;

/// Why a token could not be created or redeemed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The string is not a `zt1_` token.
    #[error("malformed enrollment token")]
    Malformed,
    /// No such token (never issued, or pruned long after expiry).
    #[error("unknown enrollment token")]
    Unknown,
    /// The token expired before it was used.
    #[error("enrollment token has expired")]
    Expired,
    /// The token was used already; tokens work once.
    #[error("enrollment token has already been used")]
    AlreadyUsed,
    /// The organisation or device name is invalid.
    #[error("invalid enrollment subject: {0}")]
    InvalidSubject(#[from] SpiffeIdError),
    /// The requested lifetime is zero or too long.
    #[error("token lifetime must be between 1 s and {MAX_TOKEN_TTL:?}")]
    InvalidTtl,
    /// Reading or writing the store failed.
    #[error("token store: {0}")]
    Store(#[from] Error),
}

/// A token secret. `Display` prints the token (show it once, to the
/// operator); `Debug` does not.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken([u8; SECRET_LEN]);

impl EnrollmentToken {
    /// A new token from the system RNG.
    pub fn generate() -> Result<Self, TokenError> {
        Ok(Self(crate::random_bytes()?))
    }

    /// Parses a printed token (surrounding whitespace is ignored).
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let body = s
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Malformed)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        let secret: [u8; SECRET_LEN] = bytes.try_into().map_err(|_| TokenError::Malformed)?;
        Ok(Self(secret))
    }

    /// Lowercase hex SHA-256 of the secret: what the store keeps.
    pub fn hash_hex(&self) -> String {
        Sha256::digest(self.0)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl std::fmt::Display for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl std::fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrollmentToken([redacted])")
    }
}

/// What the store keeps about one token (never the token itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Lowercase hex SHA-256 of the secret.
    pub hash: String,
    /// Organisation the token enrolls into.
    pub org: String,
    /// Device name (id) the token enrolls.
    pub device: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Expiry time, seconds since the Unix epoch.
    pub expires_unix: u64,
    /// When it was redeemed, seconds since the Unix epoch.
    pub used_unix: Option<u64>,
}

/// What a redeemed token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redeemed {
    /// Organisation to enroll into.
    pub org: String,
    /// Device name (id) to certify.
    pub device: String,
}

/// The token records, without any I/O.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBook {
    version: u32,
    tokens: Vec<TokenRecord>,
}

impl TokenBook {
    /// An empty book.
    pub fn new() -> Self {
        Self {
            version: STORE_VERSION,
            tokens: Vec::new(),
        }
    }

    /// Issues a token for `device` in `org`, valid for `ttl` from `now`.
    pub fn create(
        &mut self,
        org: &str,
        device: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<EnrollmentToken, TokenError> {
        validate_name("organisation", org)?;
        validate_name("device id", device)?;
        if ttl < Duration::from_secs(1) || ttl > MAX_TOKEN_TTL {
            return Err(TokenError::InvalidTtl);
        }
        let token = EnrollmentToken::generate()?;
        let created_unix = unix(now);
        self.tokens.push(TokenRecord {
            hash: token.hash_hex(),
            org: org.to_owned(),
            device: device.to_owned(),
            created_unix,
            expires_unix: created_unix.saturating_add(ttl.as_secs().max(1)),
            used_unix: None,
        });
        Ok(token)
    }

    /// Redeems `token` at `now`: succeeds once, while it has not expired.
    pub fn redeem(&mut self, token: &str, now: SystemTime) -> Result<Redeemed, TokenError> {
        let hash = EnrollmentToken::parse(token)?.hash_hex();
        // Look at every record, comparing in constant time, so timing says
        // nothing about how much of a hash matched.
        let mut found = None;
        for (i, record) in self.tokens.iter().enumerate() {
            if constant_time_eq(record.hash.as_bytes(), hash.as_bytes()) {
                found = Some(i);
            }
        }
        let record = found
            .and_then(|i| self.tokens.get_mut(i))
            .ok_or(TokenError::Unknown)?;
        if record.used_unix.is_some() {
            return Err(TokenError::AlreadyUsed);
        }
        let now = unix(now);
        if now >= record.expires_unix {
            return Err(TokenError::Expired);
        }
        record.used_unix = Some(now);
        Ok(Redeemed {
            org: record.org.clone(),
            device: record.device.clone(),
        })
    }

    /// Drops records whose token expired more than [`RECORD_RETENTION`] ago.
    /// Returns how many were dropped.
    pub fn prune(&mut self, now: SystemTime) -> usize {
        let cutoff = unix(now).saturating_sub(RECORD_RETENTION.as_secs());
        let before = self.tokens.len();
        self.tokens.retain(|r| r.expires_unix > cutoff);
        before - self.tokens.len()
    }

    /// All records, oldest first.
    pub fn records(&self) -> &[TokenRecord] {
        &self.tokens
    }

    /// Tokens that can still be redeemed at `now`.
    pub fn pending(&self, now: SystemTime) -> impl Iterator<Item = &TokenRecord> {
        let now = unix(now);
        self.tokens
            .iter()
            .filter(move |r| r.used_unix.is_none() && now < r.expires_unix)
    }
}

impl Default for TokenBook {
    fn default() -> Self {
        Self::new()
    }
}

/// A [`TokenBook`] kept in `<dir>/enrollment-tokens.json`.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    lock_path: PathBuf,
    guard: Mutex<()>,
}

impl TokenStore {
    /// Opens (and if needed creates, mode 0700) the store directory. The file
    /// itself is created by the first write.
    pub fn open(dir: &Path) -> Result<Self, TokenError> {
        files::ensure_dir(dir, files::PRIVATE_DIR_MODE)?;
        Ok(Self {
            path: dir.join(TOKENS_FILE),
            lock_path: dir.join(LOCK_FILE),
            guard: Mutex::new(()),
        })
    }

    /// Issues a token; it is on disk before this returns.
    pub fn create(
        &self,
        org: &str,
        device: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<EnrollmentToken, TokenError> {
        self.update(|book| {
            book.prune(now);
            book.create(org, device, ttl, now)
        })
    }

    /// Redeems a token exactly once; the redemption is on disk before this
    /// returns `Ok`.
    pub fn redeem(&self, token: &str, now: SystemTime) -> Result<Redeemed, TokenError> {
        self.update(|book| {
            book.prune(now);
            book.redeem(token, now)
        })
    }

    /// Drops long-expired records. Returns how many were dropped.
    pub fn prune(&self, now: SystemTime) -> Result<usize, TokenError> {
        self.update(|book| Ok(book.prune(now)))
    }

    /// Tokens that can still be redeemed at `now`.
    pub fn pending(&self, now: SystemTime) -> Result<Vec<TokenRecord>, TokenError> {
        let _guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        let _lock = self.lock_file()?;
        Ok(self.read()?.pending(now).cloned().collect())
    }

    /// Runs `f` on the book under both locks; writes the book back only if
    /// `f` succeeded.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut TokenBook) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        let _guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        let _lock = self.lock_file()?;
        let mut book = self.read()?;
        let out = f(&mut book)?;
        let json = serde_json::to_vec_pretty(&book).map_err(Error::from)?;
        files::write_file_atomic(&self.path, &json, files::PRIVATE_FILE_MODE)?;
        Ok(out)
    }

    /// An exclusive lock on the lock file, released when the file is dropped.
    fn lock_file(&self) -> Result<std::fs::File, TokenError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(files::PRIVATE_FILE_MODE)
            .open(&self.lock_path)
            .map_err(|e| Error::io(&self.lock_path, e))?;
        file.lock().map_err(|e| Error::io(&self.lock_path, e))?;
        Ok(file)
    }

    fn read(&self) -> Result<TokenBook, TokenError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let book: TokenBook = serde_json::from_slice(&bytes).map_err(Error::from)?;
                if book.version != STORE_VERSION {
                    return Err(Error::Json(serde::de::Error::custom(format!(
                        "{}: unsupported store version {}",
                        self.path.display(),
                        book.version
                    )))
                    .into());
                }
                Ok(book)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenBook::new()),
            Err(e) => Err(Error::io(&self.path, e).into()),
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn token_format_round_trips() {
        let token = EnrollmentToken::generate().unwrap();
        let printed = token.to_string();
        assert!(printed.starts_with("zt1_"));
        assert_eq!(printed.len(), 4 + 43);
        assert_eq!(EnrollmentToken::parse(&printed).unwrap(), token);
        assert_eq!(
            EnrollmentToken::parse(&format!("  {printed}\n")).unwrap(),
            token
        );
        assert_eq!(format!("{token:?}"), "EnrollmentToken([redacted])");
        assert_ne!(EnrollmentToken::generate().unwrap(), token);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "zt1_",
            "zt2_AAAA",
            "zt1_!!!!",
            "zt1_AAAA",
            &format!("zt1_{}", "A".repeat(44)),
        ] {
            assert!(
                matches!(EnrollmentToken::parse(bad), Err(TokenError::Malformed)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn book_redeems_once_then_reports_used() {
        let mut book = TokenBook::new();
        let token = book
            .create("city-a", "host-1", DEFAULT_TOKEN_TTL, t0())
            .unwrap();
        assert_eq!(book.pending(t0()).count(), 1);
        let got = book
            .redeem(&token.to_string(), t0() + Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            got,
            Redeemed {
                org: "city-a".into(),
                device: "host-1".into()
            }
        );
        assert!(matches!(
            book.redeem(&token.to_string(), t0()),
            Err(TokenError::AlreadyUsed)
        ));
        assert_eq!(book.pending(t0()).count(), 0);
        assert_eq!(book.records()[0].used_unix, Some(unix(t0()) + 5));
        // The secret itself is never stored.
        let json = serde_json::to_string(&book).unwrap();
        assert!(!json.contains(&token.to_string()["zt1_".len()..]));
    }

    #[test]
    fn book_enforces_expiry_and_knows_unknowns() {
        let mut book = TokenBook::new();
        let token = book
            .create("city-a", "host-1", Duration::from_secs(60), t0())
            .unwrap();
        assert!(matches!(
            book.redeem(&token.to_string(), t0() + Duration::from_secs(60)),
            Err(TokenError::Expired)
        ));
        let stranger = EnrollmentToken::generate().unwrap();
        assert!(matches!(
            book.redeem(&stranger.to_string(), t0()),
            Err(TokenError::Unknown)
        ));
    }

    #[test]
    fn book_validates_subject_and_ttl() {
        let mut book = TokenBook::new();
        assert!(matches!(
            book.create("City", "h", DEFAULT_TOKEN_TTL, t0()),
            Err(TokenError::InvalidSubject(_))
        ));
        assert!(matches!(
            book.create("c", "../h", DEFAULT_TOKEN_TTL, t0()),
            Err(TokenError::InvalidSubject(_))
        ));
        assert!(matches!(
            book.create("c", "h", Duration::ZERO, t0()),
            Err(TokenError::InvalidTtl)
        ));
        assert!(matches!(
            book.create("c", "h", MAX_TOKEN_TTL * 2, t0()),
            Err(TokenError::InvalidTtl)
        ));
    }

    #[test]
    fn prune_keeps_recent_records_for_clear_errors() {
        let mut book = TokenBook::new();
        let token = book
            .create("c", "h", Duration::from_secs(60), t0())
            .unwrap();
        let after_expiry = t0() + Duration::from_secs(120);
        assert_eq!(book.prune(after_expiry), 0);
        assert!(matches!(
            book.redeem(&token.to_string(), after_expiry),
            Err(TokenError::Expired)
        ));
        let much_later = t0() + RECORD_RETENTION + Duration::from_secs(61);
        assert_eq!(book.prune(much_later), 1);
        assert!(matches!(
            book.redeem(&token.to_string(), much_later),
            Err(TokenError::Unknown)
        ));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
