//! Checkpoints: what a consistent cut of the job holds, and when cuts are taken.
//!
//! Timestamps in the job are event-time watermarks, and every partition's
//! batches travel at non-decreasing times. So for any time `B`, the batches
//! stamped before `B` are a prefix of each partition. A checkpoint at
//! boundary `B` is that prefix, as one offset per partition, together with
//! the window state after applying exactly the data stamped before `B`. A
//! restart restores the state and reads each partition from its offset, and
//! the batches it reads get the same stamps they had the first time, so it
//! goes on as if it had never stopped.
//!
//! Boundaries are multiples of the checkpoint interval, in event time. Not
//! every boundary is taken: under a backlog the frontier crosses many at once.
//! The [`Schedule`], shared by the workers of a process, decides each boundary
//! once, the first time any worker passes it, and every worker gets the same
//! answer. It takes a boundary only if the last one it took was at least half
//! an interval ago in processing time.
//!
//! Writing parts and committing them is I/O, and belongs to the caller's
//! [`CheckpointSink`](crate::ports::CheckpointSink). A checkpoint is complete when every worker has written
//! its part and the sinks hold every result emitted before the boundary.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap as HashMap;
use serde::{Deserialize, Serialize};

use crate::aggregate::AggState;
use crate::model::Group;
use crate::routing::owner;
use crate::time::Millis;

/// Where one partition stands at a cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionCut {
    /// The partition.
    pub partition: u32,
    /// The offset of the first record after the cut.
    pub next_offset: u64,
    /// The partition's watermark after the last batch before the cut.
    pub watermark: Option<u64>,
    /// The first offset holding an `eventId` the source still remembered
    /// at the cut (see [`crate::dedupe`]): a restore reads the log again
    /// from there, without counting, to remember it. `None` if none.
    pub dedupe_from: Option<u64>,
}

/// The window state of one (metric, group).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupSnapshot {
    /// Index of the metric in the configuration.
    pub metric: u16,
    /// The group's dimension values.
    pub group: Group,
    /// The routing hash of (metric, group); it decides the owning worker.
    pub hash: u64,
    /// Panes still needed by an open window or a kept closed one. They are
    /// shared with the window state that took the snapshot, which copies a
    /// pane only when it changes one still held here (see
    /// [`crate::state`]); on disk they are plain states.
    pub panes: Vec<(Millis, Arc<AggState>)>,
    /// Open windows with data, as (window index, end).
    pub open: Vec<(u8, Millis)>,
    /// Closed windows kept for late data, as (window index, end, revision).
    pub closed: Vec<(u8, Millis, u32)>,
}

/// One worker's share of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerPart {
    /// The boundary: the part holds exactly the data stamped before it.
    pub boundary: u64,
    /// The worker that wrote the part.
    pub worker: usize,
    /// How many workers the job had.
    pub workers: usize,
    /// The partitions this worker read.
    pub cuts: Vec<PartitionCut>,
    /// The groups this worker owned.
    pub groups: Vec<GroupSnapshot>,
}

/// What a worker restores: a committed checkpoint's cuts for its partitions
/// and the groups it owns now, whatever the number of workers was before.
#[derive(Clone, Debug, Default)]
pub struct Restore {
    /// The boundary of the checkpoint; 0 when starting fresh.
    pub boundary: u64,
    /// Where each of the worker's partitions resumes.
    pub cuts: Vec<PartitionCut>,
    /// The window state of the groups the worker owns.
    pub groups: Vec<GroupSnapshot>,
}

impl Restore {
    /// Takes worker `worker`'s share of a whole checkpoint: the cuts of the
    /// partitions it reads, and the groups whose routing hash lands on it
    /// ([`owner`]: the owner of the hash's shard).
    pub fn share(
        boundary: u64,
        cuts: &[PartitionCut],
        groups: &[GroupSnapshot],
        partitions: &[u32],
        worker: usize,
        workers: usize,
    ) -> Restore {
        Restore {
            boundary,
            cuts: cuts
                .iter()
                .filter(|c| partitions.contains(&c.partition))
                .cloned()
                .collect(),
            groups: groups
                .iter()
                .filter(|g| owner(g.hash, workers) == worker)
                .cloned()
                .collect(),
        }
    }
}

/// Which boundaries become checkpoints; shared by the workers of a process.
pub struct Schedule {
    interval: Millis,
    min_gap: Duration,
    state: Mutex<Decided>,
}

#[derive(Default)]
struct Decided {
    /// Every boundary at or below this has been decided.
    until: u64,
    /// The boundaries taken, above the last one committed.
    taken: BTreeSet<u64>,
    last_taken: Option<Instant>,
}

impl Schedule {
    /// Boundaries every `interval` of event time, taken at most once per
    /// `min_gap` of processing time. `start` is the restored boundary.
    pub fn new(interval: Duration, min_gap: Duration, start: u64) -> Schedule {
        Schedule {
            interval: (interval.as_millis() as Millis).max(1),
            min_gap,
            state: Mutex::new(Decided {
                until: start,
                ..Decided::default()
            }),
        }
    }

    /// The distance between boundaries, in event time.
    pub fn interval(&self) -> Millis {
        self.interval
    }

