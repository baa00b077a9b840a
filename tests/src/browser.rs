//! A real browser for the console's tests: Debian's headless Chromium
//! driven over WebDriver (`/usr/bin/chromedriver`, started here on a free
//! loopback port) with `fantoccini`. Every wait is bounded; chromedriver
//! and the browsers it started are killed when the [`Browser`] is dropped,
//! whatever way the test ends.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use base64::Engine as _;
use fantoccini::{
    elements::Element, wd::WebDriverCompatibleCommand, Client, ClientBuilder, Locator,
};
use serde_json::{json, Value};

use crate::free_port;

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// How long one wait for the page may take.
pub const WAIT: Duration = Duration::from_secs(10);
const STARTUP: Duration = Duration::from_secs(20);
const WIDTH: u32 = 1400;
const HEIGHT: u32 = 1000;

/// Where screenshots go: `<target dir>/console-screenshots/`.
pub fn screenshot_dir() -> Result<PathBuf> {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            // target/<profile>/deps/<test binary> -> target
            let exe = std::env::current_exe()?;
            exe.ancestors()
                .nth(3)
                .map(Path::to_path_buf)
                .context("the test binary is not in a target directory")?
        }
    };
    Ok(target.join("console-screenshots"))
}

/// A headless Chromium session, and the chromedriver serving it.
pub struct Browser {
    pub client: Client,
    driver: Driver,
}

/// chromedriver and the browsers it started, killed when dropped.
struct Driver {
    child: Child,
    /// The browser's profile; its path also names the browser's processes.
    profile: tempfile::TempDir,
    log: PathBuf,
}

/// A chromedriver command outside the W3C set (`goog/cdp/execute`,
/// `se/log`), sent through fantoccini's session.
#[derive(Debug)]
struct VendorCommand {
    path: &'static str,
    body: Value,
}

