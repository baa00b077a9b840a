//! DNS sensor end to end: a real resolver (glibc's, through `getent`) in the
//! guarded cgroup looks a name up against a DNS responder this test runs on
//! loopback; the query is a row of `zt.dns_events` with its question, its
//! sender and the sender's ancestry. A malformed datagram to port 53 is
//! recorded with its parse error; datagrams to other ports, and queries sent
//! from outside the guarded cgroup, are not recorded.

use std::{net::Ipv4Addr, process::Stdio, time::Duration};

use anyhow::{ensure, Context as _, Result};
use zt_e2e::{eventually, stack::Stack};

/// The address every lookup of the test resolves to.
const ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);

#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
struct DnsRow {
    pid: u32,
    owner_unknown: u8,
    exe: String,
    user_name: String,
    cgroup_path: String,
    server_addr: String,
    server_port: u16,
    query_name: String,
    query_type: String,
    parse_error: String,
    ancestor_pids: Vec<u32>,
}

/// Answers A queries with [`ANSWER`] and anything else with no records,
/// until the socket is dropped with its task.
async fn serve_dns(socket: tokio::net::UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
        if let Some(reply) = answer(&buf[..len]) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

/// A reply to a one-question query: the header and question echoed, with
/// one A record for type A.
fn answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // Find the end of the question: labels, root, type, class.
    let mut at = 12;
    while *query.get(at)? != 0 {
        at += 1 + usize::from(query[at]);
    }
    let question_end = at + 5;
    let question = query.get(12..question_end)?;
    let is_a = query.get(at + 1..at + 3)? == [0, 1];
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]);
    reply.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if is_a {
        // Name by pointer to offset 12, type A, class IN, TTL 60, 4 bytes.
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&ANSWER.octets());
    }
    Some(reply)
}

/// Sends a datagram that is not DNS to port 53 and a DNS-shaped one to
/// another port.
const NOT_DNS: &str = r#"
import socket, sys
server = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"\x12\x34", (server, 53))
s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01x\x00\x00\x01\x00\x01", (server, 5353))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_lookup_is_recorded_with_its_question_and_sender() -> Result<()> {
    let stack = Stack::new("e2e_dns").await?;
    let _collector = stack.start_collector().await?;
    let _agent = stack.start_agent().await?;

    // A loopback address of its own, so that port 53 is free for the test
    // whatever else listens on this machine.
    let server = Ipv4Addr::new(127, 53, rand_octet(), rand_octet().max(1));
    let socket = tokio::net::UdpSocket::bind((server, 53))
        .await
        .with_context(|| format!("binding a DNS responder to {server}:53"))?;
    let responder = tokio::spawn(serve_dns(socket));

    // glibc's resolver reads /etc/resolv.conf and /etc/nsswitch.conf: the
    // lookup runs in a mount namespace where both point at the responder.
    let dir = tempfile::tempdir()?;
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {server}\noptions timeout:2 attempts:2\n"),
    )?;
    let nsswitch = dir.path().join("nsswitch.conf");
    std::fs::write(&nsswitch, "hosts: dns\n")?;
    let name = format!(
        "Host-{}.ZT-Test.example",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let script = format!(
        "mount --bind {} /etc/resolv.conf && mount --bind {} /etc/nsswitch.conf && exec getent ahostsv4 {name}",
        resolv.display(),
        nsswitch.display()
    );
    // A query from the test process itself, outside the guarded cgroup.
    let outside = format!("outside-{}.example", uuid::Uuid::new_v4().simple());
    let outsider = std::net::UdpSocket::bind("127.0.0.1:0")?;
    outsider.send_to(&query_for(&outside), (server, 53))?;

    let child = zt_e2e::stack::spawn_in_cgroup_with(
        &stack.guarded,
        "/usr/bin/unshare",
        &["--mount", "--propagation", "private", "sh", "-c", &script],
        Stdio::piped(),
    )?;
    let pid = child.id();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    ensure!(
        output.status.success(),
        "getent failed: {output:?}\n{}",
        stack.logs()
    );
    let resolved = String::from_utf8(output.stdout)?;
    ensure!(
        resolved.contains(&ANSWER.to_string()),
        "resolver did not use the test responder: {resolved}"
    );

    // Not DNS, and not port 53, from inside the guarded cgroup.
    let (_, status) = zt_e2e::stack::run_in_cgroup(
        &stack.guarded,
        "/usr/bin/python3",
        &["-c", NOT_DNS, &server.to_string()],
    )?;
    ensure!(status.success(), "python failed: {status}");

    let wanted = name.to_lowercase();
    let rows: Vec<DnsRow> = eventually(Duration::from_secs(15), || async {
        let rows = stack
            .db()
            .query("SELECT ?fields FROM dns_events WHERE server_addr = ? ORDER BY time_ns, seq")
            .bind(server.to_string())
            .fetch_all::<DnsRow>()
            .await
            .ok()?;
        let lookup = rows.iter().any(|r| r.query_name == wanted);
        let malformed = rows.iter().any(|r| !r.parse_error.is_empty());
        (lookup && malformed).then_some(rows)
    })
    .await
    .with_context(|| format!("dns rows did not arrive\n{}", stack.logs()))?;
    responder.abort();

    let lookups: Vec<&DnsRow> = rows.iter().filter(|r| r.query_name == wanted).collect();
    // ahostsv4 asks for A; a retry (timeout) may repeat the query.
    ensure!(!lookups.is_empty() && lookups.len() <= 2, "{rows:#?}");
    for row in &lookups {
        assert_eq!(row.query_type, "A");
        assert_eq!(row.pid, pid, "sent by getent, which the child became");
        assert_eq!(row.owner_unknown, 0);
        assert_eq!(row.exe, "/usr/bin/getent");
        assert_eq!(row.user_name, "root");
        assert!(
            stack
                .guarded
                .path()
                .ends_with(row.cgroup_path.trim_start_matches('/')),
            "cgroup path {} is the guarded cgroup {}",
            row.cgroup_path,
            stack.guarded.path().display()
        );
        assert_eq!(
            (row.server_addr.as_str(), row.server_port),
            (server.to_string().as_str(), 53)
        );
        assert_eq!(row.parse_error, "");
        assert_eq!(
            row.ancestor_pids.first(),
            Some(&std::process::id()),
            "the test process is the parent"
        );
    }

    let malformed: Vec<&DnsRow> = rows.iter().filter(|r| !r.parse_error.is_empty()).collect();
    assert_eq!(malformed.len(), 1, "{rows:#?}");
    assert_eq!(malformed[0].exe, "/usr/bin/python3");
    assert_eq!(malformed[0].query_name, "");
    assert!(
        malformed[0].parse_error.contains("header"),
        "{}",
        malformed[0].parse_error
    );

    assert!(
        rows.iter().all(|r| r.server_port == 53),
        "only port 53 is DNS: {rows:#?}"
    );
    assert!(
        !rows.iter().any(|r| r.query_name.starts_with("outside-")),
        "a query from outside the guarded cgroup is not this agent's: {rows:#?}"
    );
    assert_eq!(rows.len(), lookups.len() + 1, "{rows:#?}");
    Ok(())
}

/// A one-question A query for `name`.
fn query_for(name: &str) -> Vec<u8> {
    let mut m = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

fn rand_octet() -> u8 {
    uuid::Uuid::new_v4().as_bytes()[0]
}
