//! Policy push → applied latency across a fleet (issue 7: 1,000 agents,
//! goal p99 ≤ 2 s). Not part of `make test`; run as root with
//!
//! ```text
//! cargo build --release --bins
//! cargo bench -p zt-e2e --bench policy_push
//! ```
//!
//! The stack is the end-to-end tests' ([`zt_e2e::stack`]): a private
//! ClickHouse and the release `zt-collector` as a real process; pushes are
//! made with the release `ztctl` as a SOC user. The fleet is
//! [`zt_e2e::fleet_sim`]: `ZT_POLICY_BENCH_AGENTS` agents (default 1,000)
//! in `ZT_POLICY_BENCH_ORGS` organisations (default 4), all in this process,
//! each enrolled one after the other with its own token (`ztctl
//! enroll-token create`) and key over real gRPC, then running the agent's
//! own control channel over its own mutual-TLS connection — receiving,
//! checking (signature, organisation, serial, layers link and pass their
//! tests, compile for the device), keeping (two atomic writes, fsynced) and
//! acknowledging each bundle as a real agent does, without sensors. The
//! agents run on this program's 2 tokio worker threads and share the
//! machine's cores with the collector and ClickHouse: a real fleet brings a
//! CPU and a disk per agent, so the agent side here is the pessimistic one.
//!
//! Once every control channel is open (`ztctl policy status --org X
//! --json`, `connected`), `ZT_POLICY_BENCH_PUSHES` pushes (default 5) of the
//! baseline, alternating two versions (the example baseline and the same
//! with one more port in a dry-run rule), each to every organisation. For
//! each push and agent the latency is the time from just before `ztctl
//! policy push FILE --wait 120 --json` starts to the moment the agent's
//! accepted serial (`SimulatedAgent::bundle_serial`, an atomic in its
//! metrics) changes, read by a thread of this program that sweeps all agents
//! every 1 ms: one latency per agent and push. It includes ztctl's own
//! start (process, TLS, the local check of the layer), whose size is
//! reported (a `ztctl policy status` round trip). Also reported: when
//! `ztctl policy push` returned, i.e. when the collector had every agent's
//! acknowledgement (ztctl follows the rollout every 200 ms), the CPU the
//! collector and this process (the agents) used per push, the bundle's
//! size, and what accepting one bundle costs one agent alone.
//!
//! Open files: each agent holds a connection in this process and in the
//! collector (which inherits this process's limits); the soft
//! `RLIMIT_NOFILE` is raised to the hard limit at start and both are
//! printed. Everything is bounded (each push 2 minutes, the whole program
//! 60 minutes) and removed on exit, also on failure.

