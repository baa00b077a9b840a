//! Tunnel benchmarks on loopback, everything measured side by side in one
//! run and printed as a table:
//!
//! ```text
//! cargo run --release -p tunnel --example tunnel_bench
//! ```
//!
//! One process holds all parties: the caller, the client agent (a local TCP
//! listener standing in for the kernel redirect, a `TunnelClient`, the
//! splice), the gateway (`Gateway`, TLS with device certificates from an
//! in-memory CA, a trivial allow-all authorizer) and the TCP services. So
//! every tunnel number pays for both agents' CPU on the same cores, which on
//! a 2-core machine is the dominant cost; direct TCP pays only for the
//! kernel and the two TCP ends.
//!
//! * **connect latency**: from the caller's `connect()` to its first echoed
//!   byte. Direct TCP; through the tunnel with a warm pooled QUIC connection
//!   (one stream round trip plus the gateway's connect to the service); cold
//!   (a new `TunnelClient` per sample: UDP bind, QUIC and mutual-TLS
//!   handshake, then the same).
//! * **throughput** of one connection sending `ZT_BENCH_BULK_MIB` (default
//!   256) MiB one way, until the receiver has read it all and acknowledged:
//!   direct TCP; the tunnel (TCP → QUIC → TCP); a plain quinn stream between
//!   two endpoints with the same TLS and transport configuration (what the
//!   tunnel can at best reach).
//! * **connection rate**: new tunnelled connections per second with 64
//!   concurrent callers, each connecting, exchanging one byte and closing.
//! * **memory**: process RSS growth (`VmRSS`) per idle connection with
//!   1,000 open: direct, then through the tunnel (all parties included).
//!
//! Knobs (environment): `ZT_BENCH_ONLY` (comma-separated subset of
//! `latency,throughput,rate,memory`), `ZT_BENCH_SAMPLES` (latency samples,
//! default 2000),
//! `ZT_BENCH_STREAM_WINDOW`, `ZT_BENCH_CONN_WINDOW`, `ZT_BENCH_SEND_WINDOW`,
//! `ZT_BENCH_COPY_BUFFER`, `ZT_BENCH_UDP_BUFFER` (bytes) override the
//! defaults of `zt_tunnel::Tuning`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use zt_identity::{tls, CertificateAuthority, DeviceKey, PeerMatcher, RevocationList};
use zt_identity::{SpiffeId, TrustDomain};
use zt_tunnel::{
    config, Authorization, ClientOptions, Gateway, GatewayOptions, OpenRequest, PeerIdentity,
    Tuning, TunnelClient,
};

const DAY: Duration = Duration::from_secs(86_400);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn tuning() -> Tuning {
    let d = Tuning::default();
    Tuning {
        stream_receive_window: env_or("ZT_BENCH_STREAM_WINDOW", d.stream_receive_window),
        connection_receive_window: env_or("ZT_BENCH_CONN_WINDOW", d.connection_receive_window),
        send_window: env_or("ZT_BENCH_SEND_WINDOW", d.send_window),
        copy_buffer: env_or("ZT_BENCH_COPY_BUFFER", d.copy_buffer),
        udp_buffer: env_or("ZT_BENCH_UDP_BUFFER", d.udp_buffer),
        ..d
    }
}

// ---------------------------------------------------------------------------
// Parties

struct Pki {
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
}

fn pki() -> Pki {
    let now = SystemTime::now();
    let td = TrustDomain::new("pref.example").unwrap();
    let ca = CertificateAuthority::generate(&td, 365 * DAY, now).unwrap();
    let issue = |name: &str| {
        let id = SpiffeId::device(&td, "city-a", name).unwrap();
        let key = DeviceKey::generate().unwrap();
        let cert = ca.sign_csr(&key.csr_pem().unwrap(), &id, DAY, now).unwrap();
        (id, key, cert)
    };
    let (gateway_id, gateway_key, gateway_cert) = issue("gateway-1");
    let (_, pc_key, pc_cert) = issue("pc-1");
    Pki {
        client: tls::spiffe_client_config(
            &ca.bundle_der(),
            vec![pc_cert.der],
            pc_key.private_key_der(),
            PeerMatcher::Exact(gateway_id),
            None,
        )
        .unwrap(),
        server: tls::server_config_with_revocation(
            &ca.bundle_der(),
            vec![gateway_cert.der],
            gateway_key.private_key_der(),
            true,
            RevocationList::new().shared(),
        )
        .unwrap(),
    }
}

