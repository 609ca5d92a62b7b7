//! The seam between the dataflow and the outside world: what a source gives
//! it, what a sink takes from it, and where checkpoint parts go.
//!
//! Nothing here blocks. A source's I/O runs elsewhere, behind a bounded
//! buffer, and `poll` takes what is there; a sink takes what it can, and
//! what it leaves raises [`Backpressure`], which stops every source of the
//! process until the sink has caught up. The implementations live in
//! `tally-connectors`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::checkpoint::WorkerPart;
use crate::time::Millis;

/// Records read from one partition of the log, in order.
///
/// A record is addressed by `(offset, index)`. In a log that gives every
/// record an offset of its own (the embedded log), the records of a batch
/// have the offsets `offset..next_offset` and index 0. In one whose batch is
/// a single message (Kafka), they share the message's offset, and the index
/// is their place in it.
#[derive(Clone, Debug)]
pub struct SourceBatch {
    /// The partition read.
    pub partition: u32,
    /// Log offset of the first record.
    pub offset: u64,
    /// Where the partition continues after this batch.
    pub next_offset: u64,
    /// Events in canonical JSON, as the gateway wrote them.
    pub records: Vec<Vec<u8>>,
    /// When the log took the batch, in Unix milliseconds, if it records
    /// that. No event of the batch moves the watermark past this time.
    pub appended_at: Option<Millis>,
}

impl SourceBatch {
    /// The address of the `i`th record.
    pub fn address(&self, i: usize) -> (u64, u32) {
        if self.next_offset - self.offset == self.records.len() as u64 {
            (self.offset + i as u64, 0)
        } else {
            (self.offset, i as u32)
        }
    }
}

/// What a [`BatchSource`] has now.
pub enum Poll {
    /// Batches, in log order per partition.
    Ready(Vec<SourceBatch>),
    /// Batches, as `Ready`, and more are waiting: the poll took its fill
    /// ([`POLL_RECORDS`]) and the source has called its waker. The source
    /// operator goes on folding the next poll's batches with these.
    Behind(Vec<SourceBatch>),
    /// Nothing yet; the source will call its waker when there is.
    Pending,
    /// The input has ended: only bounded inputs, as in tests, say this.
    Finished,
}

/// Wakes a source operator from any thread.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// The records one [`BatchSource::poll`] takes at most, unless its first
/// batch alone holds more. It bounds the source operator's work in one
/// activation, so the operators after it run between its polls, and a
/// backlog enters the dataflow as fast as they take it, never all at once.
pub const POLL_RECORDS: usize = 16_384;

/// A worker's view of the log: the partitions it owns.
///
/// Implementations never block in `poll` or `mark`: I/O happens elsewhere,
/// behind a bounded buffer, and `poll` takes what is there, up to
/// [`POLL_RECORDS`]; if it leaves some, it calls the waker and says so
/// ([`Poll::Behind`]).
pub trait BatchSource: 'static {
    /// The partitions this source reads.
    fn partitions(&self) -> Vec<u32>;
    /// Called once, before the first poll, with a waker to call when data arrives.
    fn start(&mut self, waker: Waker);
    /// Takes the batches available now.
    fn poll(&mut self) -> Poll;
    /// Appends a [mark](crate::event::record::mark) to `partition`, which raises its
    /// watermark to `watermark` when it is read: how the source records a
    /// decision it takes by the wall clock, so that a replay takes the same
    /// one. It need not succeed; the source asks again if it is not read.
    fn mark(&mut self, partition: u32, watermark: Millis);
}

/// Where a stream's records leave the dataflow.
pub trait Sink<T>: 'static {
    /// Takes records from the front of `items`, as many as it can without
    /// blocking. What it leaves is offered again later, in order.
    fn offer(&mut self, items: &mut Vec<T>);

    /// Says that every record before `frontier` has been offered and taken.
    /// A durable sink reports, once those records are durable, that it holds
    /// everything before `frontier`; checkpoints wait for that. Returns
    /// false if it cannot take the note now; it is given again later.
    fn advance(&mut self, _frontier: u64) -> bool {
        true
    }
}

/// No sink: takes everything and keeps nothing, for a job that has no
/// use for one of its outputs.
impl<T, S: Sink<T>> Sink<T> for Option<S> {
    fn offer(&mut self, items: &mut Vec<T>) {
        match self {
            Some(sink) => sink.offer(items),
            None => items.clear(),
        }
    }

    fn advance(&mut self, frontier: u64) -> bool {
        self.as_mut().is_none_or(|sink| sink.advance(frontier))
    }
}

/// The number of sinks that are behind, shared by every worker of a process,
/// and whether another process of the job has sinks behind.
#[derive(Clone, Default)]
pub struct Backpressure {
    local: Arc<AtomicUsize>,
    remote: Arc<AtomicBool>,
}

impl Backpressure {
    /// True while any sink of the job is behind, here or, as far as this
    /// process has heard, in another process.
    pub fn stalled(&self) -> bool {
        self.stalled_here() || self.remote.load(Ordering::Relaxed)
    }

    /// True while any sink of this process is behind.
    pub fn stalled_here(&self) -> bool {
        self.local.load(Ordering::Relaxed) > 0
    }

    /// Records whether another process has said its sinks are behind.
    pub fn set_remote(&self, stalled: bool) {
        self.remote.store(stalled, Ordering::Relaxed);
    }

    pub(crate) fn set(&self, behind: bool, was_behind: &mut bool) {
        if behind != *was_behind {
            if behind {
                self.local.fetch_add(1, Ordering::Relaxed);
            } else {
                self.local.fetch_sub(1, Ordering::Relaxed);
            }
            *was_behind = behind;
        }
    }
}

/// Where a worker's checkpoint parts go.
pub trait CheckpointSink: 'static {
    /// Hands over a part. It must not block the worker.
    fn submit(&mut self, part: WorkerPart);
}