use std::{
    process::ExitCode,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use zt_agent::{bundles::BundleKeeper, enrollment::DeviceIdentity, metrics::AgentMetrics};
use zt_e2e::{
    fleet_sim::{start_fleet, SimulatedAgent},
    process::workspace_binary,
    stack::Stack,
    ztctl::ZtctlUser,
};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy/examples");
/// The issue's goal for the 99th percentile.
const GOAL_P99: Duration = Duration::from_secs(2);
const POLL_EVERY: Duration = Duration::from_millis(1);
/// How long one push may take to reach every agent.
const APPLY_LIMIT: Duration = Duration::from_secs(120);
/// Between pushes: the last acknowledgements and writes out of the way.
const SETTLE: Duration = Duration::from_secs(2);
const OPEN_LIMIT: Duration = Duration::from_secs(180);
/// Runs of the single-agent accept measurement.
const KEEPER_REPS: usize = 50;
const WHOLE_RUN_LIMIT: Duration = Duration::from_secs(60 * 60);

struct Knobs {
    agents: usize,
    orgs: usize,
    pushes: usize,
    /// Devices enrolled per `start_fleet` call (one progress line each).
    chunk: usize,
}

impl Knobs {
    fn from_env() -> Result<Self> {
        let knobs = Self {
            agents: zt_e2e::bench::env_number("ZT_POLICY_BENCH_AGENTS", 1000)?,
            orgs: zt_e2e::bench::env_number("ZT_POLICY_BENCH_ORGS", 4)?,
            pushes: zt_e2e::bench::env_number("ZT_POLICY_BENCH_PUSHES", 5)?,
            chunk: zt_e2e::bench::env_number("ZT_POLICY_BENCH_CHUNK", 50)?.max(1),
        };
        ensure!(
            knobs.orgs >= 1 && knobs.agents >= knobs.orgs && knobs.pushes >= 1,
            "nothing to measure: {} agents, {} organisations, {} pushes",
            knobs.agents,
            knobs.orgs,
            knobs.pushes
        );
        Ok(knobs)
    }
}

fn main() -> ExitCode {
    zt_e2e::bench::main("policy_push", WHOLE_RUN_LIMIT, run)
}

/// One push, measured.
struct PushResult {
    layer: &'static str,
    serial: u64,
    bundle_bytes: u64,
    /// Per agent: push start → its accepted serial changed.
    latencies: Vec<Duration>,
    /// Push start → `ztctl policy push --wait` returned (the collector had
    /// every acknowledgement).
    ztctl_returned: Duration,
    /// Mean interval between two sweeps of the agents' serials.
    sweep_interval: Duration,
    collector_cpu_s: f64,
    agents_cpu_s: f64,
}

struct Enrollment {
    total: Duration,
    first_chunk: (usize, Duration),
    last_chunk: (usize, Duration),
    channels_open: Duration,
}

async fn run() -> Result<()> {
    // SAFETY: no arguments, cannot fail.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the stack makes a cgroup for its agents: run as root"
    );
    let knobs = Knobs::from_env()?;
    // The stack starts the binaries of this program's profile: they must be
    // the release build.
    let collector_binary = workspace_binary("zt-collector")?;
    let ztctl_binary = workspace_binary("ztctl")?;
    ensure!(
        collector_binary
            .parent()
            .is_some_and(|d| d.ends_with("release")),
        "{} is not a release build: `cargo build --release --bins && cargo bench -p zt-e2e --bench policy_push`",
        collector_binary.display()
    );
    // Before the collector starts: it inherits the limit.
    let nofile = zt_e2e::bench::raise_nofile();
    let load = load_average();
    eprintln!(
        "policy_push: {} agents in {} organisations, {} pushes; load average {load:.2}; open files {}",
        knobs.agents,
        knobs.orgs,
        knobs.pushes,
        nofile.describe()
    );

    let stack = Stack::new("bench_policy").await?;
    let collector = stack.start_collector().await?;
    let soc = ZtctlUser::create(&stack, "pref", "soc", "soc")?;
    let orgs: Vec<(String, usize)> = (0..knobs.orgs)
        .map(|i| {
            let count = knobs.agents / knobs.orgs + usize::from(i < knobs.agents % knobs.orgs);
            (format!("town-{}", i + 1), count)
        })
        .collect();

    let (fleet, enrollment) = enroll_fleet(&stack, &soc, &orgs, knobs.chunk).await?;
    let ztctl_round_trip = ztctl_round_trip(&soc, &orgs[0].0)?;
    eprintln!("ztctl round trip (policy status): {}", ms(ztctl_round_trip));

    // The two versions of the baseline pushed in turn.
    let a_text = std::fs::read_to_string(format!("{EXAMPLES}/baseline.yaml"))
        .context("reading the example baseline")?;
    let mut b_text = a_text.replace("ports: [445]", "ports: [445, 139]");
    if b_text == a_text {
        b_text.push_str("\n# policy_push bench: version B\n");
    }
    let a_file = stack.dir.path().join("baseline-a.yaml");
    let b_file = stack.dir.path().join("baseline-b.yaml");
    std::fs::write(&a_file, &a_text)?;
    std::fs::write(&b_file, &b_text)?;
    let a_arg = a_file.display().to_string();
    let b_arg = b_file.display().to_string();

    let metrics: Arc<Vec<Arc<AgentMetrics>>> =
        Arc::new(fleet.iter().map(|a| a.metrics.clone()).collect());
    let mut pushes = Vec::new();
    for index in 0..knobs.pushes {
        let (layer, file) = if index % 2 == 0 {
            ("baseline A", a_arg.as_str())
        } else {
            ("baseline B", b_arg.as_str())
        };
        let result = push_once(&soc, &fleet, &metrics, &orgs, collector.pid(), layer, file)
            .with_context(|| format!("push {}", index + 1))?;
        let l = sorted(result.latencies.clone());
        eprintln!(
            "push {}/{} ({layer}, serial {}): p50 {} p99 {} max {}; ztctl returned after {}",
            index + 1,
            knobs.pushes,
            result.serial,
            ms(percentile(&l, 50.0)),
            ms(percentile(&l, 99.0)),
            ms(percentile(&l, 100.0)),
            ms(result.ztctl_returned)
        );
        pushes.push(result);
        tokio::time::sleep(SETTLE).await;
    }

    let keeper = keeper_cost(&stack, &fleet[0]).context("measuring one agent's accept")?;
    print_report(
        &knobs,
        &orgs,
        load,
        &nofile,
        &[&collector_binary, &ztctl_binary],
        &enrollment,
        ztctl_round_trip,
        &pushes,
        &keeper,
    );
    drop(fleet);
    drop(collector);
    Ok(())
}

