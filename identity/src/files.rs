//! Crash-safe, permission-safe file writes for keys, certificates and stores.
//!
//! Every write goes to a temporary file in the destination directory that is
//! *created* with its final mode (so a private key is never readable by others,
//! not even for an instant), is fsynced, and is then renamed over the
//! destination; the directory is fsynced afterwards so the rename survives a
//! crash. A reader therefore sees either the old content or the new, never a
//! torn file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Mode of private keys and secret stores: owner read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of certificates and other public material.
pub const PUBLIC_FILE_MODE: u32 = 0o644;
/// Mode of directories that hold private keys.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Writes a PEM private key to `path` atomically with mode 0600, replacing
/// any previous file.
pub fn write_private_key(path: &Path, pem: &[u8]) -> Result<()> {
    write_file_atomic(path, pem, PRIVATE_FILE_MODE)
}

/// Reads a private key file, refusing it if group or others have any access
/// to it (as OpenSSH does), since such a key must be presumed disclosed.
pub fn read_private_key(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mode = file
        .metadata()
        .map_err(|e| Error::io(path, e))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::InsecureKeyFile {
            path: path.to_owned(),
            mode,
        });
    }
    io::read_to_string(file).map_err(|e| Error::io(path, e))
}

/// Writes `contents` to `path` atomically, creating the file with `mode`
/// (the process umask cannot widen it; the mode is set exactly afterwards).
/// Replaces an existing file.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = write_temp(path, contents, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_parent(path)
}

/// Like [`write_file_atomic`] but fails with [`io::ErrorKind::AlreadyExists`]
/// instead of replacing an existing file (the final step is a hard link,
/// which never overwrites).
pub fn write_new_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = write_temp(path, contents, mode)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| Error::io(path, e))?;
    sync_parent(path)
}

/// Creates `dir` (and parents) if missing; a newly created directory gets
/// `mode`. An existing directory is left as it is.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| Error::io(dir, e))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(path, io::Error::other("path has no file name")))?;
    let suffix: [u8; 6] = crate::random_bytes()?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".{}.{}.{suffix}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(parent_of(path).join(tmp_name))
}

fn write_temp(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf> {
    let tmp = temp_path(path)?;
    let result = (|| -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(Error::io(&tmp, e))
        }
    }
}

fn sync_parent(path: &Path) -> Result<()> {
    let dir = parent_of(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_key_is_written_0600_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        write_private_key(&path, b"first").unwrap();
        assert_eq!(mode_of(&path), 0o600);
        write_private_key(&path, b"second").unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(read_private_key(&path).unwrap(), "second");
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("device.key")]);
    }

    #[test]
    fn public_files_get_their_mode_despite_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.crt");
        write_file_atomic(&path, b"cert", PUBLIC_FILE_MODE).unwrap();
        assert_eq!(mode_of(&path), 0o644);
    }

    #[test]
    fn new_file_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.key");
        write_new_file_atomic(&path, b"one", PRIVATE_FILE_MODE).unwrap();
        let err = write_new_file_atomic(&path, b"two", PRIVATE_FILE_MODE).unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
            "{err}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leaky.key");
        write_file_atomic(&path, b"secret", 0o644).unwrap();
        let err = read_private_key(&path).unwrap_err();
        assert!(
            matches!(err, Error::InsecureKeyFile { mode: 0o644, .. }),
            "{err}"
        );
    }
}
