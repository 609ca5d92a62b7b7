//! [`EventLog`]: the handle to an open log.

use std::fs;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::Sender;
use tally_dataflow::config::{Fsync, LogConfig};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{error, info};

use super::reader::PartitionReader;
use super::segment;
use super::state::{lock, Shared};
use super::writer::{AppendRequest, Command, Writer};
use super::{format, LogError};

/// How many appends may wait for the writer at once. Further appends wait
/// (asynchronously) for a slot, which is the log's backpressure.
const MAX_QUEUED_APPENDS: usize = 4096;

/// Rejects values the log cannot work with. The configuration reader
/// refuses them already, but the fields are public, so a config built in
/// code reaches the log without passing through it.
fn validate(config: &LogConfig) -> Result<(), LogError> {
    if config.partitions == 0 {
        return Err(LogError::InvalidConfig("partitions must be at least 1"));
    }
    if config.segment_bytes == 0 {
        return Err(LogError::InvalidConfig("segment_bytes must be at least 1"));
    }
    if config.fsync == Fsync::Interval(Duration::ZERO) {
        return Err(LogError::InvalidConfig(
            "the fsync interval must not be zero",
        ));
    }
    Ok(())
}

/// A handle to an open event log. Clones share the same log.
///
/// The writer thread stops when [`EventLog::close`] is called or the last
/// clone is dropped, after syncing everything written. Both block until
/// then, so call them from a thread that may block.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

/// What the clones of an [`EventLog`] share.
struct Inner {
    shared: Arc<Shared>,
    commands: Sender<Command>,
    /// Slots of the append queue.
    slots: Arc<Semaphore>,
    /// The writer thread, until it is stopped.
    writer: Mutex<Option<JoinHandle<Result<(), LogError>>>>,
    retention_ms: i64,
}

impl EventLog {
    /// Opens the log in `dir`, laid out and synced as `config` says,
    /// creating it if needed, and starts its writer thread. Recovery cuts
    /// torn or corrupt tails off each partition's last segment (with a
    /// warning) and finds every partition's next offset.
    pub fn open(dir: &Path, config: &LogConfig) -> Result<EventLog, LogError> {
        validate(config)?;
        fs::create_dir_all(dir)?;
        let found = segment::count_partitions(dir)?;
        if found != 0 && found != config.partitions {
            return Err(LogError::PartitionCountMismatch {
                found,
                configured: config.partitions,
            });
        }

        let mut states = Vec::with_capacity(config.partitions as usize);
        let mut active = Vec::with_capacity(config.partitions as usize);
        for partition in 0..config.partitions {
            let (state, segment) = segment::recover(dir, partition)?;
            states.push(state);
            active.push((partition, segment));
        }
        if found == 0 {
            segment::sync_dir(dir)?;
        }

        let shared = Arc::new(Shared::new(dir.to_owned(), states));
        let (commands, receiver) = crossbeam_channel::unbounded();
        let writer = Writer::new(
            Arc::clone(&shared),
            receiver,
            config.fsync,
            config.segment_bytes,
            active,
        );
        let writer = thread::Builder::new()
            .name("tally-log-writer".into())
            .spawn(move || writer.run())?;
        info!(dir = %dir.display(), partitions = config.partitions, "opened event log");

        let inner = Inner {
            shared,
            commands,
            slots: Arc::new(Semaphore::new(MAX_QUEUED_APPENDS)),
            writer: Mutex::new(Some(writer)),
            // Retention that does not fit in milliseconds is as good as forever.
            retention_ms: i64::try_from(config.retention.as_millis()).unwrap_or(i64::MAX),
        };
        Ok(EventLog {
            inner: Arc::new(inner),
        })
    }

    /// The number of partitions.
    pub fn partitions(&self) -> u32 {
        self.inner.shared.partition_count()
    }

    /// Appends `records` as one batch to `partition`; resolves with the
    /// batch's base offset once it is durable per the fsync policy. The
    /// batch is all-or-nothing for readers. The disk work runs on the writer
    /// thread, never on the caller's.
    ///
    /// On error the batch may or may not be in the log.
    pub fn append(
        &self,
        partition: u32,
        records: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<u64, LogError>> + Send + 'static {
        let all = self.append_all(vec![(partition, records)]);
        async move { Ok(all.await?[0]) }
    }

