//! The zero-trust tunnel end to end, on the real path: a client in the
//! staff PC's guarded cgroup connects to the server; the PC's kernel
//! (cgroup/connect4) redirects the connection to the PC agent's listener,
//! the agent carries it over QUIC to the server agent's gateway, which
//! connects to the service. Direct TCP to an unprotected port of the same
//! service, from the same client in the same cgroup, is measured side by
//! side in the same run. Not part of `make test`; run as root with
//!
//! ```text
//! cargo build --release --bins
//! cargo bench -p zt-e2e --bench tunnel_e2e
//! ```
//!
//! The site is the tunnel test's ([`zt_e2e::tunnel_site`]): a LAN of network
//! namespaces, ClickHouse and the release `zt-collector`, and two release
//! `zt-agent` processes (PC: guard policy with the `tunnel` rule; server:
//! gateway mode). The benchmark adds a Rust service on the server (this
//! program in service mode, in the server's guarded cgroup) listening on
//! two ports: [`TUNNEL_PORT`] is a `protected` service of the gateway and
//! tunnelled by the PC's rule, [`DIRECT_PORT`] is neither (the PC's policy
//! allows it, the server's kernel lets it in). The measuring client is this
//! program again in client mode, started in the PC's namespace and guarded
//! cgroup (`nsenter` + the cgroup join before exec), printing JSON.
//!
//! Each run, on a fresh site:
//!
//! 1. **memory**, first (no memory freed by earlier work hides growth),
//!    after 4 tunnelled connections made the pooled peer connection: both
//!    agents' `VmRSS` before, with `ZT_TUNNEL_BENCH_HOLD` idle tunnelled
//!    connections open (each after one echo round trip), and after they
//!    closed;
//! 2. **cold**: the first tunnelled connection after the PC agent starts
//!    (new QUIC + mutual-TLS handshake, and the client's executable hashed
//!    for the first time), the agent restarted `ZT_TUNNEL_BENCH_COLD` times;
//!    then the first connection of a never-seen executable (a fresh copy of
//!    this program) over the warm peer: the hashing alone;
//! 3. **latency**: `connect()` → first echoed byte, one connection at a
//!    time, direct and tunnel alternating, `ZT_TUNNEL_BENCH_SAMPLES` each
//!    (after `ZT_TUNNEL_BENCH_WARMUP`); then as many one-byte round trips
//!    on one established connection per path (the data path without
//!    set-up);
//! 4. **bulk**: one connection carrying `ZT_TUNNEL_BENCH_BULK_MIB` MiB up
//!    (client → service) and down, direct and tunnel, 3 times each;
//! 5. **rate**: `ZT_TUNNEL_BENCH_CONNECTIONS` connections (connect, one
//!    byte there and back, close) from `ZT_TUNNEL_BENCH_CONCURRENCY`
//!    concurrent openers, direct then tunnel.
//!
//! For bulk and rate it also reads the CPU time (`/proc/<pid>/stat`) each
//! party used: both agents, the collector, ClickHouse, the service, the
//! client (its own `getrusage`), any other `zt-agent` on the machine, and
//! the whole machine's busy time from `/proc/stat` (`rest`: what no listed
//! process accounts for, i.e. softirq network processing, kernel threads
//! and other processes).
//!
//! `ZT_TUNNEL_BENCH_RUNS` runs (default 3), each started once the 1-minute
//! load average is below `ZT_TUNNEL_BENCH_MAX_LOAD` (1.0; waits at most 15
//! minutes, then runs anyway and says so); the summary gives each metric's
//! median and range over the runs. `ZT_TUNNEL_BENCH_DUMP=<dir>` also writes
//! every latency sample with its start time there (`latency-run<N>.csv`).
//! Everything is bounded (each client 5 minutes, the whole program 90
//! minutes) and removed on exit, also on failure. Traffic stays inside the
//! LAN's namespaces.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use zt_e2e::{
    eventually,
    process::workspace_binary,
    stack::TEST_ORG,
    tunnel_site::{Site, SiteOptions},
};

/// The service's tunnelled, protected port.
const TUNNEL_PORT: u16 = 7100;
/// The same service's unprotected port, reached directly.
const DIRECT_PORT: u16 = 7200;

/// argv[1] of this program in client mode (in the PC's namespace).
const CLIENT_MODE: &str = "__tunnel_e2e_client";
/// argv[1] of this program in service mode (in the server's namespace).
const SERVICE_MODE: &str = "__tunnel_e2e_service";

const CLIENT_LIMIT: Duration = Duration::from_secs(5 * 60);
const WHOLE_RUN_LIMIT: Duration = Duration::from_secs(90 * 60);
const QUIET_WAIT_MAX: Duration = Duration::from_secs(15 * 60);
/// After an agent (re)start: its start-up work (process table, hashing the
/// running executables) out of the way before measuring.
const SETTLE: Duration = Duration::from_secs(3);

struct Knobs {
    runs: usize,
    samples: usize,
    warmup: usize,
    cold: usize,
    hold: usize,
    bulk_mib: usize,
    bulk_reps: usize,
    connections: usize,
    concurrency: usize,
    max_load: f64,
}

