//! Mutual TLS: handshakes per second on one core, and what TLS costs the
//! telemetry stream next to plain text on loopback (issue 5, Benchmarks).
//!
//! `cargo bench -p grpc-tls --bench mtls`. Not part of `make test`.
//!
//! - `handshake/mutual_tls_in_memory`: a full TLS 1.3 handshake with client
//!   certificates between a rustls `ClientConnection` and `ServerConnection`
//!   in one thread, bytes passed through memory (no sockets, no kernel).
//!   The server config is the collector's (`server_config_with_revocation`:
//!   webpki chain check, then SPIFFE id and revocation list), the client's an
//!   agent's (`client_config` with a device certificate); all keys ECDSA
//!   P-256, key exchange X25519. The client keeps no session, so every
//!   handshake is a full one; the server sends its session tickets as it does
//!   in production. One element = one handshake (both ends on one core).
//! - `handshake/mutual_tls_in_memory_server_share`: the same handshakes, but
//!   only the time spent in the server's calls is counted: what one collector
//!   core can accept when the agents do their half elsewhere.
//! - No resumed variant: the collector's servers never resume sessions (a
//!   resumed handshake skips the client-certificate verifier, so revocation
//!   and expiry would go unchecked). Checked before the group: a client that
//!   keeps sessions still gets a full handshake.
//! - `telemetry/stream_512_event_batches/{mtls,plaintext}`: a real tonic
//!   `Telemetry` server (acknowledges every batch as soon as it is decoded)
//!   on loopback TCP and a client in the same process (one tokio runtime,
//!   2 worker threads), once through `zt_grpc_tls::serve_tls` + `channel`
//!   and once over plain HTTP/2. The connection is set up once; each sample
//!   opens one `Stream` call and sends batches of 512 exec events (argv, hash,
//!   three ancestors) with at most 16 unacknowledged (the agent's default),
//!   timed from the first send to the last acknowledgement. One element = one
//!   event. Afterwards each variant streams 3,000 more batches and prints the
//!   process's CPU time per event (client and server together), which moves
//!   less than wall time when something else shares the cores (only under
//!   `cargo bench`, not in `cargo test --benches`).

#![allow(clippy::unwrap_used)]

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proto::telemetry::{
    event::Kind,
    telemetry_client::TelemetryClient,
    telemetry_server::{Telemetry, TelemetryServer},
    AgentIdentity, Ancestor, BatchAck, Event, EventBatch, ProcessExec,
};
use rustls::{
    client::Resumption, pki_types::ServerName, ClientConfig, ClientConnection, ConnectionCommon,
    HandshakeKind, ServerConfig, ServerConnection,
};
use tokio::{net::TcpListener, runtime::Runtime, sync::mpsc};
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{
    transport::{server::TcpIncoming, Channel, Endpoint, Server},
    Request, Response, Status, Streaming,
};
use zt_identity::{tls, CertificateAuthority, DeviceKey, RevocationList, SpiffeId, TrustDomain};

const DAY: Duration = Duration::from_secs(86_400);
const SERVER_NAME: &str = "collector.pref.example";
const BATCH: usize = 512;
/// Unacknowledged batches per stream (the agent's default).
const WINDOW: usize = 16;

// ---------------------------------------------------------------------------
// Certificates and rustls configs, as the collector and an agent build them.

struct Pki {
    server: ServerConfig,
    client: ClientConfig,
}

fn pki() -> Pki {
    let td = TrustDomain::new("pref.example").unwrap();
    let ca = CertificateAuthority::generate(&td, 365 * DAY, SystemTime::now()).unwrap();
    let bundle = ca.bundle_der();

    let issued = ca
        .issue_server_certificate(
            &[SERVER_NAME.to_owned(), "localhost".to_owned()],
            &["127.0.0.1".parse().unwrap()],
            DAY,
        )
        .unwrap();
    let server_identity =
        tls::TlsIdentity::from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    // As the collector: client certificates optional at the handshake (for
    // enrollment) but verified, SPIFFE id and revocation list checked, when
    // presented. Every client here presents one. A few revoked devices so
    // the lookup is not trivially an empty set.
    let mut revocations = RevocationList::new();
    for i in 0..100 {
        let id = SpiffeId::device(&td, "city-b", &format!("pc-{i:04}")).unwrap();
        revocations.revoke_device(&id);
    }
    let server = tls::server_config_with_revocation(
        &bundle,
        server_identity.chain,
        server_identity.key,
        false,
        revocations.shared(),
    )
    .unwrap();

    let id = SpiffeId::device(&td, "city-a", "pc-0001").unwrap();
    let key = DeviceKey::generate().unwrap();
    let cert = ca
        .sign_csr(&key.csr_pem().unwrap(), &id, DAY, SystemTime::now())
        .unwrap();
    let client = tls::client_config_from_pem(
        ca.bundle_pem().as_bytes(),
        cert.pem.as_bytes(),
        key.to_pem().as_bytes(),
    )
    .unwrap();
    Pki { server, client }
}

