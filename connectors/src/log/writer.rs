//! The writer thread: the only code that writes segments.
//!
//! It drains every waiting append into a group, writes the group, syncs each
//! touched file once (with [`Fsync::Always`]), publishes the new extent
//! to the shared index and only then completes the appends. An append may
//! hold a batch for each of several partitions, which are written in the
//! same group. A batch is
//! written at the partition's known end with a positioned write, so a failed
//! write leaves nothing behind that the next one does not overwrite.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tally_dataflow::config::Fsync;
use tally_dataflow::time::now_ms;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tracing::{debug, error};

use super::format;
use super::segment::{self, Active};
use super::state::{PartitionState, SegmentInfo, Shared};
use super::LogError;

/// The most appends committed as one group, which bounds the latency a
/// group adds to its first append.
const MAX_GROUP: usize = 1024;

/// A message to the writer thread.
pub(super) enum Command {
    /// Append one batch.
    Append(AppendRequest),
    /// Finish the current group, sync everything and stop.
    Shutdown,
}

/// One append waiting for the writer.
pub(super) struct AppendRequest {
    /// A batch per partition, each partition already checked to be in
    /// range and each batch to fit.
    pub batches: Vec<(u32, Vec<Vec<u8>>)>,
    /// Where the base offsets, or the first error, go.
    pub done: oneshot::Sender<Result<Vec<u64>, LogError>>,
    /// A slot of the bounded queue, freed when the request is dropped.
    pub _permit: OwnedSemaphorePermit,
}

/// The write side of one partition.
struct PartitionWriter {
    partition: u32,
    /// The active segment.
    file: File,
    /// The active segment's base offset.
    base: u64,
    /// Bytes written to the active segment, acknowledged or not.
    len: u64,
    /// The offset the next batch gets.
    next_offset: u64,
    /// Whether the active segment has writes that are not synced.
    dirty: bool,
    /// Whether a sync failed, which stops all further appends.
    failed: bool,
}

/// The records of a group for one partition, and whose they are: per
/// append, (its place in the group, its batch's place in it, where its
/// records start in these).
struct Merged {
    partition: u32,
    /// The encoded size of the batch.
    len: usize,
    records: Vec<Vec<u8>>,
    shares: Vec<(usize, usize, u64)>,
}

/// A batch that is written but not yet acknowledged.
struct Written {
    partition: u32,
    segment: u64,
    /// The end of the batch in its segment.
    end_pos: u64,
    base_offset: u64,
    end_offset: u64,
    append_time_ms: i64,
}

/// The writer thread's state.
pub(super) struct Writer {
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    fsync: Fsync,
    segment_bytes: u64,
    partitions: Vec<PartitionWriter>,
    /// Scratch space for encoding, reused across batches.
    buf: Vec<u8>,
}

impl Writer {
    /// A writer over the active segments of the partitions, in partition order.
    pub fn new(
        shared: Arc<Shared>,
        commands: Receiver<Command>,
        fsync: Fsync,
        segment_bytes: u64,
        active: Vec<(u32, Active)>,
    ) -> Self {
        let partitions = active
            .into_iter()
            .map(|(partition, active)| PartitionWriter::new(partition, active))
            .collect();
        Self {
            shared,
            commands,
            fsync,
            segment_bytes,
            partitions,
            buf: Vec::new(),
        }
    }

    /// Runs until shut down or until every sender is gone, then syncs all
    /// partitions. Returns the result of that last sync.
    pub fn run(mut self) -> Result<(), LogError> {
        let interval = match self.fsync {
            Fsync::Interval(interval) => Some(interval),
            Fsync::Always | Fsync::Never => None,
        };
        let mut next_sync = interval.map(|interval| Instant::now() + interval);
        loop {
            let received = match next_sync {
                Some(deadline) => self.commands.recv_deadline(deadline),
                None => self
                    .commands
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(Command::Append(first)) => {
                    let (group, shutdown) = self.gather(first);
                    self.commit(group);
                    if shutdown {
                        break;
                    }
                }
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if let (Some(deadline), Some(interval)) = (next_sync, interval) {
                if Instant::now() >= deadline {
                    self.sync_dirty();
                    next_sync = Some(Instant::now() + interval);
                }
            }
        }
        self.flush()
    }

    /// Collects `first` and every append already waiting, up to
    /// [`MAX_GROUP`]. Also says whether a shutdown was among them.
    fn gather(&self, first: AppendRequest) -> (Vec<AppendRequest>, bool) {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match self.commands.try_recv() {
                Ok(Command::Append(request)) => group.push(request),
                Ok(Command::Shutdown) => return (group, true),
                Err(_) => break,
            }
        }
        (group, false)
    }

