//! The batch writer's decisions, free of IO: which rows are pending, whose
//! completion handles wait on them, and when to flush. The clock is passed
//! in, so the tests drive time by hand.

use std::time::{Duration, Instant};

/// When to flush: whichever limit is reached first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Flush once this many rows are pending.
    pub max_rows: usize,
    /// Flush once the oldest pending row has waited this long.
    pub max_delay: Duration,
}

/// Pending rows of type `R` and the completion handles `H` of the requests
/// that brought them. Requests are never split: a handle completes when all
/// its rows are stored.
#[derive(Debug)]
pub struct Batcher<R, H> {
    limits: BatchLimits,
    rows: Vec<R>,
    handles: Vec<H>,
    oldest: Option<Instant>,
}

/// What to write now, and whom to tell when it is written.
#[derive(Debug)]
pub struct Flush<R, H> {
    pub rows: Vec<R>,
    pub handles: Vec<H>,
}

impl<R, H> Batcher<R, H> {
    pub fn new(limits: BatchLimits) -> Self {
        Batcher {
            limits,
            rows: Vec::new(),
            handles: Vec::new(),
            oldest: None,
        }
    }

    /// Adds one request's rows, received at `now`.
    pub fn push(&mut self, rows: Vec<R>, handle: H, now: Instant) {
        if self.handles.is_empty() {
            self.oldest = Some(now);
        }
        self.rows.extend(rows);
        self.handles.push(handle);
    }

    /// No request is pending.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Rows pending.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// When the pending rows must be flushed at the latest, if any are pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.limits.max_delay)
    }

    /// Whether to flush at `now`: enough rows, or the oldest waited long enough.
    pub fn should_flush(&self, now: Instant) -> bool {
        !self.is_empty()
            && (self.rows.len() >= self.limits.max_rows
                || self.deadline().is_some_and(|deadline| now >= deadline))
    }

    /// Takes everything pending (possibly nothing).
    pub fn take(&mut self) -> Flush<R, H> {
        self.oldest = None;
        Flush {
            rows: std::mem::take(&mut self.rows),
            handles: std::mem::take(&mut self.handles),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BatchLimits = BatchLimits {
        max_rows: 10,
        max_delay: Duration::from_millis(100),
    };

    #[test]
    fn empty_batcher_never_flushes() {
        let b: Batcher<u32, u32> = Batcher::new(LIMITS);
        let t0 = Instant::now();
        assert!(!b.should_flush(t0 + Duration::from_secs(3600)));
        assert_eq!(b.deadline(), None);
        assert!(b.is_empty());
    }

    #[test]
    fn flushes_when_rows_reach_the_limit() {
        let mut b = Batcher::new(LIMITS);
        let t0 = Instant::now();
        b.push(vec![1; 6], "a", t0);
        assert!(!b.should_flush(t0));
        b.push(vec![2; 3], "b", t0);
        assert!(!b.should_flush(t0));
        b.push(vec![3; 1], "c", t0);
        assert!(b.should_flush(t0));
        let flush = b.take();
        assert_eq!(flush.rows.len(), 10);
        assert_eq!(flush.handles, vec!["a", "b", "c"]);
        assert!(b.is_empty());
        assert!(!b.should_flush(t0));
    }

    #[test]
    fn one_oversized_request_flushes_whole() {
        let mut b = Batcher::new(LIMITS);
        let t0 = Instant::now();
        b.push(vec![0; 25], 1, t0);
        assert!(b.should_flush(t0));
        let flush = b.take();
        assert_eq!(flush.rows.len(), 25);
        assert_eq!(flush.handles, vec![1]);
    }

    #[test]
    fn flushes_when_the_oldest_row_is_old_enough() {
        let mut b = Batcher::new(LIMITS);
        let t0 = Instant::now();
        b.push(vec![1], 'a', t0);
        b.push(vec![2], 'b', t0 + Duration::from_millis(60));
        // The deadline follows the oldest row, not the newest.
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(100)));
        assert!(!b.should_flush(t0 + Duration::from_millis(99)));
        assert!(b.should_flush(t0 + Duration::from_millis(100)));
        b.take();
        // After a flush the clock restarts with the next request.
        let t1 = t0 + Duration::from_millis(500);
        b.push(vec![3], 'c', t1);
        assert!(!b.should_flush(t1 + Duration::from_millis(50)));
        assert_eq!(b.deadline(), Some(t1 + Duration::from_millis(100)));
    }

    #[test]
    fn a_request_without_rows_still_completes_with_the_next_flush() {
        let mut b: Batcher<u8, u8> = Batcher::new(LIMITS);
        let t0 = Instant::now();
        b.push(Vec::new(), 7, t0);
        assert!(!b.is_empty());
        assert_eq!(b.len(), 0);
        assert!(b.should_flush(t0 + LIMITS.max_delay));
        assert_eq!(b.take().handles, vec![7]);
    }
}