/// Echoes; used for latency and connection rate.
async fn echo_service() -> SocketAddr {
    serve(|mut socket: TcpStream| async move {
        let (mut read, mut write) = socket.split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
    })
    .await
}

/// Reads to EOF, then answers one byte; used for throughput.
async fn sink_service() -> SocketAddr {
    serve(|mut socket: TcpStream| async move {
        let mut buffer = vec![0u8; 256 * 1024];
        while let Ok(n) = socket.read(&mut buffer).await {
            if n == 0 {
                let _ = socket.write_all(b"k").await;
                return;
            }
        }
    })
    .await
}

/// Holds connections open; used for memory.
async fn hold_service() -> SocketAddr {
    serve(|mut socket: TcpStream| async move {
        let mut sink = [0u8; 64];
        while let Ok(n) = socket.read(&mut sink).await {
            if n == 0 {
                return;
            }
        }
    })
    .await
}

async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            tokio::spawn(handler(socket));
        }
    });
    addr
}

async fn start_gateway(pki: &Pki, tuning: &Tuning) -> SocketAddr {
    let (decisions, mut records) = mpsc::channel(1024);
    // Drain the records as an agent would.
    tokio::spawn(async move { while records.recv().await.is_some() {} });
    let allow_all = |_: &PeerIdentity, _: &OpenRequest| Authorization::allow("bench", 1);
    let gateway = Gateway::bind_with_options(
        "127.0.0.1:0".parse().unwrap(),
        pki.server.clone(),
        Arc::new(allow_all),
        decisions,
        GatewayOptions {
            tuning: tuning.clone(),
            ..GatewayOptions::default()
        },
    )
    .unwrap();
    let addr = gateway.local_addr();
    tokio::spawn(async move { gateway.run(std::future::pending::<()>()).await });
    addr
}

fn client(pki: &Pki, tuning: &Tuning) -> TunnelClient {
    TunnelClient::with_options(
        "127.0.0.1:0".parse().unwrap(),
        pki.client.clone(),
        ClientOptions {
            tuning: tuning.clone(),
            ..ClientOptions::default()
        },
    )
    .unwrap()
}

/// Which client an agent listener uses for each redirected connection.
enum Pool {
    /// One shared client: its pooled connection stays warm.
    Warm(TunnelClient),
    /// A new client (so a new QUIC connection) per connection.
    Cold(Arc<Pki>, Tuning),
}

/// The client agent: a local listener standing in for the kernel redirect;
/// every accepted caller is tunnelled to `service` through `gateway`.
async fn agent(pool: Pool, gateway: SocketAddr, service: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pool = Arc::new(pool);
    tokio::spawn(async move {
        let mut next_id = 0u64;
        while let Ok((caller, _)) = listener.accept().await {
            next_id += 1;
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                let request = OpenRequest {
                    connection_id: next_id.to_string(),
                    user: "alice".into(),
                    exe: "/usr/bin/bench".into(),
                    ..OpenRequest::to(service)
                };
                let client = match &*pool {
                    Pool::Warm(client) => client.clone(),
                    Pool::Cold(pki, tuning) => client(pki, tuning),
                };
                match client.open(gateway, &request).await {
                    Ok(stream) => {
                        let _ = stream.splice(caller).await;
                    }
                    Err(e) => {
                        eprintln!("open failed: {e}");
                        zt_tunnel::reset(caller);
                    }
                }
                if matches!(&*pool, Pool::Cold(..)) {
                    client.close();
                }
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------
// Measurements

/// Connect, send one byte, wait for it to come back; time to that byte.
async fn first_byte(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.set_nodelay(true).unwrap();
    socket.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    socket.read_exact(&mut byte).await.unwrap();
    start.elapsed()
}

struct Latency {
    p50: Duration,
    p99: Duration,
}

async fn latency(addr: SocketAddr, samples: usize) -> Latency {
    // Warm up (pool, caches) before measuring.
    for _ in 0..20 {
        first_byte(addr).await;
    }
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        times.push(first_byte(addr).await);
    }
    times.sort();
    Latency {
        p50: times[samples / 2],
        p99: times[samples * 99 / 100],
    }
}

/// Sends `bytes` over `socket`, half-closes, waits for the one-byte ack.
async fn bulk_over_tcp(mut socket: TcpStream, bytes: usize) -> Duration {
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        socket.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    socket.shutdown().await.unwrap();
    let mut ack = [0u8; 1];
    socket.read_exact(&mut ack).await.unwrap();
    start.elapsed()
}

/// A plain quinn stream between two endpoints with the tunnel's TLS and
/// transport configuration: the receiver reads everything, then acks.
async fn bulk_over_quinn(pki: &Pki, tuning: &Tuning, bytes: usize) -> Duration {
    let server = config::server_config(pki.server.clone(), tuning).unwrap();
    let server =
        config::endpoint("127.0.0.1:0".parse().unwrap(), Some(server), tuning, None).unwrap();
    let server_addr = server.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let connection = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = connection.accept_bi().await.unwrap();
        while recv.read_chunk(usize::MAX, true).await.unwrap().is_some() {}
        send.write_all(b"k").await.unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
        server
    });
    let mut client = config::endpoint("127.0.0.1:0".parse().unwrap(), None, tuning, None).unwrap();
    client.set_default_client_config(config::client_config(pki.client.clone(), tuning).unwrap());
    let connection = client
        .connect(server_addr, "127.0.0.1")
        .unwrap()
        .await
        .unwrap();
    let chunk = Bytes::from(vec![0x5au8; tuning.copy_buffer]);
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        send.write_chunk(chunk.slice(..n)).await.unwrap();
        left -= n;
    }
    send.finish().unwrap();
    let mut ack = [0u8; 1];
    recv.read_exact(&mut ack).await.unwrap();
    let elapsed = start.elapsed();
    connection.close(0u32.into(), b"done");
    let _ = receiver.await;
    elapsed
}

