//! The uplink's queue of events not yet acknowledged by the collector.
//! Sans-IO: the uplink task drives it; tests drive it directly.
//!
//! Events wait in two pending queues, critical (process, network, gap
//! records) and bulk (file activity, DNS queries); a batch takes critical events first, so
//! a flood of file events never delays an exec. Batches stay `in_flight`
//! until the collector acknowledges them (after storing them). When the
//! connection breaks, in-flight events go back to the front of their queues,
//! in order, and are sent again. The queue is bounded in events and in bytes
//! (events carry their ancestry, so their size varies): when it is full the
//! oldest bulk events are dropped first, critical ones only when no bulk
//! event is left; every drop is counted.
//!
//! Events are encoded when they are queued ([`EncodedEvent`]) and wait as
//! those bytes; batches share them (reference-counted), not copies.
//!
//! [`Queue`] puts the disk spool (`spool.rs`) in front of it: with a
//! working spool, events wait on disk and the memory queue is only the
//! fallback.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use proto::telemetry::{event::Kind, Event};

use crate::encoded::EncodedEvent;
use crate::spool::{RunId, Spool, SyncJob};

/// Whether an event may wait behind others and go first when space runs out.
pub fn is_bulk(event: &Event) -> bool {
    matches!(event.kind, Some(Kind::File(_) | Kind::Dns(_)))
}

/// A batch in flight: its first `reports` events are gap records, the next
/// `critical` critical events, the rest bulk (the order batches take them
/// in), so that a requeue returns each to its queue.
#[derive(Debug)]
struct InFlight {
    reports: usize,
    critical: usize,
    events: Vec<EncodedEvent>,
}

#[derive(Debug)]
pub struct Outbox {
    /// Gap records: sent first, never dropped.
    reports: VecDeque<EncodedEvent>,
    critical: VecDeque<EncodedEvent>,
    bulk: VecDeque<EncodedEvent>,
    in_flight: BTreeMap<u64, InFlight>,
    in_flight_events: usize,
    next_batch_seq: u64,
    capacity: usize,
    max_bytes: usize,
    /// Encoded bytes of the critical and bulk queues and of the in-flight
    /// batches.
    bytes: usize,
    dropped: u64,
    /// Drops not yet reported as gap records: (critical, bulk).
    unreported: (u64, u64),
}

impl Outbox {
    /// `capacity` bounds pending plus in-flight events.
    pub fn new(capacity: usize) -> Self {
        Self::with_limits(capacity, usize::MAX)
    }

    /// Bounds pending plus in-flight events by count and by encoded bytes.
    pub fn with_limits(capacity: usize, max_bytes: usize) -> Self {
        Self {
            reports: VecDeque::new(),
            critical: VecDeque::new(),
            bulk: VecDeque::new(),
            in_flight: BTreeMap::new(),
            in_flight_events: 0,
            next_batch_seq: 1,
            capacity,
            max_bytes,
            bytes: 0,
            dropped: 0,
            unreported: (0, 0),
        }
    }

    /// Drops since the last call, `(critical, bulk)`, if any: the uplink
    /// reports them as gap records.
    pub fn take_unreported(&mut self) -> Option<(u64, u64)> {
        let taken = std::mem::take(&mut self.unreported);
        (taken != (0, 0)).then_some(taken)
    }

    /// Queues a record of the agent's own (a gap record) regardless of the
    /// bound, so that reporting a loss never causes another.
    pub fn push_unbounded(&mut self, event: Event) {
        self.reports.push_back(EncodedEvent::encode(&event));
    }

