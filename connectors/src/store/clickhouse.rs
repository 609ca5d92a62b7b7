//! ClickHouse result store, for the cluster.
//!
//! Tables, created at start-up in `clickhouse.database`:
//!
//! - `windows`: final window values. A `ReplacingMergeTree` keyed by
//!   (metric, window, start, group) and versioned by revision, so a replay
//!   or a late correction replaces a row rather than adding one. Reads use
//!   `FINAL`. `uniq` sketches are stored as DataSketches HLL bytes and are
//!   merged at query time, so any range and any set of groups can be
//!   combined; each with its `estimate`, which a query whose every bucket is
//!   one stored window reads instead (-1 where a row has none: it was
//!   written before the column was).
//! - `dead_letters`: events too late for any window, keyed by their place
//!   in the events topic, so a replay cannot add them twice.
//! - `raw_events`: every event, partitioned by day and kept for
//!   `clickhouse.raw_retention` by dropping old partitions, and `archived`,
//!   how far each partition has been copied (see [`crate::archive`]).
//! - `versions`: when each metric version was last in use; a version
//!   unused for `backfill.keep_old` is dropped with its partition of
//!   `windows`.
//! - `active`: one row per change of the definitions the cluster serves,
//!   the newest of which is in force (see [`ClickHouseStore::activate`]).
//!
//! The DDL uses only what ClickHouse 18.16 already had: `ReplacingMergeTree`
//! with a version column, `PARTITION BY`, `FINAL`. The one newer feature it
//! takes when the server has it, `LowCardinality` for the repeated names, is
//! found in `system.data_type_families` and `system.settings`. Rows travel as
//! RowBinary without the schema check newer servers offer
//! (`with_validation(false)`).
//!
//! Inserts are batched: a writer thread sends one insert per table once
//! `batch_rows` rows are waiting or the oldest has waited `batch_interval`.
//! A failed insert, or one the server has not answered within
//! `insert_timeout`, is retried with the same rows until it succeeds; in
//! the meantime the dataflow stalls behind the writer. A server that takes
//! connections but answers nothing (overloaded, or paused) thus stalls the
//! job as one that is down does, instead of letting the workers fill the
//! writer's queue.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clickhouse::{Client, Row};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::{Deserialize, Serialize};
use tally_dataflow::aggregate::{AggState, Sketch};
use tally_dataflow::config::{ClickHouseConfig, MetricSpec};
use tally_dataflow::fingerprint;
use tally_dataflow::model::DeadLetter;
use tally_dataflow::query::{Fold, Scan};
use tracing::{info, warn};

use super::{
    expired, join_group, metric_versions, split_group, unused_since, versions, Backlog, Durable,
    InUse, Recent, StoreWriter, StoredWindow, Write, RETENTION_EVERY, SEP, VERSIONS_EVERY,
};
use crate::retry;

/// Errors of the ClickHouse store.
pub type Error = clickhouse::error::Error;

/// Whether a failed ClickHouse call may succeed later: a lost connection or
/// a timeout may recover; a bad query or a bad row will not.
pub fn is_retryable(error: &Error) -> bool {
    matches!(error, Error::Network(_) | Error::TimedOut)
}