/// CPU time (user + system, all threads) this process has used so far.
fn cpu_time() -> Duration {
    // Fields 14 and 15 of /proc/self/stat, in clock ticks (100 per second
    // on Linux); the command name (field 2) may contain spaces, so count
    // from the closing parenthesis.
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let fields: Vec<u64> = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .skip(11)
                .take(2)
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            Some(fields.iter().sum::<u64>())
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn mib_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / time.as_secs_f64()
}

/// Throughput of a bulk transfer.
struct Bulk {
    /// Best of the runs (the least disturbed by anything else).
    mib_per_s: f64,
    /// CPU time of the whole process per MiB carried, over all runs.
    cpu_ms_per_mib: f64,
}

/// `runs` transfers of `bytes` each.
async fn bulk<F, Fut>(runs: usize, bytes: usize, mut run: F) -> Bulk
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let mut best = Duration::MAX;
    let cpu_before = cpu_time();
    for _ in 0..runs {
        best = best.min(run().await);
    }
    let cpu = cpu_time().saturating_sub(cpu_before);
    let mib = (bytes * runs) as f64 / (1024.0 * 1024.0);
    Bulk {
        mib_per_s: mib_per_s(bytes, best),
        cpu_ms_per_mib: cpu.as_secs_f64() * 1e3 / mib,
    }
}

