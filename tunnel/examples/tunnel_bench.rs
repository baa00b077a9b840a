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
//! The client agent carries connections as the real agent does, pipelined
//! (`TunnelClient::carry`: the caller's bytes follow the request at once, the
//! answer is read before the first byte back); the rows marked "answer
//! first" use `TunnelClient::open` + `splice` instead (the request's answer
//! is awaited before any byte moves), for comparison.
//!
//! * **connect latency**: from the caller's `connect()` to its first echoed
//!   byte. Direct TCP; through the tunnel with a warm pooled QUIC connection
//!   (one stream round trip plus the gateway's connect to the service),
//!   pipelined and answer first; cold (a new `TunnelClient` per sample: UDP
//!   bind, QUIC and mutual-TLS handshake, then the same). The rows of one
//!   table take turns of 100 samples (see `latency`), and every caller
//!   closes with a reset (see `no_time_wait`).
//! * **over an emulated LAN**: the same warm connect latency, pipelined and
//!   answer first, with the client agent reaching the gateway through a UDP
//!   relay that delays every datagram by half of `ZT_BENCH_LAN_RTT_US`
//!   (default 500 µs round trip; OS threads sleeping until each datagram is
//!   due, some 100 µs late on a VM: the one-byte round trip on an
//!   established connection, printed with it, shows the effective round
//!   trip). On loopback a QUIC round trip
//!   costs little more than the CPU work of the parties, which all share two
//!   cores; between two machines it is the network's round trip, and that
//!   is what pipelining saves.
//! * **throughput** of one connection sending `ZT_BENCH_BULK_MIB` (default
//!   256) MiB one way, until the receiver has read it all and acknowledged:
//!   direct TCP; the tunnel (TCP → QUIC → TCP); a plain quinn stream between
//!   two endpoints with the same TLS and transport configuration (what the
//!   tunnel can at best reach).
//! * **connection rate**: new tunnelled connections per second with 64
//!   concurrent callers, each connecting, exchanging one byte and closing
//!   (pipelined and answer first).
//! * **memory**: process RSS growth (`VmRSS`) per idle connection with
//!   1,000 open: direct, then through the tunnel (all parties included).
//!
//! Knobs (environment): `ZT_BENCH_ONLY` (comma-separated subset of
//! `latency,lan,throughput,rate,memory`), `ZT_BENCH_SAMPLES` (latency
//! samples, default 2000; a quarter of that over the emulated LAN),
//! `ZT_BENCH_LAN_RTT_US` (default 500),
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

/// How the agent listener opens its tunnelled connections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    /// `TunnelClient::carry`, as the agent does.
    Pipelined,
    /// `TunnelClient::open`, then `TunnelStream::splice`.
    AnswerFirst,
}

/// The client agent: a local listener standing in for the kernel redirect;
/// every accepted caller is tunnelled to `service` through `gateway`.
async fn agent(pool: Pool, open: Open, gateway: SocketAddr, service: SocketAddr) -> SocketAddr {
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
                match open {
                    Open::Pipelined => {
                        // The answer is reported here; the agent records it.
                        let _ = client
                            .carry(gateway, None, request, caller, |answer| {
                                if let Err(e) = answer {
                                    eprintln!("open failed: {e}");
                                }
                            })
                            .await;
                    }
                    Open::AnswerFirst => match client.open(gateway, &request).await {
                        Ok(stream) => {
                            let _ = stream.splice(caller).await;
                        }
                        Err(e) => {
                            eprintln!("open failed: {e}");
                            zt_tunnel::reset(caller);
                        }
                    },
                }
                if matches!(&*pool, Pool::Cold(..)) {
                    client.close();
                }
            });
        }
    });
    addr
}