/// The tables, in creation order. `{db}` is the database; `{label}` the
/// type of short, often repeated strings (see [`label_type`]).
const SCHEMA: [&str; 7] = [
    "CREATE DATABASE IF NOT EXISTS {db}",
    "CREATE TABLE IF NOT EXISTS {db}.windows (
        metric   {label},
        version  {label},
        window   {label},
        start    Int64,
        end      Int64,
        grp      String,
        count    UInt64,
        sum      Float64,
        sketch   String,
        revision UInt32,
        estimate Float64 DEFAULT -1
    ) ENGINE = ReplacingMergeTree(revision)
    PARTITION BY version
    ORDER BY (metric, version, window, start, grp)",
    "CREATE TABLE IF NOT EXISTS {db}.versions (
        metric    {label},
        version   {label},
        last_used Int64
    ) ENGINE = ReplacingMergeTree(last_used)
    ORDER BY (metric, version)",
    "CREATE TABLE IF NOT EXISTS {db}.dead_letters (
        partition UInt32,
        offset    UInt64,
        idx       UInt32,
        reason    String,
        watermark Int64,
        record    String
    ) ENGINE = ReplacingMergeTree
    ORDER BY (partition, offset, idx)",
    "CREATE TABLE IF NOT EXISTS {db}.raw_events (
        day        Date,
        time       DateTime,
        partition  UInt32,
        offset     UInt64,
        idx        UInt32,
        event_type {label},
        event      String
    ) ENGINE = ReplacingMergeTree
    PARTITION BY day
    ORDER BY (partition, offset, idx)",
    "CREATE TABLE IF NOT EXISTS {db}.active (
        at       Int64,
        boundary UInt64,
        metrics  String
    ) ENGINE = MergeTree
    ORDER BY at",
    "CREATE TABLE IF NOT EXISTS {db}.archived (
        partition UInt32,
        next      UInt64
    ) ENGINE = ReplacingMergeTree(next)
    ORDER BY partition",
];

/// The metric definitions the cluster serves, from a checkpoint on.
#[derive(Clone, Debug, PartialEq)]
pub struct Activation {
    /// When it was made, in milliseconds since the epoch.
    pub at: i64,
    /// The live job's checkpoint boundary from which they are computed.
    pub boundary: u64,
    /// The definitions.
    pub metrics: Vec<MetricSpec>,
}

#[derive(Row, Serialize, Deserialize)]
struct ActiveRow {
    at: i64,
    boundary: u64,
    metrics: String,
}

/// What a history query reads of a stored window.
#[derive(Row, Deserialize)]
struct ScanRow<'a> {
    start: i64,
    grp: &'a str,
    count: u64,
    sum: f64,
    #[serde(with = "serde_bytes")]
    sketch: &'a [u8],
    estimate: f64,
}

#[derive(Row, Serialize, Deserialize)]
struct WindowRow {
    metric: String,
    version: String,
    window: String,
    start: i64,
    end: i64,
    grp: String,
    count: u64,
    sum: f64,
    #[serde(with = "serde_bytes")]
    sketch: Vec<u8>,
    revision: u32,
    estimate: f64,
}

#[derive(Row, Serialize, Deserialize)]
struct DeadLetterRow {
    partition: u32,
    offset: u64,
    idx: u32,
    reason: String,
    watermark: i64,
    #[serde(with = "serde_bytes")]
    record: Vec<u8>,
}

/// The ClickHouse store, for reading and for starting writers.
#[derive(Clone)]
pub struct ClickHouseStore {
    client: Client,
    config: ClickHouseConfig,
}

impl ClickHouseStore {
    /// A store on `config`'s server; nothing is sent until it is used.
    pub fn new(config: &ClickHouseConfig) -> ClickHouseStore {
        ClickHouseStore {
            client: client(config),
            config: config.clone(),
        }
    }

    /// Creates the database and the tables that are missing, gives results
    /// stored before they carried versions those of `metrics`, and deletes
    /// the results of versions unused for longer than `keep_old`, waiting
    /// out a server that is down.
    pub async fn prepare(&self, metrics: &[MetricSpec], keep_old: Duration) {
        retry::until_ok("create the ClickHouse tables", || {
            self.create_tables(metrics)
        })
        .await;
        retry::until_ok("date the metric versions in ClickHouse", || {
            retire_versions(&self.client, &self.config.database, metrics, keep_old)
        })
        .await;
    }