// ---------------------------------------------------------------------------
// In-memory handshakes.

/// Moves everything `from` wants to write into `to` and processes it.
/// `buf` is reused between calls.
fn pump<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>, buf: &mut Vec<u8>) {
    while from.wants_write() {
        buf.clear();
        from.write_tls(buf).unwrap();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets().unwrap();
        }
    }
}

/// One complete handshake (until neither side has anything left to send,
/// session tickets included). Returns the time spent in the server's calls
/// and how the handshake went.
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
    name: &ServerName<'static>,
    buf: &mut Vec<u8>,
) -> (Duration, HandshakeKind) {
    let mut in_server = Duration::ZERO;
    let mut c = ClientConnection::new(client.clone(), name.clone()).unwrap();
    let started = Instant::now();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    in_server += started.elapsed();
    for _ in 0..10 {
        // Client → server: the server reads, verifies and answers.
        let started = Instant::now();
        pump(&mut c, &mut s, buf);
        in_server += started.elapsed();
        // Server → client: the server's write is server time; the client's
        // processing is not. `pump` mixes the two, so split it by hand.
        while s.wants_write() {
            buf.clear();
            let started = Instant::now();
            s.write_tls(buf).unwrap();
            in_server += started.elapsed();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            break;
        }
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake stalled"
    );
    let kind = s.handshake_kind().unwrap();
    assert!(
        s.peer_certificates().is_some_and(|certs| !certs.is_empty()),
        "the server did not get the client's certificate"
    );
    black_box((&c, &s));
    (in_server, kind)
}

fn handshakes(c: &mut Criterion) {
    let Pki { server, client } = pki();
    let server = Arc::new(server);
    let name = ServerName::try_from(SERVER_NAME).unwrap().to_owned();

    let mut full = client.clone();
    full.resumption = Resumption::disabled();
    let full = Arc::new(full);
    // Sessions shared across connections, as one agent's reconnections.
    let resuming = Arc::new(client);

    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(8));
    let mut buf = Vec::with_capacity(16 << 10);

    // A client that would resume still gets a full handshake.
    handshake(&resuming, &server, &name, &mut buf);
    let (_, kind) = handshake(&resuming, &server, &name, &mut buf);
    assert_eq!(
        kind,
        HandshakeKind::Full,
        "the server must not resume sessions"
    );

    group.bench_function("mutual_tls_in_memory", |b| {
        b.iter(|| {
            let (_, kind) = handshake(&full, &server, &name, &mut buf);
            assert_eq!(kind, HandshakeKind::Full);
        });
    });

    group.bench_function("mutual_tls_in_memory_server_share", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += handshake(&full, &server, &name, &mut buf).0;
            }
            total
        });
    });

    group.finish();
}

// ---------------------------------------------------------------------------
// Telemetry over gRPC: mTLS vs plain text.

/// Acknowledges every batch as soon as it arrives.
struct AckAll;

