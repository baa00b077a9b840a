//! The uplink's disk spool: what writing every event ahead to disk costs
//! next to the memory-only outbox, and how fast the spool replays from disk.
//!
//! `cargo bench -p agent --bench spool`. Not part of `make test`.
//!
//! - `memory/push_batch_ack_512`: the memory-only outbox (the baseline,
//!   as in the `decode` bench).
//! - `spool/append_batch_ack_512`: write-ahead: 512 appends (encode, CRC,
//!   buffered write, a `write(2)` per 64 KiB), one batch taken from the
//!   memory cache, one ack (segments deleted as they complete). The fsync
//!   runs off the uplink's task in the agent and is not timed here.
//! - `spool/replay_512`: a batch read back from disk (page cache), its
//!   records checked (CRC) and copied out as encoded events (no decode), as
//!   after a reconnect or a restart.

use std::{cell::Cell, hint::black_box, time::Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use proto::telemetry::{event::Kind, Ancestor, Event, ProcessExec};
use zt_agent::{
    outbox::Outbox,
    spool::{RunId, Spool, SpoolLimits},
};

const BATCH: usize = 512;

/// An exec as the agent sends it: typical argv, a hash, three ancestors.
fn wire_event(seq: u64) -> Event {
    let ancestor = |pid: u32, exe: &str| Ancestor {
        pid,
        exe: exe.to_owned(),
        argv0: exe.rsplit('/').next().unwrap_or(exe).to_owned(),
        start_unix_ns: 1_749_000_000_000_000_000,
    };
    Event {
        seq,
        time_unix_ns: 1_750_000_000_000_000_000 + seq * 1_000,
        ancestors: vec![
            ancestor(1_204, "/usr/bin/bash"),
            ancestor(1_100, "/usr/sbin/sshd"),
            ancestor(1, "/usr/lib/systemd/systemd"),
        ],
        kind: Some(Kind::Exec(ProcessExec {
            pid: 31_337,
            tid: 31_337,
            ppid: 1_204,
            uid: 1_000,
            gid: 1_000,
            cgroup_id: 8_812,
            filename: "/usr/bin/python3".into(),
            argv: [
                "/usr/bin/python3",
                "-m",
                "pip",
                "install",
                "--requirement=/srv/apps/budget/requirements.txt",
            ]
            .iter()
            .map(|a| (*a).to_owned())
            .collect(),
            exe_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            user_name: "staff".into(),
            cgroup_path: "/user.slice/user-1000.slice/session-3.scope".into(),
            ..Default::default()
        })),
    }
}

fn limits(dir: &std::path::Path) -> SpoolLimits {
    SpoolLimits {
        dir: dir.to_owned(),
        max_bytes: 1 << 30,
        segment_bytes: 16 << 20,
        cache_events: 100_000,
        cache_bytes: 16 << 20,
        fsync_interval: std::time::Duration::from_millis(200),
    }
}

fn run() -> RunId {
    RunId {
        boot_id: "0b5e2f4c-8d1e-4c7a-9a55-2b9d0c7e1f30".into(),
        agent_version: "0.1.0".into(),
    }
}

fn events(next_seq: &Cell<u64>) -> Vec<Event> {
    let first = next_seq.replace(next_seq.get() + BATCH as u64);
    (first..first + BATCH as u64).map(wire_event).collect()
}

fn bench_memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut outbox = Outbox::new(200_000);
    let next_seq = Cell::new(1u64);
    group.bench_function("push_batch_ack_512", |b| {
        b.iter_batched(
            || events(&next_seq),
            |events| {
                for event in events {
                    outbox.push(event);
                }
                let (seq, batch) = outbox.next_batch(BATCH).expect("a batch");
                outbox.ack(seq);
                batch
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn bench_spool(c: &mut Criterion) {
    let mut group = c.benchmark_group("spool");
    group.throughput(Throughput::Elements(BATCH as u64));

    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = Spool::open(limits(dir.path()), run()).expect("spool");
    let next_seq = Cell::new(1u64);
    group.bench_function("append_batch_ack_512", |b| {
        b.iter_batched(
            || events(&next_seq),
            |events| {
                for event in events {
                    spool.append(event).expect("append");
                }
                let batch = spool.next_batch(BATCH).expect("a batch");
                spool.ack(batch.key);
                batch.events
            },
            BatchSize::LargeInput,
        )
    });
    drop(spool);

    // Replay: 100k events on disk, read back (nothing in the cache) and
    // checked and copied; the spool is rewound (requeue) when it runs dry.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut spool = Spool::open(limits(dir.path()), run()).expect("spool");
        for seq in 1..=100_000 {
            spool.append(wire_event(seq)).expect("append");
        }
        spool.close().expect("close");
    }
    let mut spool = Spool::open(limits(dir.path()), run()).expect("spool");
    group.bench_function("replay_512", |b| {
        b.iter_custom(|iters| {
            let mut spent = std::time::Duration::ZERO;
            for _ in 0..iters {
                if spool.pending() < BATCH as u64 {
                    spool.requeue_in_flight();
                }
                let start = Instant::now();
                let batch = spool.next_batch(BATCH).expect("a batch");
                spent += start.elapsed();
                black_box(batch);
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, bench_memory, bench_spool);
criterion_main!(benches);
