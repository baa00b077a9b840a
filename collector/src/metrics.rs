//! The collector's counters and gauges: one typed struct of atomics, shared
//! by `Arc` between ingest, the batch writer and the control service.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// Counters (monotonic) and gauges of one collector process.
#[derive(Debug)]
pub struct Metrics {
    /// Events ClickHouse accepted, in every table (process events, network
    /// events, file events, DNS events, decisions and gaps).
    pub events_stored: AtomicU64,
    /// Events refused as malformed (never stored, never retried).
    pub events_rejected: AtomicU64,
    /// Failed insert attempts, in every table (each retry counts).
    pub insert_failures: AtomicU64,
    /// Gauge: telemetry streams open right now.
    pub connected_agents: AtomicU64,
    /// Batch acknowledgements sent to agents.
    pub batches_acked: AtomicU64,
    /// Events the detection engine analysed.
    pub detection_events: AtomicU64,
    /// Alerts the rules raised (before grouping into incidents).
    pub alerts_raised: AtomicU64,
    /// Incident versions written to `zt.incidents`.
    pub incident_versions_stored: AtomicU64,
    /// Incident-to-event links given up while ClickHouse refused them.
    pub incident_links_dropped: AtomicU64,
    started: Instant,
}

/// A consistent-enough copy of [`Metrics`] for reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub events_stored: u64,
    pub events_rejected: u64,
    pub insert_failures: u64,
    pub connected_agents: u64,
    pub batches_acked: u64,
    pub detection_events: u64,
    pub alerts_raised: u64,
    pub incident_versions_stored: u64,
    pub incident_links_dropped: u64,
    pub uptime: Duration,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics {
            events_stored: AtomicU64::new(0),
            events_rejected: AtomicU64::new(0),
            insert_failures: AtomicU64::new(0),
            connected_agents: AtomicU64::new(0),
            batches_acked: AtomicU64::new(0),
            detection_events: AtomicU64::new(0),
            alerts_raised: AtomicU64::new(0),
            incident_versions_stored: AtomicU64::new(0),
            incident_links_dropped: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            events_stored: get(&self.events_stored),
            events_rejected: get(&self.events_rejected),
            insert_failures: get(&self.insert_failures),
            connected_agents: get(&self.connected_agents),
            batches_acked: get(&self.batches_acked),
            detection_events: get(&self.detection_events),
            alerts_raised: get(&self.alerts_raised),
            incident_versions_stored: get(&self.incident_versions_stored),
            incident_links_dropped: get(&self.incident_links_dropped),
            uptime: self.started.elapsed(),
        }
    }
}

/// Counts one connected agent for as long as it lives.
#[derive(Debug)]
pub struct ConnectedAgent(Arc<Metrics>);

impl ConnectedAgent {
    pub fn new(metrics: Arc<Metrics>) -> ConnectedAgent {
        metrics.connected_agents.fetch_add(1, Ordering::Relaxed);
        ConnectedAgent(metrics)
    }
}

impl Drop for ConnectedAgent {
    fn drop(&mut self) {
        self.0.connected_agents.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_agent_gauge_follows_guards() {
        let metrics = Metrics::new();
        let a = ConnectedAgent::new(metrics.clone());
        let b = ConnectedAgent::new(metrics.clone());
        assert_eq!(metrics.snapshot().connected_agents, 2);
        drop(a);
        assert_eq!(metrics.snapshot().connected_agents, 1);
        drop(b);
        assert_eq!(metrics.snapshot().connected_agents, 0);
        Metrics::add(&metrics.events_stored, 3);
        assert_eq!(metrics.snapshot().events_stored, 3);
    }
}