    /// Queues an event; returns how many events were dropped for it (the
    /// oldest bulk ones first; the new one itself when nothing pending may
    /// go for it).
    pub fn push(&mut self, event: Event) -> u64 {
        let bulk = is_bulk(&event);
        let mut dropped = 0;
        let event = EncodedEvent::encode(&event);
        // Gap records (few, never dropped) do not count against the bound.
        let size = event.len();
        while self.critical.len() + self.bulk.len() + self.in_flight_events >= self.capacity
            || self.bytes + size > self.max_bytes
        {
            if let Some(old) = self.bulk.pop_front() {
                self.bytes -= old.len();
                self.unreported.1 += 1;
            } else if let Some(old) = (!bulk).then(|| self.critical.pop_front()).flatten() {
                self.bytes -= old.len();
                self.unreported.0 += 1;
            } else {
                // Nothing may go for it: the new event is the one lost.
                if bulk {
                    self.unreported.1 += 1;
                } else {
                    self.unreported.0 += 1;
                }
                self.dropped += dropped + 1;
                return dropped + 1;
            }
            dropped += 1;
        }
        self.bytes += size;
        if bulk {
            self.bulk.push_back(event);
        } else {
            self.critical.push_back(event);
        }
        self.dropped += dropped;
        dropped
    }

    /// Takes up to `max_events` pending events as the next batch, critical
    /// ones first.
    pub fn next_batch(&mut self, max_events: usize) -> Option<(u64, Vec<EncodedEvent>)> {
        if self.pending_len() == 0 {
            return None;
        }
        let from_reports = self.reports.len().min(max_events);
        let mut events: Vec<EncodedEvent> = self.reports.drain(..from_reports).collect();
        let from_critical = self.critical.len().min(max_events - events.len());
        events.extend(self.critical.drain(..from_critical));
        let from_bulk = self.bulk.len().min(max_events - events.len());
        events.extend(self.bulk.drain(..from_bulk));
        let seq = self.next_batch_seq;
        self.next_batch_seq += 1;
        self.in_flight_events += events.len();
        self.in_flight.insert(
            seq,
            InFlight {
                reports: from_reports,
                critical: from_critical,
                events: events.clone(),
            },
        );
        Some((seq, events))
    }

    /// The collector stored batch `seq`; returns its event count, or `None`
    /// for an unknown (already acknowledged or requeued) batch.
    pub fn ack(&mut self, seq: u64) -> Option<usize> {
        let batch = self.in_flight.remove(&seq)?;
        self.in_flight_events -= batch.events.len();
        let acked: usize = batch.events[batch.reports..]
            .iter()
            .map(EncodedEvent::len)
            .sum();
        self.bytes -= acked;
        Some(batch.events.len())
    }

    /// The connection broke: everything in flight will be sent again, first
    /// and in its original order.
    pub fn requeue_in_flight(&mut self) {
        let in_flight = std::mem::take(&mut self.in_flight);
        self.in_flight_events = 0;
        for batch in in_flight.into_values().rev() {
            for (i, event) in batch.events.into_iter().enumerate().rev() {
                if i < batch.reports {
                    self.reports.push_front(event);
                } else if i < batch.reports + batch.critical {
                    self.critical.push_front(event);
                } else {
                    self.bulk.push_front(event);
                }
            }
        }
    }

    pub fn pending_len(&self) -> usize {
        self.reports.len() + self.critical.len() + self.bulk.len()
    }

    pub fn in_flight_batches(&self) -> usize {
        self.in_flight.len()
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped
    }

    /// Encoded bytes held (pending and in flight, gap records aside).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Where an in-flight batch came from.
#[derive(Debug)]
enum Source {
    Memory(u64),
    Spool(u64),
}

/// A batch to send: its events all belong to `run` (`None`: this agent
/// run; else a previous run's events replayed from the spool).
#[derive(Debug)]
pub struct Batch {
    pub seq: u64,
    pub run: Option<Arc<RunId>>,
    pub events: Vec<EncodedEvent>,
}

/// What the queue lost since the last report, per class
/// (`[critical, bulk]`) and reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// The memory queue was full (`queue_full`).
    pub queue_full: [u64; 2],
    /// The spool was full (`spool_full`).
    pub spool_full: [u64; 2],
    /// Spooled records did not check (`spool_corrupt`).
    pub spool_corrupt: [u64; 2],
}

