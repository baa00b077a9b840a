//! Hot paths of the agent's user space, free of IO: decoding one ring-buffer
//! record, and the uplink's outbox cycle (push, batch, acknowledge).
//!
//! `cargo bench -p agent --bench decode`; see docs/benchmarks.md.

use std::{cell::Cell, hint::black_box, mem::size_of};

use agent_common::{EventKind, ExecEvent, ARGS_CAPACITY, FLAG_ARGS_TRUNCATED};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use proto::telemetry::{event::Kind, Event, ProcessExec};
use zt_agent::{event::decode, outbox::Outbox};

/// Events per uplink batch (the agent's `uplink.batch_max_events` default).
const BATCH: usize = 512;

/// The bytes the kernel writes for one exec: `argv` joined by NULs, cut at
/// [`ARGS_CAPACITY`] like the kernel program does.
fn exec_record(filename: &str, args: &[&str], flags: u32) -> Vec<u8> {
    // SAFETY: all-zero is a valid ExecEvent (integers and byte arrays).
    let mut raw: ExecEvent = unsafe { std::mem::zeroed() };
    raw.header.kind = EventKind::Exec as u32;
    raw.header.flags = flags;
    raw.header.boot_ns = 9_876_543_210_123;
    raw.pid = 31_337;
    raw.tid = 31_337;
    raw.ppid = 1_204;
    raw.uid = 1_000;
    raw.gid = 1_000;
    raw.cgroup_id = 8_812;
    raw.filename[..filename.len()].copy_from_slice(filename.as_bytes());
    raw.filename_len = filename.len() as u32;
    let mut at = 0;
    for arg in args {
        let end = (at + arg.len()).min(ARGS_CAPACITY);
        raw.args[at..end].copy_from_slice(&arg.as_bytes()[..end - at]);
        at = (end + 1).min(ARGS_CAPACITY);
    }
    raw.args_len = at as u32;
    // SAFETY: ExecEvent is `#[repr(C)]` plain old data without padding.
    unsafe {
        std::slice::from_raw_parts(
            (&raw as *const ExecEvent).cast::<u8>(),
            size_of::<ExecEvent>(),
        )
    }
    .to_vec()
}

/// A typical command line: 5 arguments, 80 bytes with their NULs.
const TYPICAL_ARGS: [&str; 5] = [
    "/usr/bin/python3",
    "-m",
    "pip",
    "install",
    "--requirement=/srv/apps/budget/requirements.txt",
];

fn typical_record() -> Vec<u8> {
    exec_record("/usr/bin/python3", &TYPICAL_ARGS, 0)
}

/// The worst case: the argument area full (4 KiB of 64-byte arguments).
fn full_record() -> Vec<u8> {
    let arg = "x".repeat(63);
    let args: Vec<&str> = std::iter::repeat_n(arg.as_str(), ARGS_CAPACITY / 64 + 1).collect();
    exec_record("/usr/bin/bash", &args, FLAG_ARGS_TRUNCATED)
}

fn bench_decode(c: &mut Criterion) {
    let typical = typical_record();
    let full = full_record();
    let args_bytes: usize = TYPICAL_ARGS.iter().map(|a| a.len() + 1).sum();
    assert_eq!(
        args_bytes, 80,
        "the typical record carries 80 argument bytes"
    );

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("exec_5_args_80B", |b| {
        b.iter(|| decode(black_box(&typical)).expect("decodes"))
    });
    group.bench_function("exec_full_4KiB_argv", |b| {
        b.iter(|| decode(black_box(&full)).expect("decodes"))
    });
    group.finish();
}

/// What the agent sends for one exec: the wire event with typical argv.
#[allow(clippy::needless_update)]
fn wire_event(seq: u64) -> Event {
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
            argv: TYPICAL_ARGS.iter().map(|a| (*a).to_owned()).collect(),
            argv_truncated: false,
            filename_truncated: false,
            ppid_unknown: false,
            ..Default::default()
        })),
    }
}

fn bench_outbox(c: &mut Criterion) {
    let mut group = c.benchmark_group("outbox");
    group.throughput(Throughput::Elements(BATCH as u64));
    // One batch's life: 512 pushes (each encodes its event once), one
    // next_batch (which shares the encoded events with the in-flight copy
    // kept until the ack, as the uplink does), one ack. The events are made
    // outside the timed part; the outbox is long-lived, as in the agent.
    let mut outbox = Outbox::new(200_000);
    let next_seq = Cell::new(1u64);
    group.bench_function("push_batch_ack_512", |b| {
        b.iter_batched(
            || {
                let first = next_seq.replace(next_seq.get() + BATCH as u64);
                (first..first + BATCH as u64)
                    .map(wire_event)
                    .collect::<Vec<_>>()
            },
            |events| {
                for event in events {
                    outbox.push(event);
                }
                let (batch_seq, batch) = outbox.next_batch(BATCH).expect("a batch");
                assert_eq!(outbox.ack(batch_seq), Some(batch.len()));
                batch
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_decode, bench_outbox);
criterion_main!(benches);