    /// The checkpoint boundaries in `(after, through]`, for a worker that
    /// has applied everything before `after` and nothing from `through` on.
    pub fn boundaries(&self, after: u64, through: u64) -> Vec<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let decided = state.until.min(through);
        let mut out: Vec<u64> = if after < decided {
            state.taken.range(after + 1..=decided).copied().collect()
        } else {
            Vec::new()
        };
        let interval = self.interval as u64;
        let top = through / interval * interval;
        if top > state.until {
            state.until = top;
            if state.last_taken.is_none_or(|t| t.elapsed() >= self.min_gap) {
                state.taken.insert(top);
                state.last_taken = Some(Instant::now());
                out.push(top);
            }
        }
        out
    }

    /// Forgets boundaries at or below a committed one.
    pub fn committed(&self, boundary: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.taken.retain(|&b| b > boundary);
    }
}

/// The offsets a worker's source has passed, by the time each batch travelled
/// at, so a cut at any later boundary can be read off.
#[derive(Default)]
pub struct Progress {
    /// Per partition: where it stood before the first entry of `history`.
    base: HashMap<u32, Stood>,
    /// Per partition: the stamp of each recent batch, and where the
    /// partition stood after it.
    history: HashMap<u32, VecDeque<(u64, Stood)>>,
}

/// Where a partition stands after a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stood {
    /// The offset it resumes from.
    pub next_offset: u64,
    /// Its watermark.
    pub watermark: Option<u64>,
    /// The first offset a restore reads again for the ids it remembers.
    pub dedupe_from: Option<u64>,
}

impl Progress {
    /// Starts from restored cuts.
    pub fn new(cuts: &[PartitionCut]) -> Progress {
        Progress {
            base: cuts
                .iter()
                .map(|c| {
                    let stood = Stood {
                        next_offset: c.next_offset,
                        watermark: c.watermark,
                        dedupe_from: c.dedupe_from,
                    };
                    (c.partition, stood)
                })
                .collect(),
            history: HashMap::default(),
        }
    }

    /// Records that a batch of `partition` travelled at `stamp`, after which
    /// the partition stood as `stood` says.
    pub fn record(&mut self, partition: u32, stamp: u64, stood: Stood) {
        self.history
            .entry(partition)
            .or_default()
            .push_back((stamp, stood));
    }

    /// The cut of `partitions` at `boundary`: every batch stamped before it.
    pub fn cut(&self, partitions: &[u32], boundary: u64) -> Vec<PartitionCut> {
        partitions
            .iter()
            .map(|&partition| {
                let last = self
                    .history
                    .get(&partition)
                    .and_then(|h| h.iter().take_while(|(stamp, _)| *stamp < boundary).last())
                    .map(|&(_, stood)| stood);
                let stood = last
                    .or_else(|| self.base.get(&partition).copied())
                    .unwrap_or(Stood {
                        next_offset: 0,
                        watermark: None,
                        dedupe_from: None,
                    });
                PartitionCut {
                    partition,
                    next_offset: stood.next_offset,
                    watermark: stood.watermark,
                    dedupe_from: stood.dedupe_from,
                }
            })
            .collect()
    }

    /// Folds the batches stamped before `time` into the base: no boundary
    /// at or below `time` will be asked for again.
    pub fn forget_before(&mut self, time: u64) {
        for (partition, history) in &mut self.history {
            while history.front().is_some_and(|(stamp, _)| *stamp < time) {
                if let Some((_, stood)) = history.pop_front() {
                    self.base.insert(*partition, stood);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_gets_the_same_boundaries_whatever_its_steps() {
        let schedule = Schedule::new(Duration::from_millis(10), Duration::ZERO, 0);
        // One worker jumps far ahead: only the top boundary is taken.
        assert_eq!(schedule.boundaries(0, 57), vec![50]);
        // Another, stepping slowly through the same range, sees the same.
        let slow: Vec<u64> = [(0, 12), (12, 35), (35, 57)]
            .iter()
            .flat_map(|&(a, b)| schedule.boundaries(a, b))
            .collect();
        assert_eq!(slow, vec![50]);
        // Past what was decided, new boundaries are decided as reached.
        assert_eq!(schedule.boundaries(57, 61), vec![60]);
        assert_eq!(schedule.boundaries(50, 70), vec![60, 70]);
    }

    #[test]
    fn boundaries_are_rate_limited_in_processing_time() {
        let schedule = Schedule::new(Duration::from_millis(10), Duration::from_secs(3600), 0);
        assert_eq!(schedule.boundaries(0, 10), vec![10]);
        assert!(schedule.boundaries(10, 20).is_empty());
        assert!(schedule.boundaries(0, 20).iter().eq([10].iter()));
    }

    #[test]
    fn a_cut_is_the_prefix_stamped_before_the_boundary() {
        let mut progress = Progress::new(&[PartitionCut {
            partition: 1,
            next_offset: 5,
            watermark: Some(3),
            dedupe_from: Some(2),
        }]);
        let stood = |next_offset, watermark, dedupe_from| Stood {
            next_offset,
            watermark: Some(watermark),
            dedupe_from,
        };
        progress.record(0, 0, stood(10, 8, Some(0)));
        progress.record(0, 8, stood(20, 15, Some(10)));
        progress.record(0, 15, stood(30, 25, None));
        let cut = progress.cut(&[0, 1], 15);
        assert_eq!(
            cut[0],
            PartitionCut {
                partition: 0,
                next_offset: 20,
                watermark: Some(15),
                dedupe_from: Some(10),
            }
        );
        assert_eq!(
            cut[1],
            PartitionCut {
                partition: 1,
                next_offset: 5,
                watermark: Some(3),
                dedupe_from: Some(2),
            }
        );
        progress.forget_before(15);
        assert_eq!(progress.cut(&[0], 15)[0].next_offset, 20);
        assert_eq!(progress.cut(&[0], 16)[0].next_offset, 30);
    }
}