/// Enrolls every organisation's devices, `chunk` at a time with a progress
/// line each, and waits until every control channel is open.
async fn enroll_fleet(
    stack: &Stack,
    soc: &ZtctlUser,
    orgs: &[(String, usize)],
    chunk: usize,
) -> Result<(Vec<SimulatedAgent>, Enrollment)> {
    let total: usize = orgs.iter().map(|(_, n)| n).sum();
    let started = Instant::now();
    let mut fleet: Vec<SimulatedAgent> = Vec::with_capacity(total);
    let mut chunks: Vec<(usize, Duration)> = Vec::new();
    for (org, count) in orgs {
        let mut done = 0;
        while done < *count {
            let n = chunk.min(count - done);
            // Device ids `pc<chunk>-<n>`: unique within the organisation.
            let prefix = format!("pc{:02}", done / chunk);
            let t = Instant::now();
            let agents = start_fleet(stack, soc, org, &prefix, n)
                .await
                .with_context(|| format!("enrolling {org}'s devices {prefix}-*"))?;
            let took = t.elapsed();
            fleet.extend(agents);
            chunks.push((n, took));
            done += n;
            eprintln!(
                "enrolled {}/{total} ({org} {done}/{count}): these {n} in {:.1} s ({:.1}/s), {:.0} s so far",
                fleet.len(),
                took.as_secs_f64(),
                n as f64 / took.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let enrolled = started.elapsed();

    // Every channel open: first as the agents see it (cheap to read), then
    // as the collector does.
    let open_started = Instant::now();
    loop {
        let up = fleet
            .iter()
            .filter(|a| a.metrics.control_channel_up.load(Ordering::Relaxed))
            .count();
        if up == fleet.len() {
            break;
        }
        ensure!(
            open_started.elapsed() < OPEN_LIMIT,
            "only {up}/{} control channels open after {OPEN_LIMIT:?}",
            fleet.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut last = usize::MAX;
    loop {
        let mut connected = 0;
        for (org, _) in orgs {
            let status = soc.json(&["policy", "status", "--org", org, "--json"])?;
            connected += status["agents"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|x| x["connected"] == true).count());
        }
        if connected == total {
            break;
        }
        if connected != last {
            eprintln!("control channels the collector counts open: {connected}/{total}");
            last = connected;
        }
        ensure!(
            open_started.elapsed() < OPEN_LIMIT,
            "the collector counts {connected}/{total} control channels open after {OPEN_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let channels_open = open_started.elapsed();
    eprintln!(
        "all {total} enrolled in {:.1} s; every control channel open {:.1} s later",
        enrolled.as_secs_f64(),
        channels_open.as_secs_f64()
    );
    let first_chunk = chunks.first().copied().unwrap_or_default();
    let last_chunk = chunks.last().copied().unwrap_or_default();
    Ok((
        fleet,
        Enrollment {
            total: enrolled,
            first_chunk,
            last_chunk,
            channels_open,
        },
    ))
}

/// Median of 5 `ztctl policy status` calls: ztctl's fixed cost (process,
/// TLS, one RPC), part of every push's latency.
fn ztctl_round_trip(soc: &ZtctlUser, org: &str) -> Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        soc.json(&["policy", "status", "--org", org, "--json"])?;
        times.push(t.elapsed());
    }
    Ok(percentile(&sorted(times), 50.0))
}

/// One push of `file`, timed per agent.
fn push_once(
    soc: &ZtctlUser,
    fleet: &[SimulatedAgent],
    metrics: &Arc<Vec<Arc<AgentMetrics>>>,
    orgs: &[(String, usize)],
    collector_pid: u32,
    layer: &'static str,
    file: &str,
) -> Result<PushResult> {
    let before: Vec<u64> = fleet.iter().map(SimulatedAgent::bundle_serial).collect();
    let collector_cpu = process_cpu_s(collector_pid)?;
    let own_cpu = cpu_self_s();
    let started = Instant::now();
    let watcher = {
        let metrics = metrics.clone();
        let before = before.clone();
        std::thread::Builder::new()
            .name("policy-push-sweep".into())
            .spawn(move || sweep_until_applied(&metrics, &before, started))?
    };
    // Blocks this (the main) thread only: the agents run on the runtime's
    // workers, the sweep on its own thread.
    let reply = soc.json(&["policy", "push", file, "--wait", "120", "--json"]);
    let ztctl_returned = started.elapsed();
    let sweep = watcher
        .join()
        .map_err(|_| anyhow!("the sweeping thread panicked"))?;
    let collector_cpu_s = process_cpu_s(collector_pid)? - collector_cpu;
    let agents_cpu_s = cpu_self_s() - own_cpu;
    let reply = reply.context("ztctl policy push")?;

    let serial = reply["serial"].as_u64().context("no serial in the reply")?;
    for (org, count) in orgs {
        let rollout = reply["rollout"]
            .as_array()
            .and_then(|r| r.iter().find(|o| o["org"] == org.as_str()))
            .with_context(|| format!("no rollout for {org}: {reply}"))?;
        ensure!(
            rollout["applied"] == *count
                && rollout["connected"] == *count
                && rollout["refused"] == 0,
            "rollout to {org}: {rollout}"
        );
    }
    let mut latencies = Vec::with_capacity(fleet.len());
    let mut missing = Vec::new();
    for (agent, seen) in fleet.iter().zip(&sweep.applied) {
        match seen {
            Some((at, s)) if *s == serial => latencies.push(*at),
            Some((_, s)) => bail!("{} went to serial {s}, not {serial}", agent.device_id),
            None => missing.push(agent.device_id.as_str()),
        }
    }
    ensure!(
        missing.is_empty(),
        "{} agent(s) did not apply serial {serial} within {APPLY_LIMIT:?}: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let bundle_bytes = std::fs::metadata(fleet[0].state_dir.join("policy").join("bundle.json"))
        .map(|m| m.len())
        .context("the first agent's kept bundle")?;
    Ok(PushResult {
        layer,
        serial,
        bundle_bytes,
        latencies,
        ztctl_returned,
        sweep_interval: sweep.interval,
        collector_cpu_s,
        agents_cpu_s,
    })
}

struct Sweep {
    /// Per agent: (since the push started, the serial it changed to).
    applied: Vec<Option<(Duration, u64)>>,
    interval: Duration,
}

/// Reads every agent's accepted serial every [`POLL_EVERY`] until each
/// changed from `before` or [`APPLY_LIMIT`] passed.
fn sweep_until_applied(metrics: &[Arc<AgentMetrics>], before: &[u64], started: Instant) -> Sweep {
    let mut applied = vec![None; metrics.len()];
    let mut left = metrics.len();
    let mut sweeps = 0u32;
    while left > 0 && started.elapsed() < APPLY_LIMIT {
        for (i, m) in metrics.iter().enumerate() {
            if applied[i].is_none() {
                let serial = m.policy_bundle_serial.load(Ordering::Relaxed);
                if serial != before[i] {
                    applied[i] = Some((started.elapsed(), serial));
                    left -= 1;
                }
            }
        }
        sweeps += 1;
        if left > 0 {
            std::thread::sleep(POLL_EVERY);
        }
    }
    Sweep {
        applied,
        interval: started.elapsed() / sweeps.max(1),
    }
}

/// What accepting the bundle costs one agent on its own.
struct KeeperCost {
    /// `BundleKeeper::accept`: parse, verify, link and test the layers,
    /// compile for the device, keep (two atomic writes).
    accept: Duration,
    /// The two atomic writes alone (write, fsync, rename, fsync directory).
    writes: Duration,
}

/// [`KeeperCost`], measured with a copy of `agent`'s key and last bundle
/// in a directory of its own, with the fleet idle.
fn keeper_cost(stack: &Stack, agent: &SimulatedAgent) -> Result<KeeperCost> {
    let identity = DeviceIdentity::load(&agent.state_dir)?;
    let dir = stack.dir.path().join("keeper-bench");
    std::fs::create_dir_all(dir.join("identity"))?;
    std::fs::copy(
        agent.state_dir.join("identity").join("policy-signing.pub"),
        dir.join("identity").join("policy-signing.pub"),
    )?;
    let signed = std::fs::read_to_string(agent.state_dir.join("policy").join("bundle.json"))?;
    let keeper = BundleKeeper::new(&dir, &identity.id);
    let mut accept = Vec::with_capacity(KEEPER_REPS);
    for _ in 0..KEEPER_REPS {
        // Forget the serial, so the same bundle is new again.
        let _ = std::fs::remove_file(dir.join("policy").join("newest-serial"));
        let t = Instant::now();
        keeper.accept(&signed)?;
        accept.push(t.elapsed());
    }
    let mut writes = Vec::with_capacity(KEEPER_REPS);
    for _ in 0..KEEPER_REPS {
        let t = Instant::now();
        zt_identity::files::write_file_atomic(
            &dir.join("policy").join("bundle.json"),
            signed.as_bytes(),
            0o600,
        )?;
        zt_identity::files::write_file_atomic(
            &dir.join("policy").join("newest-serial"),
            b"1\n",
            0o600,
        )?;
        writes.push(t.elapsed());
    }
    Ok(KeeperCost {
        accept: percentile(&sorted(accept), 50.0),
        writes: percentile(&sorted(writes), 50.0),
    })
}

// ------------------------------------------------------------------ report

#[allow(clippy::too_many_arguments)]
fn print_report(
    knobs: &Knobs,
    orgs: &[(String, usize)],
    load: f64,
    nofile: &zt_e2e::bench::NoFile,
    binaries: &[&std::path::Path],
    enrollment: &Enrollment,
    ztctl_round_trip: Duration,
    pushes: &[PushResult],
    keeper: &KeeperCost,
) {
    println!("# policy_push\n");
    println!("{}", zt_e2e::bench::machine_line());
    println!("load average at start: {load:.2}");
    println!(
        "binaries: {}",
        binaries
            .iter()
            .map(|b| b.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "fleet: {} simulated agents in this process (zt_agent control channel, release build, 2 tokio workers), {}",
        knobs.agents,
        orgs.iter()
            .map(|(org, n)| format!("{org} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("open files (RLIMIT_NOFILE): {}\n", nofile.describe());

    println!("## Enrollment\n");
    println!("| step | time |");
    println!("|---|---:|");
    println!(
        "| enroll {} devices, one at a time (`ztctl enroll-token create` + `zt_agent::enrollment::enroll`) | {:.1} s ({:.1} devices/s) |",
        knobs.agents,
        enrollment.total.as_secs_f64(),
        knobs.agents as f64 / enrollment.total.as_secs_f64()
    );
    let rate = |(n, d): (usize, Duration)| n as f64 / d.as_secs_f64().max(1e-9);
    println!(
        "| rate of the first {} / last {} devices | {:.1} / {:.1} devices/s |",
        enrollment.first_chunk.0,
        enrollment.last_chunk.0,
        rate(enrollment.first_chunk),
        rate(enrollment.last_chunk)
    );
    println!(
        "| then until the collector counted every control channel open | {:.1} s |",
        enrollment.channels_open.as_secs_f64()
    );
    println!(
        "| one `ztctl policy status` round trip (process, TLS, RPC; median of 5) — included in every latency below | {} |",
        ms(ztctl_round_trip)
    );
    println!();

    println!("## Push → applied, per agent\n");
    println!(
        "Latency: from just before `ztctl policy push FILE --wait 120 --json` starts to the moment the agent's accepted serial changed (swept every 1 ms). \
         `ztctl returned`: the collector had every agent's acknowledgement (ztctl polls the rollout every 200 ms).\n"
    );
    println!("| push | layer | serial | bundle bytes | agents | first | p50 | p90 | p99 | max | ztctl returned | collector CPU | agents' CPU (this process) | sweep interval |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, p) in pushes.iter().enumerate() {
        let l = sorted(p.latencies.clone());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} s | {:.2} s | {} |",
            i + 1,
            p.layer,
            p.serial,
            p.bundle_bytes,
            l.len(),
            ms(percentile(&l, 0.0)),
            ms(percentile(&l, 50.0)),
            ms(percentile(&l, 90.0)),
            ms(percentile(&l, 99.0)),
            ms(percentile(&l, 100.0)),
            ms(p.ztctl_returned),
            p.collector_cpu_s,
            p.agents_cpu_s,
            ms(p.sweep_interval),
        );
    }
    let all = sorted(pushes.iter().flat_map(|p| p.latencies.clone()).collect());
    let returned = sorted(pushes.iter().map(|p| p.ztctl_returned).collect());
    println!(
        "| all {} | | | | {} | {} | {} | {} | {} | {} | {} (median) | {:.2} s (mean) | {:.2} s (mean) | |",
        pushes.len(),
        all.len(),
        ms(percentile(&all, 0.0)),
        ms(percentile(&all, 50.0)),
        ms(percentile(&all, 90.0)),
        ms(percentile(&all, 99.0)),
        ms(percentile(&all, 100.0)),
        ms(percentile(&returned, 50.0)),
        pushes.iter().map(|p| p.collector_cpu_s).sum::<f64>() / pushes.len() as f64,
        pushes.iter().map(|p| p.agents_cpu_s).sum::<f64>() / pushes.len() as f64,
    );
    println!();
    let p99 = percentile(&all, 99.0);
    println!(
        "Goal p99 ≤ {} s: **{}** (p99 {} over {} latencies).\n",
        GOAL_P99.as_secs(),
        if p99 <= GOAL_P99 { "met" } else { "not met" },
        ms(p99),
        all.len()
    );

    println!("## One agent accepting the bundle alone (median of {KEEPER_REPS}, fleet idle)\n");
    println!("| step | time |");
    println!("|---|---:|");
    println!(
        "| `BundleKeeper::accept` (parse, verify, link + tests, compile, keep) | {} |",
        ms(keeper.accept)
    );
    println!(
        "| of which its two atomic writes together (each: write + fsync, rename, fsync directory) | {} |",
        ms(keeper.writes)
    );
    println!(
        "| × {} agents, if 2 cores did nothing else | {} |",
        knobs.agents,
        ms(keeper.accept * knobs.agents as u32 / 2)
    );
    println!();
}

// ------------------------------------------------------------------ helpers

fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}

/// Nearest-rank percentile of sorted values (0: the smallest).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
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
