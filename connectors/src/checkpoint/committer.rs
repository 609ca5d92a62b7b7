//! The [`Committer`]: the thread that writes the workers' parts and commits
//! checkpoints, and the [`PartSink`] each worker hands its parts to.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use tally_dataflow::checkpoint::{Schedule, WorkerPart};
use tally_dataflow::ports::CheckpointSink;
use tracing::warn;

use super::store::{part_name, CheckpointError, CheckpointStore, Manifest, Share};

/// Parts each worker may have waiting for the committer. A part is a whole
/// copy of the worker's window state, so this bounds what a store that is
/// down or slow costs in memory: at most this many copies per worker,
/// besides the one being written. Two let a worker's next part wait while
/// the committer writes its last one, which is all a healthy store needs,
/// since a worker takes a part at most once per half interval.
pub const PARTS_IN_FLIGHT_PER_WORKER: usize = 2;

/// How often process 0 looks for the other processes' shares.
const SHARES_EVERY: Duration = Duration::from_millis(250);
/// Checkpoints process 0 waits on at once for the other processes' shares.
const MAX_WAITING: usize = 16;

/// Counters of the checkpoints taken since start.
#[derive(Default)]
pub struct CheckpointStats {
    /// Checkpoints committed.
    pub committed: AtomicU64,
    /// Attempts to write a part or a manifest that failed.
    pub failures: AtomicU64,
    /// Parts a worker dropped because the committer was too far behind to
    /// take them (the checkpoint store is down or slow); their
    /// checkpoints are not committed.
    pub parts_dropped: AtomicU64,
    /// Boundary of the newest committed checkpoint.
    pub boundary: AtomicU64,
    /// Bytes of the newest committed checkpoint, all parts together.
    pub bytes: AtomicU64,
    /// Milliseconds from the first part of the newest checkpoint to its commit.
    pub duration_ms: AtomicU64,
}

/// A worker's way to the committer. It never blocks: a part that finds
/// the committer's queue full is dropped and counted, and its checkpoint
/// is never committed.
#[derive(Clone)]
pub struct PartSink {
    parts: Sender<WorkerPart>,
    stats: Arc<CheckpointStats>,
}

