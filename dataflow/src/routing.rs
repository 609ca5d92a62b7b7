//! The routing contract: which worker owns a group's window state, and which
//! worker reads a partition of the log.
//!
//! Checkpoints store each group's state with its routing hash and re-key it
//! by that hash when restoring onto any number of workers, so the hash is
//! part of the checkpoint format: [`group_hash`] must give the same value on
//! every worker, every process and every build. A test pins it.
//!
//! Groups are owned in [`SHARDS`] fixed shares of the hash space, and a
//! worker owns whole shards. A decision that must not depend on the number
//! of workers, such as which groups a metric's cap admits
//! ([`crate::cap`]), is taken per shard: each shard sees the same groups
//! in the same order whichever worker owns it. A job therefore spreads its
//! groups over at most [`SHARDS`] workers.

use std::hash::{Hash, Hasher};

use rustc_hash::FxHasher;
use timely::dataflow::channels::pact::Exchange;

use crate::aggregate::AggState;
use crate::model::{Contribution, Group};
use crate::time::Millis;

/// The routing hash of a (metric, group): the same on every worker and
/// process (FxHash has no random seed), so each group's state lives in
/// exactly one place.
pub fn group_hash(metric: u16, group: &[String]) -> u64 {
    group_hash_of(metric, group.iter().map(String::as_str))
}

/// [`group_hash`] of the group of `values`, without building it.
pub fn group_hash_of<'v>(metric: u16, values: impl ExactSizeIterator<Item = &'v str>) -> u64 {
    let mut hasher = FxHasher::default();
    metric.hash(&mut hasher);
    // As a `Vec<String>` hashes: its length, then each string.
    values.len().hash(&mut hasher);
    for value in values {
        value.hash(&mut hasher);
    }
    hasher.finish()
}

impl Contribution {
    /// A contribution of `state` to pane `pane` of `group` of table
    /// `metric`, with the routing hash of (metric, group).
    pub fn new(
        metric: u16,
        group: impl Into<Group>,
        pane: Millis,
        state: AggState,
        appended_at: Option<Millis>,
    ) -> Contribution {
        let group = group.into();
        Contribution {
            metric,
            hash: group_hash(metric, &group),
            group,
            pane,
            state,
            appended_at,
        }
    }
}

/// The shares of the hash space that groups are owned in.
pub const SHARDS: usize = 128;

/// The shard of routing hash `hash`: its top bits, which FxHash mixes best.
pub fn shard(hash: u64) -> usize {
    (hash >> (64 - SHARDS.trailing_zeros())) as usize
}

/// The worker that owns routing hash `hash`, as [`exchange`] decides it:
/// the owner of its shard.
pub fn owner(hash: u64, workers: usize) -> usize {
    shard(hash) % workers
}

/// The exchange of contributions to the worker that owns their group.
///
/// Timely sends a record of key `k` to worker `k % workers` (for a power of
/// two it masks, which is the same); the key is the shard, so this is what
/// [`owner`] says.
pub fn exchange() -> Exchange<Contribution, fn(&Contribution) -> u64> {
    Exchange::new(|c: &Contribution| shard(c.hash) as u64)
}

/// The partitions of a log with `partitions` partitions that worker `worker`
/// of `workers` reads: `p % workers == worker`.
pub fn worker_partitions(partitions: u32, worker: usize, workers: usize) -> Vec<u32> {
    (0..partitions)
        .filter(|&p| p as usize % workers == worker)
        .collect()
}

/// The partitions read by the workers of process `process`, where each
/// process runs `threads` of the `workers` workers, worker `w` in process
/// `w / threads`.
pub fn process_partitions(
    partitions: u32,
    process: usize,
    threads: usize,
    workers: usize,
) -> Vec<u32> {
    (0..partitions)
        .filter(|&p| p as usize % workers / threads == process)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checkpoints re-key restored state by these values: if this test
    /// fails, restoring an older checkpoint would put groups on the wrong
    /// worker, and the checkpoint format version must change with it.
    #[test]
    fn the_group_hash_is_pinned() {
        let group: Group = vec!["camp_5541".into(), "US".into(), "MOBILE".into()].into();
        let hashes = [
            group_hash(0, &group),
            group_hash(3, &[String::new()]),
            group_hash(1, &Vec::new()),
        ];
        assert_eq!(
            hashes,
            [
                6695901343497130142,
                277408099874493204,
                13032756267696824044
            ]
        );
    }

    #[test]
    fn owners_and_partitions_cover_every_worker_once() {
        for workers in 1..=6 {
            let mut seen = [0; 12];
            for worker in 0..workers {
                for p in worker_partitions(12, worker, workers) {
                    seen[p as usize] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{workers} workers");
            let mut hashes = (0..100u64).map(|h| h.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert!(hashes.clone().all(|h| owner(h, workers) < workers));
            // A shard is owned whole.
            assert!(hashes.all(|h| owner(h, workers) == shard(h) % workers));
        }
        assert_eq!(shard(u64::MAX), SHARDS - 1);
        assert_eq!(shard(u64::MAX >> 7), 0);
        // Two processes of two threads: process 0 runs workers 0 and 1.
        assert_eq!(process_partitions(8, 0, 2, 4), [0, 1, 4, 5]);
        assert_eq!(process_partitions(8, 1, 2, 4), [2, 3, 6, 7]);
    }
}