impl Knobs {
    fn from_env() -> Result<Self> {
        Ok(Self {
            runs: zt_e2e::bench::env_number("ZT_TUNNEL_BENCH_RUNS", 3)?,
            samples: zt_e2e::bench::env_number("ZT_TUNNEL_BENCH_SAMPLES", 3000)?,
            warmup: zt_e2e::bench::env_number("ZT_TUNNEL_BENCH_WARMUP", 200)?,
            cold: zt_e2e::bench::env_number("ZT_TUNNEL_BENCH_COLD", 5)?,
            hold: zt_e2e::bench::env_number("ZT_TUNNEL_BENCH_HOLD", 1000)?,
            bulk_mib: zt_e2e::bench::env_number("ZT_TUNNEL_BENCH_BULK_MIB", 256)?,
            bulk_reps: zt_e2e::bench::env_number("ZT_TUNNEL_BENCH_BULK_REPS", 3)?,
            connections: zt_e2e::bench::env_number("ZT_TUNNEL_BENCH_CONNECTIONS", 20_000)?,
            concurrency: zt_e2e::bench::env_number("ZT_TUNNEL_BENCH_CONCURRENCY", 64)?,
            max_load: match std::env::var("ZT_TUNNEL_BENCH_MAX_LOAD") {
                Ok(v) => v
                    .parse()
                    .with_context(|| format!("ZT_TUNNEL_BENCH_MAX_LOAD={v:?}"))?,
                Err(_) => 1.0,
            },
        })
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(CLIENT_MODE) => return client::main(&args[1..]),
        Some(SERVICE_MODE) => return service::main(&args[1..]),
        _ => {}
    }
    zt_e2e::bench::main("tunnel_e2e", WHOLE_RUN_LIMIT, run)
}

async fn run() -> Result<()> {
    // SAFETY: no arguments, cannot fail.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the agents load eBPF programs and the LAN needs network namespaces: run as root"
    );
    let knobs = Knobs::from_env()?;
    ensure!(knobs.samples >= 1 && knobs.cold >= 1, "nothing to measure");
    // The site starts the binaries of this program's profile: they must be
    // the release build.
    let agent = workspace_binary("zt-agent")?;
    let collector = workspace_binary("zt-collector")?;
    ensure!(
        agent.parent().is_some_and(|d| d.ends_with("release")),
        "{} is not a release build: `cargo build --release --bins && cargo bench -p zt-e2e --bench tunnel_e2e`",
        agent.display()
    );
    let exe = std::env::current_exe()?;
    println!("# tunnel_e2e\n");
    println!("{}", zt_e2e::bench::machine_line());
    println!(
        "binaries: {}, {}, client and service {}",
        agent.display(),
        collector.display(),
        exe.display()
    );
    println!(
        "latency samples {} (+{} warm-up) per path, cold restarts {}, {} idle connections held, bulk {} MiB x {}, {} connections by {} openers\n",
        knobs.samples, knobs.warmup, knobs.cold, knobs.hold, knobs.bulk_mib, knobs.bulk_reps, knobs.connections, knobs.concurrency
    );
    let mut runs: Vec<Metrics> = Vec::new();
    for index in 0..knobs.runs {
        let load = wait_until_quiet(knobs.max_load).await;
        eprintln!(
            "run {}/{}: load average {load:.2}{}",
            index + 1,
            knobs.runs,
            if load >= knobs.max_load {
                " (still above the limit: running anyway)"
            } else {
                ""
            }
        );
        let mut metrics = one_run(&exe, &knobs, index)
            .await
            .with_context(|| format!("run {}", index + 1))?;
        metrics.insert("run.load_at_start".into(), load);
        println!("## run {}\n", index + 1);
        print_metrics(&metrics);
        println!(
            "json: {}",
            serde_json::to_string(&metrics).unwrap_or_default()
        );
        println!();
        runs.push(metrics);
    }
    print_summary(&runs);
    Ok(())
}

/// Waits (at most [`QUIET_WAIT_MAX`]) until the 1-minute load average is
/// below `max`; returns the last reading.
async fn wait_until_quiet(max: f64) -> f64 {
    let started = Instant::now();
    loop {
        let load = load_average();
        if load < max || started.elapsed() >= QUIET_WAIT_MAX {
            return load;
        }
        eprintln!("load average {load:.2} >= {max}: waiting");
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::MAX)
}

/// One metric per key, e.g. `latency.tunnel.p50_us`.
type Metrics = BTreeMap<String, f64>;

