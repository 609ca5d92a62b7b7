//! [`CheckpointStore`]: the checkpoints of one job in an object store, and
//! the files they are made of.

use std::path::Path as FsPath;
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tally_dataflow::checkpoint::{GroupSnapshot, PartitionCut, WorkerPart};
use tally_dataflow::config::MetricSpec;
use tally_dataflow::fingerprint;
use tracing::warn;

const MANIFEST: &str = "manifest.json";

/// The format of the parts and shares this build writes, and the only one
/// it reads. Raise it whenever the serialized shape of a [`WorkerPart`]
/// (with everything in it, down to the aggregate states) or of a share
/// changes: bincode is not self-describing, so an old part would otherwise
/// decode into wrong state, or fail as corrupt.
pub const FORMAT: u32 = 2;

/// The first bytes of a part file, before its format number. A part
/// written before parts were numbered lacks them, and counts as format 0.
const PART_MAGIC: &[u8; 4] = b"TLYP";

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
    /// A file of a checkpoint is of a format this build does not read: it
    /// was written by another version of tally.
    #[error(
        "checkpoint file {file} is of format {found}, but this build reads only format {known}"
    )]
    UnknownFormat {
        /// The file's path in the store.
        file: String,
        /// The format it says it is; 0 for a file from before formats.
        found: u32,
        /// The format this build reads, [`FORMAT`].
        known: u32,
    },
    /// The local directory cannot be created.
    #[error("checkpoint directory: {0}")]
    Io(#[from] std::io::Error),
}

/// The manifest that commits a checkpoint.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Manifest {
    pub(super) boundary: u64,
    pub(super) workers: usize,
    pub(super) parts: Vec<String>,
    /// Every partition's cut, from all the parts.
    pub(super) cuts: Vec<PartitionCut>,
    /// The job the state belongs to: metric indexes mean nothing under
    /// another list of metrics.
    pub(super) job: String,
    /// The definitions of that job's metrics, by index, whose fingerprint
    /// `job` is. A manifest from before it has none.
    #[serde(default)]
    pub(super) metrics: Vec<MetricSpec>,
    pub(super) bytes: u64,
}

/// A process's share of a checkpoint, once its parts are written and its
/// result store holds everything before the boundary.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Share {
    /// The format of the share and of the parts it names. A share from
    /// before formats has none, which reads as 0.
    #[serde(default)]
    pub(super) format: u32,
    /// Workers in the job, so a share of a job of another shape is refused.
    pub(super) workers: usize,
    pub(super) parts: Vec<String>,
    pub(super) cuts: Vec<PartitionCut>,
    pub(super) bytes: u64,
}

impl Default for Share {
    /// An empty share of this build's format.
    fn default() -> Share {
        Share {
            format: FORMAT,
            workers: 0,
            parts: Vec::new(),
            cuts: Vec::new(),
            bytes: 0,
        }
    }
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
    /// The metrics that made the state, which its groups are indexed by.
    pub metrics: Vec<MetricSpec>,
}

/// Checkpoints of one job in an object store.
///
/// Its methods block on a runtime of its own: it is used from the
/// committer's thread and at start-up, never from a worker or a tokio task.
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The metrics of the job that writes here, and their fingerprint.
    metrics: Vec<MetricSpec>,
    job: String,
    runtime: tokio::runtime::Runtime,
    /// The directory, for a local store: object stores have no directories
    /// to delete, but a filesystem does.
    local: Option<std::path::PathBuf>,
}