impl CheckpointSink for PartSink {
    fn submit(&mut self, part: WorkerPart) {
        match self.parts.try_send(part) {
            Ok(()) => {}
            Err(TrySendError::Full(part)) => {
                self.stats.parts_dropped.fetch_add(1, Ordering::Relaxed);
                warn!(
                    worker = part.worker,
                    boundary = part.boundary,
                    "the checkpoint store is behind; dropping this part, so its checkpoint will not be committed"
                );
            }
            // The committer outlives the workers; after it stops, the part
            // would not be committed anyway.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The thread that writes parts and commits checkpoints.
pub struct Committer {
    thread: std::thread::JoinHandle<()>,
    /// What it has done.
    pub stats: Arc<CheckpointStats>,
}

/// Which of the job's processes this is, for a job spread over several.
#[derive(Clone, Copy, Debug)]
pub struct Members {
    /// This process's index.
    pub process: usize,
    /// The number of processes.
    pub processes: usize,
    /// Worker threads in each process.
    pub threads: usize,
}

impl Members {
    /// A job in one process of `threads` workers.
    pub fn single(threads: usize) -> Members {
        Members {
            process: 0,
            processes: 1,
            threads,
        }
    }
}

impl Committer {
    /// Starts committing this process's part of the checkpoints into
    /// `store`. `durable` says up to what time the process's result store
    /// holds every result. Returns the committer and one part sink per
    /// worker thread of the process.
    ///
    /// In a job of one process, the committer writes the manifest once its
    /// workers' parts are written and `durable` has passed the boundary. In
    /// a job of several, each process then writes its share
    /// (`process-<i>.json`), and process 0 writes the manifest once every
    /// process's share is there.
    pub fn start(
        store: CheckpointStore,
        members: Members,
        keep: usize,
        schedule: Arc<Schedule>,
        durable: impl Fn() -> u64 + Send + 'static,
        stats: Arc<CheckpointStats>,
    ) -> std::io::Result<(Committer, Vec<PartSink>)> {
        let (tx, rx) = bounded(members.threads.max(1) * PARTS_IN_FLIGHT_PER_WORKER);
        let thread = {
            let stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name("checkpoints".into())
                .spawn(move || {
                    let mut committer = CommitLoop {
                        store: &store,
                        members,
                        keep: keep.max(1),
                        stats: &stats,
                        pending: BTreeMap::new(),
                        newest: HashMap::new(),
                        shared: BTreeMap::new(),
                    };
                    committer.run(&schedule, &durable, &rx)
                })?
        };
        let sinks = (0..members.threads)
            .map(|_| PartSink {
                parts: tx.clone(),
                stats: Arc::clone(&stats),
            })
            .collect();
        Ok((Committer { thread, stats }, sinks))
    }

    /// Waits for the thread, once every part sink has been dropped.
    pub fn join(self) {
        if self.thread.join().is_err() {
            warn!("the checkpoint thread panicked");
        }
    }
}

/// A checkpoint whose parts are still arriving.
struct Pending {
    share: Share,
    /// The workers whose parts are written.
    workers: BTreeSet<usize>,
    started: Instant,
}

struct CommitLoop<'a> {
    store: &'a CheckpointStore,
    members: Members,
    keep: usize,
    stats: &'a CheckpointStats,
    /// This process's checkpoints whose parts are still arriving.
    pending: BTreeMap<u64, Pending>,
    /// Per worker, the boundary of the newest part it sent.
    newest: HashMap<usize, u64>,
    /// Process 0: checkpoints whose own share is written, waiting for the
    /// other processes' shares, with when the first part arrived.
    shared: BTreeMap<u64, Instant>,
}

impl CommitLoop<'_> {
    fn run(&mut self, schedule: &Schedule, durable: &dyn Fn() -> u64, rx: &Receiver<WorkerPart>) {
        let mut shares_checked = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(part) => self.write_part(part),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Parts arrive in boundary order from each worker, so the lowest
            // pending checkpoint is the next to complete, unless one of its
            // parts was dropped.
            while let Some(entry) = self.pending.first_entry() {
                let boundary = *entry.key();
                if lacks_a_dropped_part(&self.newest, boundary, entry.get()) {
                    entry.remove();
                    warn!(
                        boundary,
                        "a part of this checkpoint was dropped; it will not be committed"
                    );
                    continue;
                }
                if entry.get().workers.len() < self.members.threads || durable() < boundary {
                    break;
                }
                let done = entry.remove();
                schedule.committed(boundary);
                if self.members.processes == 1 {
                    self.commit(boundary, done.share, done.started);
                } else {
                    let share = Share {
                        workers: self.members.processes * self.members.threads,
                        ..done.share
                    };
                    retry(self.stats, "write a checkpoint share", || {
                        self.store
                            .write_share(boundary, self.members.process, &share)
                    });
                    if self.members.process == 0 {
                        self.shared.insert(boundary, done.started);
                        // A boundary the other processes never took (or
                        // dropped a part of) is given up once enough newer
                        // ones are waiting.
                        while self.shared.len() > MAX_WAITING {
                            self.shared.pop_first();
                        }
                    }
                }
            }
            if !self.shared.is_empty() && shares_checked.elapsed() >= SHARES_EVERY {
                shares_checked = Instant::now();
                self.commit_shared();
            }
        }
    }

    fn write_part(&mut self, part: WorkerPart) {
        let bytes = retry(self.stats, "write a checkpoint part", || {
            self.store.write_part(&part)
        });
        let newest = self.newest.entry(part.worker).or_default();
        *newest = (*newest).max(part.boundary);
        let entry = self
            .pending
            .entry(part.boundary)
            .or_insert_with(|| Pending {
                share: Share::default(),
                workers: BTreeSet::new(),
                started: Instant::now(),
            });
        entry.workers.insert(part.worker);
        entry.share.parts.push(part_name(part.worker));
        entry.share.cuts.extend(part.cuts);
        entry.share.bytes += bytes;
    }

