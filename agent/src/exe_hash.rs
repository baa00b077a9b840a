//! SHA-256 of executed files, cached by (device, inode, mtime, size) so each
//! binary is read once per version. The running image is read through
//! `/proc/<pid>/exe`, which works for deleted or replaced files; when the
//! process is already gone, the exec path is hashed instead.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::Path,
};

use sha2::{Digest, Sha256};

/// Files larger than this are not hashed (an empty hash is reported).
pub const MAX_HASHED_BYTES: u64 = 512 * 1024 * 1024;
/// Cached hashes kept at most; the cache starts over beyond it.
const CACHE_CAPACITY: usize = 16_384;

/// One version of a file: what the cache is keyed by.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct FileVersion {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    size: u64,
}

/// One cache for the whole agent: the exec sensor fills it as programs
/// start, and the tunnel finds a caller's hash there instead of reading the
/// binary again on its first connection.
pub type SharedExeHasher = std::sync::Arc<std::sync::Mutex<ExeHasher>>;

#[derive(Debug, Default)]
pub struct ExeHasher {
    cache: HashMap<FileVersion, String>,
    /// Files actually read (cache misses), for tests and metrics.
    pub files_hashed: u64,
}

/// What [`ExeHasher::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// This version of the file was hashed before.
    Cached(String),
    /// A version not hashed yet: [`NewFile::compute`] reads it.
    New(NewFile),
    /// Neither the process image nor the path can be read, or it is not a
    /// regular file of hashable size.
    Unreadable,
}

/// An open file whose version is not in the cache.
#[derive(Debug)]
pub struct NewFile {
    file: File,
    version: FileVersion,
}

impl NewFile {
    pub fn version(&self) -> FileVersion {
        self.version
    }

    /// Reads and hashes the file, without the cache: the slow part, for a
    /// blocking thread. Hand the result to [`ExeHasher::remember`].
    pub fn compute(self) -> (FileVersion, Option<String>) {
        let NewFile { mut file, version } = self;
        (version, sha256_hex(&mut file).ok())
    }
}

/// Lowercase hex SHA-256 of the file at `path`.
pub fn sha256_file(path: &std::path::Path) -> io::Result<String> {
    sha256_hex(&mut File::open(path)?)
}

fn sha256_hex(file: &mut File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

impl ExeHasher {
    /// Lowercase hex SHA-256 of what `pid` executes, or of `filename` when
    /// the process is gone; `None` when neither can be read.
    pub fn hash(&mut self, pid: u32, filename: &str) -> Option<String> {
        match self.lookup(pid, filename) {
            Lookup::Cached(hash) => Some(hash),
            Lookup::New(file) => {
                let (version, hash) = file.compute();
                if let Some(hash) = &hash {
                    self.remember(version, hash);
                }
                hash
            }
            Lookup::Unreadable => None,
        }
    }

    /// The cache's answer for what `pid` executes: a `stat`, no reading.
    /// Only [`Lookup::New`] needs the (slow) [`NewFile::compute`].
    pub fn lookup(&self, pid: u32, filename: &str) -> Lookup {
        let file = File::open(format!("/proc/{pid}/exe"))
            .or_else(|_| {
                if filename.starts_with('/') {
                    File::open(Path::new(filename))
                } else {
                    Err(io::Error::from(io::ErrorKind::NotFound))
                }
            })
            .ok();
        let Some(meta) = file.as_ref().and_then(|file| file.metadata().ok()) else {
            return Lookup::Unreadable;
        };
        if !meta.is_file() || meta.len() > MAX_HASHED_BYTES {
            return Lookup::Unreadable;
        }
        let version = FileVersion {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            size: meta.len(),
        };
        match (self.cache.get(&version), file) {
            (Some(hash), _) => Lookup::Cached(hash.clone()),
            (None, Some(file)) => Lookup::New(NewFile { file, version }),
            (None, None) => Lookup::Unreadable,
        }
    }

    /// Caches the hash of a file version computed elsewhere
    /// ([`NewFile::compute`]).
    pub fn remember(&mut self, version: FileVersion, hash: &str) {
        self.files_hashed += 1;
        if self.cache.len() >= CACHE_CAPACITY {
            self.cache.clear();
        }
        self.cache.insert(version, hash.to_owned());
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_known_content_and_caches_by_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prog");
        std::fs::write(&path, b"abc").unwrap();
        let mut hasher = ExeHasher::default();
        // A pid that does not exist: falls back to the path.
        let hash = hasher.hash(u32::MAX, path.to_str().unwrap()).unwrap();
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        hasher.hash(u32::MAX, path.to_str().unwrap()).unwrap();
        assert_eq!(hasher.files_hashed, 1, "second lookup from the cache");

        // A new version of the file is read again.
        std::fs::write(&path, b"abcd").unwrap();
        let changed = hasher.hash(u32::MAX, path.to_str().unwrap()).unwrap();
        assert_ne!(changed, hash);
        assert_eq!(hasher.files_hashed, 2);
    }

    #[test]
    fn hashes_a_running_process_image() {
        let mut hasher = ExeHasher::default();
        let own = hasher.hash(std::process::id(), "").unwrap();
        let expected = {
            let bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
            hex(&Sha256::digest(&bytes))
        };
        assert_eq!(own, expected);
        assert_eq!(hasher.hash(u32::MAX, "relative/path"), None);
    }
}
