//! Reading a log's files as they are, without opening the log: for
//! `tally log dump`, which may run beside the `tally run` that writes them.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use super::format::{self, DecodeError};
use super::segment;
use super::{LogError, RecordBatch};

/// The number of partitions of the log in `dir`.
pub fn partitions_in(dir: &Path) -> Result<u32, LogError> {
    Ok(segment::count_partitions(dir)?)
}

/// Calls `each` with every batch of `partition` in `dir`, in order. The
/// last segment ends at its last whole batch: what follows is being
/// written, or a torn tail that opening the log would cut off.
pub fn read_files(
    dir: &Path,
    partition: u32,
    each: &mut dyn FnMut(RecordBatch),
) -> Result<(), LogError> {
    let bases = segment::list_segments(&segment::partition_dir(dir, partition))?;
    for (i, &base) in bases.iter().enumerate() {
        let last = i + 1 == bases.len();
        let file = File::open(segment::segment_path(dir, partition, base))?;
        let mut left = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let mut offset = base;
        while left > 0 {
            let (header, records) = match format::read_batch(&mut reader, left) {
                Ok(read) => read,
                Err(_) if last => break,
                Err(DecodeError::Io(e)) => return Err(e.into()),
                Err(DecodeError::Invalid(reason)) => {
                    return Err(LogError::Corrupt {
                        partition,
                        offset,
                        reason: reason.to_owned(),
                    })
                }
            };
            left -= header.batch_len();
            offset = header.end_offset();
            each(RecordBatch {
                partition,
                base_offset: header.base_offset,
                append_time_ms: header.append_time_ms,
                records,
            });
        }
    }
    Ok(())
}
