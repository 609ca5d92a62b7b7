//! Reading a partition: [`PartitionReader`] and the [`RecordBatch`]es it returns.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::sync::Arc;

use tracing::warn;

use super::format::{self, DecodeError};
use super::segment;
use super::state::{PartitionState, Shared};
use super::LogError;

/// The read buffer used by one [`PartitionReader::poll`].
const READ_BUFFER: usize = 64 * 1024;

/// One appended batch, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordBatch {
    /// The partition it was appended to.
    pub partition: u32,
    /// The offset of its first record; record `i` has offset `base_offset + i`.
    pub base_offset: u64,
    /// When the log appended it, in Unix milliseconds (the writer's clock).
    pub append_time_ms: i64,
    /// The records, in append order. Never empty.
    pub records: Vec<Vec<u8>>,
}

impl RecordBatch {
    /// The offset after the batch's last record.
    pub fn end_offset(&self) -> u64 {
        self.base_offset + self.records.len() as u64
    }
}

/// Follows one partition from an offset, batch by batch.
///
/// It only returns batches whose append has completed, so it never sees data
/// a crash could still tear. It moves on to the next segment when a segment
/// is finished. If retention deletes the segment it is in, it skips to the
/// oldest remaining segment and logs a warning.
///
/// Readers work on whole batches: a reader opened at an offset inside a batch
/// starts at the beginning of that batch, so its first batch may hold records
/// below the requested offset, which the caller skips.
pub struct PartitionReader {
    shared: Arc<Shared>,
    partition: u32,
    /// The base offset of the segment being read.
    segment: u64,
    file: File,
    /// Where the next batch starts in `file`.
    file_pos: u64,
    /// The base offset of the next batch.
    position: u64,
}

impl PartitionReader {
    /// Opens a reader at the batch holding `offset`. An offset older than
    /// the oldest retained segment starts at that segment, with a warning.
    pub(super) fn open(shared: Arc<Shared>, partition: u32, offset: u64) -> Result<Self, LogError> {
        let state = shared.partition(partition)?;
        if offset > state.next_offset {
            let end = state.next_offset;
            return Err(LogError::OffsetOutOfRange {
                partition,
                offset,
                end,
            });
        }
        let segment = match state.segments.range(..=offset).next_back() {
            Some((&base, _)) => base,
            None => {
                let oldest = state.oldest_segment();
                warn!(
                    partition,
                    offset, oldest, "offset is past retention; reading from the oldest segment"
                );
                oldest
            }
        };
        let visible = state.segments.get(&segment).map_or(0, |info| info.len);
        // Opened under the lock, so retention cannot delete it in between.
        let file = File::open(segment::segment_path(&shared.dir, partition, segment))?;
        drop(state);

        let mut reader = Self {
            shared,
            partition,
            segment,
            file,
            file_pos: 0,
            position: segment,
        };
        reader.skip_to(offset, visible)?;
        Ok(reader)
    }

    /// The offset of the next batch this reader returns. After opening it
    /// can be below the requested offset (see the type's docs).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Reads the complete batches available now, until their size reaches
    /// about `max_bytes` (at least one batch, if there is one). It never
    /// waits for new data: an empty result means the reader is caught up.
    pub fn poll(&mut self, max_bytes: usize) -> Result<Vec<RecordBatch>, LogError> {
        let mut batches = Vec::new();
        let mut budget = max_bytes.max(1) as u64;
        loop {
            let (visible, sealed) = self.extent()?;
            if self.file_pos < visible {
                budget = self.read_batches(visible, budget, &mut batches)?;
                if budget == 0 {
                    return Ok(batches);
                }
            }
            // All of `visible` was read. A segment is final once a later one
            // exists; otherwise this is the end of the acknowledged log.
            if !sealed {
                return Ok(batches);
            }
            self.next_segment()?;
        }
    }

