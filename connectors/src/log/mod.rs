//! The embedded event log: a durable, partitioned, append-only log on local
//! disk, in the spirit of a single Kafka broker.
//!
//! # What it does
//!
//! An [`EventLog`] is a directory holding a fixed number of partitions,
//! `<dir>/<partition>/`. Each partition is a sequence of segment files named
//! by the offset of their first record, `00000000000000000000.log`, and a new
//! segment is started once the active one would grow past the configured
//! `segment_bytes`. Offsets count records, start at 0 in every
//! partition and never repeat.
//!
//! One call to [`EventLog::append`] writes one record batch to one partition.
//! The batch is all-or-nothing: a reader sees every record of it or none. All
//! appends go over a channel to a single writer thread, which takes every
//! request that is waiting, writes them, syncs each file it touched once
//! (group commit), and only then completes them. Callers on a tokio runtime
//! therefore never block on disk I/O.
//!
//! A [`PartitionReader`] follows one partition from an offset. It only ever
//! sees batches whose append has completed, so it never reads data that a
//! crash could still take back.
//!
//! # On disk
//!
//! A batch is written as (integers little-endian):
//!
//! ```text
//! [magic u8 = 1][len u32][crc32 u32][base_offset u64][append_time_ms i64][count u32]
//! count × [len u32][bytes]
//! ```
//!
//! `len` counts the bytes after the CRC, and the CRC (CRC-32, as in `crc32fast`)
//! covers exactly those bytes.
//!
//! # Durability
//!
//! The log takes the `[log]` section of the configuration as it is,
//! [`LogConfig`](tally_dataflow::config::LogConfig), and [`Fsync`](tally_dataflow::config::Fsync) says how
//! hard it syncs; its variants say what each survives. With `Always` (the
//! default) an append resolves only after `fdatasync` of its segment. With
//! `Interval` and `Never` an append resolves once the batch is in the page
//! cache: it survives a crash of the process, but not always one of the
//! machine.
//!
//! On open, the last segment of every partition is scanned, and a torn or
//! corrupt tail (a short batch, a bad magic byte, a bad CRC, a length past
//! the end of the file) is cut off with a warning. With `Always`, only
//! unacknowledged appends can be torn, so nothing acknowledged is lost.
//!
//! An error from `append` means the batch may or may not be in the log: the
//! caller should retry, and the log is therefore at-least-once for a caller
//! that retries. If an `fdatasync` fails, the kernel may already have dropped
//! the unsynced pages, so that partition refuses further appends until the
//! log is reopened ([`LogError::PartitionFailed`]).
//!
//! # Limits
//!
//! - One writer thread serves all partitions: it is built for one disk.
//! - There is no offset index. Opening a reader in the middle of a segment
//!   scans that segment's batch headers from its start.
//! - A reader positioned inside a batch starts at that whole batch; callers
//!   skip the records below the offset they asked for.
//! - Only the last segment of each partition is checked on open. Older
//!   segments were synced when they were rolled and are trusted; corruption
//!   in them surfaces as [`LogError::Corrupt`] when they are read.
//! - The newest append time of a sealed segment found on open is taken from
//!   the file's modification time, which is what retention compares.
//! - The number of partitions is fixed when the log is created.

mod dump;
mod error;
mod event_log;
mod format;
mod reader;
mod segment;
mod source;
mod state;
mod writer;

#[cfg(test)]
mod tests;

pub use dump::{partitions_in, read_files};
pub use error::LogError;
pub use event_log::EventLog;
pub use reader::{PartitionReader, RecordBatch};
pub use source::LogSource;