#[tonic::async_trait]
impl Telemetry for AckAll {
    type StreamStream = ReceiverStream<Result<BatchAck, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<EventBatch>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut batches = request.into_inner();
        let (tx, rx) = mpsc::channel(WINDOW * 2);
        tokio::spawn(async move {
            while let Some(Ok(batch)) = batches.next().await {
                let ack = BatchAck {
                    batch_seq: batch.batch_seq,
                    stored: u32::try_from(batch.events.len()).unwrap_or(u32::MAX),
                    ..BatchAck::default()
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// An exec as the agent sends it: typical argv, a hash, three ancestors
/// (the event of the agent's `spool` bench), about 450 bytes encoded.
fn exec_event(seq: u64) -> Event {
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
            pid: 31_337 + (seq % 1000) as u32,
            tid: 31_337 + (seq % 1000) as u32,
            ppid: 1_204,
            uid: 1_000,
            gid: 1_000,
            euid: 1_000,
            egid: 1_000,
            loginuid: Some(1_000),
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
            process_start_unix_ns: 1_750_000_000_000_000_000 + seq * 1_000 - 500,
            exe_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            user_name: "staff".into(),
            cgroup_path: "/user.slice/user-1000.slice/session-3.scope".into(),
            ..Default::default()
        })),
    }
}

fn batch_template() -> EventBatch {
    EventBatch {
        batch_seq: 0,
        agent: Some(AgentIdentity {
            org_id: "city-a".into(),
            device_id: "pc-0001".into(),
            hostname: "pc-0001.city-a.pref.example".into(),
            boot_id: "5b0f4c9e-2f7a-4d55-9a53-0b8a4d1e7c21".into(),
            agent_version: "0.1.0".into(),
        }),
        events: (1..=BATCH as u64).map(exec_event).collect(),
    }
}

/// Sends `batches` batches on one new `Stream` call with at most [`WINDOW`]
/// unacknowledged; returns the time from the first send to the last ack.
async fn stream_batches(channel: &Channel, template: &EventBatch, batches: u64) -> Duration {
    let mut client = TelemetryClient::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<EventBatch>(WINDOW);
    let started = Instant::now();
    let mut acks = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut sent = 0u64;
    let mut acked = 0u64;
    while acked < batches {
        while sent < batches && sent - acked < WINDOW as u64 {
            let mut batch = template.clone();
            batch.batch_seq = sent;
            tx.send(batch).await.unwrap();
            sent += 1;
        }
        let ack = acks.message().await.unwrap().expect("the stream ended");
        assert_eq!(ack.batch_seq, acked, "acks out of order");
        assert_eq!(ack.stored as usize, BATCH);
        acked += 1;
    }
    let elapsed = started.elapsed();
    drop(tx);
    // Let the call finish before the next sample opens another.
    while let Ok(Some(_)) = acks.message().await {}
    elapsed
}

fn telemetry_service() -> TelemetryServer<AckAll> {
    TelemetryServer::new(AckAll)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

async fn mtls_channel(server_config: ServerConfig, client_config: ClientConfig) -> Channel {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = zt_grpc_tls::serve_tls(listener, server_config);
    tokio::spawn(
        Server::builder()
            .add_service(telemetry_service())
            .serve_with_incoming(incoming),
    );
    // The server certificate names 127.0.0.1 too; no DNS needed.
    zt_grpc_tls::channel(&format!("https://127.0.0.1:{port}"), client_config)
        .await
        .unwrap()
}

async fn plaintext_channel() -> Channel {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = TcpIncoming::from_listener(listener, true, None).unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(telemetry_service())
            .serve_with_incoming(incoming),
    );
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap()
}

fn telemetry(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Pki { server, client } = pki();
    let template = batch_template();
    let mtls = runtime.block_on(mtls_channel(server, client));
    let plain = runtime.block_on(plaintext_channel());

    let mut group = c.benchmark_group("telemetry/stream_512_event_batches");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(15));
    for (name, channel) in [("mtls", &mtls), ("plaintext", &plain)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| run_stream(&runtime, channel, &template, iters));
        });
    }
    group.finish();

    // Wall time on 2 shared cores moves with whatever else runs; CPU time
    // per event is the steadier measure of what TLS adds. Client and server
    // are in this process, so this is both ends together.
    // Only under `cargo bench`: `cargo test --benches` runs each benchmark
    // once as a smoke test and should stay quick.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    for (name, channel) in [("mtls", &mtls), ("plaintext", &plain)] {
        const BATCHES: u64 = 3_000;
        let cpu_before = process_cpu();
        let wall = run_stream(&runtime, channel, &template, BATCHES);
        let cpu = process_cpu().saturating_sub(cpu_before);
        let events = (BATCHES * BATCH as u64) as f64;
        println!(
            "telemetry/stream_512_event_batches/{name}: {BATCHES} batches, \
             {:.0} events/s, CPU {:.0} ns per event (client + server, {:.2} cores busy)",
            events / wall.as_secs_f64(),
            cpu.as_nanos() as f64 / events,
            cpu.as_secs_f64() / wall.as_secs_f64(),
        );
    }
}

/// CPU time of all of this process's threads (Linux `schedstat`: on-CPU
/// nanoseconds per thread). Threads that exit in between are not counted;
/// the runtime's workers live for the whole bench.
fn process_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

fn run_stream(runtime: &Runtime, channel: &Channel, template: &EventBatch, iters: u64) -> Duration {
    runtime.block_on(stream_batches(channel, template, iters))
}

criterion_group!(benches, handshakes, telemetry);
criterion_main!(benches);
