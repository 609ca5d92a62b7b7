//! What the gateway needs from the rest of tally, as traits, so the same
//! handlers serve the embedded mode and the cluster.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tally_connectors::bus::redis::RedisFeed;
use tally_connectors::kafka::producer::KafkaProducer;
use tally_connectors::kafka::KafkaError;
use tally_connectors::log::{EventLog, LogError};
use tally_connectors::store::clickhouse::{self, ClickHouseStore};
use tally_connectors::store::sqlite::{SqliteStore, StoreError};
use tally_connectors::store::{Recent, StoredWindow};
use tally_dataflow::event::{spread, Accepted};
use tally_dataflow::model::DeadLetter;
use tally_dataflow::query::Fold;
use tally_dataflow::time::Millis;

/// A boxed future, as trait methods return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where accepted events go.
pub trait EventSink: Send + Sync + 'static {
    /// Appends one request's events, each with an id to the partition its
    /// id picks and the others together to one partition, one atomic batch
    /// per partition; resolves once they are all durable.
    fn append(&self, events: Vec<Accepted>) -> BoxFuture<Result<(), AppendError>>;
}

/// Why an append failed. After any of them some of the events may have been
/// written: a retry counts those with an `eventId` once, and the others
/// again.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The embedded event log failed the append.
    #[error("the event log failed the append: {0}")]
    Log(#[from] LogError),
    /// The brokers did not acknowledge every message of the request.
    #[error("the brokers did not acknowledge the events: {0}")]
    Kafka(#[from] KafkaError),
}

impl AppendError {
    /// Whether the same append may succeed later: the log's disk or the
    /// brokers may recover, but a batch too large or a log that is closed
    /// will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            AppendError::Log(e) => e.is_retryable(),
            AppendError::Kafka(e) => e.is_retryable(),
        }
    }
}

/// Where history is read from.
pub trait History: Send + Sync + 'static {
    /// One scan of the stored windows a query needs, folded into `fold`.
    fn scan(&self, fold: Fold) -> BoxFuture<Result<Fold, HistoryError>>;
    /// The start of the earliest stored window of any of `versions` of a
    /// metric (its own, or its rollups').
    fn since(
        &self,
        metric: String,
        versions: Vec<String>,
    ) -> BoxFuture<Result<Option<Millis>, HistoryError>>;
    /// The newest dead letters, newest first.
    fn dead_letters(&self, limit: usize) -> BoxFuture<Result<Vec<DeadLetter>, HistoryError>>;
    /// The stored results of one window of a metric version, newest
    /// window first: what a live subscription that resumes replays.
    fn recent(&self, recent: Recent) -> BoxFuture<Result<Vec<StoredWindow>, HistoryError>>;
}

/// Why a read of history failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The SQLite store failed the read.
    #[error("the SQLite store failed a read: {0}")]
    Sqlite(#[from] StoreError),
    /// The blocking-pool task that ran a SQLite read did not finish: it
    /// panicked, or the runtime is shutting down.
    #[error("a SQLite read did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// ClickHouse failed the read.
    #[error("ClickHouse failed a read: {0}")]
    ClickHouse(#[from] clickhouse::Error),
}

impl HistoryError {
    /// Whether the same read may succeed later: a busy database or a lost
    /// connection may recover, but a corrupt row or a stopped store will
    /// not.
    pub fn is_retryable(&self) -> bool {
        match self {
            HistoryError::Sqlite(e) => e.is_retryable(),
            HistoryError::Task(_) => false,
            HistoryError::ClickHouse(e) => clickhouse::is_retryable(e),
        }
    }
}

/// Which metrics the gateway's WebSocket clients hold, for a live bus that
/// delivers only what is wanted.
pub trait LiveInterest: Send + Sync + 'static {
    /// The first topic of `metric` was subscribed (`true`), or the last one
    /// released (`false`).
    fn want(&self, metric: &str, wanted: bool);
}

/// The embedded log as an event sink. A request's events without an id go
/// to one partition, round robin, so partitions stay balanced; those with
/// an id go to their id's, where repeats of it meet.
pub struct EmbeddedLog {
    log: EventLog,
    next: AtomicU32,
}

impl EmbeddedLog {
    /// Wraps an open log.
    pub fn new(log: EventLog) -> EmbeddedLog {
        EmbeddedLog {
            log,
            next: AtomicU32::new(0),
        }
    }