    async fn create_tables(&self, metrics: &[MetricSpec]) -> Result<(), Error> {
        // The database may not exist yet, so DDL runs without a default one.
        let admin = client(&self.config).with_database("default");
        let label = label_type(&admin).await?;
        let db = &self.config.database;
        let columns = |table: &'static str| {
            admin
                .query(
                    "SELECT name FROM system.columns WHERE database = ? AND table = ? ORDER BY name",
                )
                .bind(db)
                .bind(table)
                .fetch_all::<String>()
        };
        // A table from before versions moves aside, then into the new one:
        // if a crash comes between, the next start finishes the move.
        let windows = columns("windows").await?;
        if !windows.is_empty() && !windows.iter().any(|c| c == "version") {
            admin
                .query(&format!(
                    "RENAME TABLE {db}.windows TO {db}.windows_unversioned"
                ))
                .execute()
                .await?;
        }
        for ddl in SCHEMA {
            admin
                .query(
                    &ddl.replace("{db}", &self.config.database)
                        .replace("{label}", label),
                )
                .execute()
                .await?;
        }
        if !columns("windows").await?.iter().any(|c| c == "estimate") {
            // Rows written before take -1: they are read by their sketches.
            admin
                .query(&format!(
                    "ALTER TABLE {db}.windows ADD COLUMN estimate Float64 DEFAULT -1"
                ))
                .execute()
                .await?;
        }
        if !columns("windows_unversioned").await?.is_empty() {
            let (names, versions): (Vec<String>, Vec<String>) =
                metric_versions(metrics).into_iter().unzip();
            // Rows of metrics no longer configured get no version ('') and
            // are never read.
            admin
                .query(&format!(
                    "INSERT INTO {db}.windows
                     (metric, version, window, start, end, grp, count, sum, sketch, revision)
                     SELECT metric, transform(toString(metric), ?, ?, '') AS version, window,
                            start, end, grp, count, sum, sketch, revision
                     FROM {db}.windows_unversioned FINAL"
                ))
                .bind(names)
                .bind(versions)
                .execute()
                .await?;
            // Dated now, so that versions no longer configured go after
            // keep_old.
            admin
                .query(&format!(
                    "INSERT INTO {db}.versions
                     SELECT metric, version, ? FROM {db}.windows GROUP BY metric, version"
                ))
                .bind(super::now_ms())
                .execute()
                .await?;
            admin
                .query(&format!("DROP TABLE {db}.windows_unversioned"))
                .execute()
                .await?;
            info!(database = %db, "gave the stored results their metrics' versions");
        }
        let version: String = admin.query("SELECT version()").fetch_one().await?;
        info!(%version, database = %self.config.database, label, "ClickHouse tables ready");
        Ok(())
    }

    /// The client, for the raw-event archive.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The configuration, for the raw-event archive.
    pub(crate) fn config(&self) -> &ClickHouseConfig {
        &self.config
    }

    /// Starts the writer thread the workers' sinks feed, holding at most
    /// `queue` results. Every hour it also dates the configured versions
    /// and deletes those unused for longer than `keep_old`.
    pub fn writer(
        &self,
        metrics: Vec<MetricSpec>,
        keep_old: Duration,
        queue: usize,
    ) -> std::io::Result<StoreWriter> {
        let (client, config) = (self.client.clone(), self.config.clone());
        StoreWriter::start(
            "clickhouse-writer",
            metrics,
            queue,
            move |rx, in_use, backlog| {
                write_loop(&client, &config, &in_use, keep_old, rx, &backlog);
            },
        )
    }

    /// Folds the stored windows a history query needs into `fold`, as
    /// ClickHouse streams them, until it has them all or has hit a bound.
    pub async fn scan(&self, fold: Fold) -> Result<Fold, Error> {
        let scan = fold.scan();
        // A read answered by estimates leaves the sketch column, most of
        // the bytes, unread. A row stored before estimates were kept has
        // none, and then the pass is read again with the sketches.
        let fold = if scan.reads.iter().any(|r| scan.by_estimate(r)) {
            let again = fold.clone();
            match self.read(fold, &scan, true).await? {
                Some(fold) => return Ok(fold),
                None => again,
            }
        } else {
            fold
        };
        Ok(self
            .read(fold, &scan, false)
            .await?
            .expect("a read with sketches takes every row"))
    }

    /// One pass of [`ClickHouseStore::scan`], taking estimates where the
    /// scan may; `None` if a row it took one from has none.
    async fn read(
        &self,
        mut fold: Fold,
        scan: &Scan,
        estimates: bool,
    ) -> Result<Option<Fold>, Error> {
        let only = scan.only.as_deref().map(join_group);
        // Filters on every dimension of the table name one group, which is
        // read alone.
        let sql = |by_estimate: bool| {
            format!(
                "SELECT start, grp, count, sum, {} FROM windows FINAL
                 WHERE metric = ? AND version = ? AND window = ? AND start >= ? AND start < ?{}
                 ORDER BY start, grp",
                if by_estimate {
                    "'' AS sketch, estimate"
                } else {
                    "sketch, toFloat64(-1) AS estimate"
                },
                if only.is_some() { " AND grp = ?" } else { "" }
            )
        };
        // Each read goes on from the end of the last window the one before
        // it found.
        let mut from = scan.start;
        for read in &scan.reads {
            if from >= scan.end {
                break;
            }
            let by_estimate = estimates && scan.by_estimate(read);
            let mut query = self
                .client
                .query(&sql(by_estimate))
                .bind(&scan.metric)
                .bind(&read.version)
                .bind(read.window.to_string())
                .bind(from)
                .bind(scan.end);
            if let Some(group) = &only {
                query = query.bind(group);
            }
            let mut cursor = query.fetch::<ScanRow<'_>>()?;
            let mut last = None;
            while let Some(row) = cursor.next().await? {
                let group: Vec<&str> = row.grp.split(SEP).collect();
                last = Some(row.start);
                let flow = if by_estimate {
                    if row.estimate < 0.0 {
                        return Ok(None);
                    }
                    let state = AggState::from_parts(row.count, row.sum, None);
                    fold.add_estimated(row.start, &group, &state, row.estimate)
                } else {
                    let sketch = (!row.sketch.is_empty())
                        .then(|| Sketch::from_bytes(row.sketch))
                        .transpose()
                        .map_err(|e| Error::Custom(format!("corrupt sketch in the store: {e}")))?;
                    let state = AggState::from_parts(row.count, row.sum, sketch);
                    fold.add(row.start, &group, &state)
                };
                if flow.is_break() {
                    return Ok(Some(fold));
                }
            }
            if let Some(last) = last {
                from = last + read.window.size();
            }
        }
        Ok(Some(fold))
    }

    /// The stored results `recent` names, newest window first.
    pub async fn recent(&self, recent: &Recent) -> Result<Vec<StoredWindow>, Error> {
        let rows: Vec<WindowRow> = self
            .client
            .query(
                "SELECT metric, version, window, start, `end`, grp, count, sum, sketch, revision,
                        estimate FROM windows FINAL
                 WHERE metric = ? AND version = ? AND window = ? AND start >= ?
                 ORDER BY start DESC, grp LIMIT ?",
            )
            .bind(&recent.metric)
            .bind(&recent.version)
            .bind(&recent.window)
            .bind(recent.since)
            .bind(recent.limit as u64)
            .fetch_all()
            .await?;
        rows.into_iter()
            .map(|row| {
                let sketch = (!row.sketch.is_empty())
                    .then(|| Sketch::from_bytes(&row.sketch))
                    .transpose()
                    .map_err(|e| Error::Custom(format!("corrupt sketch in the store: {e}")))?;
                Ok(StoredWindow {
                    start: row.start,
                    end: row.end,
                    group: split_group(&row.grp, recent.dimensions),
                    state: AggState::from_parts(row.count, row.sum, sketch),
                    revision: row.revision,
                })
            })
            .collect()
    }

    /// The start of the earliest stored window of any of `versions` of
    /// `metric`: from when they hold data.
    pub async fn since(&self, metric: &str, versions: &[String]) -> Result<Option<i64>, Error> {
        // Not min(), which answers 0 over no rows on 18.16.
        if versions.is_empty() {
            return Ok(None);
        }
        // A tuple, which 18.16 takes after IN; an array it does not.
        let listed = vec!["?"; versions.len()].join(", ");
        let mut query = self
            .client
            .query(&format!(
                "SELECT start FROM windows WHERE metric = ? AND version IN ({listed}) ORDER BY start LIMIT 1"
            ))
            .bind(metric);
        for version in versions {
            query = query.bind(version);
        }
        let starts: Vec<i64> = query.fetch_all().await?;
        Ok(starts.first().copied())
    }

    /// Makes `metrics` the cluster's active definitions, from the
    /// checkpoint at `boundary` on. One row, the newest of which is the
    /// activation: an insert of one row is atomic on every release, so a
    /// reader sees the old definitions or the new ones, never a mix.
    /// Nothing is written if they are active already.
    pub async fn activate(&self, metrics: &[MetricSpec], boundary: u64) -> Result<(), Error> {
        let newest = self.active().await?;
        if newest
            .as_ref()
            .is_some_and(|a| fingerprint::job(&a.metrics) == fingerprint::job(metrics))
        {
            return Ok(());
        }
        let after = newest.map_or(0, |a| a.at + 1);
        let row = ActiveRow {
            at: super::now_ms().max(after),
            boundary,
            metrics: serde_json::to_string(metrics).expect("metric definitions serialize"),
        };
        let mut insert =
            insert_into::<ActiveRow>(&self.client, "active", self.config.insert_timeout).await?;
        insert.write(&row).await?;
        insert.end().await
    }

    /// The newest activation, if any process has made one.
    pub async fn active(&self) -> Result<Option<Activation>, Error> {
        let rows: Vec<ActiveRow> = self
            .client
            .query("SELECT ?fields FROM active ORDER BY at DESC LIMIT 1")
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|row| match serde_json::from_str(&row.metrics) {
                Ok(metrics) => Some(Activation {
                    at: row.at,
                    boundary: row.boundary,
                    metrics,
                }),
                Err(e) => {
                    warn!(error = %e, "an unreadable activation; ignoring it");
                    None
                }
            }))
    }

    /// The newest dead letters, newest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        let rows: Vec<DeadLetterRow> = self
            .client
            .query(
                "SELECT ?fields FROM dead_letters FINAL
                 ORDER BY watermark DESC, partition, offset DESC, idx DESC LIMIT ?",
            )
            .bind(limit as u64)
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| DeadLetter {
                partition: r.partition,
                offset: r.offset,
                index: r.idx,
                reason: r.reason,
                watermark: r.watermark,
                record: r.record,
            })
            .collect())
    }
}

