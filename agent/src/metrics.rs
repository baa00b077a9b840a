//! Counters of the agent, shared by its tasks. Every drop and error has one.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Records read from the kernel ring buffers.
    pub kernel_records: AtomicU64,
    /// Records that failed to decode (and were discarded).
    pub decode_errors: AtomicU64,
    /// Events the kernel could not deliver (ring buffer full), summed per CPU.
    pub kernel_drops: AtomicU64,
    /// Bulk events the kernel left out under the self-budget's sampling.
    pub bulk_sampled: AtomicU64,
    /// Events the collector acknowledged as stored.
    pub events_acked: AtomicU64,
    /// Events the collector refused as malformed.
    pub events_rejected: AtomicU64,
    /// Events dropped because the in-memory queue was full.
    pub events_dropped_queue_full: AtomicU64,
    pub batches_sent: AtomicU64,
    /// Connection attempts to the collector that failed or broke.
    pub uplink_failures: AtomicU64,
    /// Events in the disk spool not yet acknowledged by the collector
    /// (a gauge, updated at every spool flush).
    pub spool_events: AtomicU64,
    /// Bytes of the disk spool's files (a gauge).
    pub spool_bytes: AtomicU64,
    /// Events dropped because the disk spool was full (bulk first).
    pub events_dropped_spool_full: AtomicU64,
    /// Spooled events lost to corruption (checksum mismatch, torn tail).
    pub spool_corrupt: AtomicU64,
    /// Failed spool writes and flushes (disk full, I/O errors).
    pub spool_write_errors: AtomicU64,
    /// Certificate expiry and renewal outcomes.
    pub renewal: std::sync::Arc<crate::enrollment::RenewalMetrics>,
    /// Whether the control channel (revocations) is open now.
    pub control_channel_up: std::sync::atomic::AtomicBool,
    /// When the control channel was last known open (unix seconds; 0:
    /// never in this run).
    pub control_channel_seen_unix: AtomicU64,
    /// The guard policy in force (0: none).
    /// Serial of the policy bundle accepted last (0: none).
    pub policy_bundle_serial: AtomicU64,
    pub policy_version: AtomicU64,
    /// Connections carried through the tunnel (client side), refused by a
    /// gateway, and failed for want of a gateway.
    pub tunnel_opened: AtomicU64,
    pub tunnel_refused: AtomicU64,
    pub tunnel_failed: AtomicU64,
    /// Decision records dropped because the event queue was full.
    pub decisions_dropped: AtomicU64,
}

impl AgentMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
