//! What the workers of a process coordinate through, outside the data: the
//! highest watermark any of them has seen, when any of them last read an
//! event, and whether a sink is behind.
//!
//! They move capabilities and stop sources, so they are part of the job's
//! semantics, not of its observation; the counters that `/metrics` reads are
//! in [`crate::stats`]. In the cluster, [`crate::operators::gossip`] shares
//! them between processes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::ports::Backpressure;

/// A value the workers of a process share that only ever rises: each
/// raises it to what it has seen, and all read the highest.
#[derive(Clone, Debug, Default)]
pub struct Highest(Arc<AtomicU64>);

impl Highest {
    /// Raises the value to at least `value`.
    pub fn raise(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }

    /// The highest value seen.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The coordination state shared by every worker of a process.
#[derive(Clone, Default)]
pub struct Coordination {
    /// The highest per-partition watermark any worker of the job has seen
    /// with events (marks aside), as far as this process knows. A worker
    /// whose partitions are all idle marks them just past it.
    pub high_watermark: Highest,
    /// When any worker of the job last read an event, or started, in Unix
    /// milliseconds, as far as this process knows. Once that is
    /// `idle_timeout` ago, every partition is idle, and idle partitions
    /// are marked on from the high watermark as the wall clock moves.
    pub last_data: Highest,
    /// Whether any sink is behind.
    pub backpressure: Backpressure,
}
