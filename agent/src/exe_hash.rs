//! SHA-256 of executed files, cached by (device, inode, mtime, size) so each
//! binary is read once per version. Exec events bring that version from the
//! kernel (the exec sensor reads the program's inode), so a binary seen
//! before costs no system call; otherwise `stat` finds it. The running
//! image is read through
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

impl FileVersion {
    /// The version `stat` gives, for a regular file of hashable size.
    pub fn of(meta: &std::fs::Metadata) -> Option<Self> {
        (meta.is_file() && meta.len() <= MAX_HASHED_BYTES).then(|| Self {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            size: meta.len(),
        })
    }

    /// The version of an executable as the exec sensor read it from the
    /// kernel's inode; `dev` is the kernel's internal `dev_t` (major in the
    /// top 12 bits, minor in the low 20), made into what `stat` reports.
    pub fn from_kernel(dev: u32, ino: u64, size: u64, mtime_sec: i64, mtime_nsec: u32) -> Self {
        Self {
            dev: libc::makedev(dev >> 20, dev & 0xf_ffff),
            ino,
            mtime_ns: i128::from(mtime_sec) * 1_000_000_000 + i128::from(mtime_nsec),
            size,
        }
    }
}

#[derive(Debug, Default)]
pub struct ExeHasher {
    cache: HashMap<FileVersion, String>,
    /// For a file being hashed: the version the kernel reported for it
    /// when that differs from what `stat` says (a file system whose
    /// `st_dev` is not its super block's, as btrfs subvolumes), so the
    /// hash is cached under both.
    aliases: HashMap<FileVersion, FileVersion>,
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

    /// The cache's answer for the program an exec event names: when the
    /// kernel reported its file version (`known`), no system call at all
    /// for a version seen before; else (or on a miss) [`Self::lookup`].
    pub fn lookup_exec(&mut self, pid: u32, filename: &str, known: Option<FileVersion>) -> Lookup {
        if let Some(hash) = known.and_then(|version| self.cache.get(&version)) {
            return Lookup::Cached(hash.clone());
        }
        let found = self.lookup(pid, filename);
        if let Some(known) = known {
            match &found {
                Lookup::Cached(hash) => {
                    let hash = hash.clone();
                    self.insert(known, hash);
                }
                Lookup::New(file) if file.version != known => {
                    self.aliases.insert(file.version, known);
                }
                _ => {}
            }
        }
        found
    }

    /// The cache's answer for what `pid` executes: one `stat` through
    /// `/proc/<pid>/exe` for a version seen before (its path walk, not the
    /// open it replaced, is what costs: an eighth of the agent's CPU in an
    /// exec storm, which is why exec events use [`Self::lookup_exec`] with
    /// the kernel's version). Only [`Lookup::New`] opens the file, and
    /// needs the (slow) [`NewFile::compute`].
    pub fn lookup(&self, pid: u32, filename: &str) -> Lookup {
        let proc_exe = format!("/proc/{pid}/exe");
        let found = std::fs::metadata(&proc_exe)
            .map(|meta| (Path::new(&proc_exe), meta))
            .or_else(|err| {
                if filename.starts_with('/') {
                    let path = Path::new(filename);
                    std::fs::metadata(path).map(|meta| (path, meta))
                } else {
                    Err(err)
                }
            });
        let Some((path, version)) = found
            .ok()
            .and_then(|(path, meta)| Some((path, FileVersion::of(&meta)?)))
        else {
            return Lookup::Unreadable;
        };
        if let Some(hash) = self.cache.get(&version) {
            return Lookup::Cached(hash.clone());
        }
        // The version of what is opened, which may differ from what was
        // stat'ed if the file was replaced in between.
        let opened = File::open(path).ok().and_then(|file| {
            let version = FileVersion::of(&file.metadata().ok()?)?;
            Some((file, version))
        });
        match opened {
            Some((file, version)) => match self.cache.get(&version) {
                Some(hash) => Lookup::Cached(hash.clone()),
                None => Lookup::New(NewFile { file, version }),
            },
            None => Lookup::Unreadable,
        }
    }

    /// Caches the hash of a file version computed elsewhere
    /// ([`NewFile::compute`]).
    pub fn remember(&mut self, version: FileVersion, hash: &str) {
        self.files_hashed += 1;
        if let Some(alias) = self.aliases.remove(&version) {
            self.insert(alias, hash.to_owned());
        }
        self.insert(version, hash.to_owned());
    }

    fn insert(&mut self, version: FileVersion, hash: String) {
        if self.cache.len() >= CACHE_CAPACITY {
            self.cache.clear();
            self.aliases.clear();
        }
        self.cache.insert(version, hash);
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
    fn a_version_from_the_kernel_finds_the_hash_without_a_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prog");
        std::fs::write(&path, b"abc").unwrap();
        let name = path.to_str().unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        // What the exec sensor reads from the inode, with the kernel's dev_t.
        let kernel_dev = (libc::major(meta.dev()) << 20) | libc::minor(meta.dev());
        let kernel = FileVersion::from_kernel(
            kernel_dev,
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec() as u32,
        );
        assert_eq!(kernel, FileVersion::of(&meta).unwrap(), "same key as stat");

        let mut hasher = ExeHasher::default();
        let Lookup::New(file) = hasher.lookup_exec(u32::MAX, name, Some(kernel)) else {
            panic!("a new file");
        };
        let (version, hash) = file.compute();
        hasher.remember(version, &hash.clone().unwrap());
        // Found by the kernel's version alone: the path no longer exists.
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        assert!(matches!(
            hasher.lookup_exec(u32::MAX, name, Some(kernel)),
            Lookup::Cached(h) if Some(&h) == hash.as_ref()
        ));
        assert!(matches!(
            hasher.lookup_exec(u32::MAX, name, None),
            Lookup::Unreadable
        ));

        // A kernel version that stat would not give (another dev): the hash
        // is cached under both once computed.
        let path = dir.path().join("moved");
        let name = path.to_str().unwrap();
        let other = FileVersion {
            dev: 12345,
            ..kernel
        };
        let Lookup::Cached(_) = hasher.lookup_exec(u32::MAX, name, Some(other)) else {
            panic!("stat's version is cached");
        };
        assert!(matches!(
            hasher.lookup_exec(u32::MAX, "/gone", Some(other)),
            Lookup::Cached(_)
        ));
        assert_eq!(hasher.files_hashed, 1);
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