    /// Writes a group, makes it durable per the policy, publishes it and
    /// completes its appends.
    ///
    /// The group's records for a partition go in one batch, in the order
    /// of its appends, as long as they fit one: committed together, they
    /// are read together, and a source folds a larger batch better.
    fn commit(&mut self, group: Vec<AppendRequest>) {
        let mut appends = Vec::with_capacity(group.len());
        let mut merged: Vec<Merged> = Vec::new();
        for (index, request) in group.into_iter().enumerate() {
            let AppendRequest {
                batches,
                done,
                _permit,
            } = request;
            appends.push((vec![None; batches.len()], None, done, _permit));
            for (slot, (partition, records)) in batches.into_iter().enumerate() {
                // Checked to fit on its own when it was sent.
                let len = format::batch_len(&records).unwrap_or(usize::MAX);
                let open = merged.iter().rposition(|m| m.partition == partition);
                let joined =
                    open.and_then(|at| Some((at, format::merged_len(merged[at].len, len)?)));
                let at = match joined {
                    Some((at, len)) => {
                        merged[at].len = len;
                        at
                    }
                    None => {
                        merged.push(Merged {
                            partition,
                            len,
                            records: Vec::new(),
                            shares: Vec::new(),
                        });
                        merged.len() - 1
                    }
                };
                let m = &mut merged[at];
                m.shares.push((index, slot, m.records.len() as u64));
                m.records.extend(records);
            }
        }
        let mut written = Vec::with_capacity(merged.len());
        for m in merged {
            match self.write(m.partition, &m.records) {
                Ok(batch) => written.push((batch, m.shares)),
                Err(error) => {
                    for &(index, ..) in &m.shares {
                        let failure = &mut appends[index].1;
                        *failure = failure.take().or(Some(error.again()));
                    }
                }
            }
        }
        if self.fsync == Fsync::Always {
            self.sync_dirty();
        }
        for (batch, shares) in &written {
            let failed = self.partitions[batch.partition as usize].failed;
            if !failed {
                self.publish(batch);
            }
            for &(index, slot, at) in shares {
                let (offsets, failure, ..) = &mut appends[index];
                if failed {
                    *failure = failure.take().or(Some(LogError::PartitionFailed {
                        partition: batch.partition,
                    }));
                } else {
                    offsets[slot] = Some(batch.base_offset + at);
                }
            }
        }
        // Publish before completing, so a caller can read what it appended.
        self.shared.notify_appended();
        for (offsets, failure, done, _permit) in appends {
            let result = match failure {
                Some(error) => Err(error),
                None => Ok(offsets.into_iter().flatten().collect()),
            };
            // The caller may have stopped waiting; the batch stays either way.
            let _ = done.send(result);
        }
    }

    /// Writes one batch at the end of its partition, rolling to a new
    /// segment first if the batch would not fit.
    fn write(&mut self, partition: u32, records: &[Vec<u8>]) -> Result<Written, LogError> {
        let writer = &mut self.partitions[partition as usize];
        if writer.failed {
            return Err(LogError::PartitionFailed { partition });
        }
        // The roll below keeps the next offset, so the batch can be encoded
        // first and its size decide the roll.
        let append_time_ms = now_ms();
        format::encode(&mut self.buf, writer.next_offset, append_time_ms, records);
        if writer.len > 0 && writer.len + self.buf.len() as u64 > self.segment_bytes {
            writer.roll(&self.shared.dir, self.fsync)?;
        }
        writer.file.seek(SeekFrom::Start(writer.len))?;
        writer.file.write_all(&self.buf)?;
        writer.dirty = true;

        let base_offset = writer.next_offset;
        writer.len += self.buf.len() as u64;
        writer.next_offset += records.len() as u64;
        Ok(Written {
            partition,
            segment: writer.base,
            end_pos: writer.len,
            base_offset,
            end_offset: writer.next_offset,
            append_time_ms,
        })
    }

