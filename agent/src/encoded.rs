//! Events as the protobuf bytes they travel in, encoded once: when the
//! uplink queues them (into the spool or the memory queue). Batches are
//! assembled from these bytes; an event is never decoded or encoded again
//! on its way to the collector, and what waits in memory is the compact
//! encoding, not the decoded message with its many small allocations.
//!
//! [`EncodedBatch`] is wire-identical to `zt.telemetry.v1.EventBatch`:
//! a repeated message field is a sequence of length-delimited fields, so
//! the batch writes each event's bytes behind its field key as they are.

use bytes::{Buf, BufMut, Bytes};
use prost::{
    encoding::{self, DecodeContext, WireType},
    DecodeError, Message,
};
use proto::telemetry::{AgentIdentity, Event};

/// One `Event`, protobuf-encoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedEvent(Bytes);

impl EncodedEvent {
    pub fn encode(event: &Event) -> Self {
        Self(Bytes::from(event.encode_to_vec()))
    }

    /// Bytes that an event was encoded to (read back from the spool, where
    /// a checksum vouches for them).
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn decode(&self) -> Result<Event, DecodeError> {
        Event::decode(self.0.clone())
    }
}

/// Field numbers of `EventBatch` (telemetry.proto).
const BATCH_SEQ: u32 = 1;
const AGENT: u32 = 2;
const EVENTS: u32 = 3;

/// `zt.telemetry.v1.EventBatch` with its events already encoded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedBatch {
    pub batch_seq: u64,
    pub agent: Option<AgentIdentity>,
    pub events: Vec<EncodedEvent>,
}

impl Message for EncodedBatch {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.batch_seq != 0 {
            encoding::uint64::encode(BATCH_SEQ, &self.batch_seq, buf);
        }
        if let Some(agent) = &self.agent {
            encoding::message::encode(AGENT, agent, buf);
        }
        for event in &self.events {
            encoding::bytes::encode(EVENTS, &event.0, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            BATCH_SEQ => encoding::uint64::merge(wire_type, &mut self.batch_seq, buf, ctx),
            AGENT => encoding::message::merge(
                wire_type,
                self.agent.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            EVENTS => {
                let mut event = Bytes::new();
                encoding::bytes::merge(wire_type, &mut event, buf, ctx)?;
                self.events.push(EncodedEvent(event));
                Ok(())
            }
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let seq = if self.batch_seq != 0 {
            encoding::uint64::encoded_len(BATCH_SEQ, &self.batch_seq)
        } else {
            0
        };
        let agent = self
            .agent
            .as_ref()
            .map_or(0, |agent| encoding::message::encoded_len(AGENT, agent));
        let events: usize = self
            .events
            .iter()
            .map(|event| encoding::bytes::encoded_len(EVENTS, &event.0))
            .sum();
        seq + agent + events
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::telemetry::{event::Kind, Ancestor, EventBatch, ProcessExec};

    fn exec(seq: u64) -> Event {
        Event {
            seq,
            time_unix_ns: 1_700_000_000_000_000_000 + seq,
            ancestors: vec![Ancestor {
                pid: 1,
                exe: "/sbin/init".into(),
                ..Default::default()
            }],
            kind: Some(Kind::Exec(ProcessExec {
                filename: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "https://example.org/".into()],
                ..Default::default()
            })),
        }
    }

    fn identity() -> AgentIdentity {
        AgentIdentity {
            device_id: "pc-1".into(),
            boot_id: "boot".into(),
            agent_version: "1.2.3".into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_encoded_batch_is_an_event_batch_on_the_wire() {
        let events: Vec<Event> = (1..=3).map(exec).collect();
        let encoded = EncodedBatch {
            batch_seq: 7,
            agent: Some(identity()),
            events: events.iter().map(EncodedEvent::encode).collect(),
        };
        let plain = EventBatch {
            batch_seq: 7,
            agent: Some(identity()),
            events: events.clone(),
        };
        let bytes = encoded.encode_to_vec();
        assert_eq!(bytes.len(), encoded.encoded_len());
        assert_eq!(bytes, plain.encode_to_vec(), "the same bytes as EventBatch");
        assert_eq!(EventBatch::decode(&bytes[..]).unwrap(), plain);
        // And back: an EventBatch read as an encoded batch.
        let read = EncodedBatch::decode(&bytes[..]).unwrap();
        assert_eq!(read, encoded);
        let decoded: Vec<Event> = read.events.iter().map(|e| e.decode().unwrap()).collect();
        assert_eq!(decoded, events);
    }

    #[test]
    fn empty_fields_are_left_out_and_unknown_ones_skipped() {
        assert!(EncodedBatch::default().encode_to_vec().is_empty());
        // An unknown field (15, varint 1) before the events.
        let mut bytes = vec![15 << 3, 1];
        bytes.extend(
            EncodedBatch {
                events: vec![EncodedEvent::encode(&exec(1))],
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let read = EncodedBatch::decode(&bytes[..]).unwrap();
        assert_eq!(read.batch_seq, 0);
        assert_eq!(read.events.len(), 1);
        assert_eq!(read.events[0].decode().unwrap(), exec(1));
        // A truncated event is an error, not a short batch.
        let whole = EncodedBatch {
            events: vec![EncodedEvent::encode(&exec(1))],
            ..Default::default()
        }
        .encode_to_vec();
        assert!(EncodedBatch::decode(&whole[..whole.len() - 1]).is_err());
    }
}
