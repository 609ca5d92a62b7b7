//! The in-memory index shared by the writer, the readers and the handle.
//!
//! It only describes acknowledged data: the writer publishes a batch here
//! after the batch is durable per the fsync policy and before it completes
//! the append. Readers never look past it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::LogError;

/// State shared between the writer thread, readers and [`EventLog`](super::EventLog) clones.
pub(super) struct Shared {
    /// The log's directory.
    pub dir: PathBuf,
    /// One entry per partition.
    partitions: Vec<Mutex<PartitionState>>,
    /// Counts completed append groups, so waiters can tell one happened.
    appends: Mutex<u64>,
    appended: Condvar,
}

/// The acknowledged extent of one partition.
pub(super) struct PartitionState {
    /// Segments by base offset. Never empty: recovery leaves at least one
    /// segment and retention never deletes the newest. A segment appears
    /// here once its first batch is acknowledged, so once a later segment is
    /// present, an earlier one is final.
    pub segments: BTreeMap<u64, SegmentInfo>,
    /// The offset the next acknowledged batch will start at.
    pub next_offset: u64,
}

/// The acknowledged extent of one segment.
#[derive(Debug, Clone, Copy)]
pub(super) struct SegmentInfo {
    /// Bytes of acknowledged batches; readers stop here.
    pub len: u64,
    /// The newest append time in the segment, in Unix milliseconds.
    pub newest_append_ms: i64,
}

impl PartitionState {
    /// The base offset of the oldest segment.
    pub fn oldest_segment(&self) -> u64 {
        // Invariant: `segments` is never empty (see its doc).
        *self
            .segments
            .keys()
            .next()
            .expect("a partition always has a segment")
    }

    /// The base offset of the first segment after `base`, if any.
    pub fn segment_after(&self, base: u64) -> Option<u64> {
        self.segments
            .range(base + 1..)
            .next()
            .map(|(&next, _)| next)
    }
}

impl Shared {
    /// Shared state over the recovered partitions.
    pub fn new(dir: PathBuf, partitions: Vec<PartitionState>) -> Self {
        Self {
            dir,
            partitions: partitions.into_iter().map(Mutex::new).collect(),
            appends: Mutex::new(0),
            appended: Condvar::new(),
        }
    }

    /// The number of partitions.
    pub fn partition_count(&self) -> u32 {
        // The count came from a `u32` config field.
        self.partitions.len() as u32
    }

    /// Locks one partition's state.
    pub fn partition(&self, partition: u32) -> Result<MutexGuard<'_, PartitionState>, LogError> {
        self.partitions
            .get(partition as usize)
            .map(lock)
            .ok_or(LogError::PartitionOutOfRange(partition))
    }

    /// Locks every partition's state in turn, passing each to `f`.
    pub fn for_each<T>(&self, mut f: impl FnMut(u32, &mut PartitionState) -> T) -> Vec<T> {
        (0..self.partition_count())
            .zip(&self.partitions)
            .map(|(partition, state)| f(partition, &mut lock(state)))
            .collect()
    }

    /// Wakes everyone in [`Shared::wait_for_append`].
    pub fn notify_appended(&self) {
        *lock(&self.appends) += 1;
        self.appended.notify_all();
    }

    /// Blocks until the writer completes appends or `timeout` passes.
    pub fn wait_for_append(&self, timeout: Duration) {
        let appends = lock(&self.appends);
        let seen = *appends;
        drop(
            self.appended
                .wait_timeout_while(appends, timeout, |appends| *appends == seen)
                .unwrap_or_else(PoisonError::into_inner),
        );
    }
}

/// Locks a mutex, ignoring poisoning: every critical section on this state
/// leaves it consistent even if it panics halfway, as each one only assigns
/// plain fields.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