    /// Process 0: commits the newest checkpoint every process has its
    /// share of. Older ones still waiting are given up: a newer commit
    /// makes them useless, and pruning deletes them.
    fn commit_shared(&mut self) {
        let store = self.store;
        let waiting: Vec<(u64, Instant)> =
            self.shared.iter().rev().map(|(&b, &t)| (b, t)).collect();
        for (boundary, started) in waiting {
            let shares = match store.read_shares(boundary, self.members.processes) {
                Ok(Some(shares)) => shares,
                Ok(None) => continue,
                Err(e @ CheckpointError::UnknownFormat { .. }) => {
                    warn!(boundary, error = %e, "a checkpoint share of another version of tally; skipping it");
                    continue;
                }
                Err(e) => {
                    warn!(boundary, error = %e, "cannot read the checkpoint shares; trying again");
                    return;
                }
            };
            let workers = self.members.processes * self.members.threads;
            if shares.iter().any(|s| s.workers != workers) {
                warn!(
                    boundary,
                    "a checkpoint share of a job of another shape; skipping it"
                );
                continue;
            }
            let mut whole = Share {
                workers,
                ..Share::default()
            };
            for share in shares {
                whole.parts.extend(share.parts);
                whole.cuts.extend(share.cuts);
                whole.bytes += share.bytes;
            }
            self.shared.retain(|&b, _| b > boundary);
            self.commit(boundary, whole, started);
            return;
        }
    }

    fn commit(&self, boundary: u64, share: Share, started: Instant) {
        let Share {
            mut parts,
            mut cuts,
            bytes,
            ..
        } = share;
        cuts.sort_by_key(|c| c.partition);
        parts.sort();
        let manifest = Manifest {
            boundary,
            workers: self.members.processes * self.members.threads,
            parts,
            cuts,
            job: self.store.job().to_owned(),
            metrics: self.store.metrics().to_vec(),
            bytes,
        };
        let store = self.store;
        retry(self.stats, "commit a checkpoint", || {
            store.commit(&manifest)
        });
        let took = started.elapsed();
        let stats = self.stats;
        stats.committed.fetch_add(1, Ordering::Relaxed);
        stats.boundary.store(boundary, Ordering::Relaxed);
        stats.bytes.store(bytes, Ordering::Relaxed);
        stats
            .duration_ms
            .store(took.as_millis() as u64, Ordering::Relaxed);
        tracing::debug!(boundary, bytes, ?took, "checkpoint committed");
        match store.prune(self.keep) {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "pruned old checkpoints"),
            Err(e) => {
                warn!(error = %e, "cannot prune old checkpoints; trying again after the next one")
            }
        }
    }
}

/// Whether checkpoint `boundary` misses the part of a worker that has since
/// sent a part of a later one (`newest` holds each worker's newest
/// boundary). Each worker sends its parts in boundary order, so that part
/// was dropped and will never come, and the checkpoint can never be whole.
fn lacks_a_dropped_part(newest: &HashMap<usize, u64>, boundary: u64, pending: &Pending) -> bool {
    newest
        .iter()
        .any(|(worker, &newest)| newest > boundary && !pending.workers.contains(worker))
}

/// Runs `op` until it succeeds, counting each failure.
fn retry<T>(
    stats: &CheckpointStats,
    what: &str,
    mut op: impl FnMut() -> Result<T, CheckpointError>,
) -> T {
    crate::retry::blocking(what, || {
        op().inspect_err(|_| {
            stats.failures.fetch_add(1, Ordering::Relaxed);
        })
    })
}

#[cfg(test)]
mod tests {
    use super::super::sample_part as part;
    use super::*;

    /// A committer of two workers over a store in `dir`, whose result store
    /// is durable through `durable`.
    fn start(dir: &std::path::Path, durable: &Arc<AtomicU64>) -> (Committer, Vec<PartSink>) {
        let store = CheckpointStore::open(None, dir, &[]).unwrap();
        let schedule = Arc::new(Schedule::new(Duration::from_secs(10), Duration::ZERO, 0));
        let durable = Arc::clone(durable);
        let durable = move || durable.load(Ordering::Relaxed);
        Committer::start(
            store,
            Members::single(2),
            2,
            schedule,
            durable,
            Arc::default(),
        )
        .unwrap()
    }

