//! The set of live tunnelled connections at one end, for re-evaluation.
//!
//! Each live stream is registered with what it was opened for and the sending
//! half of a one-shot *abort* channel; the task splicing the stream holds the
//! receiving half. Re-evaluation takes a snapshot (so the policy callback runs
//! without the lock held and may take its time), then aborts the streams that
//! no longer pass: the abort is sent within the call and the splicing task,
//! woken by it, resets the QUIC stream and the TCP connection at once.
//!
//! A registration removes itself when dropped, so the set holds exactly the
//! streams whose task is still running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::protocol::ErrorCode;

/// Live streams, each with its description `T`.
pub(crate) struct LiveSet<T> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    next_id: u64,
    entries: HashMap<u64, Entry<T>>,
}

struct Entry<T> {
    info: Arc<T>,
    abort: oneshot::Sender<ErrorCode>,
}

impl<T> LiveSet<T> {
    pub(crate) fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                next_id: 0,
                entries: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Every critical section is a single map operation, so a panic
        // elsewhere cannot leave the map half-updated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a stream; it stays registered until the returned value is
    /// dropped.
    pub(crate) fn register(self: &Arc<Self>, info: Arc<T>) -> Registration<T> {
        let (abort, aborted) = oneshot::channel();
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.entries.insert(id, Entry { info, abort });
        Registration {
            id,
            set: Arc::clone(self),
            aborted: Some(aborted),
        }
    }

    /// Every live stream's id and description.
    pub(crate) fn snapshot(&self) -> Vec<(u64, Arc<T>)> {
        self.lock()
            .entries
            .iter()
            .map(|(id, entry)| (*id, Arc::clone(&entry.info)))
            .collect()
    }

    /// Aborts stream `id` with `code`. False if it already ended.
    pub(crate) fn abort(&self, id: u64, code: ErrorCode) -> bool {
        let entry = self.lock().entries.remove(&id);
        entry.is_some_and(|entry| entry.abort.send(code).is_ok())
    }

    /// How many streams are live.
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

/// A stream's place in a [`LiveSet`]; removes it when dropped.
pub(crate) struct Registration<T> {
    id: u64,
    set: Arc<LiveSet<T>>,
    aborted: Option<oneshot::Receiver<ErrorCode>>,
}

impl<T> Registration<T> {
    /// The receiving half of the abort channel (taken once, by the splice).
    pub(crate) fn take_abort(&mut self) -> Option<oneshot::Receiver<ErrorCode>> {
        self.aborted.take()
    }
}

impl<T> Drop for Registration<T> {
    fn drop(&mut self) {
        self.set.lock().entries.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_come_and_go() {
        let set = Arc::new(LiveSet::new());
        let a = set.register(Arc::new("a"));
        let mut b = set.register(Arc::new("b"));
        assert_eq!(set.len(), 2);
        let mut aborted = b.take_abort().unwrap();
        let b_id = set
            .snapshot()
            .into_iter()
            .find(|(_, info)| **info == "b")
            .unwrap()
            .0;
        assert!(set.abort(b_id, ErrorCode::PolicyClosed));
        assert_eq!(aborted.try_recv().unwrap(), ErrorCode::PolicyClosed);
        assert!(!set.abort(b_id, ErrorCode::PolicyClosed), "only once");
        assert_eq!(set.len(), 1);
        drop(a);
        drop(b);
        assert_eq!(set.len(), 0);
    }
}