/// The column type for metric names, window specs and event types:
/// `LowCardinality(String)`, dictionary-encoded, where the server has it
/// without the experimental flag older releases (18.16 among them) needed,
/// and `String` otherwise. Read from `system.*`, not from the version
/// string. Both read and write as strings in RowBinary.
async fn label_type(admin: &Client) -> Result<&'static str, Error> {
    let has_type: u64 = admin
        .query("SELECT count() FROM system.data_type_families WHERE name = 'LowCardinality'")
        .fetch_one()
        .await?;
    let gated: u64 = admin
        .query(
            "SELECT count() FROM system.settings
             WHERE name = 'allow_experimental_low_cardinality_type' AND value = '0'",
        )
        .fetch_one()
        .await?;
    Ok(if has_type > 0 && gated == 0 {
        "LowCardinality(String)"
    } else {
        "String"
    })
}

/// An insert into `table` that fails if a chunk cannot be sent, or the
/// server does not answer its end, within `timeout`.
pub(crate) async fn insert_into<R: Row>(
    client: &Client,
    table: &str,
    timeout: Duration,
) -> Result<clickhouse::insert::Insert<R>, Error> {
    Ok(client
        .insert::<R>(table)
        .await?
        .with_timeouts(Some(timeout), Some(timeout)))
}

