//! Checkpoints in an object store: the local filesystem by default, S3 (or
//! any store `object_store` reads from a URL) by configuration.
//!
//! # What it does
//!
//! At a checkpoint boundary, each worker's window operator hands a copy of
//! its state and its source's offsets, a [`WorkerPart`], to its
//! [`PartSink`]. A [`Committer`] thread per process writes the parts to a
//! [`CheckpointStore`] and commits the checkpoint; on start, the job
//! restores [`CheckpointStore::latest`]. Under the store's prefix, each
//! checkpoint is a directory named by its boundary, zero-padded so names
//! sort as numbers:
//!
//! ```text
//! 00000001767225600000/part-00000.bin     one worker's part
//! 00000001767225600000/part-00001.bin
//! 00000001767225600000/process-00000.json a process's share (cluster only)
//! 00000001767225600000/manifest.json      written last: the commit
//! ```
//!
//! A part is `TLYP`, its format number ([`FORMAT`], a little-endian `u32`)
//! and the bincode of the `WorkerPart`; a share is JSON with a `format`
//! field. Bincode is not self-describing, so a part of another shape could
//! decode into nonsense: the reader refuses a format it does not know, and
//! such a checkpoint is not restored, as one of another configuration of
//! metrics is not.
//!
//! # Guarantee
//!
//! A checkpoint is committed when its manifest exists, and the manifest is
//! written only once every worker's part for that boundary is written and
//! the result store holds every result emitted before the boundary, so a
//! restored job never misses a result it will not emit again: exactly once
//! into the result store. A job of several processes (the cluster) shares
//! one store: each process writes its share once its own parts and results
//! are written, and process 0 writes the manifest when every share is
//! there. Every put is atomic, so a reader never sees half a file, and a
//! directory without a manifest is never read. After each commit, all but
//! the newest `keep` committed checkpoints are deleted, along with any
//! unfinished ones older than them.
//!
//! # Limits
//!
//! - A part is a whole copy of a worker's state, not a difference from the
//!   last one.
//! - Workers never wait for the store. A part sink holds a bounded number of
//!   parts ([`PARTS_IN_FLIGHT_PER_WORKER`] per worker); while the store is
//!   down or slow, a part that finds it full is dropped and counted
//!   ([`CheckpointStats::parts_dropped`]), and its checkpoint is never
//!   committed. The next boundary whose parts all arrive commits as usual,
//!   so an outage costs checkpoints, never correctness.
//! - Process 0 waits for the other processes' shares of at most a few
//!   boundaries at once; an older one still missing a share is given up.
//! - One thread per process writes parts one after another.

mod committer;
mod store;

pub use committer::{CheckpointStats, Committer, Members, PartSink, PARTS_IN_FLIGHT_PER_WORKER};
pub use store::{Checkpoint, CheckpointError, CheckpointStore, FORMAT};

#[cfg(test)]
use tally_dataflow::checkpoint::WorkerPart;

/// A part of worker `worker` of two at `boundary`, with one group, for
/// the tests of both the store and the committer.
#[cfg(test)]
fn sample_part(boundary: u64, worker: usize) -> WorkerPart {
    use std::sync::Arc;
    use tally_dataflow::aggregate::AggState;
    use tally_dataflow::checkpoint::{GroupSnapshot, PartitionCut};
    WorkerPart {
        boundary,
        worker,
        workers: 2,
        cuts: vec![PartitionCut {
            partition: worker as u32,
            next_offset: boundary / 10,
            watermark: Some(boundary),
            dedupe_from: Some(boundary / 20),
        }],
        groups: vec![GroupSnapshot {
            metric: 0,
            group: vec![format!("w{worker}")].into(),
            hash: worker as u64,
            panes: vec![(
                boundary as i64,
                Arc::new(AggState::from_parts(3, 1.5, None)),
            )],
            open: vec![(0, boundary as i64 + 10)],
            closed: vec![(0, boundary as i64, 1)],
        }],
    }
}