async fn one_run(exe: &Path, knobs: &Knobs, index: usize) -> Result<Metrics> {
    let exe_arg = exe.display().to_string();
    let options = SiteOptions {
        tunnelled_ports: vec![TUNNEL_PORT],
        server_policy_extra: format!(
            r#"
[[service]]
name = "bench"
destinations = ["{{srv}}"]
ports = [{TUNNEL_PORT}]
target = "127.0.0.1:{TUNNEL_PORT}"
class = "protected"

[[access]]
id = "bench-callers"
service = "bench"
action = "allow"
orgs = ["{TEST_ORG}"]
"#
        ),
        server_programs: vec![vec![
            exe_arg.clone(),
            SERVICE_MODE.to_owned(),
            TUNNEL_PORT.to_string(),
            DIRECT_PORT.to_string(),
        ]],
        wait_for_ports: vec![TUNNEL_PORT, DIRECT_PORT],
        ..SiteOptions::default()
    };
    let mut site = Site::start_with(&format!("bench_tunnel{index}"), options).await?;
    let srv = site.server.addr();
    let direct = SocketAddr::new(srv.into(), DIRECT_PORT);
    let tunnel = SocketAddr::new(srv.into(), TUNNEL_PORT);
    // Many connections in a minute from one host to one address: every
    // ephemeral port, in both namespaces (theirs; the machine's stay).
    for host in [&site.pc, &site.server] {
        let status = host
            .command("/usr/sbin/sysctl")
            .args(["-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"])
            .status()?;
        ensure!(status.success(), "sysctl in {}: {status}", host.netns());
    }
    let mut m = Metrics::new();

    // 1. Memory per idle tunnelled connection, first: no memory freed by
    // earlier work hides growth. A few connections before it make the
    // pooled peer connection and hash the client.
    run_client(&site, exe, &["first", &tunnel.to_string(), "4", "0"]).await?;
    memory(&site, exe, tunnel, knobs.hold, &mut m).await?;
    eprintln!("memory done");

    // 2. Cold: the first tunnelled connection after the PC agent started.
    let mut cold_first = Vec::new();
    let mut cold_next = Vec::new();
    for attempt in 0..knobs.cold {
        site.restart_pc_agent().await?;
        tokio::time::sleep(SETTLE).await;
        let out = run_client(&site, exe, &["first", &tunnel.to_string(), "4", "1000"]).await?;
        let us = numbers(&out, "us")?;
        eprintln!("cold {attempt}: {us:?} µs");
        cold_first.push(us[0]);
        cold_next.extend_from_slice(&us[1..]);
    }
    summarise(&mut m, "cold.first_us", &cold_first);
    summarise(&mut m, "cold.following_us", &cold_next);

    // ... and the first connection of an executable the agent has not
    // hashed yet, over the warm peer.
    let copies = tempfile::tempdir()?;
    let mut new_exe_first = Vec::new();
    let mut new_exe_next = Vec::new();
    for attempt in 0..knobs.cold {
        let copy = copies.path().join(format!("tunnel-e2e-client-{attempt}"));
        std::fs::copy(exe, &copy)?;
        let out = run_client(&site, &copy, &["first", &tunnel.to_string(), "4", "1000"]).await?;
        std::fs::remove_file(&copy)?;
        let us = numbers(&out, "us")?;
        eprintln!("new executable {attempt}: {us:?} µs");
        new_exe_first.push(us[0]);
        new_exe_next.extend_from_slice(&us[1..]);
    }
    summarise(&mut m, "new_exe.first_us", &new_exe_first);
    summarise(&mut m, "new_exe.following_us", &new_exe_next);
    m.insert("exe.size_mib".into(), mib(std::fs::metadata(exe)?.len()));

    // 3. Latency, warm: direct and tunnel alternating; then round trips
    // on one established connection each (no set-up: the data path alone).
    let parties = Parties::of(&site);
    let before = parties.snapshot();
    let out = run_client(
        &site,
        exe,
        &[
            "latency",
            &direct.to_string(),
            &tunnel.to_string(),
            &knobs.samples.to_string(),
            &knobs.warmup.to_string(),
        ],
    )
    .await?;
    for path in ["direct", "tunnel"] {
        let mut samples = numbers(&out, path)?;
        samples.sort_by(f64::total_cmp);
        m.insert(format!("latency.{path}.samples"), samples.len() as f64);
        for (name, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0)] {
            m.insert(format!("latency.{path}.{name}_us"), percentile(&samples, p));
        }
        m.insert(
            format!("latency.{path}.mean_us"),
            samples.iter().sum::<f64>() / samples.len() as f64,
        );
    }
    let cpu = parties.snapshot().since(&before);
    m.insert("latency.rest_cores".into(), cpu.rest_s() / cpu.wall_s);
    if let Ok(dir) = std::env::var("ZT_TUNNEL_BENCH_DUMP") {
        // Every sample with when it started, to look for patterns.
        let (d, t, at) = (
            numbers(&out, "direct")?,
            numbers(&out, "tunnel")?,
            numbers(&out, "at_ms")?,
        );
        let mut csv = String::from("at_ms,direct_us,tunnel_us\n");
        for i in 0..at.len() {
            csv.push_str(&format!("{:.3},{:.1},{:.1}\n", at[i], d[i], t[i]));
        }
        std::fs::write(Path::new(&dir).join(format!("latency-run{index}.csv")), csv)?;
    }
    for p in ["p50", "p99"] {
        let added = m[&format!("latency.tunnel.{p}_us")] - m[&format!("latency.direct.{p}_us")];
        m.insert(format!("latency.added.{p}_us"), added);
    }
    let out = run_client(
        &site,
        exe,
        &[
            "pingpong",
            &direct.to_string(),
            &tunnel.to_string(),
            &knobs.samples.to_string(),
            &knobs.warmup.to_string(),
        ],
    )
    .await?;
    for path in ["direct", "tunnel"] {
        let mut samples = numbers(&out, path)?;
        samples.sort_by(f64::total_cmp);
        for (name, p) in [("p50", 50.0), ("p99", 99.0)] {
            m.insert(
                format!("round_trip.{path}.{name}_us"),
                percentile(&samples, p),
            );
        }
    }
    eprintln!("latency done");

    // 4. Bulk, one connection each way, direct and tunnel interleaved.
    let bytes = knobs.bulk_mib * 1024 * 1024;
    let mut bulk: BTreeMap<String, (Vec<f64>, Cpu)> = BTreeMap::new();
    for _ in 0..knobs.bulk_reps {
        for (path, addr) in [("direct", direct), ("tunnel", tunnel)] {
            for direction in ["up", "down"] {
                let before = parties.snapshot();
                let out = run_client(
                    &site,
                    exe,
                    &["bulk", &addr.to_string(), &bytes.to_string(), direction],
                )
                .await?;
                let mut cpu = parties.snapshot().since(&before);
                cpu.add("client", number(&out, "cpu_s")?);
                let secs = number(&out, "secs")?;
                let entry = bulk
                    .entry(format!("{path}.{direction}"))
                    .or_insert_with(|| (Vec::new(), Cpu::default()));
                entry.0.push(knobs.bulk_mib as f64 / secs);
                entry.1.merge(&cpu);
            }
        }
    }
    for (key, (rates, cpu)) in &bulk {
        m.insert(format!("bulk.{key}.mib_s"), median(rates));
        let total_mib = (knobs.bulk_mib * rates.len()) as f64;
        for (party, secs) in &cpu.by_party {
            m.insert(
                format!("bulk.{key}.cpu_ms_per_mib.{party}"),
                secs * 1e3 / total_mib,
            );
        }
        m.insert(
            format!("bulk.{key}.machine_busy_cores"),
            cpu.machine_busy_s / cpu.wall_s,
        );
        m.insert(
            format!("bulk.{key}.cpu_ms_per_mib.rest"),
            cpu.rest_s() * 1e3 / total_mib,
        );
    }
    eprintln!("bulk done");

    // 5. New connections per second, many openers.
    for (path, addr) in [("direct", direct), ("tunnel", tunnel)] {
        let before = parties.snapshot();
        let out = run_client(
            &site,
            exe,
            &[
                "rate",
                &addr.to_string(),
                &knobs.connections.to_string(),
                &knobs.concurrency.to_string(),
            ],
        )
        .await?;
        let mut cpu = parties.snapshot().since(&before);
        cpu.add("client", number(&out, "cpu_s")?);
        let ok = number(&out, "ok")?;
        let failed = number(&out, "failed")?;
        ensure!(
            failed == 0.0,
            "{path}: {failed} connections failed: {}\n{}",
            out["errors"],
            site.logs()
        );
        m.insert(format!("rate.{path}.conn_s"), ok / number(&out, "secs")?);
        for (party, secs) in &cpu.by_party {
            m.insert(
                format!("rate.{path}.cpu_us_per_conn.{party}"),
                secs * 1e6 / ok,
            );
        }
        m.insert(
            format!("rate.{path}.machine_busy_cores"),
            cpu.machine_busy_s / cpu.wall_s,
        );
        m.insert(
            format!("rate.{path}.cpu_us_per_conn.rest"),
            cpu.rest_s() * 1e6 / ok,
        );
        m.insert(
            format!("rate.{path}.machine_softirq_us_per_conn"),
            cpu.machine_softirq_s * 1e6 / ok,
        );
        eprintln!("rate {path} done");
    }

    // Every tunnelled connection went through the gateway (its decisions),
    // and none of the direct ones did.
    let tunnelled_expected = (4
        + knobs.cold * 4 * 2
        + knobs.samples
        + 1
        + knobs.warmup
        + knobs.hold
        + 2 * knobs.bulk_reps
        + knobs.connections) as u64;
    let recorded = eventually(Duration::from_secs(60), || async {
        let (tunnel, direct) = gateway_decisions(&site).await.ok()?;
        (tunnel >= tunnelled_expected).then_some((tunnel, direct))
    })
    .await;
    let (tunnel_rows, direct_rows) = match recorded {
        Some(counts) => counts,
        None => gateway_decisions(&site).await?,
    };
    m.insert(
        "check.gateway_decisions_per_tunnelled_connection".into(),
        tunnel_rows as f64 / tunnelled_expected as f64,
    );
    ensure!(
        direct_rows == 0,
        "{direct_rows} direct connections went through the gateway"
    );
    for (name, process) in [("pc", &mut site.pc_agent), ("srv", &mut site.server_agent)] {
        if let Some(status) = process.exited() {
            bail!("the {name} agent exited ({status}):\n{}", process.log());
        }
    }
    Ok(m)
}

