//! Hot paths of the collector's ingest, free of IO: converting one agent
//! batch to table rows, and the batch writer's push/flush decisions.
//!
//! `cargo bench -p collector --bench ingest_convert`; see docs/benchmarks.md.

use std::{
    cell::RefCell,
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use proto::telemetry::{event::Kind, AgentIdentity, Event, ProcessExec};
use zt_collector::{
    ingest::convert_batch,
    storage::ProcessEventRow,
    writer::{BatchLimits, Batcher},
};

/// Events per agent batch (the agent's `uplink.batch_max_events` default).
const BATCH: usize = 512;
const NOW: u32 = 1_750_000_100;

fn identity() -> AgentIdentity {
    AgentIdentity {
        org_id: "pref-kanagawa".into(),
        device_id: "6f1c2a4e-93b1-4c55-a1f0-2b8d7e9c0a11".into(),
        hostname: "pc-04211.pref.example".into(),
        boot_id: "b2e7f0a8-5d3c-4e91-8f6a-0c1d2e3f4a5b".into(),
        agent_version: "0.1.0".into(),
    }
}

/// One exec with a typical command line (5 arguments, 80 bytes).
#[allow(clippy::needless_update)]
fn exec(seq: u64) -> Event {
    Event {
        seq,
        time_unix_ns: 1_750_000_000_000_000_000 + seq * 1_000,
        ancestors: Vec::new(),
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
            argv_truncated: false,
            filename_truncated: false,
            ppid_unknown: false,
            ..Default::default()
        })),
    }
}

fn batch() -> Vec<Event> {
    (1..=BATCH as u64).map(exec).collect()
}

fn bench_convert(c: &mut Criterion) {
    let identity = identity();
    let events = batch();
    let mut group = c.benchmark_group("convert_batch");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("exec_512", |b| {
        b.iter(|| {
            let converted = convert_batch(Some(black_box(&identity)), black_box(&events), NOW);
            assert_eq!(converted.rows.len(), BATCH);
            converted
        })
    });
    group.finish();
}

fn rows() -> Vec<ProcessEventRow> {
    convert_batch(Some(&identity()), &batch(), NOW)
        .rows
        .process_events
}

fn bench_batcher(c: &mut Criterion) {
    let template = rows();
    // The collector's defaults: 10,000 rows or 1 s.
    let limits = BatchLimits {
        max_rows: 10_000,
        max_delay: Duration::from_secs(1),
    };
    let mut group = c.benchmark_group("batcher");

    // One request of 512 rows arriving: push, then the writer's question
    // "flush now?". The batcher is emptied (outside the timing) whenever it
    // would flush, so it stays in its steady state.
    group.throughput(Throughput::Elements(BATCH as u64));
    let batcher: RefCell<Batcher<ProcessEventRow, u64>> = RefCell::new(Batcher::new(limits));
    let mut handle = 0u64;
    group.bench_function("push_512_and_decide", |b| {
        b.iter_batched(
            || {
                let mut batcher = batcher.borrow_mut();
                if batcher.len() + BATCH > limits.max_rows {
                    drop(batcher.take());
                }
                template.clone()
            },
            |rows| {
                handle += 1;
                let now = Instant::now();
                let mut batcher = batcher.borrow_mut();
                batcher.push(rows, handle, now);
                black_box(batcher.should_flush(now))
            },
            BatchSize::LargeInput,
        )
    });

    // A whole flush cycle: requests of 512 rows until the size limit says
    // flush (20 requests, 10,240 rows), then take.
    let per_flush = limits.max_rows.div_ceil(BATCH);
    group.throughput(Throughput::Elements((per_flush * BATCH) as u64));
    group.bench_function("fill_to_10k_and_take", |b| {
        b.iter_batched(
            || {
                (
                    Batcher::<ProcessEventRow, u64>::new(limits),
                    vec![template.clone(); per_flush],
                )
            },
            |(mut batcher, requests)| {
                let now = Instant::now();
                for (i, rows) in requests.into_iter().enumerate() {
                    assert!(!batcher.should_flush(now));
                    batcher.push(rows, i as u64, now);
                }
                assert!(batcher.should_flush(now));
                batcher.take()
            },
            BatchSize::LargeInput,
        )
    });

    // The decision alone, as the writer asks it after every wake-up.
    let mut full: Batcher<ProcessEventRow, u64> = Batcher::new(limits);
    full.push(template.clone(), 0, Instant::now());
    group.throughput(Throughput::Elements(1));
    group.bench_function("should_flush", |b| {
        b.iter(|| black_box(&full).should_flush(black_box(Instant::now())))
    });
    group.finish();
}

criterion_group!(benches, bench_convert, bench_batcher);
criterion_main!(benches);
