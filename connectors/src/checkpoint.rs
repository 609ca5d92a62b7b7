//! Checkpoints in an object store: the local filesystem by default, S3 (or
//! any store `object_store` reads from a URL) by configuration.
//!
//! Under the store's prefix, each checkpoint is a directory named by its
//! boundary, zero-padded so names sort as numbers:
//!
//! ```text
//! 00000001767225600000/part-00000.bin   one worker's part (bincode)
//! 00000001767225600000/part-00001.bin
//! 00000001767225600000/manifest.json    written last
//! ```
//!
//! A checkpoint is committed when its manifest exists. The manifest is
//! written only once every worker's part is written and the result store
//! holds every result emitted before the boundary, so a restored job never
//! misses a result it will not emit again. A job of several processes
//! (the cluster) shares one store: each process writes its share,
//! `process-<i>.json`, once its own parts and results are written, and
//! process 0 writes the manifest when every share is there. Every put is atomic, so a reader
//! never sees half a file, and a directory without a manifest is never read.
//! After each commit, all but the newest `keep` committed checkpoints are
//! deleted, along with any unfinished ones older than them.

use std::collections::BTreeMap;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use futures_util::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tally_dataflow::checkpoint::{GroupSnapshot, PartitionCut, Schedule, WorkerPart};
use tally_dataflow::ports::CheckpointSink;
use tracing::warn;

const MANIFEST: &str = "manifest.json";

/// Errors reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The object store failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// The checkpoint URL is not one `object_store` understands.
    #[error("checkpoint url '{0}': {1}")]
    Url(String, String),
    /// A file of a committed checkpoint cannot be decoded.
    #[error("corrupt checkpoint file {0}: {1}")]
    Corrupt(String, String),
    /// The local directory cannot be created.
    #[error("checkpoint directory: {0}")]
    Io(#[from] std::io::Error),
}

/// The manifest that commits a checkpoint.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    boundary: u64,
    workers: usize,
    parts: Vec<String>,
    /// Every partition's cut, from all the parts.
    cuts: Vec<PartitionCut>,
    /// The job the state belongs to: metric indexes mean nothing under
    /// another list of metrics.
    job: String,
    bytes: u64,
}

/// A committed checkpoint, read back whole.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its boundary.
    pub boundary: u64,
    /// The number of workers that wrote it.
    pub workers: usize,
    /// Where every partition resumes.
    pub cuts: Vec<PartitionCut>,
    /// The window state of every group.
    pub groups: Vec<GroupSnapshot>,
}

/// Checkpoints of one job in an object store.
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// Describes the job; a checkpoint of another job is not restored.
    job: String,
    runtime: tokio::runtime::Runtime,
    /// The directory, for a local store: object stores have no directories
    /// to delete, but a filesystem does.
    local: Option<std::path::PathBuf>,
}