impl CheckpointStore {
    /// Opens the store at `url` (`s3://bucket/prefix`, `file:///dir`, ...), or
    /// the local directory `dir` when there is no URL. S3 takes its
    /// credentials and region from the usual `AWS_*` variables. The job
    /// that writes there runs `metrics`.
    pub fn open(
        url: Option<&str>,
        dir: &FsPath,
        metrics: &[MetricSpec],
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
            metrics: metrics.to_vec(),
            job: fingerprint::job(metrics),
            runtime,
            local,
        })
    }

    /// The fingerprint of the metrics of the job that writes here.
    pub(super) fn job(&self) -> &str {
        &self.job
    }

    /// The metrics of the job that writes here.
    pub(super) fn metrics(&self) -> &[MetricSpec] {
        &self.metrics
    }

    /// The newest committed checkpoint, if there is one, of whichever
    /// metrics made it: see [`Checkpoint::metrics`]. A checkpoint that
    /// cannot be read is skipped, with a warning, for the one before it.
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

    /// The committed checkpoint at `boundary`, if there is one.
    pub fn at(&self, boundary: u64) -> Result<Option<Checkpoint>, CheckpointError> {
        self.runtime.block_on(self.read(boundary))
    }

    /// The boundary of the newest committed checkpoint, without reading it.
    pub fn newest(&self) -> Result<Option<u64>, CheckpointError> {
        self.runtime.block_on(async {
            for b in self.boundaries().await?.into_iter().rev() {
                if self.store.head(&self.dir(b).join(MANIFEST)).await.is_ok() {
                    return Ok(Some(b));
                }
            }
            Ok(None)
        })
    }

    /// Makes `checkpoint`, of this store's metrics, the newest committed
    /// one: deletes every checkpoint at or after its boundary, then writes
    /// it as one part and commits it. A crash in between leaves an older
    /// checkpoint newest, never a mix.
    pub fn install(&self, checkpoint: Checkpoint) -> Result<(), CheckpointError> {
        let boundary = checkpoint.boundary;
        self.runtime.block_on(async {
            for b in self.boundaries().await? {
                if b >= boundary {
                    self.delete(b).await?;
                }
            }
            Ok::<_, CheckpointError>(())
        })?;
        let bytes = self.write_part(&WorkerPart {
            boundary,
            worker: 0,
            workers: 1,
            cuts: checkpoint.cuts.clone(),
            groups: checkpoint.groups,
        })?;
        self.commit(&Manifest {
            boundary,
            workers: 1,
            parts: vec![part_name(0)],
            cuts: checkpoint.cuts,
            job: self.job.clone(),
            metrics: self.metrics.clone(),
            bytes,
        })
    }

    /// Deletes every checkpoint: those of a backfill that is cancelled, or
    /// whose checkpoint the live job now holds.
    pub fn clear(&self) -> Result<(), CheckpointError> {
        self.runtime.block_on(async {
            for b in self.boundaries().await? {
                self.delete(b).await?;
            }
            Ok(())
        })
    }

    /// Reads checkpoint `boundary`: `None` if it is not committed, was
    /// written by metrics it does not name (before manifests named them),
    /// or is of a format this build does not read.
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
        // A manifest from before manifests named their metrics is known
        // only to a job of the same metrics.
        let metrics = if manifest.metrics.is_empty() && manifest.job == self.job {
            self.metrics.clone()
        } else {
            manifest.metrics
        };
        if fingerprint::job(&metrics) != manifest.job {
            warn!(boundary, "the newest checkpoint is of other metrics, which it does not name; starting from the log");
            return Ok(None);
        }
        let mut groups = Vec::new();
        for name in &manifest.parts {
            let path = dir.clone().join(name.as_str());
            let bytes = self.store.get(&path).await?.bytes().await?;
            match decode_part(path.as_ref(), &bytes) {
                Ok(part) => groups.extend(part.groups),
                Err(e @ CheckpointError::UnknownFormat { .. }) => {
                    // As with another configuration: the state cannot be
                    // used, and the log still holds what it was made of.
                    warn!(boundary, error = %e, "the newest checkpoint is of another version of tally; starting from the log");
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(Checkpoint {
            boundary,
            workers: manifest.workers,
            cuts: manifest.cuts,
            groups,
            metrics,
        }))
    }

    /// Writes a worker's part; returns its size.
    pub(super) fn write_part(&self, part: &WorkerPart) -> Result<u64, CheckpointError> {
        let bytes = encode_part(part)?;
        let len = bytes.len() as u64;
        let path = self.dir(part.boundary).join(part_name(part.worker));
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(bytes)))?;
        Ok(len)
    }

    /// Commits a checkpoint by writing its manifest.
    pub(super) fn commit(&self, manifest: &Manifest) -> Result<(), CheckpointError> {
        let bytes = serde_json::to_vec_pretty(manifest)
            .map_err(|e| CheckpointError::Corrupt(MANIFEST.into(), e.to_string()))?;
        let path = self.dir(manifest.boundary).join(MANIFEST);
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(bytes)))?;
        Ok(())
    }

    /// Writes process `process`'s share of checkpoint `boundary`.
    pub(super) fn write_share(
        &self,
        boundary: u64,
        process: usize,
        share: &Share,
    ) -> Result<(), CheckpointError> {
        let bytes = serde_json::to_vec(share)
            .map_err(|e| CheckpointError::Corrupt(share_name(process), e.to_string()))?;
        let path = self.dir(boundary).join(share_name(process));
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(bytes)))?;
        Ok(())
    }

    /// Every process's share of checkpoint `boundary`, or `None` while
    /// some are missing. A share of a format this build does not read is
    /// an error, [`CheckpointError::UnknownFormat`].
    pub(super) fn read_shares(
        &self,
        boundary: u64,
        processes: usize,
    ) -> Result<Option<Vec<Share>>, CheckpointError> {
        self.runtime.block_on(async {
            let mut shares = Vec::with_capacity(processes);
            for process in 0..processes {
                let path = self.dir(boundary).join(share_name(process));
                let bytes = match self.store.get(&path).await {
                    Ok(found) => found.bytes().await?,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                let share: Share = serde_json::from_slice(&bytes)
                    .map_err(|e| CheckpointError::Corrupt(path.to_string(), e.to_string()))?;
                if share.format != FORMAT {
                    return Err(CheckpointError::UnknownFormat {
                        file: path.to_string(),
                        found: share.format,
                        known: FORMAT,
                    });
                }
                shares.push(share);
            }
            Ok(Some(shares))
        })
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
        // What the store does not list goes too: the staging file of a
        // write that a kill cut short.
        if let Some(dir) = &self.local {
            std::fs::remove_dir_all(dir.join(format!("{boundary:020}")))?;
        }
        Ok(())
    }

    /// Deletes everything older than the newest `keep` committed
    /// checkpoints; returns how many checkpoints it deleted.
    pub(super) fn prune(&self, keep: usize) -> Result<usize, CheckpointError> {
        self.runtime.block_on(async {
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
        })
    }
}