/// Gateway decisions for the bench's ports: (tunnelled port, direct port).
async fn gateway_decisions(site: &Site) -> Result<(u64, u64)> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Count {
        remote_port: u16,
        connections: u64,
    }
    let rows: Vec<Count> = site
        .stack
        .db()
        .query(
            "SELECT remote_port, count() AS connections FROM decisions FINAL \
             WHERE enforcement_point = 'gateway' AND verdict = 'allowed' \
             AND remote_port IN (?, ?) GROUP BY remote_port",
        )
        .bind(TUNNEL_PORT)
        .bind(DIRECT_PORT)
        .fetch_all()
        .await?;
    let count = |port| {
        rows.iter()
            .find(|r| r.remote_port == port)
            .map_or(0, |r| r.connections)
    };
    Ok((count(TUNNEL_PORT), count(DIRECT_PORT)))
}

async fn memory(
    site: &Site,
    exe: &Path,
    tunnel: SocketAddr,
    hold: usize,
    m: &mut Metrics,
) -> Result<()> {
    let pids = [
        ("pc", site.pc_agent.pid()),
        ("srv", site.server_agent.pid()),
    ];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: Vec<u64> = pids
        .iter()
        .map(|(_, pid)| rss_kib(*pid))
        .collect::<Result<_>>()?;
    let mut child = site.spawn_on_pc(
        &[
            &exe.display().to_string(),
            CLIENT_MODE,
            "hold",
            &tunnel.to_string(),
            &hold.to_string(),
        ],
        Stdio::piped(),
    )?;
    let stdout = child.stdout.take().context("client stdout")?;
    let line = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        }),
    )
    .await;
    let held = match line {
        Ok(Ok(Ok(line))) => serde_json::from_str::<Value>(line.trim()).ok(),
        _ => None,
    };
    let outcome = async {
        let held = held.context("the holding client did not report")?;
        ensure!(
            number(&held, "held")? as usize == hold,
            "the client holds {} connections, not {hold}",
            held["held"]
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        pids.iter()
            .map(|(_, pid)| rss_kib(*pid))
            .collect::<Result<Vec<u64>>>()
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let during = outcome.with_context(|| site.logs())?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<u64> = pids
        .iter()
        .map(|(_, pid)| rss_kib(*pid))
        .collect::<Result<_>>()?;
    let mut both = 0.0;
    for (i, (name, _)) in pids.iter().enumerate() {
        let growth = during[i] as f64 - before[i] as f64;
        both += growth;
        m.insert(
            format!("memory.{name}.before_mib"),
            before[i] as f64 / 1024.0,
        );
        m.insert(format!("memory.{name}.held_mib"), during[i] as f64 / 1024.0);
        m.insert(format!("memory.{name}.after_mib"), after[i] as f64 / 1024.0);
        m.insert(format!("memory.{name}.kib_per_conn"), growth / hold as f64);
    }
    m.insert("memory.both.kib_per_conn".into(), both / hold as f64);
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS for {pid}"))
}

/// Runs `exe` (this program, or a copy of it) in client mode on the PC (its
/// namespace and guarded cgroup) and returns the JSON it printed.
async fn run_client(site: &Site, exe: &Path, args: &[&str]) -> Result<Value> {
    let program = exe.display().to_string();
    let mut argv = vec![program.as_str(), CLIENT_MODE];
    argv.extend(args);
    let child = site.spawn_on_pc(&argv, Stdio::piped())?;
    let pid = child.id();
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
    let output = match tokio::time::timeout(CLIENT_LIMIT, waiting).await {
        Ok(output) => output??,
        Err(_) => {
            // SAFETY: signalling our own child, still unreaped (the
            // blocking task reaps it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            bail!("client {args:?} did not finish in time");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "client {args:?}: {} {stdout}",
        output.status
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("client {args:?} printed {stdout:?}"))
}

fn number(value: &Value, key: &str) -> Result<f64> {
    value[key]
        .as_f64()
        .with_context(|| format!("no number {key:?} in {value}"))
}

fn numbers(value: &Value, key: &str) -> Result<Vec<f64>> {
    let list = value[key]
        .as_array()
        .with_context(|| format!("no list {key:?} in the client's report"))?;
    let numbers: Vec<f64> = list.iter().filter_map(Value::as_f64).collect();
    ensure!(
        !numbers.is_empty() && numbers.len() == list.len(),
        "bad list {key:?}"
    );
    Ok(numbers)
}

// ------------------------------------------------------------- CPU time

/// The processes whose CPU time a phase reads.
struct Parties {
    named: Vec<(&'static str, u32)>,
}

#[derive(Default, Clone)]
struct Cpu {
    by_party: BTreeMap<String, f64>,
    machine_busy_s: f64,
    machine_softirq_s: f64,
    wall_s: f64,
}

impl Cpu {
    fn add(&mut self, party: &str, secs: f64) {
        *self.by_party.entry(party.to_owned()).or_default() += secs;
    }

    /// The machine's busy time no party accounts for: softirq and kernel
    /// threads (network processing), and processes not listed.
    fn rest_s(&self) -> f64 {
        self.machine_busy_s - self.by_party.values().sum::<f64>()
    }

    fn merge(&mut self, other: &Cpu) {
        for (party, secs) in &other.by_party {
            self.add(party, *secs);
        }
        self.machine_busy_s += other.machine_busy_s;
        self.machine_softirq_s += other.machine_softirq_s;
        self.wall_s += other.wall_s;
    }
}

struct Snapshot {
    at: Instant,
    cpu: Cpu,
}

impl Parties {
    fn of(site: &Site) -> Self {
        let mut named = vec![
            ("pc_agent", site.pc_agent.pid()),
            ("srv_agent", site.server_agent.pid()),
            ("collector", site.collector.pid()),
        ];
        if let Some(service) = site.services.last() {
            named.push(("service", service.id()));
        }
        Self { named }
    }

    fn snapshot(&self) -> Snapshot {
        let mut cpu = Cpu::default();
        for (name, pid) in &self.named {
            cpu.add(name, process_cpu_s(*pid).unwrap_or(0.0));
        }
        // ClickHouse (the stack's, a descendant of this process) and any
        // other agent on the machine (e.g. `make up`'s).
        let ours = std::process::id();
        let known: Vec<u32> = self.named.iter().map(|(_, p)| *p).collect();
        for (pid, ppid, comm) in processes() {
            if known.contains(&pid) {
                continue;
            }
            if comm.starts_with("clickhouse") && descends_from(ppid, ours) {
                cpu.add("clickhouse", process_cpu_s(pid).unwrap_or(0.0));
            } else if comm == "zt-agent" {
                cpu.add("other_agents", process_cpu_s(pid).unwrap_or(0.0));
            }
        }
        let (busy, softirq) = machine_cpu_s();
        cpu.machine_busy_s = busy;
        cpu.machine_softirq_s = softirq;
        Snapshot {
            at: Instant::now(),
            cpu,
        }
    }
}

impl Snapshot {
    fn since(&self, before: &Snapshot) -> Cpu {
        let mut cpu = Cpu::default();
        for (party, secs) in &self.cpu.by_party {
            let was = before.cpu.by_party.get(party).copied().unwrap_or(0.0);
            cpu.add(party, (secs - was).max(0.0));
        }
        cpu.machine_busy_s = self.cpu.machine_busy_s - before.cpu.machine_busy_s;
        cpu.machine_softirq_s = self.cpu.machine_softirq_s - before.cpu.machine_softirq_s;
        cpu.wall_s = self.at.duration_since(before.at).as_secs_f64();
        cpu
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of a process (all its threads).
fn process_cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(") ").context("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state (3) ... utime (14), stime (15).
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / clock_ticks())
}

/// (pid, ppid, comm) of every process.
fn processes() -> Vec<(u32, u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(") ")?;
            let comm = head.split_once(" (")?.1.to_owned();
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid, comm))
        })
        .collect()
}