/// How long the queue keeps events in memory after the spool failed before
/// it tries the spool again.
pub const SPOOL_RETRY: Duration = Duration::from_secs(5);

/// The uplink's queue: the disk spool when there is one and it works, the
/// bounded memory [`Outbox`] otherwise (no spool configured, or the disk
/// failing: then events wait in memory, drops are reported as `queue_full`,
/// and the spool is tried again after [`SPOOL_RETRY`]). Batches are taken
/// from the spool first (it holds the older events), then from memory.
#[derive(Debug)]
pub struct Queue {
    memory: Outbox,
    spool: Option<Spool>,
    spool_retry_at: Option<Instant>,
    spool_errors: u64,
    in_flight: BTreeMap<u64, Source>,
    next_seq: u64,
}

impl Queue {
    pub fn new(memory: Outbox, spool: Option<Spool>) -> Self {
        Self {
            memory,
            spool,
            spool_retry_at: None,
            spool_errors: 0,
            in_flight: BTreeMap::new(),
            next_seq: 1,
        }
    }

    fn spool_usable(&mut self) -> Option<&mut Spool> {
        if self.spool_retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        self.spool.as_mut()
    }

    fn spool_failed(&mut self, err: &std::io::Error) {
        self.spool_errors += 1;
        self.spool_retry_at = Some(Instant::now() + SPOOL_RETRY);
        tracing::error!(error = %err, retry_in_s = SPOOL_RETRY.as_secs(), errors = self.spool_errors, "SPOOL WRITE FAILED: events wait in memory only (bounded; drops are reported as gaps) until the disk takes writes again");
    }

    /// Queues an event; returns how many events were dropped for it, and
    /// whether the spool (else the memory queue) dropped them.
    pub fn push(&mut self, event: Event) -> (u64, bool) {
        if let Some(spool) = self.spool_usable() {
            match spool.append(event) {
                Ok(dropped) => {
                    self.spool_retry_at = None;
                    return (dropped, true);
                }
                Err(refused) => {
                    self.spool_failed(&refused.error);
                    return (self.memory.push(refused.event), false);
                }
            }
        }
        (self.memory.push(event), false)
    }

    /// Spool failures so far.
    pub fn spool_errors(&self) -> u64 {
        self.spool_errors
    }

    /// Queues a gap record, never refused.
    pub fn push_report(&mut self, event: Event) {
        if let Some(spool) = self.spool_usable() {
            match spool.append_report(event) {
                Ok(()) => return,
                Err(refused) => {
                    self.spool_failed(&refused.error);
                    self.memory.push_unbounded(refused.event);
                    return;
                }
            }
        }
        self.memory.push_unbounded(event);
    }

    /// Losses since the last call, if any.
    pub fn take_losses(&mut self) -> Option<Losses> {
        let mut losses = Losses::default();
        if let Some((critical, bulk)) = self.memory.take_unreported() {
            losses.queue_full = [critical, bulk];
        }
        if let Some(spool) = &mut self.spool {
            let lost = spool.take_lost();
            losses.spool_full = lost.full;
            losses.spool_corrupt = lost.corrupt;
        }
        (losses != Losses::default()).then_some(losses)
    }

    pub fn next_batch(&mut self, max_events: usize) -> Option<Batch> {
        let seq = self.next_seq;
        if let Some(batch) = self.spool.as_mut().and_then(|s| s.next_batch(max_events)) {
            self.next_seq += 1;
            self.in_flight.insert(seq, Source::Spool(batch.key));
            return Some(Batch {
                seq,
                run: Some(batch.run),
                events: batch.events,
            });
        }
        let (inner, events) = self.memory.next_batch(max_events)?;
        self.next_seq += 1;
        self.in_flight.insert(seq, Source::Memory(inner));
        Some(Batch {
            seq,
            run: None,
            events,
        })
    }

