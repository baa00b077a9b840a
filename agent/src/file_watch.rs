//! The file sensor's watch list: configured prefixes, `~/` expanded to each
//! home directory, merged, checked against the kernel's limits, and turned
//! into the entries of the `FILE_WATCH` map. Sans-IO apart from
//! [`home_directories`].

use std::{collections::BTreeMap, fs, path::PathBuf};

use agent_common::{WatchPrefix, FILE_WATCH_CAPACITY, PREFIX_CAPACITY, WATCH_READ, WATCH_WRITE};

use crate::config::FileWatchConfig;

/// The watch list and what had to be left out of it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WatchList {
    pub prefixes: Vec<WatchPrefix>,
    /// Human-readable reasons for every prefix that could not be watched.
    pub skipped: Vec<String>,
}

/// `/root` and every directory under `/home`.
pub fn home_directories() -> Vec<PathBuf> {
    let mut homes = vec![PathBuf::from("/root")];
    if let Ok(entries) = fs::read_dir("/home") {
        let mut users: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        users.sort();
        homes.extend(users);
    }
    homes
}

/// Builds the kernel watch list from `config`, expanding `~/` with `homes`.
pub fn build(config: &FileWatchConfig, homes: &[PathBuf]) -> WatchList {
    let mut kinds: BTreeMap<String, u32> = BTreeMap::new();
    let mut add = |prefix: &str, kind: u32| {
        for expanded in expand(prefix, homes) {
            *kinds.entry(expanded).or_default() |= kind;
        }
    };
    for prefix in &config.write_prefixes {
        add(prefix, WATCH_WRITE);
    }
    for prefix in &config.read_prefixes {
        add(prefix, WATCH_READ);
    }

    let mut list = WatchList::default();
    for (prefix, kinds) in kinds {
        if prefix.len() > PREFIX_CAPACITY {
            list.skipped
                .push(format!("{prefix}: longer than {PREFIX_CAPACITY} bytes"));
            continue;
        }
        if list.prefixes.len() >= FILE_WATCH_CAPACITY as usize {
            list.skipped.push(format!(
                "{prefix}: more than {FILE_WATCH_CAPACITY} prefixes"
            ));
            continue;
        }
        let mut bytes = [0u8; PREFIX_CAPACITY];
        bytes[..prefix.len()].copy_from_slice(prefix.as_bytes());
        list.prefixes.push(WatchPrefix {
            len: prefix.len() as u32,
            kinds,
            bytes,
        });
    }
    list
}

fn expand(prefix: &str, homes: &[PathBuf]) -> Vec<String> {
    match prefix.strip_prefix("~/") {
        Some(rest) => homes
            .iter()
            .map(|home| format!("{}/{rest}", home.display()))
            .collect(),
        None => vec![prefix.to_owned()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(prefix: &WatchPrefix) -> (String, u32) {
        (
            String::from_utf8_lossy(&prefix.bytes[..prefix.len as usize]).into_owned(),
            prefix.kinds,
        )
    }

    #[test]
    fn expands_homes_and_merges_kinds() {
        let config = FileWatchConfig {
            write_prefixes: vec!["/etc/".into(), "~/.ssh/".into()],
            read_prefixes: vec!["/etc/shadow".into(), "~/.ssh/".into()],
        };
        let homes = [PathBuf::from("/root"), PathBuf::from("/home/tanaka")];
        let list = build(&config, &homes);
        let entries: Vec<(String, u32)> = list.prefixes.iter().map(text).collect();
        assert_eq!(
            entries,
            vec![
                ("/etc/".into(), WATCH_WRITE),
                ("/etc/shadow".into(), WATCH_READ),
                ("/home/tanaka/.ssh/".into(), WATCH_WRITE | WATCH_READ),
                ("/root/.ssh/".into(), WATCH_WRITE | WATCH_READ),
            ]
        );
        assert!(list.skipped.is_empty());
    }

    #[test]
    fn over_long_and_too_many_prefixes_are_skipped_and_said() {
        let long = format!("/{}", "a".repeat(PREFIX_CAPACITY));
        let mut write: Vec<String> = (0..40).map(|i| format!("/d{i:02}/")).collect();
        write.push(long.clone());
        let config = FileWatchConfig {
            write_prefixes: write,
            read_prefixes: vec![],
        };
        let list = build(&config, &[]);
        assert_eq!(list.prefixes.len(), FILE_WATCH_CAPACITY as usize);
        assert!(list.skipped.iter().any(|s| s.contains(&long)));
        assert_eq!(list.skipped.len(), 41 - FILE_WATCH_CAPACITY as usize);
    }

    #[test]
    fn the_default_list_fits_a_pc_with_a_few_users() {
        let homes: Vec<PathBuf> = ["/root", "/home/a", "/home/b"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let list = build(&FileWatchConfig::default(), &homes);
        assert!(list.skipped.is_empty(), "{:?}", list.skipped);
    }
}
