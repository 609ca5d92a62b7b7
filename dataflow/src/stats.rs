//! Counters the job keeps for operators, read by the `/metrics` endpoint.
//!
//! They are plain atomics, updated once per batch or activation, never per
//! record, so that observing the job costs nothing measurable. Nothing the
//! job decides reads them: coordination state is in [`crate::coordination`].

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Shared counters of one process's timely workers.
#[derive(Debug)]
pub struct JobStats {
    /// Each worker's watermark, in Unix milliseconds; -1 before the first.
    watermarks: Vec<AtomicI64>,
    /// Window results emitted as final, revisions included.
    pub windows_emitted: AtomicU64,
    /// Contributions applied to windows that had already closed.
    pub late_updates: AtomicU64,
    /// Events sent to the dead letters.
    pub dead_letters: AtomicU64,
    /// Records the sources have read from the log.
    pub events_read: AtomicU64,
    /// Log positions the sources have passed: records of the embedded
    /// log, messages of Kafka. A backfill's progress is counted in them.
    pub positions_read: AtomicU64,
}

impl JobStats {
    /// Counters for `workers` workers.
    pub fn new(workers: usize) -> JobStats {
        JobStats {
            watermarks: (0..workers).map(|_| AtomicI64::new(-1)).collect(),
            windows_emitted: AtomicU64::new(0),
            late_updates: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            events_read: AtomicU64::new(0),
            positions_read: AtomicU64::new(0),
        }
    }

    /// Records worker `worker`'s watermark.
    pub fn set_watermark(&self, worker: usize, watermark: u64) {
        if let Some(w) = self.watermarks.get(worker) {
            w.store(watermark as i64, Ordering::Relaxed);
        }
    }

    /// Each worker's watermark, or `None` before it has one.
    pub fn watermarks(&self) -> Vec<Option<i64>> {
        self.watermarks
            .iter()
            .map(|w| Some(w.load(Ordering::Relaxed)).filter(|&w| w > 0))
            .collect()
    }
}