/// Whether a process whose parent is `ppid` descends from `ancestor`.
fn descends_from(mut ppid: u32, ancestor: u32) -> bool {
    let mut hops = 0;
    while ppid > 1 && hops < 16 {
        if ppid == ancestor {
            return true;
        }
        ppid = std::fs::read_to_string(format!("/proc/{ppid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        hops += 1;
    }
    false
}

/// The whole machine's busy and softirq CPU seconds (all cores).
fn machine_cpu_s() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let get = |i: usize| fields.get(i).copied().unwrap_or(0.0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy / clock_ticks(), get(6) / clock_ticks())
}

// ------------------------------------------------------------- numbers

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn summarise(m: &mut Metrics, key: &str, values: &[f64]) {
    m.insert(format!("{key}.median"), median(values));
    m.insert(
        format!("{key}.min"),
        values.iter().copied().fold(f64::INFINITY, f64::min),
    );
    m.insert(
        format!("{key}.max"),
        values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_metrics(m: &Metrics) {
    println!("| metric | value |");
    println!("|---|---:|");
    for (key, value) in m {
        println!("| {key} | {} |", format_number(*value));
    }
    println!();
}

fn print_summary(runs: &[Metrics]) {
    println!("## Summary over {} runs (median, min – max)\n", runs.len());
    println!("| metric | median | min | max |");
    println!("|---|---:|---:|---:|");
    let keys: std::collections::BTreeSet<&String> = runs.iter().flat_map(|r| r.keys()).collect();
    for key in keys {
        let values: Vec<f64> = runs.iter().filter_map(|r| r.get(key).copied()).collect();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        println!(
            "| {key} | {} | {} | {} |",
            format_number(median(&values)),
            format_number(min),
            format_number(max)
        );
    }
    println!();
}

fn format_number(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.4}")
    }
}

// ------------------------------------------------------------- both modes

/// Exits when the bench that started this process is gone (it would
/// otherwise outlive a killed bench), and after `limit` in any case.
fn exit_with_parent(limit: Duration) {
    // SAFETY: getppid cannot fail.
    let parent = unsafe { libc::getppid() };
    let started = Instant::now();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: as above.
        if unsafe { libc::getppid() } != parent || started.elapsed() > limit {
            std::process::exit(3);
        }
    });
}