impl WebDriverCompatibleCommand for VendorCommand {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/{}",
            session_id.unwrap_or(""),
            self.path
        ))
    }

    fn method_and_body(&self, _url: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(self.body.to_string()))
    }
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium
    /// session (English, the window 1400×1000, the collector's own
    /// certificate accepted). `time_zone` is the browser's zone (`TZ`).
    pub async fn start(time_zone: &str) -> Result<Browser> {
        for binary in [CHROMEDRIVER, CHROMIUM] {
            if !Path::new(binary).exists() {
                bail!("{binary} not found: install Debian's chromium and chromium-driver (deploy/setup.sh does)");
            }
        }
        let profile = tempfile::Builder::new().prefix("zt-chromium-").tempdir()?;
        let log = profile.path().join("chromedriver.log");
        let out = File::create(&log)?;
        let port = free_port()?;
        let mut command = Command::new(CHROMEDRIVER);
        command
            .arg(format!("--port={port}"))
            .env("TZ", time_zone)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own process group: chromedriver and the browsers it starts
            // are killed together.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork
        // and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // From here on, the guard's Drop cleans up whatever fails.
        let driver = Driver {
            child: command.spawn().context("starting chromedriver")?,
            profile,
            log,
        };
        let client = Self::connect(port, driver.profile.path(), &driver.log).await?;
        let browser = Browser { client, driver };
        browser
            .client
            .set_window_size(WIDTH, HEIGHT)
            .await
            .context("sizing the window")?;
        Ok(browser)
    }

    async fn connect(port: u16, profile: &Path, log: &Path) -> Result<Client> {
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("acceptInsecureCerts".into(), json!(true));
        caps.insert(
            "timeouts".into(),
            json!({"pageLoad": 15_000, "script": 10_000, "implicit": 0}),
        );
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    format!("--window-size={WIDTH},{HEIGHT}"),
                    "--ignore-certificate-errors",
                    format!("--user-data-dir={}", profile.join("profile").display()),
                    "--lang=en-US",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-extensions",
                    "--disable-dev-shm-usage",
                    "--hide-scrollbars",
                    "--force-device-scale-factor=1",
                ],
                "prefs": {"intl.accept_languages": "en-US,en"},
            }),
        );
        let deadline = Instant::now() + STARTUP;
        let mut last = String::new();
        // chromedriver needs a moment to listen; a session a moment more.
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let mut builder =
                    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
                builder.capabilities(caps.clone());
                match tokio::time::timeout(STARTUP, builder.connect(&url)).await {
                    Ok(Ok(client)) => return Ok(client),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "no session within the startup limit".into(),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "no WebDriver session from chromedriver on port {port}: {last}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    }

    /// chromedriver's log, for failure messages.
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(&self.driver.log).unwrap_or_default()
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("opening {url}"))
    }

    /// The page's address now.
    pub async fn url(&self) -> Result<String> {
        Ok(self.client.current_url().await?.to_string())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        Ok(self.client.execute(script, args).await?)
    }

    /// Polls `check` until it gives `Some`, or fails after [`WAIT`] saying
    /// what was awaited and showing the page.
    pub async fn wait<T, F, Fut>(&self, what: &str, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let deadline = Instant::now() + WAIT;
        let mut last_error = String::new();
        loop {
            match check().await {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => {}
                // Elements replaced by a re-render go stale: try again.
                Err(e) => last_error = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                let page = self.describe().await;
                bail!("timed out after {WAIT:?} waiting for {what} (last error: {last_error})\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page's address, its banner and its visible text (cut), for
    /// failure messages.
    pub async fn describe(&self) -> String {
        let text = self
            .js(
                "const b = document.getElementById('banner');
                 const main = document.getElementById('main') || document.body;
                 return location.href + '\\n[banner] ' + (b && !b.hidden ? b.innerText : '') +
                   '\\n' + (main ? main.innerText : '').slice(0, 3000);",
                vec![],
            )
            .await
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|e| format!("(page unreadable: {e:#})"));
        let errors = self.console_errors().await.unwrap_or_default();
        format!(
            "--- page ---\n{text}\n--- console errors ---\n{}",
            errors.join("\n")
        )
    }

    /// Waits until `script` returns a truthy value; returns it.
    pub async fn wait_js(&self, what: &str, script: &str, args: Vec<Value>) -> Result<Value> {
        self.wait(what, || async {
            let value = self.js(script, args.clone()).await?;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!(0)
                && value != json!("");
            Ok(truthy.then_some(value))
        })
        .await
    }

    /// The first displayed element matching `css`, if any, now.
    async fn displayed(&self, css: &str) -> Result<Option<Element>> {
        for element in self.client.find_all(Locator::Css(css)).await? {
            if element.is_displayed().await? {
                return Ok(Some(element));
            }
        }
        Ok(None)
    }

    /// Waits for an element matching `css` that is displayed.
    pub async fn wait_for(&self, css: &str) -> Result<Element> {
        self.wait(&format!("an element {css}"), || self.displayed(css))
            .await
    }

    /// Waits for an element matching `css` whose text contains `needle`;
    /// returns that text.
    pub async fn wait_for_text(&self, css: &str, needle: &str) -> Result<String> {
        self.wait(&format!("{css} containing {needle:?}"), || async {
            for element in self.client.find_all(Locator::Css(css)).await? {
                let text = element.text().await?;
                if text.contains(needle) {
                    return Ok(Some(text));
                }
            }
            Ok(None)
        })
        .await
    }

    /// The texts of every element matching `css`, now.
    pub async fn texts(&self, css: &str) -> Result<Vec<String>> {
        let mut texts = Vec::new();
        for element in self.client.find_all(Locator::Css(css)).await? {
            texts.push(element.text().await?);
        }
        Ok(texts)
    }

    /// Clicks the first displayed element matching `css` (waiting for it).
    pub async fn click(&self, css: &str) -> Result<()> {
        self.wait(&format!("a clickable {css}"), || async {
            let Some(element) = self.displayed(css).await? else {
                return Ok(None);
            };
            element.click().await?;
            Ok(Some(()))
        })
        .await
    }

    /// Replaces the value of the input matching `css` with `text`.
    pub async fn fill(&self, css: &str, text: &str) -> Result<()> {
        self.wait(&format!("an input {css}"), || async {
            let Some(element) = self.displayed(css).await? else {
                return Ok(None);
            };
            element.clear().await?;
            element.send_keys(text).await?;
            Ok(Some(()))
        })
        .await
    }

    /// Chooses `value` in the `<select>` matching `css`.
    pub async fn choose(&self, css: &str, value: &str) -> Result<()> {
        self.wait(&format!("a select {css}"), || async {
            let Some(element) = self.displayed(css).await? else {
                return Ok(None);
            };
            element.select_by_value(value).await?;
            Ok(Some(()))
        })
        .await
    }

    /// Saves a PNG of the whole page (up to 4000 px high) as
    /// `<target>/console-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let dir = screenshot_dir()?;
        std::fs::create_dir_all(&dir)?;
        let height = self
            .js(
                "return Math.ceil(Math.max(document.documentElement.scrollHeight, window.innerHeight));",
                vec![],
            )
            .await?
            .as_f64()
            .unwrap_or(f64::from(HEIGHT))
            .min(4000.0);
        let width = self
            .js("return window.innerWidth;", vec![])
            .await?
            .as_f64()
            .unwrap_or(f64::from(WIDTH));
        let reply = self
            .client
            .issue_cmd(VendorCommand {
                path: "goog/cdp/execute",
                body: json!({
                    "cmd": "Page.captureScreenshot",
                    "params": {
                        "format": "png",
                        "captureBeyondViewport": true,
                        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                    },
                }),
            })
            .await
            .context("Page.captureScreenshot")?;
        let png = match reply["data"].as_str() {
            Some(data) => base64::engine::general_purpose::STANDARD.decode(data)?,
            // Not Chromium's DevTools: the viewport through WebDriver.
            None => self.client.screenshot().await?,
        };
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(path)
    }

    /// The browser console's errors since the last call: uncaught
    /// exceptions, failed loads and Content-Security-Policy violations.
    /// Statuses of failed requests (a refused sign-in, a 403) are left out:
    /// the tests make them on purpose.
    pub async fn console_errors(&self) -> Result<Vec<String>> {
        let reply = self
            .client
            .issue_cmd(VendorCommand {
                path: "se/log",
                body: json!({"type": "browser"}),
            })
            .await
            .context("reading the browser's console")?;
        Ok(reply
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|entry| entry["level"] == "SEVERE")
            .filter_map(|entry| entry["message"].as_str())
            .filter(|message| !message.contains("the server responded with a status of"))
            .map(str::to_owned)
            .collect())
    }

    /// Ends the session (the browser quits); chromedriver is killed on drop.
    pub async fn close(self) -> Result<()> {
        let client = self.client.clone();
        tokio::time::timeout(Duration::from_secs(10), client.close())
            .await
            .context("closing the browser timed out")??;
        Ok(())
    }
}

impl Driver {
    /// Kills chromedriver's process group and any browser process still
    /// running with this session's profile (by pid).
    fn kill_all(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscalls on our own child's process group.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let marker = self.profile.path().as_os_str().as_encoded_bytes().to_vec();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.filter_map(Result::ok) {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<libc::pid_t>().ok())
                else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if cmdline
                    .windows(marker.len())
                    .any(|w| w == marker.as_slice())
                {
                    // SAFETY: a process this browser session started.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill_all();
    }
}
