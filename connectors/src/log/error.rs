//! Errors of the event log.

/// What can go wrong in the event log.
#[derive(thiserror::Error, Debug)]
pub enum LogError {
    /// Reading or writing a file or directory failed. For an append, the
    /// batch may or may not be in the log; retrying is safe for callers that
    /// tolerate a duplicate.
    #[error("event log I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// A batch that was already acknowledged failed its checks when read
    /// back: the disk or someone else changed the file.
    #[error("corrupt batch in partition {partition} at offset {offset}: {reason}")]
    Corrupt {
        /// The partition holding the batch.
        partition: u32,
        /// The offset at which the reader expected the batch to start.
        offset: u64,
        /// Which check failed.
        reason: String,
    },

    /// The partition does not exist: it is not below the configured count.
    #[error("partition {0} is out of range")]
    PartitionOutOfRange(u32),

    /// The directory holds a log with a different number of partitions than
    /// configured. The count is fixed when a log is created.
    #[error("the log has {found} partitions but {configured} are configured")]
    PartitionCountMismatch {
        /// Partitions found on disk.
        found: u32,
        /// Partitions in the configuration.
        configured: u32,
    },

    /// A reader was asked to start past the end of its partition.
    #[error("offset {offset} is past the end ({end}) of partition {partition}")]
    OffsetOutOfRange {
        /// The partition.
        partition: u32,
        /// The offset asked for.
        offset: u64,
        /// The partition's next offset.
        end: u64,
    },

    /// An append had no records. Every batch holds at least one, so that
    /// each batch has its own base offset.
    #[error("an append must hold at least one record")]
    EmptyBatch,

    /// An append is too large to be framed: a batch is at most 4 GiB.
    #[error("a batch of {bytes} bytes is too large")]
    BatchTooLarge {
        /// The encoded size the batch would have had.
        bytes: usize,
    },

    /// An earlier `fdatasync` of this partition failed. The kernel may have
    /// dropped the unsynced data, so the partition takes no more appends
    /// until the log is reopened and its tail is checked again.
    #[error("partition {partition} failed to sync and takes no appends until reopened")]
    PartitionFailed {
        /// The failed partition.
        partition: u32,
    },

    /// The configuration cannot be used; the message says which field.
    #[error("invalid event log config: {0}")]
    InvalidConfig(&'static str),

    /// The log was closed, or its writer stopped.
    #[error("the event log is closed")]
    Closed,
}

impl LogError {
    /// The same error again, for another append of a batch that failed:
    /// I/O errors say what went wrong, not the error itself.
    pub(super) fn again(&self) -> LogError {
        match self {
            LogError::Io(error) => {
                LogError::Io(std::io::Error::new(error.kind(), error.to_string()))
            }
            LogError::PartitionFailed { partition } => LogError::PartitionFailed {
                partition: *partition,
            },
            other => LogError::Io(std::io::Error::other(other.to_string())),
        }
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LogError::Io(_))
    }
}