/// A UDP path to `target` that delays every datagram by `one_way`, each
/// direction: an emulated LAN between one client and a gateway. Returns the
/// address to send to instead of `target`.
fn delay_line(target: SocketAddr, one_way: Duration) -> SocketAddr {
    let front = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let back = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    back.connect(target).unwrap();
    let addr = front.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (front_in, back_out) = (front.try_clone().unwrap(), back.try_clone().unwrap());
    let seen = Arc::clone(&client);
    relay_direction(
        one_way,
        move |buffer| {
            let (n, from) = front_in.recv_from(buffer).ok()?;
            *seen.lock().unwrap() = Some(from);
            Some(n)
        },
        move |datagram| {
            let _ = back_out.send(datagram);
        },
    );
    relay_direction(
        one_way,
        move |buffer| back.recv(buffer).ok(),
        move |datagram| {
            if let Some(client) = *client.lock().unwrap() {
                let _ = front.send_to(datagram, client);
            }
        },
    );
    addr
}

/// One direction of a [`delay_line`]: a thread receiving, a thread sending
/// each datagram once `one_way` has passed since it arrived.
fn relay_direction(
    one_way: Duration,
    mut receive: impl FnMut(&mut [u8]) -> Option<usize> + Send + 'static,
    send: impl Fn(&[u8]) + Send + 'static,
) {
    let (queue, due) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 65_536];
        while let Some(n) = receive(&mut buffer) {
            if queue
                .send((Instant::now() + one_way, buffer[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((at, datagram)) = due.recv() {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            send(&datagram);
        }
    });
}

// ---------------------------------------------------------------------------
// Measurements

/// Connect, send one byte, wait for it to come back; time to that byte.
/// Then close with a reset (see [`no_time_wait`]).
async fn first_byte(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.set_nodelay(true).unwrap();
    socket.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    socket.read_exact(&mut byte).await.unwrap();
    let elapsed = start.elapsed();
    no_time_wait(&socket);
    elapsed
}

/// Makes `socket` close with a reset rather than a FIN, so that it leaves no
/// TIME_WAIT entry behind, nor do the connections the tunnel made for it
/// (the reset travels through the tunnel). A run makes some 100,000
/// connections; left in TIME_WAIT for a minute, they make every later
/// `connect(2)` on loopback slower (the kernel's search for a free local
/// port walks them), later rows and later runs more than earlier ones, and
/// the tunnel, which connects twice per connection, more than direct TCP.
fn no_time_wait(socket: &TcpStream) {
    socket.set_zero_linger().unwrap();
}

struct Latency {
    p50: Duration,
    p99: Duration,
}

/// Connect latency of each of `addrs`, measured in turns of
/// [`LATENCY_BLOCK`] back-to-back samples each, so that all paths see the
/// same machine: on a shared VM the latencies drift by tens of percent from
/// one minute to the next. (Not sample by sample: a connection's teardown
/// then falls into the next path's sample.) The first samples of each turn
/// are not counted.
async fn latency(addrs: &[SocketAddr], samples: usize) -> Vec<Latency> {
    // Warm up (pool, caches) before measuring.
    for addr in addrs {
        for _ in 0..20 {
            first_byte(*addr).await;
        }
    }
    let mut times = vec![Vec::with_capacity(samples); addrs.len()];
    for turn in 0..samples.div_ceil(LATENCY_BLOCK) {
        for i in 0..addrs.len() {
            let i = (turn + i) % addrs.len();
            for _ in 0..5 {
                first_byte(addrs[i]).await;
            }
            let n = LATENCY_BLOCK.min(samples - times[i].len());
            for _ in 0..n {
                times[i].push(first_byte(addrs[i]).await);
            }
        }
    }
    times
        .into_iter()
        .map(|mut times| {
            times.sort();
            Latency {
                p50: times[samples / 2],
                p99: times[samples * 99 / 100],
            }
        })
        .collect()
}

/// Samples per turn in [`latency`].
const LATENCY_BLOCK: usize = 100;

/// One connection, then `samples` one-byte round trips on it: what every
/// exchange costs once a connection is set up.
async fn round_trips(addr: SocketAddr, samples: usize) -> Latency {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.set_nodelay(true).unwrap();
    let mut byte = [0u8; 1];
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples + 20 {
        let start = Instant::now();
        socket.write_all(b"x").await.unwrap();
        socket.read_exact(&mut byte).await.unwrap();
        if i >= 20 {
            times.push(start.elapsed());
        }
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
        no_time_wait(&socket);
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
    let warm = || Pool::Warm(warm_client.clone());
    let cold = || Pool::Cold(Arc::clone(&pki), tuning.clone());
    let warm_echo = agent(warm(), Open::Pipelined, gateway, echo).await;
    let warm_echo_answer_first = agent(warm(), Open::AnswerFirst, gateway, echo).await;
    let warm_sink = agent(warm(), Open::Pipelined, gateway, sink).await;
    let warm_hold = agent(warm(), Open::Pipelined, gateway, hold).await;
    let cold_echo = agent(cold(), Open::Pipelined, gateway, echo).await;
    let cold_echo_answer_first = agent(cold(), Open::AnswerFirst, gateway, echo).await;
    let lan_rtt = Duration::from_micros(env_or("ZT_BENCH_LAN_RTT_US", 500));
    let lan_gateway = delay_line(gateway, lan_rtt / 2);
    let lan_client = client(&pki, &tuning);
    let lan = || Pool::Warm(lan_client.clone());
    let lan_echo = agent(lan(), Open::Pipelined, lan_gateway, echo).await;
    let lan_echo_answer_first = agent(lan(), Open::AnswerFirst, lan_gateway, echo).await;

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
        println!("| path | p50 | p99 | p50 added to direct TCP |");
        println!("|---|---:|---:|---:|");
        let mut direct = None;
        for group in [
            &[
                ("direct TCP", echo),
                ("tunnel, warm pooled QUIC connection", warm_echo),
                (
                    "tunnel, warm, answer first (`open` + `splice`)",
                    warm_echo_answer_first,
                ),
            ][..],
            &[
                ("tunnel, cold (new QUIC + mTLS handshake)", cold_echo),
                (
                    "tunnel, cold, answer first (`open` + `splice`)",
                    cold_echo_answer_first,
                ),
            ][..],
        ] {
            let addrs: Vec<_> = group.iter().map(|(_, addr)| *addr).collect();
            for ((name, _), l) in group.iter().zip(latency(&addrs, samples).await) {
                let added = match direct {
                    None => {
                        direct = Some(l.p50);
                        String::new()
                    }
                    Some(direct) => format!("{:.0} µs", micros(l.p50) - micros(direct)),
                };
                println!(
                    "| {name} | {:.0} µs | {:.0} µs | {added} |",
                    micros(l.p50),
                    micros(l.p99)
                );
            }
        }
        println!("\n## Round trip of one byte on an established connection ({samples} samples)\n");
        println!("| path | p50 | p99 |");
        println!("|---|---:|---:|");
        for (name, addr) in [("direct TCP", echo), ("tunnel", warm_echo)] {
            let l = round_trips(addr, samples).await;
            println!(
                "| {name} | {:.0} µs | {:.0} µs |",
                micros(l.p50),
                micros(l.p99)
            );
        }
    }

    if wanted("lan") {
        let samples = samples / 4;
        println!(
            "\n## Over an emulated LAN (UDP round trip {} µs): connect() to first echoed byte ({samples} samples)\n",
            lan_rtt.as_micros()
        );
        println!("| path | p50 | p99 |");
        println!("|---|---:|---:|");
        let rows = [
            ("tunnel, warm pooled QUIC connection", lan_echo),
            (
                "tunnel, warm, answer first (`open` + `splice`)",
                lan_echo_answer_first,
            ),
        ];
        let addrs: Vec<_> = rows.iter().map(|(_, addr)| *addr).collect();
        for ((name, _), l) in rows.iter().zip(latency(&addrs, samples).await) {
            println!(
                "| {name} | {:.0} µs | {:.0} µs |",
                micros(l.p50),
                micros(l.p99)
            );
        }
        let l = round_trips(lan_echo, samples).await;
        println!(
            "| (one-byte round trip on an established tunnelled connection) | {:.0} µs | {:.0} µs |",
            micros(l.p50),
            micros(l.p99)
        );
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
        println!(
            "| tunnel, warm, answer first (`open` + `splice`) | {:.0} |",
            connection_rate(warm_echo_answer_first, callers, total).await
        );
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