    /// The collector stored batch `seq`; returns whether it was in flight.
    pub fn ack(&mut self, seq: u64) -> bool {
        match self.in_flight.remove(&seq) {
            Some(Source::Memory(inner)) => self.memory.ack(inner).is_some(),
            Some(Source::Spool(key)) => self.spool.as_mut().is_some_and(|s| s.ack(key)),
            None => false,
        }
    }

    pub fn requeue_in_flight(&mut self) {
        self.in_flight.clear();
        self.memory.requeue_in_flight();
        if let Some(spool) = &mut self.spool {
            spool.requeue_in_flight();
        }
    }

    pub fn pending_len(&self) -> usize {
        let spooled = self.spool.as_ref().map(|s| s.pending()).unwrap_or(0);
        self.memory.pending_len() + spooled as usize
    }

    pub fn in_flight_batches(&self) -> usize {
        self.in_flight.len()
    }

    /// Events dropped by the memory queue.
    pub fn dropped_total(&self) -> u64 {
        self.memory.dropped_total()
    }

    /// Events not yet acknowledged in the spool, and its bytes.
    pub fn spool_depth(&self) -> (u64, u64) {
        self.spool.as_ref().map(Spool::depth).unwrap_or((0, 0))
    }

    /// Events the spool dropped for room, `[critical, bulk]`.
    pub fn spool_dropped(&self) -> [u64; 2] {
        self.spool
            .as_ref()
            .map(Spool::dropped_totals)
            .unwrap_or_default()
    }

    pub fn has_spool(&self) -> bool {
        self.spool.is_some()
    }

    /// Writes what the spool buffered; returns what to fsync.
    pub fn flush(&mut self) -> std::io::Result<SyncJob> {
        match &mut self.spool {
            Some(spool) => spool.flush(),
            None => Ok(SyncJob::default()),
        }
    }

