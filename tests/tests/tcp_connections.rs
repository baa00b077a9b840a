//! TCP sensor end to end: a process in a test cgroup listens, connects,
//! accepts, exchanges bytes and closes on loopback, and connects to a closed
//! port; each step is a row of `zt.network_events` owned by that process.

use std::{process::Stdio, time::Duration};

use anyhow::{ensure, Context as _, Result};
use zt_e2e::{cgroup::TestCgroup, eventually, free_port, stack::Stack};

/// Listens, connects, sends 5000 bytes one way and 3000 back, closes, then
/// connects to a closed port. Prints "<listen port> <client port>".
const SCRIPT: &str = r#"
import socket, sys
closed_port = int(sys.argv[1])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(8)
port = srv.getsockname()[1]
cli = socket.create_connection(("127.0.0.1", port))
acc, _ = srv.accept()
def recv_exactly(sock, n):
    got = 0
    while got < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("peer closed early")
        got += len(chunk)
cli.sendall(b"x" * 5000)
recv_exactly(acc, 5000)
acc.sendall(b"y" * 3000)
recv_exactly(cli, 3000)
client_port = cli.getsockname()[1]
cli.close()
acc.recv(1)
acc.close()
srv.close()
try:
    socket.create_connection(("127.0.0.1", closed_port), timeout=2)
except OSError:
    pass
print(port, client_port, flush=True)
"#;

#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
struct NetRow {
    action: String,
    pid: u32,
    owner_unknown: u8,
    exe: String,
    ip_version: u8,
    local_addr: String,
    local_port: u16,
    remote_addr: String,
    remote_port: u16,
    duration_ns: u64,
    bytes_sent: u64,
    bytes_received: u64,
    ancestor_pids: Vec<u32>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_accept_close_and_refused_connect_are_recorded() -> Result<()> {
    let stack = Stack::new("e2e_tcp").await?;
    let _collector = stack.start_collector().await?;
    let _agent = stack.start_agent().await?;
    let cgroup = TestCgroup::create("tcp")?;
    let closed_port = free_port()?;

    let child = zt_e2e::stack::spawn_in_cgroup_with(
        &cgroup,
        "/usr/bin/python3",
        &["-c", SCRIPT, &closed_port.to_string()],
        Stdio::piped(),
    )?;
    let pid = child.id();
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "python failed: {output:?}");
    let stdout = String::from_utf8(output.stdout)?;
    let mut ports = stdout.split_whitespace().map(str::parse::<u16>);
    let (listen_port, client_port) = (
        ports.next().context("listen port")??,
        ports.next().context("client port")??,
    );

    let cgroup_id = cgroup.id()?;
    let rows: Vec<NetRow> = eventually(Duration::from_secs(10), || async {
        let rows = stack
            .db()
            .query("SELECT ?fields FROM network_events WHERE cgroup_id = ? ORDER BY time_ns, seq")
            .bind(cgroup_id)
            .fetch_all::<NetRow>()
            .await
            .ok()?;
        // listen, attempt, connected, accepted, 2 closed, attempt, failed
        (rows.len() >= 8).then_some(rows)
    })
    .await
    .with_context(|| format!("network rows did not arrive\n{}", stack.logs()))?;

    let find = |action: &str, pred: &dyn Fn(&NetRow) -> bool| -> Result<NetRow> {
        let found: Vec<&NetRow> = rows
            .iter()
            .filter(|r| r.action == action && pred(r))
            .collect();
        ensure!(
            found.len() == 1,
            "one {action} row expected, got {found:?}\nall rows: {rows:#?}"
        );
        Ok(found[0].clone())
    };
    for row in &rows {
        assert_eq!(
            row.pid, pid,
            "every row is owned by the python process: {row:?}"
        );
        assert_eq!(row.owner_unknown, 0);
        assert_eq!(row.exe, "/usr/bin/python3");
        assert_eq!(row.ip_version, 4);
        assert_eq!(row.ancestor_pids.first(), Some(&std::process::id()));
    }

    let listen = find("listen", &|r| r.local_port == listen_port)?;
    assert_eq!(listen.local_addr, "127.0.0.1");
    let attempt = find("connect_attempt", &|r| r.remote_port == listen_port)?;
    // The kernel moves to SYN_SENT before it picks the local port: the
    // attempt has the address, the `connected` row has the port too.
    assert_eq!(attempt.remote_addr, "127.0.0.1");
    assert_eq!(attempt.local_addr, "127.0.0.1");
    find("connected", &|r| {
        r.remote_port == listen_port && r.local_port == client_port
    })?;
    find("accepted", &|r| {
        r.local_port == listen_port && r.remote_port == client_port
    })?;

    let client_close = find("closed", &|r| r.local_port == client_port)?;
    assert_eq!(
        (client_close.bytes_sent, client_close.bytes_received),
        (5000, 3000)
    );
    assert!(client_close.duration_ns > 0);
    let server_close = find("closed", &|r| r.local_port == listen_port)?;
    assert_eq!(
        (server_close.bytes_sent, server_close.bytes_received),
        (3000, 5000)
    );

    find("connect_attempt", &|r| r.remote_port == closed_port)?;
    find("connect_failed", &|r| r.remote_port == closed_port)?;
    Ok(())
}

/// A service that was listening before the agent started: connections it
/// accepts are still attributed to it, from the agent's /proc snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_a_listener_older_than_the_agent_are_attributed() -> Result<()> {
    const LISTENER: &str = r#"
import socket, sys
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(8)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.recv(16)
conn.close()
"#;
    let stack = Stack::new("e2e_old_listener").await?;
    let _collector = stack.start_collector().await?;
    let cgroup = TestCgroup::create("oldlistener")?;
    let mut service = zt_e2e::stack::spawn_in_cgroup_with(
        &cgroup,
        "/usr/bin/python3",
        &["-c", LISTENER],
        Stdio::piped(),
    )?;
    let mut line = String::new();
    {
        use std::io::BufRead as _;
        let stdout = service.stdout.take().context("listener stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
    }
    let port: u16 = line.trim().parse()?;

    // Only now the agent: it never saw this socket enter LISTEN.
    let _agent = stack.start_agent().await?;
    {
        use std::io::Write as _;
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port))?;
        client.write_all(b"hello")?;
    }
    ensure!(service.wait()?.success(), "listener failed");

    let cgroup_id = cgroup.id()?;
    let accepted = eventually(Duration::from_secs(10), || async {
        stack
            .db()
            .query(
                "SELECT ?fields FROM network_events WHERE action = 'accepted' AND local_port = ?",
            )
            .bind(port)
            .fetch_all::<NetRow>()
            .await
            .ok()
            .filter(|rows| !rows.is_empty())
    })
    .await
    .with_context(|| format!("no accepted row\n{}", stack.logs()))?;
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(
        accepted[0].pid,
        service.id(),
        "the listener's process owns it"
    );
    assert_eq!(accepted[0].owner_unknown, 0);
    let owner_cgroup = stack
        .db()
        .query("SELECT cgroup_id FROM network_events WHERE action = 'accepted' AND local_port = ?")
        .bind(port)
        .fetch_one::<u64>()
        .await?;
    assert_eq!(owner_cgroup, cgroup_id);
    Ok(())
}