/// Connections per second with `callers` concurrent callers making `total`
/// connections (connect, one byte each way, close).
async fn connection_rate(addr: SocketAddr, callers: usize, total: usize) -> f64 {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        tasks.spawn(async move {
            for _ in 0..total / callers {
                first_byte(addr).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (total / callers * callers) as f64 / start.elapsed().as_secs_f64()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Opens `n` connections to `addr` (one byte each, so a tunnel's whole
/// path is set up) and returns them.
async fn open_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket.write_all(b"x").await.unwrap();
        held.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    held
}

/// RSS growth per idle connection, `n` open: direct to the service, then
/// (with those still open) through the tunnel. Runs first in the process,
/// and keeps everything open while measuring, so that no memory freed
/// earlier is reused and hides growth. A few connections of each kind warm
/// up what is made once (the pooled QUIC connection, runtime and allocator
/// structures).
async fn memory_per_connection(direct: SocketAddr, tunnel: SocketAddr, n: usize) -> (f64, f64) {
    let warm = (open_idle(direct, 10).await, open_idle(tunnel, 10).await);
    let start = rss_kib();
    let direct_held = open_idle(direct, n).await;
    let after_direct = rss_kib();
    let tunnel_held = open_idle(tunnel, n).await;
    let after_tunnel = rss_kib();
    drop((warm, direct_held, tunnel_held));
    let per = |from: u64, to: u64| to.saturating_sub(from) as f64 / n as f64;
    (per(start, after_direct), per(after_direct, after_tunnel))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let samples: usize = env_or("ZT_BENCH_SAMPLES", 2000);
    let bulk_bytes = env_or::<usize>("ZT_BENCH_BULK_MIB", 256) * 1024 * 1024;
    let tuning = tuning();
    println!("tuning: {tuning:?}");
    let pki = Arc::new(pki());
    let gateway = start_gateway(&pki, &tuning).await;
    let echo = echo_service().await;
    let sink = sink_service().await;
    let hold = hold_service().await;
    let warm_client = client(&pki, &tuning);
    let warm_echo = agent(Pool::Warm(warm_client.clone()), gateway, echo).await;
    let warm_sink = agent(Pool::Warm(warm_client.clone()), gateway, sink).await;
    let warm_hold = agent(Pool::Warm(warm_client.clone()), gateway, hold).await;
    let cold_echo = agent(Pool::Cold(Arc::clone(&pki), tuning.clone()), gateway, echo).await;

    let only = std::env::var("ZT_BENCH_ONLY").unwrap_or_default();
    let wanted = |part: &str| only.is_empty() || only.split(',').any(|p| p == part);

    if wanted("memory") {
        let n = 1000;
        println!("\n## Memory: {n} idle connections open (process RSS growth)\n");
        let (direct, tunnel) = memory_per_connection(hold, warm_hold, n).await;
        println!("| path | KiB per connection |");
        println!("|---|---:|");
        println!("| direct TCP (caller and service) | {direct:.1} |");
        println!("| tunnel (caller, client agent, gateway, service) | {tunnel:.1} |");
        println!(
            "| tunnel's own share (difference) | {:.1} |",
            tunnel - direct
        );
        println!(
            "\npooled QUIC connections: {} (client side)",
            warm_client.connections()
        );
    }

    if wanted("latency") {
        println!("\n## Connect latency: connect() to first echoed byte ({samples} samples)\n");
        println!("| path | p50 | p99 |");
        println!("|---|---:|---:|");
        for (name, addr, n) in [
            ("direct TCP", echo, samples),
            ("tunnel, warm pooled QUIC connection", warm_echo, samples),
            (
                "tunnel, cold (new QUIC + mTLS handshake)",
                cold_echo,
                samples,
            ),
        ] {
            let l = latency(addr, n).await;
            println!(
                "| {name} | {:.0} µs | {:.0} µs |",
                micros(l.p50),
                micros(l.p99)
            );
        }
    }

    // `throughput` runs all three paths; `tcp-throughput`,
    // `quinn-throughput`, `tunnel-throughput` one each (for profiling).
    let path_wanted = |path: &str| wanted("throughput") || wanted(&format!("{path}-throughput"));
    if ["tcp", "quinn", "tunnel"].iter().any(|p| path_wanted(p)) {
        let mib = bulk_bytes / (1024 * 1024);
        println!("\n## Throughput: one connection, {mib} MiB one way (best of 3)\n");
        println!("| path | MiB/s | CPU ms per MiB (all parties) |");
        println!("|---|---:|---:|");
        let mut quinn_rate = None;
        if path_wanted("tcp") {
            let b = bulk(3, bulk_bytes, || async {
                bulk_over_tcp(TcpStream::connect(sink).await.unwrap(), bulk_bytes).await
            })
            .await;
            println!(
                "| direct TCP | {:.0} | {:.2} |",
                b.mib_per_s, b.cpu_ms_per_mib
            );
        }
        if path_wanted("quinn") {
            let b = bulk(3, bulk_bytes, || bulk_over_quinn(&pki, &tuning, bulk_bytes)).await;
            println!(
                "| plain quinn stream, same TLS and tuning | {:.0} | {:.2} |",
                b.mib_per_s, b.cpu_ms_per_mib
            );
            quinn_rate = Some(b.mib_per_s);
        }
        if path_wanted("tunnel") {
            let b = bulk(3, bulk_bytes, || async {
                bulk_over_tcp(TcpStream::connect(warm_sink).await.unwrap(), bulk_bytes).await
            })
            .await;
            let share = quinn_rate
                .map(|q| format!(" ({:.0} % of plain quinn)", 100.0 * b.mib_per_s / q))
                .unwrap_or_default();
            println!(
                "| tunnel (TCP → QUIC → TCP) | {:.0}{share} | {:.2} |",
                b.mib_per_s, b.cpu_ms_per_mib
            );
        }
    }

    if wanted("rate") {
        let callers = 64;
        let total = 20_000;
        println!(
            "\n## New connections per second ({callers} concurrent callers, {total} connections)\n"
        );
        println!("| path | connections/s |");
        println!("|---|---:|");
        println!(
            "| direct TCP | {:.0} |",
            connection_rate(echo, callers, total).await
        );
        println!(
            "| tunnel, warm pooled QUIC connection | {:.0} |",
            connection_rate(warm_echo, callers, total).await
        );
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