    /// Moves forward over whole batches in the current segment until the
    /// batch holding `offset`, or the end of the first `visible` bytes.
    fn skip_to(&mut self, offset: u64, visible: u64) -> Result<(), LogError> {
        let mut reader = BufReader::new(&self.file);
        while self.file_pos < visible {
            let header = format::read_header(&mut reader, visible - self.file_pos)
                .map_err(|error| self.decode_error(error))?;
            if header.end_offset() > offset {
                break;
            }
            reader.seek_relative(header.records_len() as i64)?;
            self.file_pos += header.batch_len();
            self.position = header.end_offset();
        }
        Ok(())
    }

    /// The acknowledged length of the current segment and whether a later
    /// segment exists. If retention deleted the current segment, it first
    /// moves to the oldest remaining one.
    fn extent(&mut self) -> Result<(u64, bool), LogError> {
        let shared = Arc::clone(&self.shared);
        let state = shared.partition(self.partition)?;
        if !state.segments.contains_key(&self.segment) {
            let oldest = state.oldest_segment();
            warn!(
                partition = self.partition,
                position = self.position,
                skipped = oldest.saturating_sub(self.position),
                oldest,
                "segment deleted by retention; skipping to the oldest remaining"
            );
            self.switch_to(&state, oldest)?;
        }
        let visible = state.segments.get(&self.segment).map_or(0, |info| info.len);
        Ok((visible, state.segment_after(self.segment).is_some()))
    }

    /// Moves to the segment after the current one.
    fn next_segment(&mut self) -> Result<(), LogError> {
        let shared = Arc::clone(&self.shared);
        let state = shared.partition(self.partition)?;
        // Retention keeps the newest segment, so the later segment seen by
        // `extent` (or one after it) still exists.
        match state.segment_after(self.segment) {
            Some(next) => self.switch_to(&state, next),
            None => Ok(()),
        }
    }

    /// Opens the segment at `base`. Takes the partition's locked state, so
    /// retention cannot delete the file before it is open.
    fn switch_to(&mut self, _locked: &PartitionState, base: u64) -> Result<(), LogError> {
        self.file = File::open(segment::segment_path(
            &self.shared.dir,
            self.partition,
            base,
        ))?;
        self.segment = base;
        self.file_pos = 0;
        self.position = base;
        Ok(())
    }

    /// Decodes batches from the current position up to `visible` bytes into
    /// the segment, while `budget` lasts. Returns the budget left.
    fn read_batches(
        &mut self,
        visible: u64,
        mut budget: u64,
        batches: &mut Vec<RecordBatch>,
    ) -> Result<u64, LogError> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(self.file_pos))?;
        // A fresh buffer limited to acknowledged bytes, so nothing that is
        // still being written is ever buffered.
        let mut reader = BufReader::with_capacity(READ_BUFFER, file.take(visible - self.file_pos));
        while self.file_pos < visible && budget > 0 {
            let (header, records) = format::read_batch(&mut reader, visible - self.file_pos)
                .map_err(|error| self.decode_error(error))?;
            if header.base_offset != self.position {
                return Err(self.corrupt("unexpected base offset"));
            }
            self.file_pos += header.batch_len();
            self.position = header.end_offset();
            budget = budget.saturating_sub(header.batch_len());
            batches.push(RecordBatch {
                partition: self.partition,
                base_offset: header.base_offset,
                append_time_ms: header.append_time_ms,
                records,
            });
        }
        Ok(budget)
    }

    /// Turns a decoding failure at the current position into a [`LogError`].
    fn decode_error(&self, error: DecodeError) -> LogError {
        match error {
            DecodeError::Invalid(reason) => self.corrupt(reason),
            DecodeError::Io(error) => error.into(),
        }
    }

    /// A [`LogError::Corrupt`] at the current position.
    fn corrupt(&self, reason: &str) -> LogError {
        LogError::Corrupt {
            partition: self.partition,
            offset: self.position,
            reason: reason.to_owned(),
        }
    }
}
