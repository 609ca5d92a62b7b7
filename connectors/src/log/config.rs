//! Configuration of the event log.

use std::path::PathBuf;
use std::time::Duration;

use super::LogError;

/// The default size after which a partition starts a new segment: 128 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 128 * 1024 * 1024;

/// The default retention: seven days, as in Kafka.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// How an [`EventLog`](super::EventLog) is laid out and how hard it syncs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// The directory holding one sub-directory per partition. It is created
    /// if missing. No default: [`LogConfig::new`] takes it.
    pub dir: PathBuf,
    /// The number of partitions. It is fixed when the log is created;
    /// reopening a log with a different number is an error. No default:
    /// [`LogConfig::new`] takes it.
    pub partitions: u32,
    /// A partition starts a new segment before a batch would take its active
    /// segment past this size. A single larger batch gets a segment of its
    /// own. Default: [`DEFAULT_SEGMENT_BYTES`].
    pub segment_bytes: u64,
    /// When appended data is synced to disk. Default: [`FsyncPolicy::Always`].
    pub fsync: FsyncPolicy,
    /// Segments whose newest append is older than this are deleted by
    /// [`EventLog::enforce_retention`](super::EventLog::enforce_retention).
    /// The active segment of a partition is never deleted. Default:
    /// [`DEFAULT_RETENTION`].
    pub retention: Duration,
}

impl LogConfig {
    /// A config for a log in `dir` with `partitions` partitions and the
    /// defaults for everything else.
    pub fn new(dir: impl Into<PathBuf>, partitions: u32) -> Self {
        Self {
            dir: dir.into(),
            partitions,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            fsync: FsyncPolicy::default(),
            retention: DEFAULT_RETENTION,
        }
    }

    /// Rejects values the log cannot work with.
    pub(super) fn validate(&self) -> Result<(), LogError> {
        if self.partitions == 0 {
            return Err(LogError::InvalidConfig("partitions must be at least 1"));
        }
        if self.segment_bytes == 0 {
            return Err(LogError::InvalidConfig("segment_bytes must be at least 1"));
        }
        if self.fsync == FsyncPolicy::Interval(Duration::ZERO) {
            return Err(LogError::InvalidConfig(
                "the fsync interval must not be zero",
            ));
        }
        Ok(())
    }

    /// The retention as milliseconds, saturating for absurdly long ones.
    pub(super) fn retention_ms(&self) -> i64 {
        i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX)
    }
}

/// When the log syncs appended data to disk, trading latency for durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// An append resolves only after `fdatasync` of its segment. Appends that
    /// arrive together share one sync (group commit). An acknowledged append
    /// survives a machine crash.
    #[default]
    Always,
    /// The writer syncs every dirty segment once per interval; an append
    /// resolves once it is written to the page cache. A machine crash may
    /// lose up to one interval of acknowledged appends.
    Interval(Duration),
    /// The log syncs only when it is closed; the operating system decides
    /// when data reaches disk. A machine crash may lose any acknowledged
    /// append not yet written back.
    Never,
}
