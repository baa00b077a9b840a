//! Local console accounts: a user of an organisation (registered like a
//! certificate user, with a role) who signs in with a password. The
//! passwords are kept as Argon2id hashes (PHC strings) in
//! `<state_dir>/accounts.json`, mode 0600; the file is read again on every
//! sign-in, so accounts created while the collector runs work at once.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use serde::{Deserialize, Serialize};

use crate::control_plane::{ControlPlane, ControlPlaneError, Role};

pub const ACCOUNTS_FILE: &str = "accounts.json";
/// Shortest password an account may have.
pub const MIN_PASSWORD_CHARS: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("the password must have at least {MIN_PASSWORD_CHARS} characters")]
    WeakPassword,
    #[error("user name {0:?} is taken in organisation {1}; console sign-in names are unique")]
    NameTaken(String, String),
    #[error("account file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("hashing the password: {0}")]
    Hash(String),
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
}

/// One account, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub org: String,
    pub name: String,
    pub role: Role,
    /// Argon2id, PHC string format.
    pub password_hash: String,
    pub created_unix: u64,
}

/// The accounts of a state directory.
#[derive(Debug, Clone)]
pub struct Accounts {
    path: PathBuf,
}

impl Accounts {
    pub fn new(state_dir: &Path) -> Accounts {
        Accounts {
            path: state_dir.join(ACCOUNTS_FILE),
        }
    }

    fn read(&self) -> Result<BTreeMap<String, Account>, AccountError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AccountError::File {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(AccountError::File {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Creates the account, or sets a new password and role on it; the
    /// user is registered with the control plane (same role as for
    /// certificates).
    pub fn create(
        &self,
        plane: &ControlPlane,
        org: &str,
        name: &str,
        role: Role,
        password: &str,
    ) -> Result<(), AccountError> {
        if password.chars().count() < MIN_PASSWORD_CHARS {
            return Err(AccountError::WeakPassword);
        }
        let mut accounts = self.read()?;
        if let Some(existing) = accounts.get(name) {
            if existing.org != org {
                return Err(AccountError::NameTaken(
                    name.to_owned(),
                    existing.org.clone(),
                ));
            }
        }
        plane.register_user(org, name, role)?;
        let salt = SaltString::generate(&mut OsRng);
        let password_hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| AccountError::Hash(e.to_string()))?
            .to_string();
        accounts.insert(
            name.to_owned(),
            Account {
                org: org.to_owned(),
                name: name.to_owned(),
                role,
                password_hash,
                created_unix: crate::distribution::unix_now_ms() / 1000,
            },
        );
        let bytes = serde_json::to_vec_pretty(&accounts).map_err(|e| AccountError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        zt_identity::files::write_file_atomic(&self.path, &bytes, 0o600).map_err(|e| {
            AccountError::File {
                path: self.path.clone(),
                reason: e.to_string(),
            }
        })
    }

    /// The organisation of account `name`, if there is one.
    pub fn org_of(&self, name: &str) -> Option<String> {
        self.read().ok()?.get(name).map(|a| a.org.clone())
    }

    /// The account if `password` is its password. Unknown names cost the
    /// same hashing time as wrong passwords.
    pub fn verify(&self, name: &str, password: &str) -> Result<Option<Account>, AccountError> {
        let accounts = self.read()?;
        let account = accounts.get(name);
        // A fixed hash for unknown names, so their answer takes as long.
        const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Ng1+uQpdPE0yzKA8qT0xQkdNZGpjPZpVqSbnAqEBlqY";
        let hash = account.map_or(DUMMY, |a| a.password_hash.as_str());
        let parsed = PasswordHash::new(hash).map_err(|e| AccountError::Hash(e.to_string()))?;
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        Ok(account.filter(|_| ok).cloned())
    }
}