    /// For a clean stop: everything written and synced.
    pub fn close(&mut self) -> std::io::Result<()> {
        match &mut self.spool {
            Some(spool) => spool.close(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn event(seq: u64) -> Event {
        Event {
            seq,
            time_unix_ns: seq,
            ..Default::default()
        }
    }

    fn seqs(events: &[EncodedEvent]) -> Vec<u64> {
        events
            .iter()
            .map(|e| e.decode().expect("an event").seq)
            .collect()
    }

    #[test]
    fn batches_in_order_and_acks_release() {
        let mut outbox = Outbox::new(100);
        for i in 0..5 {
            outbox.push(event(i));
        }
        let (b1, e1) = outbox.next_batch(3).unwrap();
        let (b2, e2) = outbox.next_batch(3).unwrap();
        assert_eq!((b1, seqs(&e1)), (1, vec![0, 1, 2]));
        assert_eq!((b2, seqs(&e2)), (2, vec![3, 4]));
        assert!(outbox.next_batch(3).is_none());
        assert_eq!(outbox.ack(b1), Some(3));
        assert_eq!(outbox.ack(b1), None);
        assert_eq!(outbox.in_flight_batches(), 1);
    }

    #[test]
    fn requeue_resends_in_original_order_before_newer_events() {
        let mut outbox = Outbox::new(100);
        for i in 0..6 {
            outbox.push(event(i));
        }
        let (b1, _) = outbox.next_batch(2).unwrap();
        let _ = outbox.next_batch(2).unwrap();
        outbox.ack(b1);
        outbox.push(event(6));
        outbox.requeue_in_flight();
        let (seq, events) = outbox.next_batch(10).unwrap();
        assert_eq!(seq, 3, "batch numbers never repeat");
        assert_eq!(seqs(&events), vec![2, 3, 4, 5, 6]);
    }

    #[test]
    fn full_queue_drops_oldest_pending_and_counts() {
        let mut outbox = Outbox::new(3);
        for i in 0..3 {
            assert_eq!(outbox.push(event(i)), 0);
        }
        assert_eq!(outbox.push(event(3)), 1);
        assert_eq!(outbox.dropped_total(), 1);
        let (_, events) = outbox.next_batch(10).unwrap();
        assert_eq!(seqs(&events), vec![1, 2, 3]);
        // All in flight: a new event cannot displace unacknowledged ones.
        assert_eq!(outbox.push(event(4)), 1);
        assert_eq!(outbox.dropped_total(), 2);
        assert_eq!(outbox.pending_len(), 0);
    }

    fn file(seq: u64) -> Event {
        Event {
            seq,
            time_unix_ns: seq,
            kind: Some(Kind::File(Default::default())),
            ..Default::default()
        }
    }

    #[test]
    fn critical_events_go_first_and_bulk_events_are_dropped_first() {
        let mut outbox = Outbox::new(4);
        outbox.push(file(1));
        outbox.push(file(2));
        outbox.push(event(3));
        outbox.push(file(4));
        // Full: a critical event displaces the oldest bulk one.
        assert_eq!(outbox.push(event(5)), 1);
        let (_, events) = outbox.next_batch(3).unwrap();
        assert_eq!(
            seqs(&events),
            vec![3, 5, 2],
            "critical first, then the oldest bulk"
        );

        // Only critical pending and in flight: a bulk event cannot displace
        // any, it is dropped itself.
        let mut all_critical = Outbox::new(2);
        all_critical.push(event(1));
        all_critical.push(event(2));
        assert_eq!(all_critical.push(file(3)), 1);
        assert_eq!(all_critical.pending_len(), 2);
        assert_eq!(all_critical.dropped_total(), 1);
    }

    #[test]
    fn drops_are_handed_out_once_per_stream_for_gap_records() {
        let mut outbox = Outbox::new(2);
        assert_eq!(outbox.take_unreported(), None);
        outbox.push(file(1));
        outbox.push(event(2));
        outbox.push(event(3)); // displaces the file event
        outbox.push(event(4)); // displaces event 2
        assert_eq!(outbox.take_unreported(), Some((1, 1)));
        assert_eq!(outbox.take_unreported(), None, "reported once");
        let gap = Event {
            seq: 5,
            kind: Some(Kind::Gap(Default::default())),
            ..Default::default()
        };
        outbox.push_unbounded(gap);
        assert_eq!(outbox.pending_len(), 3, "a gap record is never refused");
        // Nor displaced: new events displace each other, not the report.
        outbox.push(event(6));
        outbox.push(event(7));
        assert_eq!(outbox.take_unreported(), Some((2, 0)));
        let (_, events) = outbox.next_batch(10).unwrap();
        assert_eq!(seqs(&events), vec![5, 6, 7], "the report goes first");
    }

    #[test]
    fn the_byte_bound_drops_bulk_first_and_acks_free_bytes() {
        let one = file(1).encoded_len();
        let mut outbox = Outbox::with_limits(100, one * 3);
        outbox.push(file(1));
        outbox.push(event(2));
        outbox.push(file(3));
        assert_eq!(outbox.dropped_total(), 0);
        // The next one does not fit: the oldest bulk event goes.
        outbox.push(event(4));
        assert_eq!(outbox.take_unreported(), Some((0, 1)));
        assert!(outbox.bytes() <= one * 3);
        let (seq, _) = outbox.next_batch(10).unwrap();
        let held = outbox.bytes();
        assert!(held > 0, "in-flight events still count");
        outbox.ack(seq);
        assert_eq!(outbox.bytes(), 0, "acknowledged events free their bytes");
    }

    #[test]
    fn requeued_events_return_to_their_queues() {
        let mut outbox = Outbox::new(10);
        outbox.push(event(1));
        outbox.push(file(2));
        let _ = outbox.next_batch(10).unwrap();
        outbox.push(file(3));
        outbox.requeue_in_flight();
        let (_, events) = outbox.next_batch(10).unwrap();
        assert_eq!(seqs(&events), vec![1, 2, 3]);
    }
}