fn cpu_self_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The service's protocol: the first byte of a connection picks what it
/// does with the rest.
mod protocol {
    /// Echo every byte back; half-close at the caller's end of stream.
    pub const ECHO: u8 = b'E';
    /// Read and discard until the caller's end of stream, then answer the
    /// count of bytes read (u64, little endian).
    pub const DISCARD: u8 = b'D';
    /// Followed by a u64 (little endian) n: send n bytes, then close.
    pub const SOURCE: u8 = b'S';
}

// ------------------------------------------------------------- client mode

mod client {
    use std::{
        io::{Read, Write},
        net::{Shutdown, SocketAddr, TcpStream},
        process::ExitCode,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc, Mutex,
        },
        time::{Duration, Instant},
    };

    use anyhow::{bail, ensure, Context as _, Result};
    use serde_json::{json, Value};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{cpu_self_s, exit_with_parent, protocol};

    const IO_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn main(args: &[String]) -> ExitCode {
        exit_with_parent(Duration::from_secs(10 * 60));
        zt_e2e::bench::raise_nofile();
        match run(args) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tunnel_e2e client {args:?}: {e:#}");
                ExitCode::FAILURE
            }
        }
    }

    fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        Ok(args.get(i).context("missing argument")?.parse()?)
    }

    fn run(args: &[String]) -> Result<Value> {
        match args.first().map(String::as_str) {
            // latency <direct> <tunnel> <samples> <warmup>: alternating.
            Some("latency") => {
                let direct: SocketAddr = arg(args, 1)?;
                let tunnel: SocketAddr = arg(args, 2)?;
                let samples: usize = arg(args, 3)?;
                let warmup: usize = arg(args, 4)?;
                let (mut d, mut t, mut at) = (Vec::new(), Vec::new(), Vec::new());
                let started = Instant::now();
                for i in 0..samples + warmup {
                    let when = started.elapsed().as_secs_f64() * 1e3;
                    let a = round_trip(direct)?;
                    let b = round_trip(tunnel)?;
                    if i >= warmup {
                        d.push(a);
                        t.push(b);
                        at.push(when);
                    }
                }
                Ok(json!({ "direct": d, "tunnel": t, "at_ms": at }))
            }
            // pingpong <direct> <tunnel> <samples> <warmup>: one-byte round
            // trips on one established connection each, alternating.
            Some("pingpong") => {
                let mut direct = open_echo(arg(args, 1)?)?;
                let mut tunnel = open_echo(arg(args, 2)?)?;
                let samples: usize = arg(args, 3)?;
                let warmup: usize = arg(args, 4)?;
                let (mut d, mut t) = (Vec::new(), Vec::new());
                for i in 0..samples + warmup {
                    let a = ping(&mut direct)?;
                    let b = ping(&mut tunnel)?;
                    if i >= warmup {
                        d.push(a);
                        t.push(b);
                    }
                }
                Ok(json!({ "direct": d, "tunnel": t }))
            }
            // first <addr> <count> <sleep ms>: after the pause, `count`
            // connections one after the other (the first is the cold one).
            Some("first") => {
                let addr: SocketAddr = arg(args, 1)?;
                let count: usize = arg(args, 2)?;
                std::thread::sleep(Duration::from_millis(arg(args, 3)?));
                let us = (0..count)
                    .map(|_| round_trip(addr))
                    .collect::<Result<Vec<f64>>>()?;
                Ok(json!({ "us": us }))
            }
            // bulk <addr> <bytes> <up|down>
            Some("bulk") => {
                let addr: SocketAddr = arg(args, 1)?;
                let bytes: u64 = arg(args, 2)?;
                let up = match args.get(3).map(String::as_str) {
                    Some("up") => true,
                    Some("down") => false,
                    other => bail!("direction {other:?}"),
                };
                let cpu0 = cpu_self_s();
                let started = Instant::now();
                if up {
                    upload(addr, bytes)?;
                } else {
                    download(addr, bytes)?;
                }
                let secs = started.elapsed().as_secs_f64();
                Ok(json!({ "secs": secs, "bytes": bytes, "cpu_s": cpu_self_s() - cpu0 }))
            }
            // rate <addr> <total> <concurrency>
            Some("rate") => {
                let addr: SocketAddr = arg(args, 1)?;
                let total: usize = arg(args, 2)?;
                let concurrency: usize = arg(args, 3)?;
                rate(addr, total, concurrency)
            }
            // hold <addr> <n>: n connections open (one round trip each);
            // reports, then holds them until killed.
            Some("hold") => {
                let addr: SocketAddr = arg(args, 1)?;
                let n: usize = arg(args, 2)?;
                hold(addr, n)
            }
            other => bail!("unknown client mode {other:?}"),
        }
    }

    /// connect → first echoed byte, in µs.
    fn round_trip(addr: SocketAddr) -> Result<f64> {
        let started = Instant::now();
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.write_all(&[protocol::ECHO, b'.'])?;
        let mut byte = [0u8];
        stream
            .read_exact(&mut byte)
            .with_context(|| format!("echo from {addr}"))?;
        let took = started.elapsed();
        ensure!(byte[0] == b'.', "echoed {byte:?}");
        Ok(took.as_secs_f64() * 1e6)
    }

    fn open_echo(addr: SocketAddr) -> Result<TcpStream> {
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.write_all(&[protocol::ECHO])?;
        Ok(stream)
    }

    /// One byte there and back on an open echo connection, in µs.
    fn ping(stream: &mut TcpStream) -> Result<f64> {
        let started = Instant::now();
        stream.write_all(b".")?;
        let mut byte = [0u8];
        stream.read_exact(&mut byte)?;
        let took = started.elapsed();
        ensure!(byte[0] == b'.', "echoed {byte:?}");
        Ok(took.as_secs_f64() * 1e6)
    }

    fn upload(addr: SocketAddr, bytes: u64) -> Result<()> {
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let chunk = vec![0x5au8; 1 << 20];
        stream.write_all(&[protocol::DISCARD])?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        stream.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        stream
            .read_exact(&mut count)
            .context("the service's count")?;
        let count = u64::from_le_bytes(count);
        ensure!(count == bytes, "the service read {count} of {bytes} bytes");
        Ok(())
    }

    fn download(addr: SocketAddr, bytes: u64) -> Result<()> {
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut request = vec![protocol::SOURCE];
        request.extend_from_slice(&bytes.to_le_bytes());
        stream.write_all(&request)?;
        let mut buffer = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        ensure!(got == bytes, "received {got} of {bytes} bytes");
        Ok(())
    }

    fn runtime() -> Result<tokio::runtime::Runtime> {
        // One thread: the client's cost stays one core's worth at most.
        Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?)
    }

    async fn echo_once(addr: SocketAddr) -> Result<tokio::net::TcpStream> {
        let mut stream = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
        stream.set_nodelay(true)?;
        stream.write_all(&[protocol::ECHO, b'.']).await?;
        let mut byte = [0u8];
        tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut byte))
            .await
            .context("echo timed out")??;
        ensure!(byte[0] == b'.', "echoed {byte:?}");
        Ok(stream)
    }

    fn rate(addr: SocketAddr, total: usize, concurrency: usize) -> Result<Value> {
        let next = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let cpu0 = cpu_self_s();
        let started = Instant::now();
        let ok: usize = runtime()?.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let next = next.clone();
                let errors = errors.clone();
                tasks.push(tokio::spawn(async move {
                    let mut ok = 0;
                    while next.fetch_add(1, Ordering::Relaxed) < total {
                        match echo_once(addr).await {
                            Ok(_) => ok += 1,
                            Err(e) => {
                                let mut errors = errors.lock().unwrap_or_else(|p| p.into_inner());
                                if errors.len() < 5 {
                                    errors.push(format!("{e:#}"));
                                }
                            }
                        }
                    }
                    ok
                }));
            }
            let mut ok = 0;
            for task in tasks {
                ok += task.await.unwrap_or(0);
            }
            ok
        });
        let secs = started.elapsed().as_secs_f64();
        let errors = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(json!({
            "secs": secs,
            "ok": ok,
            "failed": total - ok,
            "errors": errors,
            "cpu_s": cpu_self_s() - cpu0,
        }))
    }

    fn hold(addr: SocketAddr, n: usize) -> Result<Value> {
        let runtime = runtime()?;
        let streams = runtime.block_on(async {
            let mut streams = Vec::with_capacity(n);
            // 50 at a time: opening is not what is measured here.
            let mut pending = tokio::task::JoinSet::new();
            let mut opened = 0;
            while streams.len() < n {
                while opened < n && pending.len() < 50 {
                    pending.spawn(echo_once(addr));
                    opened += 1;
                }
                match pending.join_next().await {
                    Some(Ok(Ok(stream))) => streams.push(stream),
                    Some(Ok(Err(e))) => return Err(e),
                    Some(Err(e)) => return Err(e.into()),
                    None => break,
                }
            }
            Ok(streams)
        })?;
        println!("{}", json!({ "held": streams.len() }));
        std::io::stdout().flush()?;
        // Held until the bench kills this process (bounded all the same).
        std::thread::sleep(Duration::from_secs(5 * 60));
        drop(streams);
        drop(runtime);
        bail!("nobody came back for the held connections")
    }
}

