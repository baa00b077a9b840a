//! Wire → storage conversion of telemetry events, in one place: every check
//! an event must pass before it is stored, and the mapping of its fields to
//! table columns.

use proto::telemetry::{event::Kind, AgentIdentity, Event, ProcessExec};

use crate::storage::ProcessEventRow;

/// Why an event was refused. Refused events are counted and reported in the
/// acknowledgement, never stored and never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("batch has no agent identity")]
    MissingIdentity,
    #[error("agent identity has an empty {0}")]
    EmptyIdentityField(&'static str),
    #[error("event seq {seq} has no kind")]
    MissingKind { seq: u64 },
    #[error("event seq {seq} has time 0")]
    ZeroTime { seq: u64 },
    #[error("event seq {seq} has a time beyond 2106 ({time_unix_ns} ns)")]
    TimeOutOfRange { seq: u64, time_unix_ns: u64 },
}

/// The sender of a batch, checked once per batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender<'a> {
    pub org_id: &'a str,
    pub device_id: &'a str,
    pub hostname: &'a str,
    pub boot_id: &'a str,
    pub agent_version: &'a str,
}

impl<'a> TryFrom<Option<&'a AgentIdentity>> for Sender<'a> {
    type Error = RejectReason;

    fn try_from(identity: Option<&'a AgentIdentity>) -> Result<Self, Self::Error> {
        let id = identity.ok_or(RejectReason::MissingIdentity)?;
        for (name, value) in [
            ("org_id", &id.org_id),
            ("device_id", &id.device_id),
            ("boot_id", &id.boot_id),
        ] {
            if value.trim().is_empty() {
                return Err(RejectReason::EmptyIdentityField(name));
            }
        }
        Ok(Sender {
            org_id: &id.org_id,
            device_id: &id.device_id,
            hostname: &id.hostname,
            boot_id: &id.boot_id,
            agent_version: &id.agent_version,
        })
    }
}

/// An event of a batch, with its sender and the time the collector got it.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub sender: &'a Sender<'a>,
    pub event: &'a Event,
    /// Seconds since the Unix epoch.
    pub ingested_at: u32,
}

impl TryFrom<Received<'_>> for ProcessEventRow {
    type Error = RejectReason;

    fn try_from(received: Received<'_>) -> Result<Self, Self::Error> {
        let Received {
            sender,
            event,
            ingested_at,
        } = received;
        let seq = event.seq;
        let exec: &ProcessExec = match &event.kind {
            Some(Kind::Exec(exec)) => exec,
            None => return Err(RejectReason::MissingKind { seq }),
        };
        if event.time_unix_ns == 0 {
            return Err(RejectReason::ZeroTime { seq });
        }
        let time = u32::try_from(event.time_unix_ns / 1_000_000_000).map_err(|_| {
            RejectReason::TimeOutOfRange {
                seq,
                time_unix_ns: event.time_unix_ns,
            }
        })?;
        Ok(ProcessEventRow {
            org_id: sender.org_id.to_owned(),
            time,
            time_ns: event.time_unix_ns,
            device_id: sender.device_id.to_owned(),
            hostname: sender.hostname.to_owned(),
            boot_id: sender.boot_id.to_owned(),
            seq,
            pid: exec.pid,
            tid: exec.tid,
            ppid: exec.ppid,
            uid: exec.uid,
            gid: exec.gid,
            cgroup_id: exec.cgroup_id,
            filename: exec.filename.clone(),
            argv: exec.argv.clone(),
            argv_truncated: u8::from(exec.argv_truncated),
            filename_truncated: u8::from(exec.filename_truncated),
            ppid_unknown: u8::from(exec.ppid_unknown),
            agent_version: sender.agent_version.to_owned(),
            ingested_at,
        })
    }
}

/// The outcome of converting one batch.
#[derive(Debug, Default, PartialEq)]
pub struct Converted {
    pub rows: Vec<ProcessEventRow>,
    pub rejected: u32,
    /// The first reason, if any event was refused.
    pub first_reason: Option<RejectReason>,
}

