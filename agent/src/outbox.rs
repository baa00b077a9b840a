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
//! event is left; every drop is counted (the disk spool replaces this).

use std::collections::{BTreeMap, VecDeque};

use prost::Message as _;
use proto::telemetry::{event::Kind, Event};

/// Whether an event may wait behind others and go first when space runs out.
pub fn is_bulk(event: &Event) -> bool {
    matches!(event.kind, Some(Kind::File(_) | Kind::Dns(_)))
}

/// Gap records report losses: they are never dropped themselves.
fn is_report(event: &Event) -> bool {
    matches!(event.kind, Some(Kind::Gap(_)))
}

#[derive(Debug)]
pub struct Outbox {
    /// Gap records: sent first, never dropped.
    reports: VecDeque<Event>,
    critical: VecDeque<Event>,
    bulk: VecDeque<Event>,
    in_flight: BTreeMap<u64, Vec<Event>>,
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
        self.reports.push_back(event);
    }

    /// Queues an event; returns how many events were dropped for it (the
    /// oldest bulk ones first; the new one itself when nothing pending may
    /// go for it).
    pub fn push(&mut self, event: Event) -> u64 {
        let bulk = is_bulk(&event);
        let mut dropped = 0;
        // Gap records (few, never dropped) do not count against the bound.
        let size = event.encoded_len();
        while self.critical.len() + self.bulk.len() + self.in_flight_events >= self.capacity
            || self.bytes + size > self.max_bytes
        {
            if let Some(old) = self.bulk.pop_front() {
                self.bytes -= old.encoded_len();
                self.unreported.1 += 1;
            } else if let Some(old) = (!bulk).then(|| self.critical.pop_front()).flatten() {
                self.bytes -= old.encoded_len();
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
    pub fn next_batch(&mut self, max_events: usize) -> Option<(u64, Vec<Event>)> {
        if self.pending_len() == 0 {
            return None;
        }
        let from_reports = self.reports.len().min(max_events);
        let mut events: Vec<Event> = self.reports.drain(..from_reports).collect();
        let from_critical = self.critical.len().min(max_events - events.len());
        events.extend(self.critical.drain(..from_critical));
        let from_bulk = self.bulk.len().min(max_events - events.len());
        events.extend(self.bulk.drain(..from_bulk));
        let seq = self.next_batch_seq;
        self.next_batch_seq += 1;
        self.in_flight_events += events.len();
        self.in_flight.insert(seq, events.clone());
        Some((seq, events))
    }

    /// The collector stored batch `seq`; returns its event count, or `None`
    /// for an unknown (already acknowledged or requeued) batch.
    pub fn ack(&mut self, seq: u64) -> Option<usize> {
        let events = self.in_flight.remove(&seq)?;
        self.in_flight_events -= events.len();
        let acked: usize = events
            .iter()
            .filter(|e| !is_report(e))
            .map(|e| e.encoded_len())
            .sum();
        self.bytes -= acked;
        Some(events.len())
    }

    /// The connection broke: everything in flight will be sent again, first
    /// and in its original order.
    pub fn requeue_in_flight(&mut self) {
        let in_flight = std::mem::take(&mut self.in_flight);
        self.in_flight_events = 0;
        for events in in_flight.into_values().rev() {
            for event in events.into_iter().rev() {
                if is_report(&event) {
                    self.reports.push_front(event);
                } else if is_bulk(&event) {
                    self.bulk.push_front(event);
                } else {
                    self.critical.push_front(event);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> Event {
        Event {
            seq,
            time_unix_ns: seq,
            ..Default::default()
        }
    }

    fn seqs(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
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