// ------------------------------------------------------------- service mode

mod service {
    use std::{net::SocketAddr, process::ExitCode, time::Duration};

    use anyhow::{Context as _, Result};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpSocket, TcpStream},
    };

    use super::{exit_with_parent, protocol};

    /// `service <port>...`: the protocol in [`protocol`] on every port, on
    /// all addresses.
    pub fn main(args: &[String]) -> ExitCode {
        exit_with_parent(Duration::from_secs(2 * 60 * 60));
        zt_e2e::bench::raise_nofile();
        let outcome = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(serve(args)));
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tunnel_e2e service: {e:#}");
                ExitCode::FAILURE
            }
        }
    }

    async fn serve(args: &[String]) -> Result<()> {
        let mut listeners = Vec::new();
        for port in args {
            let port: u16 = port.parse().context("port")?;
            let socket = TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
            listeners.push(socket.listen(4096)?);
        }
        let mut tasks = Vec::new();
        for listener in listeners {
            tasks.push(tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(async move {
                                let _ = handle(stream).await;
                            });
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }));
        }
        for task in tasks {
            task.await?;
        }
        Ok(())
    }

    async fn handle(mut stream: TcpStream) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        let mut small = vec![0u8; 16 * 1024];
        let n = stream.read(&mut small).await?;
        if n == 0 {
            return Ok(());
        }
        match small[0] {
            protocol::ECHO => {
                stream.write_all(&small[1..n]).await?;
                loop {
                    let n = stream.read(&mut small).await?;
                    if n == 0 {
                        break;
                    }
                    stream.write_all(&small[..n]).await?;
                }
            }
            protocol::DISCARD => {
                drop(small);
                let mut count = (n - 1) as u64;
                let mut big = vec![0u8; 256 * 1024];
                loop {
                    let n = stream.read(&mut big).await?;
                    if n == 0 {
                        break;
                    }
                    count += n as u64;
                }
                stream.write_all(&count.to_le_bytes()).await?;
            }
            protocol::SOURCE => {
                let mut have = n;
                while have < 9 {
                    let n = stream.read(&mut small[have..]).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    have += n;
                }
                let mut length = [0u8; 8];
                length.copy_from_slice(&small[1..9]);
                let mut left = u64::from_le_bytes(length);
                drop(small);
                let big = vec![0xa5u8; 256 * 1024];
                while left > 0 {
                    let n = left.min(big.len() as u64) as usize;
                    stream.write_all(&big[..n]).await?;
                    left -= n as u64;
                }
            }
            _ => {}
        }
        stream.shutdown().await
    }
}