/// Converts every event of a batch; a bad event never stops the others, and
/// a bad identity refuses them all.
pub fn convert_batch(
    identity: Option<&AgentIdentity>,
    events: &[Event],
    ingested_at: u32,
) -> Converted {
    let sender = match Sender::try_from(identity) {
        Ok(sender) => sender,
        Err(reason) => {
            return Converted {
                rows: Vec::new(),
                rejected: u32::try_from(events.len()).unwrap_or(u32::MAX),
                first_reason: (!events.is_empty()).then_some(reason),
            }
        }
    };
    let mut out = Converted {
        rows: Vec::with_capacity(events.len()),
        ..Default::default()
    };
    for event in events {
        let received = Received {
            sender: &sender,
            event,
            ingested_at,
        };
        match ProcessEventRow::try_from(received) {
            Ok(row) => out.rows.push(row),
            Err(reason) => {
                out.rejected = out.rejected.saturating_add(1);
                out.first_reason.get_or_insert(reason);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> AgentIdentity {
        AgentIdentity {
            org_id: "pref".into(),
            device_id: "dev-1".into(),
            hostname: "pc-001".into(),
            boot_id: "b-1".into(),
            agent_version: "0.1.0".into(),
        }
    }

    fn exec_event(seq: u64, time_unix_ns: u64) -> Event {
        Event {
            seq,
            time_unix_ns,
            kind: Some(Kind::Exec(ProcessExec {
                pid: 42,
                tid: 43,
                ppid: 1,
                uid: 1000,
                gid: 1001,
                cgroup_id: 7,
                filename: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "-s".into(), "http://x".into()],
                argv_truncated: true,
                filename_truncated: false,
                ppid_unknown: true,
            })),
        }
    }

    #[test]
    fn converts_every_field() {
        let converted = convert_batch(
            Some(&identity()),
            &[exec_event(5, 1_700_000_000_123_456_789)],
            1_700_000_100,
        );
        assert_eq!(converted.rejected, 0);
        assert_eq!(converted.first_reason, None);
        assert_eq!(
            converted.rows,
            vec![ProcessEventRow {
                org_id: "pref".into(),
                time: 1_700_000_000,
                time_ns: 1_700_000_000_123_456_789,
                device_id: "dev-1".into(),
                hostname: "pc-001".into(),
                boot_id: "b-1".into(),
                seq: 5,
                pid: 42,
                tid: 43,
                ppid: 1,
                uid: 1000,
                gid: 1001,
                cgroup_id: 7,
                filename: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "-s".into(), "http://x".into()],
                argv_truncated: 1,
                filename_truncated: 0,
                ppid_unknown: 1,
                agent_version: "0.1.0".into(),
                ingested_at: 1_700_000_100,
            }]
        );
    }

    #[test]
    fn bad_events_are_refused_without_stopping_the_batch() {
        let no_kind = Event {
            seq: 2,
            time_unix_ns: 1,
            kind: None,
        };
        let events = [
            exec_event(1, 1_000_000_000),
            no_kind,
            exec_event(3, 0),
            exec_event(4, 2_000_000_000),
            exec_event(5, u64::MAX),
        ];
        let converted = convert_batch(Some(&identity()), &events, 0);
        assert_eq!(converted.rows.len(), 2);
        assert_eq!(converted.rows[0].seq, 1);
        assert_eq!(converted.rows[1].seq, 4);
        assert_eq!(converted.rejected, 3);
        assert_eq!(
            converted.first_reason,
            Some(RejectReason::MissingKind { seq: 2 })
        );
    }

    #[test]
    fn each_check_has_its_reason() {
        let id = identity();
        let sender = Sender::try_from(Some(&id)).unwrap();
        let check = |event: &Event| {
            ProcessEventRow::try_from(Received {
                sender: &sender,
                event,
                ingested_at: 0,
            })
        };
        assert_eq!(
            check(&exec_event(9, 0)),
            Err(RejectReason::ZeroTime { seq: 9 })
        );
        assert!(matches!(
            check(&exec_event(9, u64::MAX)),
            Err(RejectReason::TimeOutOfRange { seq: 9, .. })
        ));
        assert!(check(&exec_event(9, 1)).is_ok());
    }

    #[test]
    fn missing_or_incomplete_identity_refuses_every_event() {
        let events = [exec_event(1, 1), exec_event(2, 1)];
        let converted = convert_batch(None, &events, 0);
        assert_eq!(converted.rows.len(), 0);
        assert_eq!(converted.rejected, 2);
        assert_eq!(converted.first_reason, Some(RejectReason::MissingIdentity));

        for field in ["org_id", "device_id", "boot_id"] {
            let mut id = identity();
            match field {
                "org_id" => id.org_id.clear(),
                "device_id" => id.device_id = "  ".into(),
                _ => id.boot_id.clear(),
            }
            let converted = convert_batch(Some(&id), &events, 0);
            assert_eq!(converted.rejected, 2);
            assert_eq!(
                converted.first_reason,
                Some(RejectReason::EmptyIdentityField(field))
            );
        }
        // An empty hostname is allowed: identity is org + device + boot.
        let mut id = identity();
        id.hostname.clear();
        assert_eq!(convert_batch(Some(&id), &events, 0).rejected, 0);
    }

    #[test]
    fn empty_batch_converts_to_nothing() {
        assert_eq!(convert_batch(None, &[], 0), Converted::default());
    }
}
