//! Segment files: their names, and recovering a partition's tail on open.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use tracing::warn;

use super::format::{self, DecodeError};
use super::state::{PartitionState, SegmentInfo};
use super::LogError;

/// The suffix of segment files.
const SUFFIX: &str = ".log";

/// The directory of `partition` in the log at `dir`.
pub(super) fn partition_dir(dir: &Path, partition: u32) -> PathBuf {
    dir.join(partition.to_string())
}

/// The file of the segment starting at `base_offset` in `partition`.
pub(super) fn segment_path(dir: &Path, partition: u32, base_offset: u64) -> PathBuf {
    partition_dir(dir, partition).join(format!("{base_offset:020}{SUFFIX}"))
}

/// Counts the partition directories (named by a number) in `dir`.
pub(super) fn count_partitions(dir: &Path) -> io::Result<u32> {
    let mut count = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let numbered = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.parse::<u32>().is_ok());
        if numbered && entry.file_type()?.is_dir() {
            count += 1;
        }
    }
    Ok(count)
}

/// Creates an empty segment, replacing any file of that name, and makes its
/// directory entry durable.
pub(super) fn create_segment(dir: &Path, partition: u32, base_offset: u64) -> io::Result<File> {
    // Truncating is safe: a segment is only created at the partition's next
    // offset, so a file already there holds no acknowledged batch (it can
    // only be left over from a roll whose first write failed).
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(segment_path(dir, partition, base_offset))?;
    sync_dir(&partition_dir(dir, partition))?;
    Ok(file)
}

/// Syncs a directory, so the entries created in it survive a crash.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The last segment of a partition, open for writing.
pub(super) struct Active {
    /// The open file.
    pub file: File,
    /// Its base offset.
    pub base: u64,
    /// Its length, all of it valid batches.
    pub len: u64,
    /// The offset after its last batch.
    pub next_offset: u64,
}

/// Opens one partition: lists its segments, cuts a torn or corrupt tail off
/// its last segment, and creates the first segment of a new partition.
/// Returns what readers may see (all of it, since everything left is valid)
/// and the last segment.
pub(super) fn recover(dir: &Path, partition: u32) -> Result<(PartitionState, Active), LogError> {
    fs::create_dir_all(partition_dir(dir, partition))?;
    let bases = list_segments(&partition_dir(dir, partition))?;
    let Some((&active_base, sealed)) = bases.split_last() else {
        let file = create_segment(dir, partition, 0)?;
        let segments = BTreeMap::from([(
            0,
            SegmentInfo {
                len: 0,
                newest_append_ms: 0,
            },
        )]);
        let state = PartitionState {
            segments,
            next_offset: 0,
        };
        return Ok((
            state,
            Active {
                file,
                base: 0,
                len: 0,
                next_offset: 0,
            },
        ));
    };

    let mut segments = BTreeMap::new();
    for &base in sealed {
        let metadata = fs::metadata(segment_path(dir, partition, base))?;
        let info = SegmentInfo {
            len: metadata.len(),
            newest_append_ms: modified_ms(&metadata),
        };
        segments.insert(base, info);
    }

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment_path(dir, partition, active_base))?;
    let tail = repair_tail(partition, active_base, &file)?;
    segments.insert(active_base, tail.info);
    let state = PartitionState {
        segments,
        next_offset: tail.next_offset,
    };
    let active = Active {
        file,
        base: active_base,
        len: tail.info.len,
        next_offset: tail.next_offset,
    };
    Ok((state, active))
}

/// The base offsets of the segments in a partition directory, ascending.
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let base = name
            .to_str()
            .and_then(|name| name.strip_suffix(SUFFIX))
            .filter(|digits| digits.len() == 20)
            .and_then(|digits| digits.parse::<u64>().ok());
        match base {
            Some(base) => bases.push(base),
            None => {
                warn!(dir = %dir.display(), file = ?name, "ignoring a file that is not a segment")
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// What the valid part of the last segment holds.
struct Tail {
    info: SegmentInfo,
    next_offset: u64,
}

/// Scans a segment from its start, cuts it after the last valid batch, and
/// syncs the cut so it is not redone differently after another crash.
fn repair_tail(partition: u32, base: u64, file: &File) -> Result<Tail, LogError> {
    let metadata = file.metadata()?;
    let file_len = metadata.len();
    let mut reader = BufReader::new(file);
    let mut valid_len = 0;
    let mut next_offset = base;
    let mut newest_append_ms = modified_ms(&metadata);
    let mut reason = None;

    while valid_len < file_len {
        match format::read_batch(&mut reader, file_len - valid_len) {
            Ok((header, _)) if header.base_offset == next_offset => {
                valid_len += header.batch_len();
                next_offset = header.end_offset();
                newest_append_ms = header.append_time_ms;
            }
            Ok(_) => {
                reason = Some("unexpected base offset");
                break;
            }
            Err(DecodeError::Invalid(invalid)) => {
                reason = Some(invalid);
                break;
            }
            Err(DecodeError::Io(error)) => return Err(error.into()),
        }
    }

    if let Some(reason) = reason {
        let cut_bytes = file_len - valid_len;
        warn!(
            partition,
            segment = base,
            offset = next_offset,
            cut_bytes,
            reason,
            "cut torn tail"
        );
        file.set_len(valid_len)?;
        file.sync_all()?;
    }
    let info = SegmentInfo {
        len: valid_len,
        newest_append_ms,
    };
    Ok(Tail { info, next_offset })
}

/// A file's modification time in Unix milliseconds, or 0 if unknown.
fn modified_ms(metadata: &fs::Metadata) -> i64 {
    metadata
        .modified()
        .ok()
        .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |age| i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
}