    /// Bytes held by the log, for `/metrics`.
    pub fn log_bytes(&self) -> u64 {
        self.log.size_bytes()
    }
}

impl EventSink for EmbeddedLog {
    fn append(&self, events: Vec<Accepted>) -> BoxFuture<Result<(), AppendError>> {
        let partitions = self.log.partitions();
        let fallback = self.next.fetch_add(1, Ordering::Relaxed) % partitions;
        let append = self.log.append_all(spread(events, partitions, fallback));
        Box::pin(async move {
            append.await?;
            Ok(())
        })
    }
}

/// The embedded SQLite store as history. Queries run on tokio's blocking pool.
pub struct EmbeddedStore(pub Arc<SqliteStore>);

impl History for EmbeddedStore {
    fn scan(&self, mut fold: Fold) -> BoxFuture<Result<Fold, HistoryError>> {
        let store = Arc::clone(&self.0);
        Box::pin(async move {
            let scan = move || store.scan(&mut fold).map(|()| fold);
            Ok(tokio::task::spawn_blocking(scan).await??)
        })
    }

    fn since(
        &self,
        metric: String,
        versions: Vec<String>,
    ) -> BoxFuture<Result<Option<Millis>, HistoryError>> {
        let store = Arc::clone(&self.0);
        Box::pin(async move {
            Ok(tokio::task::spawn_blocking(move || store.since(&metric, &versions)).await??)
        })
    }

    fn dead_letters(&self, limit: usize) -> BoxFuture<Result<Vec<DeadLetter>, HistoryError>> {
        let store = Arc::clone(&self.0);
        Box::pin(async move {
            Ok(tokio::task::spawn_blocking(move || store.dead_letters(limit)).await??)
        })
    }

    fn recent(&self, recent: Recent) -> BoxFuture<Result<Vec<StoredWindow>, HistoryError>> {
        let store = Arc::clone(&self.0);
        Box::pin(
            async move { Ok(tokio::task::spawn_blocking(move || store.recent(&recent)).await??) },
        )
    }
}

/// The events topic as an event sink: `202` once the brokers acknowledge.
pub struct KafkaEvents(pub Arc<KafkaProducer>);

impl EventSink for KafkaEvents {
    fn append(&self, events: Vec<Accepted>) -> BoxFuture<Result<(), AppendError>> {
        let append = self.0.append(events);
        Box::pin(async move { Ok(append.await?) })
    }
}

/// ClickHouse as history.
pub struct ClickHouseHistory(pub ClickHouseStore);

impl History for ClickHouseHistory {
    fn scan(&self, fold: Fold) -> BoxFuture<Result<Fold, HistoryError>> {
        let store = self.0.clone();
        Box::pin(async move { Ok(store.scan(fold).await?) })
    }

    fn since(
        &self,
        metric: String,
        versions: Vec<String>,
    ) -> BoxFuture<Result<Option<Millis>, HistoryError>> {
        let store = self.0.clone();
        Box::pin(async move { Ok(store.since(&metric, &versions).await?) })
    }

    fn dead_letters(&self, limit: usize) -> BoxFuture<Result<Vec<DeadLetter>, HistoryError>> {
        let store = self.0.clone();
        Box::pin(async move { Ok(store.dead_letters(limit).await?) })
    }

    fn recent(&self, recent: Recent) -> BoxFuture<Result<Vec<StoredWindow>, HistoryError>> {
        let store = self.0.clone();
        Box::pin(async move { Ok(store.recent(&recent).await?) })
    }
}

impl LiveInterest for RedisFeed {
    fn want(&self, metric: &str, wanted: bool) {
        RedisFeed::want(self, metric, wanted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Kafka's errors are sorted by `tally_connectors::kafka::KafkaError`
    // and tested there.

    #[test]
    fn a_failing_disk_or_broker_is_worth_a_retry() {
        let io = std::io::Error::other("disk full");
        assert!(AppendError::from(LogError::Io(io)).is_retryable());
        assert!(HistoryError::from(clickhouse::Error::TimedOut).is_retryable());
    }

    #[test]
    fn a_request_that_cannot_succeed_is_not() {
        let too_large = LogError::BatchTooLarge { bytes: 5 << 30 };
        assert!(!AppendError::from(too_large).is_retryable());
        assert!(!AppendError::from(LogError::Closed).is_retryable());
        assert!(!HistoryError::from(StoreError::Closed).is_retryable());
    }
}