impl CheckpointStore {
    /// Opens the store at `url` (`s3://bucket/prefix`, `file:///dir`, ...), or
    /// the local directory `dir` when there is no URL. S3 takes its
    /// credentials and region from the usual `AWS_*` variables.
    pub fn open(
        url: Option<&str>,
        dir: &FsPath,
        job: String,
    ) -> Result<CheckpointStore, CheckpointError> {
        let local = url.is_none().then(|| dir.to_owned());
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match url {
            Some(url) => {
                let parsed = url::Url::parse(url)
                    .map_err(|e| CheckpointError::Url(url.into(), e.to_string()))?;
                let options = std::env::vars()
                    .filter(|(k, _)| k.starts_with("AWS_"))
                    .map(|(k, v)| (k.to_ascii_lowercase(), v));
                let (store, prefix) = object_store::parse_url_opts(&parsed, options)
                    .map_err(|e| CheckpointError::Url(url.into(), e.to_string()))?;
                (Arc::from(store), prefix)
            }
            None => {
                std::fs::create_dir_all(dir)?;
                (
                    Arc::new(LocalFileSystem::new_with_prefix(dir)?),
                    Path::default(),
                )
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(CheckpointStore {
            store,
            prefix,
            job,
            runtime,
            local,
        })
    }

    /// The newest committed checkpoint of this job, if there is one. A
    /// checkpoint that cannot be read is skipped, with a warning, for the
    /// one before it.
    pub fn latest(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        let mut boundaries = self.runtime.block_on(self.boundaries())?;
        boundaries.reverse();
        for boundary in boundaries {
            match self.runtime.block_on(self.read(boundary)) {
                Ok(Some(checkpoint)) => return Ok(Some(checkpoint)),
                Ok(None) => {}
                Err(e) => {
                    warn!(boundary, error = %e, "cannot read a committed checkpoint; trying the one before")
                }
            }
        }
        Ok(None)
    }

    /// The boundaries present, committed or not, in ascending order.
    async fn boundaries(&self) -> Result<Vec<u64>, CheckpointError> {
        let listing = self.store.list_with_delimiter(Some(&self.prefix)).await?;
        let mut boundaries: Vec<u64> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(|n| n.parse().ok()))
            .collect();
        boundaries.sort_unstable();
        Ok(boundaries)
    }

    fn dir(&self, boundary: u64) -> Path {
        self.prefix.clone().join(format!("{boundary:020}"))
    }

    /// Reads checkpoint `boundary`: `None` if it is not committed, or
    /// belongs to another job.
    async fn read(&self, boundary: u64) -> Result<Option<Checkpoint>, CheckpointError> {
        let dir = self.dir(boundary);
        let manifest = match self.store.get(&dir.clone().join(MANIFEST)).await {
            Ok(found) => found.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let manifest: Manifest = serde_json::from_slice(&manifest).map_err(|e| {
            CheckpointError::Corrupt(dir.clone().join(MANIFEST).to_string(), e.to_string())
        })?;
        if manifest.job != self.job {
            warn!(boundary, "the newest checkpoint is of another configuration of metrics; starting from the log");
            return Ok(None);
        }
        let mut groups = Vec::new();
        for name in &manifest.parts {
            let path = dir.clone().join(name.as_str());
            let bytes = self.store.get(&path).await?.bytes().await?;
            let part: WorkerPart = bincode::deserialize(&bytes)
                .map_err(|e| CheckpointError::Corrupt(path.to_string(), e.to_string()))?;
            groups.extend(part.groups);
        }
        Ok(Some(Checkpoint {
            boundary,
            workers: manifest.workers,
            cuts: manifest.cuts,
            groups,
        }))
    }

    async fn write_part(&self, part: &WorkerPart) -> Result<u64, CheckpointError> {
        let bytes = bincode::serialize(part)
            .map_err(|e| CheckpointError::Corrupt("part".into(), e.to_string()))?;
        let len = bytes.len() as u64;
        let path = self.dir(part.boundary).join(part_name(part.worker));
        self.store.put(&path, PutPayload::from(bytes)).await?;
        Ok(len)
    }

    async fn commit(&self, manifest: &Manifest) -> Result<(), CheckpointError> {
        let bytes = serde_json::to_vec_pretty(manifest)
            .map_err(|e| CheckpointError::Corrupt(MANIFEST.into(), e.to_string()))?;
        self.store
            .put(
                &self.dir(manifest.boundary).join(MANIFEST),
                PutPayload::from(bytes),
            )
            .await?;
        Ok(())
    }

    async fn write_share(
        &self,
        boundary: u64,
        process: usize,
        share: &Share,
    ) -> Result<(), CheckpointError> {
        let bytes = serde_json::to_vec(share)
            .map_err(|e| CheckpointError::Corrupt(share_name(process), e.to_string()))?;
        let path = self.dir(boundary).join(share_name(process));
        self.store.put(&path, PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// Every process's share of checkpoint `boundary`, or `None` while
    /// some are missing.
    async fn read_shares(
        &self,
        boundary: u64,
        processes: usize,
    ) -> Result<Option<Vec<Share>>, CheckpointError> {
        let mut shares = Vec::with_capacity(processes);
        for process in 0..processes {
            let path = self.dir(boundary).join(share_name(process));
            let bytes = match self.store.get(&path).await {
                Ok(found) => found.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            shares.push(
                serde_json::from_slice(&bytes)
                    .map_err(|e| CheckpointError::Corrupt(path.to_string(), e.to_string()))?,
            );
        }
        Ok(Some(shares))
    }

    /// Deletes the unfinished checkpoints above `boundary`, the one a job
    /// restored: they hold parts and shares of the run before, which must
    /// never be combined with the new run's. Call it before the job starts.
    pub fn discard_unfinished(&self, boundary: u64) -> Result<usize, CheckpointError> {
        self.runtime.block_on(async {
            let mut deleted = 0;
            for b in self.boundaries().await? {
                if b > boundary && self.store.head(&self.dir(b).join(MANIFEST)).await.is_err() {
                    self.delete(b).await?;
                    deleted += 1;
                }
            }
            Ok(deleted)
        })
    }

    /// Deletes checkpoint `boundary`, its manifest first, so a half-deleted
    /// checkpoint is never read.
    async fn delete(&self, boundary: u64) -> Result<(), CheckpointError> {
        let files: Vec<_> = self
            .store
            .list(Some(&self.dir(boundary)))
            .try_collect()
            .await?;
        let (manifest, parts): (Vec<_>, Vec<_>) = files
            .into_iter()
            .partition(|f| f.location.filename() == Some(MANIFEST));
        for file in manifest.into_iter().chain(parts) {
            self.store.delete(&file.location).await?;
        }
        if let Some(dir) = &self.local {
            std::fs::remove_dir(dir.join(format!("{boundary:020}")))?;
        }
        Ok(())
    }

    /// Deletes everything older than the newest `keep` committed checkpoints.
    async fn prune(&self, keep: usize) -> Result<usize, CheckpointError> {
        let mut committed = Vec::new();
        let boundaries = self.boundaries().await?;
        for &b in boundaries.iter().rev() {
            if self.store.head(&self.dir(b).join(MANIFEST)).await.is_ok() {
                committed.push(b);
                if committed.len() == keep {
                    break;
                }
            }
        }
        let Some(&oldest_kept) = committed.last().filter(|_| committed.len() == keep) else {
            return Ok(0);
        };
        let mut deleted = 0;
        for &b in boundaries.iter().filter(|&&b| b < oldest_kept) {
            self.delete(b).await?;
            deleted += 1;
        }
        Ok(deleted)
    }
}

fn part_name(worker: usize) -> String {
    format!("part-{worker:05}.bin")
}

fn share_name(process: usize) -> String {
    format!("process-{process:05}.json")
}

/// Counters of the checkpoints taken since start.
#[derive(Default)]
pub struct CheckpointStats {
    /// Checkpoints committed.
    pub committed: AtomicU64,
    /// Attempts to write a part or a manifest that failed.
    pub failures: AtomicU64,
    /// Boundary of the newest committed checkpoint.
    pub boundary: AtomicU64,
    /// Bytes of the newest committed checkpoint, all parts together.
    pub bytes: AtomicU64,
    /// Milliseconds from the first part of the newest checkpoint to its commit.
    pub duration_ms: AtomicU64,
}

/// A worker's way to the committer.
#[derive(Clone)]
pub struct PartSink(Sender<WorkerPart>);

impl CheckpointSink for PartSink {
    fn submit(&mut self, part: WorkerPart) {
        // The committer outlives the workers; after it stops, the part
        // would not be committed anyway.
        let _ = self.0.send(part);
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

/// A process's share of a checkpoint, once its parts are written and its
/// result store holds everything before the boundary.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Share {
    /// Workers in the job, so a share of a job of another shape is refused.
    workers: usize,
    parts: Vec<String>,
    cuts: Vec<PartitionCut>,
    bytes: u64,
}

/// A checkpoint whose parts are still arriving.
struct Pending {
    share: Share,
    started: Instant,
}

/// How often process 0 looks for the other processes' shares.
const SHARES_EVERY: Duration = Duration::from_millis(250);
/// Checkpoints process 0 waits on at once for the other processes' shares.
const MAX_WAITING: usize = 16;

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
    ) -> std::io::Result<(Committer, Vec<PartSink>)> {
        let (tx, rx) = unbounded();
        let stats = Arc::new(CheckpointStats::default());
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
                        shared: BTreeMap::new(),
                    };
                    committer.run(&schedule, &durable, &rx)
                })?
        };
        Ok((
            Committer { thread, stats },
            (0..members.threads).map(|_| PartSink(tx.clone())).collect(),
        ))
    }

