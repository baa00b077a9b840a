//! The file-backed enrollment token store, including concurrent redemption.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, SystemTime};

use zt_identity::tokens::{TokenStore, DEFAULT_TOKEN_TTL, TOKENS_FILE};
use zt_identity::{Redeemed, TokenError};

#[test]
fn a_token_works_once_and_the_store_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let token = {
        let store = TokenStore::open(dir.path()).unwrap();
        store
            .create("city-a", "host-1", DEFAULT_TOKEN_TTL, now)
            .unwrap()
    };

    let file = dir.path().join(TOKENS_FILE);
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let on_disk = fs::read_to_string(&file).unwrap();
    assert!(on_disk.contains("host-1"));
    assert!(
        !on_disk.contains(&token.to_string()[4..]),
        "the secret must not be stored"
    );
    assert!(on_disk.contains(&token.hash_hex()));

    // A new store object (think: collector restart) sees the token...
    let store = TokenStore::open(dir.path()).unwrap();
    assert_eq!(store.pending(now).unwrap().len(), 1);
    assert_eq!(
        store.redeem(&token.to_string(), now).unwrap(),
        Redeemed {
            org: "city-a".into(),
            device: "host-1".into()
        }
    );
    // ...and after another restart, the redemption is remembered.
    let store = TokenStore::open(dir.path()).unwrap();
    assert!(matches!(
        store.redeem(&token.to_string(), now),
        Err(TokenError::AlreadyUsed)
    ));
    assert!(store.pending(now).unwrap().is_empty());
}

#[test]
fn expired_unknown_and_malformed_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::open(dir.path()).unwrap();
    let now = SystemTime::now();
    let token = store
        .create("city-a", "host-1", Duration::from_secs(60), now)
        .unwrap();
    assert!(matches!(
        store.redeem(&token.to_string(), now + Duration::from_secs(61)),
        Err(TokenError::Expired)
    ));
    // Expired stays expired: the failed attempt did not consume or change it.
    assert!(matches!(
        store.redeem(&token.to_string(), now + Duration::from_secs(3600)),
        Err(TokenError::Expired)
    ));
    let stranger = zt_identity::EnrollmentToken::generate().unwrap();
    assert!(matches!(
        store.redeem(&stranger.to_string(), now),
        Err(TokenError::Unknown)
    ));
    assert!(matches!(
        store.redeem("zt1_nope", now),
        Err(TokenError::Malformed)
    ));
    assert!(matches!(store.redeem("", now), Err(TokenError::Malformed)));
}

#[test]
fn tokens_of_one_organisation_enroll_only_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::open(dir.path()).unwrap();
    let now = SystemTime::now();
    let a = store
        .create("city-a", "pc-1", DEFAULT_TOKEN_TTL, now)
        .unwrap();
    let b = store
        .create("city-b", "pc-1", DEFAULT_TOKEN_TTL, now)
        .unwrap();
    assert_eq!(store.redeem(&b.to_string(), now).unwrap().org, "city-b");
    assert_eq!(store.redeem(&a.to_string(), now).unwrap().org, "city-a");
}

#[test]
fn concurrent_redeems_succeed_exactly_once() {
    const THREADS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let shared = Arc::new(TokenStore::open(dir.path()).unwrap());
    let token = shared
        .create("city-a", "host-1", DEFAULT_TOKEN_TTL, now)
        .unwrap()
        .to_string();

    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let barrier = barrier.clone();
            let token = token.clone();
            let shared = shared.clone();
            let dir = dir.path().to_owned();
            thread::spawn(move || {
                // Half share one store (mutex), half open their own (file lock),
                // as separate processes would.
                let own;
                let store: &TokenStore = if i % 2 == 0 {
                    &shared
                } else {
                    own = TokenStore::open(&dir).unwrap();
                    &own
                };
                barrier.wait();
                store.redeem(&token, now)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let used = results
        .iter()
        .filter(|r| matches!(r, Err(TokenError::AlreadyUsed)))
        .count();
    assert_eq!(ok, 1, "{results:?}");
    assert_eq!(used, THREADS - 1, "{results:?}");
}

#[test]
fn concurrent_creates_lose_nothing() {
    const THREADS: usize = 6;
    const EACH: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let barrier = barrier.clone();
            let dir = dir.path().to_owned();
            thread::spawn(move || {
                let store = TokenStore::open(&dir).unwrap();
                barrier.wait();
                (0..EACH)
                    .map(|i| {
                        store
                            .create("city-a", &format!("host-{t}-{i}"), DEFAULT_TOKEN_TTL, now)
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let tokens: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let store = TokenStore::open(dir.path()).unwrap();
    assert_eq!(store.pending(now).unwrap().len(), THREADS * EACH);
    for token in tokens {
        store.redeem(&token.to_string(), now).unwrap();
    }
}

#[test]
fn pruning_drops_long_expired_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::open(dir.path()).unwrap();
    let now = SystemTime::now();
    store
        .create("city-a", "old", Duration::from_secs(60), now)
        .unwrap();
    store
        .create(
            "city-a",
            "new",
            DEFAULT_TOKEN_TTL,
            now + Duration::from_secs(3 * 86400),
        )
        .unwrap();
    let later = now + Duration::from_secs(3 * 86400);
    // The create above already pruned the old record.
    assert_eq!(store.prune(later).unwrap(), 0);
    let pending = store.pending(later).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].device, "new");
}

#[test]
fn a_corrupted_store_is_an_error_not_a_fresh_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::open(dir.path()).unwrap();
    let now = SystemTime::now();
    let token = store
        .create("city-a", "host-1", DEFAULT_TOKEN_TTL, now)
        .unwrap();
    fs::write(dir.path().join(TOKENS_FILE), b"{ not json").unwrap();
    assert!(matches!(
        store.redeem(&token.to_string(), now),
        Err(TokenError::Store(_))
    ));
    assert!(matches!(
        store.create("city-a", "host-2", DEFAULT_TOKEN_TTL, now),
        Err(TokenError::Store(_))
    ));
}
