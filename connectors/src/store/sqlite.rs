//! SQLite result store: one writer thread, a few reader connections, WAL.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::{params, Connection};
use tally_dataflow::aggregate::{AggState, Sketch};
use tally_dataflow::config::MetricSpec;
use tally_dataflow::model::DeadLetter;
use tally_dataflow::query::Fold;
use tracing::{info, warn};

use super::{
    expired, join_group, metric_versions, now_ms, split_group, unused_since, versions, Backlog,
    Durable, InUse, Recent, StoreWriter, StoredWindow, Write, RETENTION_EVERY, SEP, VERSIONS_EVERY,
};
use crate::retry;

const PRAGMAS: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS windows (
    metric   TEXT    NOT NULL,
    version  TEXT    NOT NULL,
    window   TEXT    NOT NULL,
    start    INTEGER NOT NULL,
    end      INTEGER NOT NULL,
    grp      TEXT    NOT NULL,
    count    INTEGER NOT NULL,
    sum      REAL    NOT NULL,
    sketch   BLOB,
    revision INTEGER NOT NULL,
    estimate REAL,
    PRIMARY KEY (metric, version, window, start, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    metric    TEXT    NOT NULL,
    version   TEXT    NOT NULL,
    last_used INTEGER NOT NULL,
    PRIMARY KEY (metric, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    partition INTEGER NOT NULL,
    offset    INTEGER NOT NULL,
    idx       INTEGER NOT NULL,
    reason    TEXT    NOT NULL,
    watermark INTEGER NOT NULL,
    record    BLOB    NOT NULL,
    PRIMARY KEY (partition, offset, idx)
) WITHOUT ROWID;
";

/// Errors of the SQLite store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed; the message says how.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored sketch could not be read back.
    #[error("corrupt sketch in the store: {0}")]
    CorruptSketch(String),
    /// The writer thread has stopped.
    #[error("the store writer has stopped")]
    Closed,
}

impl StoreError {
    /// Whether the same read may succeed later: a busy or locked database,
    /// or a failed disk read, may recover; a corrupt row or a stopped store
    /// will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                        | rusqlite::ErrorCode::SystemIoFailure
                )
            ),
            StoreError::CorruptSketch(_) | StoreError::Closed => false,
        }
    }
}

/// The embedded result store, for reading.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    readers: Arc<Mutex<Vec<Connection>>>,
}

