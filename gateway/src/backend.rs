//! What the gateway needs from the rest of tally, as traits, so the same
//! handlers serve the embedded mode and the cluster.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tally_connectors::bus::redis::RedisFeed;
use tally_connectors::kafka::producer::KafkaProducer;
use tally_connectors::log::EventLog;
use tally_connectors::store::clickhouse::ClickHouseStore;
use tally_connectors::store::sqlite::SqliteStore;
use tally_dataflow::model::DeadLetter;
use tally_dataflow::query::{Query, StoredWindow};

/// A boxed future, as trait methods return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where accepted events go.
pub trait EventSink: Send + Sync + 'static {
    /// Appends one request's events as one atomic batch; resolves once they
    /// are durable.
    fn append(&self, records: Vec<Vec<u8>>) -> BoxFuture<Result<(), String>>;
}

/// Where history is read from.
pub trait History: Send + Sync + 'static {
    /// The stored windows a query needs.
    fn windows(&self, query: Query) -> BoxFuture<Result<Vec<StoredWindow>, String>>;
    /// The newest dead letters, newest first.
    fn dead_letters(&self, limit: usize) -> BoxFuture<Result<Vec<DeadLetter>, String>>;
}

/// Which metrics the gateway's WebSocket clients hold, for a live bus that
/// delivers only what is wanted.
pub trait LiveInterest: Send + Sync + 'static {
    /// The first topic of `metric` was subscribed (`true`), or the last one
    /// released (`false`).
    fn want(&self, metric: &str, wanted: bool);
}

/// The embedded log as an event sink. Each request goes whole to one
/// partition, round robin, so a request is one record batch: atomic on disk,
/// and partitions stay balanced.
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
    fn append(&self, records: Vec<Vec<u8>>) -> BoxFuture<Result<(), String>> {
        let partition = self.next.fetch_add(1, Ordering::Relaxed) % self.log.partitions();
        let append = self.log.append(partition, records);
        Box::pin(async move { append.await.map(|_| ()).map_err(|e| e.to_string()) })
    }
}

/// The embedded SQLite store as history. Queries run on tokio's blocking pool.
pub struct EmbeddedStore(pub Arc<SqliteStore>);

impl History for EmbeddedStore {
    fn windows(&self, query: Query) -> BoxFuture<Result<Vec<StoredWindow>, String>> {
        let store = Arc::clone(&self.0);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.windows(&query).map_err(|e| e.to_string()))
                .await
                .map_err(|e| e.to_string())?
        })
    }

    fn dead_letters(&self, limit: usize) -> BoxFuture<Result<Vec<DeadLetter>, String>> {
        let store = Arc::clone(&self.0);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                store.dead_letters(limit).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

/// The events topic as an event sink: `202` once the brokers acknowledge.
pub struct KafkaEvents(pub KafkaProducer);

impl EventSink for KafkaEvents {
    fn append(&self, records: Vec<Vec<u8>>) -> BoxFuture<Result<(), String>> {
        let append = self.0.append(records);
        Box::pin(async move { append.await.map_err(|e| e.to_string()) })
    }
}

/// ClickHouse as history.
pub struct ClickHouseHistory(pub ClickHouseStore);

impl History for ClickHouseHistory {
    fn windows(&self, query: Query) -> BoxFuture<Result<Vec<StoredWindow>, String>> {
        let store = self.0.clone();
        Box::pin(async move { store.windows(&query).await.map_err(|e| e.to_string()) })
    }

    fn dead_letters(&self, limit: usize) -> BoxFuture<Result<Vec<DeadLetter>, String>> {
        let store = self.0.clone();
        Box::pin(async move { store.dead_letters(limit).await.map_err(|e| e.to_string()) })
    }
}

impl LiveInterest for RedisFeed {
    fn want(&self, metric: &str, wanted: bool) {
        RedisFeed::want(self, metric, wanted);
    }
}