    /// Waits until a file called `name` exists somewhere under `dir`.
    fn wait_for_file(dir: &std::path::Path, name: &str) {
        fn found(dir: &std::path::Path, name: &str) -> bool {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|entry| {
                    let path = entry.path();
                    entry.file_name() == name || (path.is_dir() && found(&path, name))
                })
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !found(dir, name) {
            assert!(Instant::now() < deadline, "{name} was never written");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until `committer` has committed `n` checkpoints.
    fn wait_for(committer: &Committer, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while committer.stats.committed.load(Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "checkpoint {n} was not committed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_checkpoint_is_read_only_once_committed_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let open = || CheckpointStore::open(None, dir.path(), &[]).unwrap();
        let durable = Arc::new(AtomicU64::new(0));
        let (committer, mut sinks) = start(dir.path(), &durable);
        // One part of two: once it is written, nothing is committed.
        sinks[0].submit(part(100, 0));
        wait_for_file(dir.path(), &part_name(0));
        assert!(open().latest().unwrap().is_none());
        // Both parts written, but the store does not hold the results yet.
        sinks[1].submit(part(100, 1));
        wait_for_file(dir.path(), &part_name(1));
        assert!(open().latest().unwrap().is_none());
        durable.store(u64::MAX, Ordering::Relaxed);
        wait_for(&committer, 1);
        let latest = open().latest().unwrap().unwrap();
        assert_eq!(
            (latest.boundary, latest.workers, latest.groups.len()),
            (100, 2, 2)
        );
        assert_eq!(
            latest.cuts.iter().map(|c| c.partition).collect::<Vec<_>>(),
            [0, 1]
        );
        // Three more: the two newest stay. Each waits for the one before,
        // as workers do, which take a part at most once per half interval:
        // all at once would fill the queue and drop parts.
        for (n, b) in [(2, 200), (3, 300), (4, 400)] {
            sinks[0].submit(part(b, 0));
            sinks[1].submit(part(b, 1));
            wait_for(&committer, n);
        }
        drop(sinks);
        committer.join();
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [format!("{:020}", 300), format!("{:020}", 400)]);
        assert_eq!(open().latest().unwrap().unwrap().boundary, 400);
        // A job of other metrics reads it too, with the metrics that made it.
        let config = tally_dataflow::config::Config::load(
            Some("[[metric]]\nname = \"other\"\nwindows = [\"tumbling 1m\"]"),
            [],
        )
        .unwrap();
        let other = CheckpointStore::open(None, dir.path(), &config.metrics).unwrap();
        let read = other.latest().unwrap().unwrap();
        assert_eq!((read.boundary, read.metrics.len()), (400, 0));
    }

    #[test]
    fn a_full_queue_drops_the_part_without_blocking_and_counts_it() {
        let (tx, rx) = bounded(1);
        let stats = Arc::new(CheckpointStats::default());
        let mut sink = PartSink {
            parts: tx,
            stats: Arc::clone(&stats),
        };
        sink.submit(part(100, 0));
        sink.submit(part(200, 0));
        assert_eq!(stats.parts_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(rx.try_recv().unwrap().boundary, 100);
        assert!(rx.try_recv().is_err(), "the second part was dropped");
    }

    #[test]
    fn a_checkpoint_missing_a_dropped_part_is_never_committed_but_the_next_is() {
        let dir = tempfile::tempdir().unwrap();
        let durable = Arc::new(AtomicU64::new(u64::MAX));
        let (committer, mut sinks) = start(dir.path(), &durable);
        // Worker 1's part of 100 was dropped: the committer sees only
        // worker 0's, then both parts of 200.
        sinks[0].submit(part(100, 0));
        sinks[0].submit(part(200, 0));
        sinks[1].submit(part(200, 1));
        wait_for(&committer, 1);
        let stats = Arc::clone(&committer.stats);
        drop(sinks);
        committer.join();
        assert_eq!(stats.committed.load(Ordering::Relaxed), 1);
        assert_eq!(stats.boundary.load(Ordering::Relaxed), 200);
        let unfinished = dir.path().join(format!("{:020}", 100));
        assert!(unfinished.join(part_name(0)).exists());
        assert!(
            !unfinished.join("manifest.json").exists(),
            "the checkpoint with a dropped part is not committed"
        );
        let store = CheckpointStore::open(None, dir.path(), &[]).unwrap();
        let latest = store.latest().unwrap().unwrap();
        assert_eq!((latest.boundary, latest.groups.len()), (200, 2));
    }
}