/// A client for `config`'s server and database.
pub(crate) fn client(config: &ClickHouseConfig) -> Client {
    Client::default()
        .with_url(&config.url)
        .with_database(&config.database)
        .with_user(&config.user)
        .with_password(&config.password)
        .with_validation(false)
}

/// A runtime with one thread of its own, for a thread that blocks between
/// requests.
pub(crate) fn io_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("clickhouse-io")
        .enable_all()
        .build()
        .expect("a one-thread runtime builds")
}

/// Rows waiting for the next insert, and the frontiers they complete.
#[derive(Default)]
struct Batch {
    windows: Vec<WindowRow>,
    dead_letters: Vec<DeadLetterRow>,
    frontiers: Vec<Write>,
    since: Option<Instant>,
}

impl Batch {
    fn rows(&self) -> usize {
        self.windows.len() + self.dead_letters.len()
    }

    fn add(&mut self, write: Write) {
        match write {
            Write::Windows(names, updates) => {
                self.windows.extend(updates.iter().map(|u| {
                    let (metric, version, windows) = &names[u.metric as usize];
                    WindowRow {
                        metric: metric.clone(),
                        version: version.clone(),
                        window: windows[u.window as usize].clone(),
                        start: u.span.start,
                        end: u.span.end,
                        grp: join_group(&u.group),
                        count: u.state.count,
                        sum: u.state.sum_f64(),
                        sketch: u
                            .state
                            .sketch
                            .as_ref()
                            .map(Sketch::to_bytes)
                            .unwrap_or_default(),
                        revision: u.revision,
                        estimate: u
                            .state
                            .sketch
                            .as_ref()
                            .and_then(Sketch::estimate)
                            .unwrap_or(-1.0),
                    }
                }));
            }
            Write::DeadLetters(letters) => {
                self.dead_letters
                    .extend(letters.into_iter().map(|d| DeadLetterRow {
                        partition: d.partition,
                        offset: d.offset,
                        idx: d.index,
                        reason: d.reason,
                        watermark: d.watermark,
                        record: d.record,
                    }));
            }
            Write::Frontier(..) => self.frontiers.push(write),
        }
        if self.rows() > 0 && self.since.is_none() {
            self.since = Some(Instant::now());
        }
    }
}