    /// Waits for the thread, once every part sink has been dropped.
    pub fn join(self) {
        if self.thread.join().is_err() {
            warn!("the checkpoint thread panicked");
        }
    }
}

struct CommitLoop<'a> {
    store: &'a CheckpointStore,
    members: Members,
    keep: usize,
    stats: &'a CheckpointStats,
    /// This process's checkpoints whose parts are still arriving.
    pending: BTreeMap<u64, Pending>,
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
            // pending checkpoint is the next to complete.
            while let Some(entry) = self.pending.first_entry() {
                let boundary = *entry.key();
                if entry.get().share.parts.len() < self.members.threads || durable() < boundary {
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
                    let share = &share;
                    retry(self.stats, "write a checkpoint share", || {
                        self.store.runtime.block_on(self.store.write_share(
                            boundary,
                            self.members.process,
                            share,
                        ))
                    });
                    if self.members.process == 0 {
                        self.shared.insert(boundary, done.started);
                        // A boundary the other processes never took is
                        // given up once enough newer ones are waiting.
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
            self.store.runtime.block_on(self.store.write_part(&part))
        });
        let entry = self
            .pending
            .entry(part.boundary)
            .or_insert_with(|| Pending {
                share: Share::default(),
                started: Instant::now(),
            });
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
            let shares = match store
                .runtime
                .block_on(store.read_shares(boundary, self.members.processes))
            {
                Ok(Some(shares)) => shares,
                Ok(None) => continue,
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
            job: self.store.job.clone(),
            bytes,
        };
        let store = self.store;
        retry(self.stats, "commit a checkpoint", || {
            store.runtime.block_on(store.commit(&manifest))
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
        match store.runtime.block_on(store.prune(self.keep)) {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "pruned old checkpoints"),
            Err(e) => {
                warn!(error = %e, "cannot prune old checkpoints; trying again after the next one")
            }
        }
    }
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
    use super::*;
    use tally_dataflow::aggregate::AggState;

    fn part(boundary: u64, worker: usize) -> WorkerPart {
        WorkerPart {
            boundary,
            worker,
            workers: 2,
            cuts: vec![PartitionCut {
                partition: worker as u32,
                next_offset: boundary / 10,
                watermark: Some(boundary),
            }],
            groups: vec![GroupSnapshot {
                metric: 0,
                group: vec![format!("w{worker}")],
                hash: worker as u64,
                panes: vec![(boundary as i64, AggState::from_parts(3, 1.5, None))],
                open: vec![(0, boundary as i64 + 10)],
                closed: vec![(0, boundary as i64, 1)],
            }],
        }
    }

    #[test]
    fn a_checkpoint_is_read_only_once_committed_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let open = || CheckpointStore::open(None, dir.path(), "job".into()).unwrap();
        let schedule = Arc::new(Schedule::new(Duration::from_secs(10), Duration::ZERO, 0));
        let durable = Arc::new(AtomicU64::new(0));
        let (committer, mut sinks) = {
            let durable = Arc::clone(&durable);
            Committer::start(open(), Members::single(2), 2, schedule, move || {
                durable.load(Ordering::Relaxed)
            })
            .unwrap()
        };
        let wait_for = |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while committer.stats.committed.load(Ordering::Relaxed) < n {
                assert!(
                    Instant::now() < deadline,
                    "checkpoint {n} was not committed"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // One part of two: nothing is committed.
        sinks[0].submit(part(100, 0));
        std::thread::sleep(Duration::from_millis(100));
        assert!(open().latest().unwrap().is_none());
        // Both parts, but the store does not hold the results yet.
        sinks[1].submit(part(100, 1));
        std::thread::sleep(Duration::from_millis(100));
        assert!(open().latest().unwrap().is_none());
        durable.store(u64::MAX, Ordering::Relaxed);
        wait_for(1);
        let latest = open().latest().unwrap().unwrap();
        assert_eq!(
            (latest.boundary, latest.workers, latest.groups.len()),
            (100, 2, 2)
        );
        assert_eq!(
            latest.cuts.iter().map(|c| c.partition).collect::<Vec<_>>(),
            [0, 1]
        );
        // Three more: the two newest stay.
        for b in [200, 300, 400] {
            sinks[0].submit(part(b, 0));
            sinks[1].submit(part(b, 1));
        }
        wait_for(4);
        drop(sinks);
        committer.join();
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [format!("{:020}", 300), format!("{:020}", 400)]);
        assert_eq!(open().latest().unwrap().unwrap().boundary, 400);
        // Another job's checkpoints are not restored.
        let other = CheckpointStore::open(None, dir.path(), "other".into()).unwrap();
        assert!(other.latest().unwrap().is_none());
    }
}
