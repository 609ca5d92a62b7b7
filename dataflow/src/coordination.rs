//! What the workers of a process coordinate through, outside the data: the
//! highest watermark any of them has seen, when any of them last read an
//! event, and whether a sink is behind.
//!
//! Both move capabilities and stop sources, so they are part of the job's
//! semantics, not of its observation; the counters that `/metrics` reads are
//! in [`crate::stats`]. In the cluster, [`crate::operators::gossip`] shares
//! them between processes.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::ports::Backpressure;

/// The highest per-partition watermark any worker of the job has seen, as
/// far as this process knows, with events (marks aside). A worker whose
/// partitions are all idle marks them just past it.
#[derive(Clone, Debug, Default)]
pub struct HighWatermark(Arc<AtomicU64>);

impl HighWatermark {
    /// Raises the highest watermark seen to at least `watermark`.
    pub fn raise(&self, watermark: u64) {
        self.0.fetch_max(watermark, Ordering::Relaxed);
    }

    /// The highest watermark seen.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// When any worker of the job last read an event, or started, in Unix
/// milliseconds, as far as this process knows. Once that is `idle_timeout`
/// ago, every partition is idle, and idle partitions are marked up to the
/// wall clock.
#[derive(Clone, Debug, Default)]
pub struct LastData(Arc<AtomicI64>);

impl LastData {
    /// Notes that an event was read, or a worker started, at `at`.
    pub fn raise(&self, at: i64) {
        self.0.fetch_max(at, Ordering::Relaxed);
    }

    /// When an event was last read.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The coordination state shared by every worker of a process.
#[derive(Clone, Default)]
pub struct Coordination {
    /// The highest watermark seen.
    pub high_watermark: HighWatermark,
    /// When an event was last read.
    pub last_data: LastData,
    /// Whether any sink is behind.
    pub backpressure: Backpressure,
}