impl SqliteStore {
    /// Opens (or creates) the store at `path`, deletes the results of
    /// versions unused for longer than `keep_old`, and starts its writer
    /// thread, which holds at most `queue` results.
    pub fn open(
        path: &Path,
        metrics: Vec<MetricSpec>,
        keep_old: Duration,
        queue: usize,
    ) -> Result<(SqliteStore, StoreWriter), StoreError> {
        let mut conn = Connection::open(path)?;
        conn.execute_batch(PRAGMAS)?;
        add_versions(&mut conn, &metrics)?;
        conn.execute_batch(SCHEMA)?;
        add_estimates(&conn)?;
        retire_versions(&mut conn, &metrics, keep_old)?;
        let writer = StoreWriter::start(
            "store-writer",
            metrics,
            queue,
            move |rx, in_use, backlog| write_loop(conn, rx, &in_use, keep_old, &backlog),
        )
        .map_err(|e| StoreError::Sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let store = SqliteStore {
            path: path.to_owned(),
            readers: Arc::default(),
        };
        Ok((store, writer))
    }

    /// Folds the stored windows a history query needs into `fold`, row by
    /// row, until it has them all or has hit a bound. Blocking: call it from
    /// a blocking thread.
    pub fn scan(&self, fold: &mut Fold) -> Result<(), StoreError> {
        self.with_reader(|conn| {
            // Filters on every dimension of the table name one group, which
            // is read alone. A read answered by estimates (?7) takes a
            // sketch only where a row has no estimate.
            let mut stmt = conn.prepare_cached(
                "SELECT start, grp, count, sum,
                        CASE WHEN ?7 AND estimate IS NOT NULL THEN NULL ELSE sketch END,
                        CASE WHEN ?7 THEN estimate END
                 FROM windows
                 WHERE metric = ?1 AND version = ?2 AND window = ?3 AND start >= ?4 AND start < ?5
                   AND (?6 IS NULL OR grp = ?6)
                 ORDER BY start, grp",
            )?;
            let scan = fold.scan();
            let only = scan.only.as_deref().map(join_group);
            // Each read goes on from the end of the last window the one
            // before it found.
            let mut from = scan.start;
            for read in &scan.reads {
                if from >= scan.end {
                    break;
                }
                let mut rows = stmt.query(params![
                    scan.metric,
                    read.version,
                    read.window.to_string(),
                    from,
                    scan.end,
                    only,
                    scan.by_estimate(read)
                ])?;
                let mut last = None;
                while let Some(row) = rows.next()? {
                    let state = state_at(row, 2)?;
                    let grp = row.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
                    let group: Vec<&str> = grp.split(SEP).collect();
                    let start: i64 = row.get(0)?;
                    last = Some(start);
                    let flow = match row.get::<_, Option<f64>>(5)? {
                        Some(estimate) => fold.add_estimated(start, &group, &state, estimate),
                        None => fold.add(start, &group, &state),
                    };
                    if flow.is_break() {
                        return Ok(());
                    }
                }
                if let Some(last) = last {
                    from = last + read.window.size();
                }
            }
            Ok(())
        })
    }

    /// The start of the earliest stored window of any of `versions` of
    /// `metric`: from when they hold data. Blocking, as
    /// [`SqliteStore::scan`].
    pub fn since(&self, metric: &str, versions: &[String]) -> Result<Option<i64>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT min(start) FROM windows WHERE metric = ?1 AND version = ?2",
            )?;
            let mut since: Option<i64> = None;
            for version in versions {
                let first: Option<i64> =
                    stmt.query_row(params![metric, version], |row| row.get(0))?;
                since = since.into_iter().chain(first).min();
            }
            Ok(since)
        })
    }

    /// The stored results `recent` names, newest window first. Blocking,
    /// as [`SqliteStore::scan`].
    pub fn recent(&self, recent: &Recent) -> Result<Vec<StoredWindow>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT start, end, grp, count, sum, sketch, revision FROM windows
                 WHERE metric = ?1 AND version = ?2 AND window = ?3 AND start >= ?4
                 ORDER BY start DESC, grp LIMIT ?5",
            )?;
            let mut rows = stmt.query(params![
                recent.metric,
                recent.version,
                recent.window,
                recent.since,
                i64::try_from(recent.limit).unwrap_or(i64::MAX)
            ])?;
            let mut read = Vec::new();
            while let Some(row) = rows.next()? {
                let grp = row.get_ref(2)?.as_str().map_err(rusqlite::Error::from)?;
                read.push(StoredWindow {
                    start: row.get(0)?,
                    end: row.get(1)?,
                    group: split_group(grp, recent.dimensions),
                    state: state_at(row, 3)?,
                    revision: row.get(6)?,
                });
            }
            Ok(read)
        })
    }

    /// The newest dead letters, newest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT partition, offset, idx, reason, watermark, record FROM dead_letters
                 ORDER BY watermark DESC, partition, offset DESC, idx DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit as i64], |row| {
                Ok(DeadLetter {
                    partition: row.get(0)?,
                    offset: row.get::<_, i64>(1)? as u64,
                    index: row.get(2)?,
                    reason: row.get(3)?,
                    watermark: row.get(4)?,
                    record: row.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.readers.lock().ok().and_then(|mut pool| pool.pop());
        let conn = match pooled {
            Some(conn) => conn,
            None => Connection::open(&self.path)?,
        };
        let result = f(&conn);
        if let Ok(mut pool) = self.readers.lock() {
            pool.push(conn);
        }
        result
    }
}

/// A stored state from a row's columns `count, sum, sketch`, the first at
/// `at`.
fn state_at(row: &rusqlite::Row<'_>, at: usize) -> Result<AggState, StoreError> {
    let sketch = row
        .get_ref(at + 2)?
        .as_blob_or_null()
        .map_err(rusqlite::Error::from)?
        .map(Sketch::from_bytes)
        .transpose()
        .map_err(StoreError::CorruptSketch)?;
    Ok(AggState::from_parts(
        row.get::<_, i64>(at)? as u64,
        row.get(at + 1)?,
        sketch,
    ))
}

/// The columns of table `windows`; none before it exists.
fn columns(conn: &Connection) -> Result<Vec<String>, rusqlite::Error> {
    conn.prepare("SELECT name FROM pragma_table_info('windows')")?
        .query_map([], |row| row.get(0))?
        .collect()
}

/// Gives a store written before sketches carried their estimates the
/// column; its rows have none, and are read by their sketches.
fn add_estimates(conn: &Connection) -> Result<(), rusqlite::Error> {
    if !columns(conn)?.iter().any(|c| c == "estimate") {
        conn.execute_batch("ALTER TABLE windows ADD COLUMN estimate REAL")?;
    }
    Ok(())
}

/// Gives the rows of a store written before results carried their
/// metric's version the version of the metric of that name as configured
/// now, in one transaction; rows of metrics no longer configured get none
/// (`""`) and are never read. A store that has versions is left alone.
fn add_versions(conn: &mut Connection, metrics: &[MetricSpec]) -> Result<(), rusqlite::Error> {
    let columns = columns(conn)?;
    if columns.is_empty() || columns.iter().any(|c| c == "version") {
        return Ok(());
    }
    let tx = conn.transaction()?;
    tx.execute_batch(
        "ALTER TABLE windows RENAME TO windows_unversioned;
         CREATE TEMP TABLE configured (metric TEXT PRIMARY KEY, version TEXT NOT NULL);",
    )?;
    for (metric, version) in metric_versions(metrics) {
        tx.execute(
            "INSERT OR REPLACE INTO temp.configured VALUES (?1, ?2)",
            params![metric, version],
        )?;
    }
    tx.execute_batch(SCHEMA)?;
    let moved = tx.execute(
        "INSERT INTO windows (metric, version, window, start, end, grp, count, sum, sketch, revision)
         SELECT w.metric, coalesce(v.version, ''), w.window, w.start, w.end, w.grp, w.count,
                w.sum, w.sketch, w.revision
         FROM windows_unversioned w LEFT JOIN temp.configured v ON v.metric = w.metric",
        [],
    )?;
    // Dated now, so that versions no longer configured go after keep_old.
    tx.execute(
        "INSERT OR IGNORE INTO versions SELECT DISTINCT metric, version, ?1 FROM windows",
        params![now_ms()],
    )?;
    tx.execute_batch("DROP TABLE windows_unversioned; DROP TABLE temp.configured;")?;
    tx.commit()?;
    info!(
        rows = moved,
        "gave the stored results their metrics' versions"
    );
    Ok(())
}

/// Records that the configured versions are in use now, and deletes the
/// results of every other version last in use more than `keep_old` ago.
fn retire_versions(
    conn: &mut Connection,
    metrics: &[MetricSpec],
    keep_old: Duration,
) -> Result<(), rusqlite::Error> {
    let now = now_ms();
    let configured = versions(metrics);
    let tx = conn.transaction()?;
    for (metric, version) in &configured {
        tx.execute(
            "INSERT OR REPLACE INTO versions VALUES (?1, ?2, ?3)",
            params![metric, version, now],
        )?;
    }
    let cutoff = unused_since(now, keep_old);
    let unused: Vec<(String, String)> = tx
        .prepare("SELECT metric, version FROM versions WHERE last_used < ?1")?
        .query_map(params![cutoff], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (metric, version) in unused.iter().filter(|v| !configured.contains(v)) {
        let rows = tx.execute(
            "DELETE FROM windows WHERE metric = ?1 AND version = ?2",
            params![metric, version],
        )?;
        tx.execute(
            "DELETE FROM versions WHERE metric = ?1 AND version = ?2",
            params![metric, version],
        )?;
        info!(
            metric,
            version, rows, "deleted the results of a version no longer configured"
        );
    }
    tx.commit()
}

/// Windows a chunk of retention deletes at most: about 25,000 rows for a
/// metric of 250 groups, a few tens of milliseconds of the writer's time.
const RETENTION_CHUNK: i64 = 100;

/// Deletes one chunk of the results past their retention: the oldest
/// [`RETENTION_CHUNK`] windows of the first window that has any. Returns
/// whether there may be more.
fn delete_expired(conn: &mut Connection, metrics: &[MetricSpec]) -> Result<bool, rusqlite::Error> {
    for e in expired(metrics, now_ms(), 1) {
        let oldest: Option<i64> = conn
            .prepare_cached(
                "SELECT min(start) FROM windows WHERE metric = ?1 AND version = ?2 AND window = ?3",
            )?
            .query_row(params![e.metric, e.version, e.window], |row| row.get(0))?;
        let Some(oldest) = oldest.filter(|&o| o < e.before) else {
            continue;
        };
        let until = e
            .before
            .min(oldest.saturating_add(RETENTION_CHUNK * e.size));
        let rows = conn.prepare_cached(
            "DELETE FROM windows WHERE metric = ?1 AND version = ?2 AND window = ?3 AND start >= ?4 AND start < ?5",
        )?
        .execute(params![e.metric, e.version, e.window, oldest, until])?;
        tracing::debug!(
            metric = e.metric,
            window = e.window,
            rows,
            "deleted results past their retention"
        );
        return Ok(true);
    }
    Ok(false)
}

fn write_loop(
    mut conn: Connection,
    rx: Receiver<Write>,
    in_use: &InUse,
    keep_old: Duration,
    backlog: &Backlog,
) {
    let mut versions_due = Instant::now() + VERSIONS_EVERY;
    let mut retention_due = Instant::now();
    loop {
        match rx.recv_deadline(versions_due.min(retention_due)) {
            Ok(first) => {
                // Commit everything queued in one transaction.
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                let rows = retry::blocking("write results to SQLite", || {
                    backlog.note(commit(&mut conn, &batch))
                });
                tracing::trace!(rows, "committed results");
                Durable::committed(&batch);
                backlog.written(batch.iter().map(Write::rows).sum());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        // Housekeeping runs between commits, however busy the writer is.
        let now = Instant::now();
        if now >= versions_due {
            let metrics = in_use.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Err(e) = retire_versions(&mut conn, &metrics, keep_old) {
                warn!(error = %e, "cannot date or delete metric versions; trying again later");
            }
            versions_due = now + VERSIONS_EVERY;
        }
        if now >= retention_due {
            let metrics = in_use.lock().unwrap_or_else(|e| e.into_inner()).clone();
            retention_due = match delete_expired(&mut conn, &metrics) {
                // More to delete: the next chunk after the next commit.
                Ok(true) => now,
                Ok(false) => now + RETENTION_EVERY,
                Err(e) => {
                    warn!(error = %e, "cannot delete results past their retention; trying again later");
                    now + RETENTION_EVERY
                }
            };
        }
    }
    info!("store writer stopped");
}

fn commit(conn: &mut Connection, batch: &[Write]) -> Result<usize, rusqlite::Error> {
    let tx = conn.transaction()?;
    let mut rows = 0;
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO windows (metric, version, window, start, end, grp, count, sum, sketch, revision, estimate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (metric, version, window, start, grp) DO UPDATE SET
                 end = excluded.end, count = excluded.count, sum = excluded.sum,
                 sketch = excluded.sketch, revision = excluded.revision, estimate = excluded.estimate
             WHERE excluded.revision > windows.revision",
        )?;
        let mut dead = tx.prepare_cached(
            "INSERT OR IGNORE INTO dead_letters (partition, offset, idx, reason, watermark, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for write in batch {
            match write {
                Write::Windows(names, updates) => {
                    for u in updates {
                        let (metric, version, windows) = &names[u.metric as usize];
                        let sketch = u.state.sketch.as_ref().map(Sketch::to_bytes);
                        rows += upsert.execute(params![
                            metric,
                            version,
                            windows[u.window as usize],
                            u.span.start,
                            u.span.end,
                            join_group(&u.group),
                            u.state.count as i64,
                            u.state.sum_f64(),
                            sketch,
                            u.revision,
                            u.state.sketch.as_ref().and_then(Sketch::estimate),
                        ])?;
                    }
                }
                Write::DeadLetters(letters) => {
                    for d in letters {
                        rows += dead.execute(params![
                            d.partition,
                            d.offset as i64,
                            d.index,
                            d.reason,
                            d.watermark,
                            d.record
                        ])?;
                    }
                }
                Write::Frontier(..) => {}
            }
        }
    }
    tx.commit()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_dataflow::aggregate::Value;
    use tally_dataflow::config::{Config, DEFAULT_STORE_QUEUE};
    use tally_dataflow::model::WindowUpdate;
    use tally_dataflow::ports::Sink;
    use tally_dataflow::query::{Pass, Query};

    const WEEK: Duration = Duration::from_secs(7 * 86_400);
    use tally_dataflow::window::Span;

    fn config() -> Config {
        Config::load(
            Some(
                r#"
[[metric]]
name = "ad_clicks"
dimensions = ["campaignId", "country"]
# The store's own rows, kept for ever: these tests write windows of 1970.
windows = ["tumbling 10s keep forever"]
rollups = []
projections = []
"#,
            ),
            [],
        )
        .unwrap()
    }

    fn update(start: i64, country: &str, count: u64, revision: u32) -> WindowUpdate {
        WindowUpdate {
            metric: 0,
            window: 0,
            span: Span {
                start,
                end: start + 10_000,
            },
            group: vec!["c1".into(), country.into()].into(),
            state: AggState {
                count,
                ..Default::default()
            },
            revision,
            is_final: true,
            appended_at: None,
        }
    }

    #[test]
    fn upserts_keep_the_highest_revision() {
        let dir = tempfile::tempdir().unwrap();
        let config = config();
        let (store, writer) = SqliteStore::open(
            &dir.path().join("results.db"),
            config.metrics.clone(),
            WEEK,
            DEFAULT_STORE_QUEUE,
        )
        .unwrap();
        let mut sink = writer.sinks(&config.metrics, 1, false).windows.remove(0);
        let mut batch = vec![
            update(0, "US", 2, 0),
            update(0, "US", 3, 1),
            update(0, "DE", 1, 0),
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        sink.offer(&mut batch);
        // A replay re-emits revision 0 with the same key: it must not win.
        sink.offer(&mut vec![Arc::new(update(0, "US", 2, 0))]);
        drop(sink);
        writer.close();
        let counts = |filter| counts(&store, &config, filter);
        assert_eq!(counts(&[("country", "US")]), [(vec![], Some(3.0))]);
        let country = |c: &str| vec![("country".to_string(), c.to_string())];
        assert_eq!(
            counts(&[("groupBy", "country")]),
            [(country("US"), Some(3.0)), (country("DE"), Some(1.0))]
        );
    }

    /// Each series' group and its first value.
    type Counted = Vec<(Vec<(String, String)>, Option<f64>)>;

    /// What a query of the first ten seconds of ad_clicks reads, by series.
    fn counts(store: &SqliteStore, config: &Config, filter: &[(&str, &str)]) -> Counted {
        let mut params = vec![("metric", "ad_clicks"), ("start", "0"), ("end", "10")];
        params.extend_from_slice(filter);
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut fold =
            Fold::new(Query::parse(&params, &config.metrics, &config.history, 0).unwrap());
        store.scan(&mut fold).unwrap();
        match fold.finish().unwrap() {
            Pass::Done(answer) => answer
                .series
                .iter()
                .map(|s| {
                    let value = match &s.points[0].1 {
                        Some(Value::Number(n)) => Some(*n),
                        None => None,
                        Some(other) => panic!("{other:?} is not a count"),
                    };
                    (s.group.clone(), value)
                })
                .collect(),
            Pass::Again(_) => panic!("a small answer takes one scan"),
        }
    }

    #[test]
    fn results_from_before_versions_take_their_metrics_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.db");
        {
            let legacy = Connection::open(&path).unwrap();
            legacy
                .execute_batch(
                    "CREATE TABLE windows (
                        metric TEXT NOT NULL, window TEXT NOT NULL, start INTEGER NOT NULL,
                        end INTEGER NOT NULL, grp TEXT NOT NULL, count INTEGER NOT NULL,
                        sum REAL NOT NULL, sketch BLOB, revision INTEGER NOT NULL,
                        PRIMARY KEY (metric, window, start, grp)
                    ) WITHOUT ROWID;
                    INSERT INTO windows VALUES
                        ('ad_clicks', 'tumbling 10s', 0, 10000, 'c1' || char(31) || 'US', 4, 0, NULL, 0),
                        ('gone', 'tumbling 10s', 0, 10000, 'x', 9, 0, NULL, 0);",
                )
                .unwrap();
        }
        let config = config();
        let (store, writer) =
            SqliteStore::open(&path, config.metrics.clone(), WEEK, DEFAULT_STORE_QUEUE).unwrap();
        writer.close();
        assert_eq!(counts(&store, &config, &[]), [(vec![], Some(4.0))]);
        // Another definition of the metric does not read them.
        let changed = Config::load(
            Some("[[metric]]\nname = \"ad_clicks\"\ndimensions = [\"campaignId\", \"country\"]\nwindows = [\"tumbling 10s keep forever\", \"tumbling 1m\"]\nrollups = []\nprojections = []\n"),
            [],
        )
        .unwrap();
        assert_eq!(counts(&store, &changed, &[]), [(vec![], Some(0.0))]);
        // Opening again finds versions and leaves them.
        drop(store);
        let (store, writer) =
            SqliteStore::open(&path, changed.metrics.clone(), WEEK, DEFAULT_STORE_QUEUE).unwrap();
        writer.close();
        assert_eq!(counts(&store, &config, &[]), [(vec![], Some(4.0))]);
    }

    #[test]
    fn a_version_unused_for_longer_than_keep_old_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.db");
        let config = config();
        let (store, writer) =
            SqliteStore::open(&path, config.metrics.clone(), WEEK, DEFAULT_STORE_QUEUE).unwrap();
        let mut sink = writer.sinks(&config.metrics, 1, false).windows.remove(0);
        sink.offer(&mut vec![Arc::new(update(0, "US", 2, 0))]);
        drop(sink);
        writer.close();
        assert_eq!(counts(&store, &config, &[]), [(vec![], Some(2.0))]);
        // Another definition, opened with a week to keep: the old one stays.
        let changed = Config::load(
            Some("[[metric]]\nname = \"ad_clicks\"\ndimensions = [\"country\"]\nwindows = [\"tumbling 10s keep forever\"]\nrollups = []\nprojections = []\n"),
            [],
        )
        .unwrap();
        let (_, writer) =
            SqliteStore::open(&path, changed.metrics.clone(), WEEK, DEFAULT_STORE_QUEUE).unwrap();
        writer.close();
        assert_eq!(counts(&store, &config, &[]), [(vec![], Some(2.0))]);
        // With nothing to keep, it goes; the configured one is dated anew.
        std::thread::sleep(Duration::from_millis(5));
        let (_, writer) = SqliteStore::open(
            &path,
            changed.metrics.clone(),
            Duration::ZERO,
            DEFAULT_STORE_QUEUE,
        )
        .unwrap();
        writer.close();
        assert_eq!(counts(&store, &config, &[]), [(vec![], Some(0.0))]);
    }

    #[test]
    fn results_past_their_retention_are_deleted_a_chunk_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.db");
        let config = Config::load(
            Some("[[metric]]\nname = \"ad_clicks\"\ndimensions = [\"campaignId\", \"country\"]\nwindows = [\"tumbling 10s keep 1d\"]\nrollups = []\nprojections = []\n"),
            [],
        )
        .unwrap();
        let now = now_ms() / 10_000 * 10_000;
        let day = 86_400_000;
        // 250 old windows, more than one chunk, and one that is kept.
        let mut batch: Vec<_> = (0..250)
            .map(|i| Arc::new(update(now - 2 * day + i * 10_000, "US", 1, 0)))
            .collect();
        batch.push(Arc::new(update(now - 3_600_000, "US", 1, 0)));
        let (_, writer) =
            SqliteStore::open(&path, config.metrics.clone(), WEEK, DEFAULT_STORE_QUEUE).unwrap();
        let mut sink = writer.sinks(&config.metrics, 1, false).windows.remove(0);
        sink.offer(&mut batch);
        assert!(batch.is_empty(), "the writer took the batch");
        let rows = || -> i64 {
            Connection::open(&path)
                .unwrap()
                .query_row("SELECT count(*) FROM windows", [], |r| r.get(0))
                .unwrap()
        };
        drop(sink);
        writer.close();
        assert!(rows() > 1, "the rows were written");
        // A writer deletes at start, and goes on a chunk at a time between
        // commits.
        let (_, writer) =
            SqliteStore::open(&path, config.metrics.clone(), WEEK, DEFAULT_STORE_QUEUE).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while rows() != 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        writer.close();
        assert_eq!(rows(), 1, "only the window within a day is left");
    }
}
