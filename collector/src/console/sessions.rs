//! Console sessions: a random token in an `HttpOnly; Secure;
//! SameSite=Strict` cookie names a signed-in user for at most
//! [`MAX_AGE`], and [`IDLE`] without a request; changes made with the
//! cookie also need the session's CSRF token in a header. Tokens are kept
//! only as SHA-256 digests. Wrong passwords lock an account for a while.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use zt_identity::SpiffeId;

use crate::control_plane::Role;

pub const MAX_AGE: Duration = Duration::from_secs(8 * 3600);
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// Wrong passwords in a row that lock an account, and for how long.
pub const MAX_FAILURES: u32 = 5;
pub const LOCKOUT: Duration = Duration::from_secs(5 * 60);
/// Sessions held at most; the least recently used go first.
const MAX_SESSIONS: usize = 10_000;

/// A signed-in user.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: SpiffeId,
    pub name: String,
    pub org: String,
    pub role: Role,
    pub csrf: String,
    created: Instant,
    last_seen: Instant,
}

#[derive(Debug, Default)]
struct Failures {
    count: u32,
    locked_until: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct Sessions {
    by_digest: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<String, Failures>>,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn digest(token: &str) -> String {
    let hash = Sha256::digest(token.as_bytes());
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// Opens a session; returns its cookie token.
    pub fn open(&self, id: SpiffeId, name: &str, org: &str, role: Role) -> (String, Session) {
        let token = random_token();
        let now = Instant::now();
        let session = Session {
            id,
            name: name.to_owned(),
            org: org.to_owned(),
            role,
            csrf: random_token(),
            created: now,
            last_seen: now,
        };
        let mut sessions = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, s| live(s, now));
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(digest(&token), session.clone());
        (token, session)
    }

    /// The live session of `token`, touched.
    pub fn get(&self, token: &str) -> Option<Session> {
        let now = Instant::now();
        let mut sessions = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        let key = digest(token);
        match sessions.get_mut(&key) {
            Some(session) if live(session, now) => {
                session.last_seen = now;
                Some(session.clone())
            }
            Some(_) => {
                sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, token: &str) -> bool {
        self.by_digest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest(token))
            .is_some()
    }

    /// How long `name` stays locked, if it is.
    pub fn locked(&self, name: &str) -> Option<Duration> {
        let now = Instant::now();
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures
            .get(name)
            .and_then(|f| f.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Counts a wrong password; true when it locked the account.
    pub fn failed(&self, name: &str) -> bool {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let entry = failures.entry(name.to_owned()).or_default();
        entry.count += 1;
        if entry.count >= MAX_FAILURES {
            entry.count = 0;
            entry.locked_until = Some(Instant::now() + LOCKOUT);
            true
        } else {
            false
        }
    }

    pub fn succeeded(&self, name: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

fn live(session: &Session, now: Instant) -> bool {
    now.duration_since(session.created) < MAX_AGE && now.duration_since(session.last_seen) < IDLE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://pref.example/org/city-a/user/analyst-a").unwrap()
    }

    #[test]
    fn sessions_open_find_and_close() {
        let sessions = Sessions::default();
        let (token, session) = sessions.open(id(), "analyst-a", "city-a", Role::Analyst);
        assert_ne!(token, session.csrf);
        assert_eq!(sessions.get(&token).unwrap().name, "analyst-a");
        assert!(sessions.get("forged").is_none());
        assert!(sessions.close(&token));
        assert!(sessions.get(&token).is_none());
    }

    #[test]
    fn wrong_passwords_lock_the_account() {
        let sessions = Sessions::default();
        for _ in 1..MAX_FAILURES {
            assert!(!sessions.failed("a"));
            assert!(sessions.locked("a").is_none());
        }
        assert!(sessions.failed("a"));
        assert!(sessions.locked("a").is_some_and(|d| d <= LOCKOUT));
        assert!(sessions.locked("b").is_none());
        sessions.succeeded("a");
        assert!(sessions.locked("a").is_none());
    }
}