/// The file name of worker `worker`'s part.
pub(super) fn part_name(worker: usize) -> String {
    format!("part-{worker:05}.bin")
}

fn share_name(process: usize) -> String {
    format!("process-{process:05}.json")
}

/// A part as it is stored: [`PART_MAGIC`], [`FORMAT`], then the bincode.
fn encode_part(part: &WorkerPart) -> Result<Vec<u8>, CheckpointError> {
    let mut bytes = Vec::with_capacity(64);
    bytes.extend_from_slice(PART_MAGIC);
    bytes.extend_from_slice(&FORMAT.to_le_bytes());
    bincode::serialize_into(&mut bytes, part)
        .map_err(|e| CheckpointError::Corrupt("part".into(), e.to_string()))?;
    Ok(bytes)
}

/// Reads a part stored at `file`, refusing one of another format.
fn decode_part(file: &str, bytes: &[u8]) -> Result<WorkerPart, CheckpointError> {
    let (found, body) = match bytes.split_first_chunk::<8>() {
        Some((header, body)) if header.starts_with(PART_MAGIC) => (
            u32::from_le_bytes([header[4], header[5], header[6], header[7]]),
            body,
        ),
        _ => (0, bytes),
    };
    if found != FORMAT {
        return Err(CheckpointError::UnknownFormat {
            file: file.into(),
            found,
            known: FORMAT,
        });
    }
    bincode::deserialize(body).map_err(|e| CheckpointError::Corrupt(file.into(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::super::sample_part;
    use super::*;

    #[test]
    fn a_part_reads_back_as_it_was_written() {
        let part = sample_part(100, 1);
        let back = decode_part("p", &encode_part(&part).unwrap()).unwrap();
        assert_eq!((back.boundary, back.worker), (100, 1));
        assert_eq!(back.cuts, part.cuts);
        assert_eq!(back.groups[0].group, part.groups[0].group);
    }

    #[test]
    fn a_part_of_an_unknown_format_is_refused_and_not_restored() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(None, dir.path(), &[]).unwrap();
        let part = sample_part(100, 0);
        let bytes = store.write_part(&part).unwrap();
        store
            .commit(&Manifest {
                boundary: 100,
                workers: 1,
                parts: vec![part_name(0)],
                cuts: part.cuts.clone(),
                job: store.job().into(),
                metrics: Vec::new(),
                bytes,
            })
            .unwrap();
        assert_eq!(store.latest().unwrap().unwrap().boundary, 100);

        // The same part, as a later version of tally would number it.
        let mut future = encode_part(&part).unwrap();
        future[4..8].copy_from_slice(&(FORMAT + 1).to_le_bytes());
        match decode_part("p", &future) {
            Err(CheckpointError::UnknownFormat { found, known, .. }) => {
                assert_eq!((found, known), (FORMAT + 1, FORMAT));
            }
            other => panic!("expected an unknown format, got {other:?}"),
        }
        // And as tally wrote parts before they were numbered.
        let unnumbered = bincode::serialize(&part).unwrap();
        assert!(matches!(
            decode_part("p", &unnumbered),
            Err(CheckpointError::UnknownFormat { found: 0, .. })
        ));

        let file = dir.path().join(format!("{:020}", 100)).join(part_name(0));
        std::fs::write(&file, &future).unwrap();
        assert!(
            store.latest().unwrap().is_none(),
            "a checkpoint of an unknown format is not restored"
        );
    }

    #[test]
    fn a_share_of_an_unknown_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(None, dir.path(), &[]).unwrap();
        let share = Share {
            format: FORMAT + 1,
            ..Share::default()
        };
        store.write_share(100, 0, &share).unwrap();
        assert!(matches!(
            store.read_shares(100, 1),
            Err(CheckpointError::UnknownFormat { found, .. }) if found == FORMAT + 1
        ));
        store.write_share(100, 0, &Share::default()).unwrap();
        assert_eq!(store.read_shares(100, 1).unwrap().unwrap().len(), 1);
    }

    /// A process killed while it wrote a part leaves the store's staging
    /// file, which the store does not list; the next start deletes the
    /// unfinished checkpoint all the same.
    #[test]
    fn an_unfinished_checkpoint_is_deleted_with_a_write_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(None, dir.path(), &[]).unwrap();
        store.write_part(&sample_part(300, 0)).unwrap();
        let unfinished = dir.path().join(format!("{:020}", 300));
        std::fs::write(unfinished.join("part-1.bin#1"), b"half a part").unwrap();
        assert_eq!(store.discard_unfinished(200).unwrap(), 1);
        assert!(!unfinished.exists());
    }

    #[test]
    fn an_installed_checkpoint_replaces_those_from_its_boundary_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(None, dir.path(), &[]).unwrap();
        let checkpoint = |boundary, groups| Checkpoint {
            boundary,
            workers: 2,
            cuts: sample_part(boundary, 0).cuts,
            groups,
            metrics: Vec::new(),
        };
        for boundary in [100, 200, 300] {
            store.install(checkpoint(boundary, Vec::new())).unwrap();
        }
        let groups = sample_part(200, 0).groups;
        let count = groups.len();
        store.install(checkpoint(200, groups)).unwrap();
        assert_eq!(store.newest().unwrap(), Some(200));
        let newest = store.latest().unwrap().unwrap();
        assert_eq!((newest.boundary, newest.groups.len()), (200, count));
        assert!(store.at(100).unwrap().is_some());
        store.clear().unwrap();
        assert!(store.latest().unwrap().is_none());
    }
}
