//! User names of uids, from /etc/passwd, re-read when it changes.

use std::{collections::HashMap, fs, path::PathBuf, time::SystemTime};

#[derive(Debug)]
pub struct UserNames {
    path: PathBuf,
    names: HashMap<u32, String>,
    loaded_mtime: Option<SystemTime>,
}

impl Default for UserNames {
    fn default() -> Self {
        Self::from_file("/etc/passwd")
    }
}

impl UserNames {
    pub fn from_file(path: impl Into<PathBuf>) -> Self {
        let mut names = Self {
            path: path.into(),
            names: HashMap::new(),
            loaded_mtime: None,
        };
        names.reload_if_changed();
        names
    }

    /// The name of `uid`, or `None` when the passwd file does not know it
    /// (directory users resolved through NSS are not looked up here).
    pub fn name(&mut self, uid: u32) -> Option<&str> {
        if !self.names.contains_key(&uid) {
            self.reload_if_changed();
        }
        self.names.get(&uid).map(String::as_str)
    }

    /// The uid of a user name, as loaded (policy user groups name users).
    pub fn uid(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .filter(|(_, n)| n.as_str() == name)
            .map(|(uid, _)| *uid)
            .min()
    }

    fn reload_if_changed(&mut self) {
        let mtime = fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if mtime.is_some() && mtime == self.loaded_mtime {
            return;
        }
        if let Ok(text) = fs::read_to_string(&self.path) {
            self.names = parse_passwd(&text);
            self.loaded_mtime = mtime;
        }
    }
}

fn parse_passwd(text: &str) -> HashMap<u32, String> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((uid, name.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_uids_and_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        fs::write(
            &path,
            "root:x:0:0:root:/root:/bin/bash\n# comment\nbad line\n",
        )
        .unwrap();
        let mut users = UserNames::from_file(&path);
        assert_eq!(users.name(0), Some("root"));
        assert_eq!(users.name(1000), None);

        // A user added later is found (the file's mtime changed).
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(
            &path,
            "root:x:0:0::/root:/bin/bash\ntanaka:x:1000:1000::/home/tanaka:/bin/bash\n",
        )
        .unwrap();
        assert_eq!(users.name(1000), Some("tanaka"));
    }

    #[test]
    fn knows_root_on_this_machine() {
        assert_eq!(UserNames::default().name(0), Some("root"));
    }
}