    /// Appends a batch to each of several partitions, committed together;
    /// resolves with their base offsets, in order, once all are durable
    /// per the fsync policy. Each batch is all-or-nothing for readers.
    ///
    /// On error each batch may or may not be in the log.
    pub fn append_all(
        &self,
        batches: Vec<(u32, Vec<Vec<u8>>)>,
    ) -> impl Future<Output = Result<Vec<u64>, LogError>> + Send + 'static {
        let inner = Arc::clone(&self.inner);
        async move {
            for (partition, records) in &batches {
                inner.check_append(*partition, records)?;
            }
            let permit = Arc::clone(&inner.slots)
                .acquire_owned()
                .await
                .map_err(|_| LogError::Closed)?;
            let result = inner.send(batches, permit)?;
            // The writer drops the sender without answering only if it stopped.
            result.await.map_err(|_| LogError::Closed)?
        }
    }

    /// Queues `records` as one batch to `partition` without waiting for it,
    /// for records that may be lost, such as a watermark mark. Returns
    /// whether it was queued: not when the writer's queue is full or the
    /// log is closed.
    pub fn append_detached(&self, partition: u32, records: Vec<Vec<u8>>) -> bool {
        let inner = &self.inner;
        if inner.check_append(partition, &records).is_err() {
            return false;
        }
        let Ok(permit) = Arc::clone(&inner.slots).try_acquire_owned() else {
            return false;
        };
        // Nobody waits for the answer; the writer drops it.
        inner.send(vec![(partition, records)], permit).is_ok()
    }

    /// The next offset of each partition: one past its last acknowledged record.
    pub fn next_offsets(&self) -> Vec<u64> {
        self.inner.shared.for_each(|_, state| state.next_offset)
    }

    /// The bytes of acknowledged batches in all retained segments.
    pub fn size_bytes(&self) -> u64 {
        self.inner
            .shared
            .for_each(|_, state| {
                state
                    .segments
                    .values()
                    .map(|segment| segment.len)
                    .sum::<u64>()
            })
            .into_iter()
            .sum()
    }

    /// Deletes the segments whose newest append is older than the retention
    /// at `now_ms` (Unix milliseconds), and returns how many. Only the oldest
    /// segments of a partition are deleted, so a partition stays one
    /// contiguous range of offsets, and its newest segment is always kept.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<usize, LogError> {
        let cutoff = now_ms.saturating_sub(self.inner.retention_ms);
        let dir = &self.inner.shared.dir;
        let deleted = self.inner.shared.for_each(|partition, state| {
            let mut deleted = 0;
            while let Some((&base, oldest)) = state.segments.first_key_value() {
                if state.segments.len() == 1 || oldest.newest_append_ms >= cutoff {
                    break;
                }
                match fs::remove_file(segment::segment_path(dir, partition, base)) {
                    Ok(()) => {}
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(error),
                }
                state.segments.remove(&base);
                info!(partition, segment = base, "deleted segment past retention");
                deleted += 1;
            }
            Ok(deleted)
        });
        deleted
            .into_iter()
            .try_fold(0, |sum, deleted| Ok(sum + deleted?))
    }

    /// A reader of `partition` starting at the batch that holds
    /// `from_offset`. That batch is returned whole, so the caller skips its
    /// records below `from_offset`. An offset below the oldest retained one
    /// starts at the oldest, with a warning; one past the partition's next
    /// offset is an error.
    pub fn reader(&self, partition: u32, from_offset: u64) -> Result<PartitionReader, LogError> {
        PartitionReader::open(Arc::clone(&self.inner.shared), partition, from_offset)
    }

    /// Blocks the calling thread until any append completes or `timeout`
    /// passes. An append completing just before the call is not seen, so
    /// pollers should use a short timeout. Not for async tasks.
    pub fn wait_for_append(&self, timeout: Duration) {
        self.inner.shared.wait_for_append(timeout);
    }

    /// Stops the writer after the appends already queued, syncs everything
    /// written and returns the result of that sync. Later appends through
    /// other clones fail with [`LogError::Closed`].
    pub fn close(self) -> Result<(), LogError> {
        self.inner.shutdown()
    }
}

impl Inner {
    /// Rejects an append before it is queued.
    fn check_append(&self, partition: u32, records: &[Vec<u8>]) -> Result<(), LogError> {
        if partition >= self.shared.partition_count() {
            return Err(LogError::PartitionOutOfRange(partition));
        }
        if records.is_empty() {
            return Err(LogError::EmptyBatch);
        }
        if format::batch_len(records).is_none() {
            let bytes = records
                .iter()
                .map(|record| record.len().saturating_add(4))
                .fold(0, usize::saturating_add);
            return Err(LogError::BatchTooLarge { bytes });
        }
        Ok(())
    }

    /// Hands checked batches, holding a slot of the queue, to the writer;
    /// the receiver gets their offsets once they are durable.
    fn send(
        &self,
        batches: Vec<(u32, Vec<Vec<u8>>)>,
        permit: OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Result<Vec<u64>, LogError>>, LogError> {
        let (done, result) = oneshot::channel();
        let request = AppendRequest {
            batches,
            done,
            _permit: permit,
        };
        self.commands
            .send(Command::Append(request))
            .map_err(|_| LogError::Closed)?;
        Ok(result)
    }

    /// Stops the writer thread, if it runs, and waits for its final sync.
    fn shutdown(&self) -> Result<(), LogError> {
        let Some(writer) = lock(&self.writer).take() else {
            return Ok(());
        };
        self.slots.close();
        // Sending fails only if the writer has already stopped.
        let _ = self.commands.send(Command::Shutdown);
        writer.join().unwrap_or_else(|_| {
            error!("the event log writer thread panicked");
            Err(LogError::Closed)
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            error!(%error, "closing the event log failed");
        }
    }
}