    /// Makes a written batch visible to readers and to `next_offsets`.
    fn publish(&self, batch: &Written) {
        // The partition was range-checked before the request was sent.
        let Ok(mut state) = self.shared.partition(batch.partition) else {
            return;
        };
        let PartitionState {
            segments,
            next_offset,
        } = &mut *state;
        let segment = segments.entry(batch.segment).or_insert(SegmentInfo {
            len: 0,
            newest_append_ms: batch.append_time_ms,
        });
        segment.len = batch.end_pos;
        segment.newest_append_ms = segment.newest_append_ms.max(batch.append_time_ms);
        *next_offset = batch.end_offset;
    }

    /// Syncs every partition with unsynced writes. A group usually touches
    /// several (events with ids go to their ids' partitions), so every
    /// file's writeback is started first and then each is waited for: the
    /// writes go to the disk together, not one file after another.
    fn sync_dirty(&mut self) {
        let dirty = || self.partitions.iter().filter(|writer| writer.dirty);
        if dirty().nth(1).is_some() {
            for writer in dirty() {
                start_writeback(&writer.file);
            }
        }
        for writer in self.partitions.iter_mut().filter(|writer| writer.dirty) {
            // A failure is logged and marks the partition; the appends of
            // the current group see that mark.
            let _ = writer.sync();
        }
    }

    /// Syncs every partition on the way out, returning the first failure.
    fn flush(mut self) -> Result<(), LogError> {
        let mut result = Ok(());
        for writer in self.partitions.iter_mut().filter(|writer| writer.dirty) {
            if let Err(error) = writer.sync() {
                result = result.and(Err(error));
            }
        }
        result
    }
}

impl PartitionWriter {
    /// The write side of a recovered partition.
    fn new(partition: u32, active: Active) -> Self {
        let Active {
            file,
            base,
            len,
            next_offset,
        } = active;
        Self {
            partition,
            file,
            base,
            len,
            next_offset,
            dirty: false,
            failed: false,
        }
    }

    /// Syncs the active segment. A failure marks the partition failed: after
    /// a failed `fdatasync` the kernel may have dropped the dirty pages, so a
    /// later sync succeeding would prove nothing.
    fn sync(&mut self) -> Result<(), LogError> {
        match self.file.sync_data() {
            Ok(()) => {
                self.dirty = false;
                Ok(())
            }
            Err(error) => {
                self.failed = true;
                error!(partition = self.partition, segment = self.base, %error, "fdatasync failed; the partition takes no more appends");
                Err(error.into())
            }
        }
    }

    /// Closes the active segment and starts a new one at the next offset.
    ///
    /// The old segment is trimmed to its batches first: a failed write may
    /// have left bytes past them, which recovery would only cut from the
    /// last segment. It is then synced unless the policy is
    /// [`Fsync::Never`], since the writer keeps no handle to it.
    fn roll(&mut self, dir: &Path, fsync: Fsync) -> Result<(), LogError> {
        self.file.set_len(self.len)?;
        if fsync != Fsync::Never {
            self.sync()?;
        }
        self.file = segment::create_segment(dir, self.partition, self.next_offset)?;
        self.base = self.next_offset;
        self.len = 0;
        self.dirty = false;
        debug!(
            partition = self.partition,
            segment = self.base,
            "rolled to a new segment"
        );
        Ok(())
    }
}

/// Starts writing `file`'s dirty pages to the disk without waiting for
/// them (`sync_file_range`); the `fdatasync` after it waits. A hint only:
/// durability is the sync's, so a failure here changes nothing.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the whole call, which writes no
    // memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}