/// Records that the configured versions are in use now, and drops the
/// partitions of every other version last in use more than `keep_old` ago.
async fn retire_versions(
    client: &Client,
    db: &str,
    metrics: &[MetricSpec],
    keep_old: Duration,
) -> Result<(), Error> {
    let now = super::now_ms();
    let configured = versions(metrics);
    for (metric, version) in &configured {
        client
            .query(&format!("INSERT INTO {db}.versions VALUES (?, ?, ?)"))
            .bind(metric)
            .bind(version)
            .bind(now)
            .execute()
            .await?;
    }
    let cutoff = unused_since(now, keep_old);
    let unused: Vec<VersionRow> = client
        .query(&format!(
            "SELECT ?fields FROM {db}.versions FINAL WHERE last_used < ?"
        ))
        .bind(cutoff)
        .fetch_all()
        .await?;
    for row in unused {
        if configured
            .iter()
            .any(|(m, v)| *m == row.metric && *v == row.version)
        {
            continue;
        }
        client
            .query(&format!("ALTER TABLE {db}.windows DROP PARTITION ?"))
            .bind(&row.version)
            .execute()
            .await?;
        info!(metric = %row.metric, version = %row.version, "dropped the results of a version no longer configured");
    }
    Ok(())
}

/// Deletes, by a mutation ClickHouse applies in the background, the
/// results past their retention, a whole day at a time: a window's cutoff
/// moves once a day, and `deleted` remembers the cutoff each window was
/// last deleted to.
async fn delete_expired(
    client: &Client,
    db: &str,
    metrics: &[MetricSpec],
    deleted: &mut HashMap<(String, String, String), i64>,
) -> Result<(), Error> {
    const DAY: i64 = 86_400_000;
    for e in expired(metrics, super::now_ms(), DAY) {
        let key = (e.metric.clone(), e.version.clone(), e.window.clone());
        if deleted.get(&key) == Some(&e.before) {
            continue;
        }
        let filter = "metric = ? AND version = ? AND window = ? AND start < ?";
        let rows: u64 = client
            .query(&format!("SELECT count() FROM {db}.windows WHERE {filter}"))
            .bind(&e.metric)
            .bind(&e.version)
            .bind(&e.window)
            .bind(e.before)
            .fetch_one()
            .await?;
        if rows > 0 {
            client
                .query(&format!("ALTER TABLE {db}.windows DELETE WHERE {filter}"))
                .bind(&e.metric)
                .bind(&e.version)
                .bind(&e.window)
                .bind(e.before)
                .execute()
                .await?;
            info!(metric = %e.metric, window = %e.window, rows, "deleting results past their retention");
        }
        deleted.insert(key, e.before);
    }
    Ok(())
}

