//! SQLite result store: one writer thread, a few reader connections, WAL.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use rusqlite::{params, Connection};
use tally_dataflow::aggregate::{AggState, Sketch};
use tally_dataflow::config::MetricSpec;
use tally_dataflow::operators::deliver::Sink;
use tally_dataflow::operators::source::DeadLetter;
use tally_dataflow::operators::windows::WindowUpdate;
use tally_dataflow::query::{Query, StoredWindow};
use tracing::{error, info};

/// Batches the writer may have queued before sinks must wait.
const QUEUE: usize = 256;
/// Separates dimension values in the stored group key. It cannot appear in a
/// value that came from JSON text without an escape, and is never produced by
/// the parser's number or boolean conversions.
const SEP: char = '\u{1f}';

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS windows (
    metric   TEXT    NOT NULL,
    window   TEXT    NOT NULL,
    start    INTEGER NOT NULL,
    end      INTEGER NOT NULL,
    grp      TEXT    NOT NULL,
    count    INTEGER NOT NULL,
    sum      REAL    NOT NULL,
    sketch   BLOB,
    revision INTEGER NOT NULL,
    PRIMARY KEY (metric, window, start, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    partition INTEGER NOT NULL,
    offset    INTEGER NOT NULL,
    reason    TEXT    NOT NULL,
    watermark INTEGER NOT NULL,
    record    BLOB    NOT NULL,
    PRIMARY KEY (partition, offset)
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

/// What the writer thread is asked to do.
enum Write {
    Windows(Vec<Arc<WindowUpdate>>),
    DeadLetters(Vec<DeadLetter>),
    /// Sink `.0` has sent everything before time `.1`.
    Frontier(usize, u64),
}

/// How far the store holds each sink's records: the frontier every sink has
/// reported, once what came before the report is committed.
#[derive(Clone, Default)]
pub struct Durable(Arc<Mutex<Vec<u64>>>);

impl Durable {
    fn register(&self) -> usize {
        let mut frontiers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        frontiers.push(0);
        frontiers.len() - 1
    }

    fn set(&self, sink: usize, frontier: u64) {
        let mut frontiers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        frontiers[sink] = frontiers[sink].max(frontier);
    }

    /// Every record any sink was given before this time is committed.
    pub fn through(&self) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// The embedded result store, for reading.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    readers: Arc<Mutex<Vec<Connection>>>,
}

/// The store's writer thread, and the sinks that feed it.
pub struct StoreWriter {
    tx: Sender<Write>,
    thread: JoinHandle<()>,
    durable: Durable,
}

impl StoreWriter {
    /// A sink for a worker's final window values. Take one per worker: the
    /// store's [`Durable`] frontier waits for every sink taken.
    pub fn window_sink(&self) -> WindowSink {
        WindowSink(self.tx.clone(), self.durable.register())
    }

    /// A sink for a worker's dead letters; one per worker, as above.
    pub fn dead_letter_sink(&self) -> DeadLetterSink {
        DeadLetterSink(self.tx.clone(), self.durable.register())
    }

    /// How far the store holds what its sinks were given.
    pub fn durable(&self) -> Durable {
        self.durable.clone()
    }

    /// Waits until everything queued has been committed. Drop every sink
    /// first: the writer finishes when the last of them is gone.
    pub fn close(self) {
        drop(self.tx);
        if self.thread.join().is_err() {
            error!("the store writer panicked; results queued at shutdown may be missing until the log is replayed");
        }
    }
}

impl SqliteStore {
    /// Opens (or creates) the store at `path` and starts its writer thread.
    pub fn open(
        path: &Path,
        metrics: Vec<MetricSpec>,
    ) -> Result<(SqliteStore, StoreWriter), StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        let (tx, rx) = bounded(QUEUE);
        let durable = Durable::default();
        let reports = durable.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(conn, rx, metrics, reports))
            .map_err(|e| {
                StoreError::Sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
            })?;
        let store = SqliteStore {
            path: path.to_owned(),
            readers: Arc::default(),
        };
        Ok((
            store,
            StoreWriter {
                tx,
                thread: writer,
                durable,
            },
        ))
    }

    /// Reads the stored windows a history query needs. Blocking: call it
    /// from a blocking thread.
    pub fn windows(&self, query: &Query) -> Result<Vec<StoredWindow>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT start, grp, count, sum, sketch FROM windows
                 WHERE metric = ?1 AND window = ?2 AND start >= ?3 AND start < ?4
                 ORDER BY start, grp",
            )?;
            let rows = stmt.query_map(
                params![
                    query.metric,
                    query.window.to_string(),
                    query.start,
                    query.end
                ],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, f64>(3)?,
                        row.get::<_, Option<Vec<u8>>>(4)?,
                    ))
                },
            )?;
            let mut out = Vec::new();
            for row in rows {
                let (start, grp, count, sum, sketch) = row?;
                let Some(group_value) = query.select(&grp.split(SEP).collect::<Vec<_>>()) else {
                    continue;
                };
                let sketch = sketch
                    .map(|b| Sketch::from_bytes(&b))
                    .transpose()
                    .map_err(StoreError::CorruptSketch)?;
                out.push(StoredWindow {
                    start,
                    group_value,
                    state: AggState::from_parts(count as u64, sum, sketch),
                });
            }
            Ok(out)
        })
    }

    /// The newest dead letters, newest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT partition, offset, reason, watermark, record FROM dead_letters
                 ORDER BY watermark DESC, partition, offset DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit as i64], |row| {
                Ok(DeadLetter {
                    partition: row.get(0)?,
                    offset: row.get::<_, i64>(1)? as u64,
                    reason: row.get(2)?,
                    watermark: row.get(3)?,
                    record: row.get(4)?,
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

/// The store as a sink of final window values.
#[derive(Clone)]
pub struct WindowSink(Sender<Write>, usize);

impl Sink<Arc<WindowUpdate>> for WindowSink {
    fn offer(&mut self, items: &mut Vec<Arc<WindowUpdate>>) {
        offer(&self.0, items, Write::Windows, |w| match w {
            Write::Windows(v) => v,
            _ => unreachable!("only windows are offered here"),
        });
    }

    fn advance(&mut self, frontier: u64) -> bool {
        self.0.try_send(Write::Frontier(self.1, frontier)).is_ok()
    }
}

/// The store as a sink of dead letters.
#[derive(Clone)]
pub struct DeadLetterSink(Sender<Write>, usize);

impl Sink<DeadLetter> for DeadLetterSink {
    fn offer(&mut self, items: &mut Vec<DeadLetter>) {
        offer(&self.0, items, Write::DeadLetters, |w| match w {
            Write::DeadLetters(v) => v,
            _ => unreachable!("only dead letters are offered here"),
        });
    }

    fn advance(&mut self, frontier: u64) -> bool {
        self.0.try_send(Write::Frontier(self.1, frontier)).is_ok()
    }
}

/// Queues all of `items` if there is room, or leaves them for a later offer.
fn offer<T>(
    tx: &Sender<Write>,
    items: &mut Vec<T>,
    wrap: fn(Vec<T>) -> Write,
    unwrap: fn(Write) -> Vec<T>,
) {
    match tx.try_send(wrap(std::mem::take(items))) {
        Ok(()) => {}
        Err(TrySendError::Full(back)) => *items = unwrap(back),
        Err(TrySendError::Disconnected(back)) => {
            // Only at shutdown; the log still holds these events.
            *items = unwrap(back);
        }
    }
}

fn write_loop(
    mut conn: Connection,
    rx: Receiver<Write>,
    metrics: Vec<MetricSpec>,
    durable: Durable,
) {
    let names: Vec<(String, Vec<String>)> = metrics
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                m.windows.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    while let Ok(first) = rx.recv() {
        // Commit everything queued in one transaction.
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut attempt = 0;
        loop {
            match commit(&mut conn, &batch, &names) {
                Ok(rows) => {
                    tracing::trace!(rows, "committed results");
                    for write in &batch {
                        if let Write::Frontier(sink, frontier) = write {
                            durable.set(*sink, *frontier);
                        }
                    }
                    break;
                }
                Err(e) => {
                    attempt += 1;
                    error!(error = %e, attempt, "cannot write results to sqlite; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(100 * attempt.min(50)));
                }
            }
        }
    }
    info!("store writer stopped");
}

fn commit(
    conn: &mut Connection,
    batch: &[Write],
    names: &[(String, Vec<String>)],
) -> Result<usize, rusqlite::Error> {
    let tx = conn.transaction()?;
    let mut rows = 0;
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO windows (metric, window, start, end, grp, count, sum, sketch, revision)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (metric, window, start, grp) DO UPDATE SET
                 end = excluded.end, count = excluded.count, sum = excluded.sum,
                 sketch = excluded.sketch, revision = excluded.revision
             WHERE excluded.revision > windows.revision",
        )?;
        let mut dead = tx.prepare_cached(
            "INSERT OR IGNORE INTO dead_letters (partition, offset, reason, watermark, record) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for write in batch {
            match write {
                Write::Windows(updates) => {
                    for u in updates {
                        let (metric, windows) = &names[u.metric as usize];
                        let sketch = u.state.sketch.as_ref().map(Sketch::to_bytes);
                        rows += upsert.execute(params![
                            metric,
                            windows[u.window as usize],
                            u.span.start,
                            u.span.end,
                            join_group(&u.group),
                            u.state.count as i64,
                            u.state.sum_f64(),
                            sketch,
                            u.revision,
                        ])?;
                    }
                }
                Write::DeadLetters(letters) => {
                    for d in letters {
                        rows += dead.execute(params![
                            d.partition,
                            d.offset as i64,
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

fn join_group(group: &[String]) -> String {
    let mut key = String::with_capacity(group.iter().map(|g| g.len() + 1).sum());
    for (i, value) in group.iter().enumerate() {
        if i > 0 {
            key.push(SEP);
        }
        key.push_str(value);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_dataflow::config::Config;
    use tally_dataflow::window::Span;

    fn config() -> Config {
        Config::load(
            Some(
                r#"
[[metric]]
name = "ad_clicks"
dimensions = ["campaignId", "country"]
windows = ["tumbling 10s"]
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
            group: vec!["c1".into(), country.into()],
            state: AggState {
                count,
                ..Default::default()
            },
            revision,
            is_final: true,
        }
    }

    #[test]
    fn upserts_keep_the_highest_revision() {
        let dir = tempfile::tempdir().unwrap();
        let config = config();
        let (store, writer) =
            SqliteStore::open(&dir.path().join("results.db"), config.metrics.clone()).unwrap();
        let mut sink = writer.window_sink();
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
        let params: Vec<(String, String)> = [
            ("metric", "ad_clicks"),
            ("start", "0"),
            ("end", "10"),
            ("country", "US"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let query = Query::parse(&params, &config, 0).unwrap();
        writer.close();
        let rows = store.windows(&query).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state.count, 3);
        let all: Vec<(String, String)> = [("metric", "ad_clicks"), ("start", "0"), ("end", "10")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            store
                .windows(&Query::parse(&all, &config, 0).unwrap())
                .unwrap()
                .len(),
            2
        );
    }
}
