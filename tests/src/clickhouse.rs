//! A private, throw-away ClickHouse server for tests.
//!
//! [`ClickHouseServer::start`] renders the same configuration templates the
//! stack uses (`deploy/clickhouse/*.xml.in`) into a fresh temporary directory,
//! starts `clickhouse-server` on free loopback ports and waits until `/ping`
//! answers. The server is killed (and reaped) when the value is dropped; the
//! child also gets `PR_SET_PDEATHSIG`, so it dies with the test process even
//! if the test panics or is killed.
//!
//! Several servers can run at once (one per test); give each test its own
//! database with [`fresh_database_name`] when tests share a server.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const CONFIG_TEMPLATE: &str = include_str!("../../deploy/clickhouse/config.xml.in");
const USERS_TEMPLATE: &str = include_str!("../../deploy/clickhouse/users.xml.in");
const SERVER_BINARY: &str = "clickhouse-server";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running private ClickHouse server; killed on drop.
pub struct ClickHouseServer {
    child: Option<Child>,
    binary: PathBuf,
    http_port: u16,
    tcp_port: u16,
    // Dropped after the child is killed (field order and `Drop` below).
    dir: tempfile::TempDir,
}

impl ClickHouseServer {
    /// Starts a server on free loopback ports in a fresh temporary directory
    /// and waits (at most 30 s) until it answers `/ping`.
    pub async fn start() -> Result<ClickHouseServer> {
        let binary = find_binary(SERVER_BINARY).with_context(|| {
            format!(
                "`{SERVER_BINARY}` not found in PATH (or /usr/bin, /usr/sbin); \
                 install ClickHouse with deploy/setup.sh"
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("zt-clickhouse-")
            .tempdir()
            .context("creating a temporary directory for ClickHouse")?;
        let (http_port, tcp_port) = free_port_pair()?;
        let mut server = ClickHouseServer {
            child: None,
            binary,
            http_port,
            tcp_port,
            dir,
        };
        server.render_config()?;
        server.spawn_and_wait().await?;
        Ok(server)
    }

    /// `http://127.0.0.1:<port>`, for `clickhouse::Client::with_url`.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The HTTP port.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The native-protocol TCP port (for `clickhouse-client --port`).
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// The directory holding the rendered config, data and logs.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client for this server, bound to no database. Uncompressed:
    /// ClickHouse 18.16 answers a `compress=1` SELECT with an empty body.
    pub fn client(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(self.http_url())
            .with_compression(clickhouse::Compression::None)
    }

    /// Whether the server process is running (not stopped, not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit. The
    /// data directory and ports are kept for [`ClickHouseServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and data directory, and
    /// waits for `/ping`. Stops it first if it is running.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn_and_wait().await
    }

    fn render_config(&self) -> Result<()> {
        let dir = self.dir.path();
        for sub in ["data", "tmp", "user_files", "format_schemas", "log"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let data_dir = dir
            .to_str()
            .context("temporary directory path is not UTF-8")?;
        let render = |template: &str| {
            template
                .replace("@DATA_DIR@", data_dir)
                .replace("@HTTP_PORT@", &self.http_port.to_string())
                .replace("@TCP_PORT@", &self.tcp_port.to_string())
        };
        fs::write(dir.join("config.xml"), render(CONFIG_TEMPLATE)).context("writing config.xml")?;
        fs::write(dir.join("users.xml"), render(USERS_TEMPLATE)).context("writing users.xml")?;
        Ok(())
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let dir = self.dir.path().to_path_buf();
        let stdout = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log/stdout.log"))
            .context("opening the server's stdout log")?;
        let stderr = stdout.try_clone().context("cloning the log file handle")?;
        let mut command = Command::new(&self.binary);
        command
            .arg(format!(
                "--config-file={}",
                dir.join("config.xml").display()
            ))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec and calls
        // only async-signal-safe functions (prctl, getppid); it allocates
        // nothing on the success path. PDEATHSIG fires when the spawning
        // thread exits: tests spawn from their runtime's thread, which lives
        // as long as the test.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("parent exited before exec"));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);

        let addr = SocketAddr::from(([127, 0, 0, 1], self.http_port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(addr).await {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    bail!(
                        "clickhouse-server exited during start-up ({status}); log tail:\n{}",
                        self.log_tail()
                    );
                }
            }
            if Instant::now() >= deadline {
                self.stop();
                bail!(
                    "clickhouse-server did not answer http://{addr}/ping within {} s; log tail:\n{}",
                    START_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the server's error log and stdout/stderr.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for name in ["log/clickhouse-server.err.log", "log/stdout.log"] {
            if let Ok(text) = fs::read_to_string(self.dir.path().join(name)) {
                let lines: Vec<&str> = text.lines().collect();
                let start = lines.len().saturating_sub(20);
                out.push_str(&format!("--- {name} ---\n"));
                out.push_str(&lines[start..].join("\n"));
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A database name unique to this call: `<prefix>_<32 hex digits>`, with
/// characters outside `[A-Za-z0-9_]` in the prefix replaced by `_`.
pub fn fresh_database_name(prefix: &str) -> String {
    let mut clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() || clean.starts_with(|c: char| c.is_ascii_digit()) {
        clean.insert_str(0, "db_");
    }
    format!("{clean}_{}", uuid::Uuid::new_v4().simple())
}

async fn ping(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response);
        Some(text.starts_with("HTTP/1.") && text.contains(" 200 ") && text.contains("Ok."))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn free_port_pair() -> Result<(u16, u16)> {
    // Both listeners are held until both ports are known, so they differ.
    let a = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    let b = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_unique_identifiers() {
        let a = fresh_database_name("it-works");
        let b = fresh_database_name("it-works");
        assert_ne!(a, b);
        assert!(a.starts_with("it_works_"));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        assert!(fresh_database_name("1x").starts_with("db_1x_"));
    }

    #[tokio::test]
    async fn starts_answers_and_restarts() {
        let mut server = ClickHouseServer::start().await.expect("server starts");
        let one: u8 = server
            .client()
            .query("SELECT 1")
            .fetch_one()
            .await
            .expect("SELECT 1");
        assert_eq!(one, 1);
        server.stop();
        assert!(!server.is_running());
        server.restart().await.expect("server restarts");
        assert!(server.is_running());
    }
}