/// A metric version, as `versions` holds it.
#[derive(Row, Deserialize)]
struct VersionRow {
    metric: String,
    version: String,
}

fn write_loop(
    client: &Client,
    config: &ClickHouseConfig,
    in_use: &InUse,
    keep_old: Duration,
    rx: Receiver<Write>,
    backlog: &Backlog,
) {
    // The HTTP client's connections are driven by the runtime's own thread,
    // so they stay serviced while this thread waits for rows.
    let runtime = io_runtime();
    let mut batch = Batch::default();
    let mut open = true;
    let mut versions_due = Instant::now() + VERSIONS_EVERY;
    let (mut retention_due, mut deleted) = (Instant::now(), HashMap::new());
    while open {
        if Instant::now() >= versions_due {
            let metrics = in_use.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let retire = retire_versions(client, &config.database, &metrics, keep_old);
            if let Err(e) = runtime.block_on(retire) {
                warn!(error = %e, "cannot date or drop metric versions; trying again later");
            }
            versions_due = Instant::now() + VERSIONS_EVERY;
        }
        if Instant::now() >= retention_due {
            let metrics = in_use.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let delete = delete_expired(client, &config.database, &metrics, &mut deleted);
            if let Err(e) = runtime.block_on(delete) {
                warn!(error = %e, "cannot delete results past their retention; trying again later");
            }
            retention_due = Instant::now() + RETENTION_EVERY;
        }
        let wait = batch.since.map_or(
            versions_due
                .min(retention_due)
                .saturating_duration_since(Instant::now()),
            |since| config.batch_interval.saturating_sub(since.elapsed()),
        );
        match rx.recv_timeout(wait) {
            Ok(write) => {
                batch.add(write);
                // Take what else is queued without waiting.
                while batch.rows() < config.batch_rows {
                    match rx.try_recv() {
                        Ok(write) => batch.add(write),
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        let due = batch.rows() >= config.batch_rows
            || batch
                .since
                .is_some_and(|since| since.elapsed() >= config.batch_interval)
            || !open;
        if batch.rows() == 0 {
            // Frontiers with nothing before them still unwritten.
            Durable::committed(&std::mem::take(&mut batch.frontiers));
        } else if due {
            let full = std::mem::take(&mut batch);
            runtime.block_on(retry::until_ok(
                "insert results into ClickHouse",
                || async { backlog.note(insert(client, &full, config.insert_timeout).await) },
            ));
            Durable::committed(&full.frontiers);
            backlog.written(full.rows());
        }
    }
    info!("clickhouse writer stopped");
}

async fn insert(client: &Client, batch: &Batch, timeout: Duration) -> Result<(), Error> {
    if !batch.windows.is_empty() {
        let mut insert = insert_into::<WindowRow>(client, "windows", timeout).await?;
        for row in &batch.windows {
            insert.write(row).await?;
        }
        insert.end().await?;
    }
    if !batch.dead_letters.is_empty() {
        let mut insert = insert_into::<DeadLetterRow>(client, "dead_letters", timeout).await?;
        for row in &batch.dead_letters {
            insert.write(row).await?;
        }
        insert.end().await?;
    }
    tracing::trace!(
        windows = batch.windows.len(),
        dead_letters = batch.dead_letters.len(),
        "inserted results"
    );
    Ok(())
}
