//! The result store: final window values, kept for history queries.
//!
//! The embedded store is SQLite ([`sqlite`]), one file in the data
//! directory; the cluster's is ClickHouse ([`clickhouse`]).
//!
//! **Versions.** A result belongs to a version of its metric: the
//! [`fingerprint`] of the definition that produced it, which is part of its
//! key. A history query reads the version of the metric as configured, so
//! a changed definition never mixes its results with the old one's.
//!
//! Each store also records, per version, when it was last configured: at
//! start and every hour while it is. The results of a version no longer
//! configured for `backfill.keep_old` are deleted in bulk (a ranged delete
//! in SQLite, `DROP PARTITION` in ClickHouse), so that a definition put
//! back within that time finds its results, and one long gone costs
//! nothing.
//!
//! **Retention.** Each window of a metric and of its rollups keeps its
//! results for its `keep` ([`MetricSpec::keep`]); older ones are removed in
//! bulk, a ranged delete at a time in SQLite between the writer's commits,
//! an `ALTER TABLE … DELETE` a day at a time in ClickHouse, which applies
//! it in the background. Neither holds up the results being written.
//!
//! **Delivery guarantee.** A window result is keyed by (metric, version,
//! window, start, group) and carries a revision. Writing it replaces a stored row only with
//! a higher revision (an upsert in SQLite, a `ReplacingMergeTree` versioned by
//! revision in ClickHouse), so re-emitting results, as a restart that replays
//! the log does, overwrites and never adds.
//!
//! **Reads.** A history query's rows are streamed in key order, `(start,
//! grp)`, into a [`tally_dataflow::query::Fold`]: sketches merge in that
//! order, so both stores give the same estimates for the same rows.
//!
//! **Backpressure.** Workers hand results to a writer thread ([`StoreWriter`]),
//! which holds at most `dataflow.store_queue` of them, queued or being
//! written. When it holds that many, or while its last write failed, the
//! worker's sink keeps the results and the dataflow stops reading the log
//! until the writer catches up; each such stall is counted ([`Stalls`]).
//! A writer that cannot reach its database retries the same rows until it
//! can, so a store outage stalls the job at once, leaves the backlog in the
//! log, and loses nothing.

pub mod clickhouse;
pub mod sqlite;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};
use tally_dataflow::config::MetricSpec;
use tally_dataflow::fingerprint;
use tally_dataflow::model::DeadLetter;
use tally_dataflow::model::WindowUpdate;
use tally_dataflow::ports::Sink;
use tally_dataflow::rollup;
use tally_dataflow::time::now_ms;
use tracing::error;

/// The most results a sink hands a writer at once, so that the writer can
/// take them a few at a time, however many an activation of a worker closes.
const CHUNK: usize = 4096;

/// Separates dimension values in the stored group key. It cannot appear in a
/// value that came from JSON text without an escape, and is never produced by
/// the parser's number or boolean conversions.
const SEP: char = '\u{1f}';

/// What a writer thread is asked to do.
enum Write {
    /// Window values of the job whose metrics `.0` names.
    Windows(Names, Vec<Arc<WindowUpdate>>),
    DeadLetters(Vec<DeadLetter>),
    /// Sink `.1` of the job `.0` is for has sent everything before time `.2`.
    Frontier(Durable, usize, u64),
}

impl Write {
    /// The results it holds.
    fn rows(&self) -> usize {
        match self {
            Write::Windows(_, rows) => rows.len(),
            Write::DeadLetters(rows) => rows.len(),
            Write::Frontier(..) => 0,
        }
    }
}

/// Each metric's stored name, its version and its windows' stored specs,
/// by its index in a job: see [`names`].
type Names = Arc<Vec<(String, String, Vec<String>)>>;

/// The metrics whose versions are in use, which a writer dates every
/// [`VERSIONS_EVERY`] so that `backfill.keep_old` keeps their results.
type InUse = Arc<Mutex<Vec<MetricSpec>>>;

/// How far the store holds each of one job's sinks' records: the frontier
/// every sink has reported, once what came before the report is committed.
/// Each job has its own, so that a backfill far behind does not hold back
/// the live job's checkpoints.
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

    /// Records the frontiers reported in `writes`, once they are committed.
    fn committed(writes: &[Write]) {
        for write in writes {
            if let Write::Frontier(durable, sink, frontier) = write {
                durable.set(*sink, *frontier);
            }
        }
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

/// What a writer holds for the sinks, shared with them: how many results
/// it was handed and has not yet written, whether its last attempt to
/// write failed, and how often a sink found it unable to take more.
struct Backlog {
    /// `dataflow.store_queue`: the results it may hold.
    limit: usize,
    held: AtomicUsize,
    failing: AtomicBool,
    /// Stalls because it held `limit` results, and because it was failing.
    full: AtomicU64,
    stalled_failing: AtomicU64,
}

impl Backlog {
    fn new(limit: usize) -> Backlog {
        Backlog {
            limit,
            held: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            full: AtomicU64::new(0),
            stalled_failing: AtomicU64::new(0),
        }
    }

    /// Takes room for `rows` more results, if it has it. An empty writer
    /// takes any number, so that a limit below [`CHUNK`] still lets every
    /// result through.
    fn reserve(&self, rows: usize) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held == 0 || held + rows <= self.limit).then_some(held + rows)
            })
            .is_ok()
    }

    /// Gives back the room of `rows` results, once the store has them.
    fn written(&self, rows: usize) {
        self.held.fetch_sub(rows, Ordering::Relaxed);
    }

    /// Records the outcome of a write, and passes it on.
    fn note<T, E>(&self, result: Result<T, E>) -> Result<T, E> {
        self.failing.store(result.is_err(), Ordering::Relaxed);
        result
    }

    fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }
}

/// Reads a writer's [`Stalls`].
#[derive(Clone)]
pub struct StallCounter(Arc<Backlog>);

impl StallCounter {
    /// The stalls so far.
    pub fn read(&self) -> Stalls {
        Stalls {
            full: self.0.full.load(Ordering::Relaxed),
            failing: self.0.stalled_failing.load(Ordering::Relaxed),
        }
    }
}

/// How often a sink found a writer unable to take more results, which
/// stopped its worker's reading of the log until the writer caught up.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stalls {
    /// The writer held `dataflow.store_queue` results.
    pub full: u64,
    /// Its last attempt to write had failed.
    pub failing: u64,
}

/// A store's writer thread, and the sinks that feed it.
pub struct StoreWriter {
    tx: Sender<Write>,
    thread: JoinHandle<()>,
    backlog: Arc<Backlog>,
    in_use: InUse,
}

/// One job's sinks into the store, one of each kind per worker, and how
/// far the store holds what they were given.
pub struct JobSinks {
    /// Each worker's sink of final window values.
    pub windows: Vec<WindowSink>,
    /// Each worker's sink of dead letters, if the job writes them.
    pub dead_letters: Vec<DeadLetterSink>,
    /// The frontier every one of these sinks has reached in the store.
    pub durable: Durable,
}

impl StoreWriter {
    /// Starts a writer thread running `write_loop` until every sink is
    /// gone, with `metrics` in use, holding at most `queue` results.
    fn start(
        name: &str,
        metrics: Vec<MetricSpec>,
        queue: usize,
        write_loop: impl FnOnce(Receiver<Write>, InUse, Arc<Backlog>) + Send + 'static,
    ) -> std::io::Result<StoreWriter> {
        // The backlog bounds what the channel holds, in results.
        let (tx, rx) = unbounded();
        let (in_use, backlog) = (Arc::new(Mutex::new(metrics)), Arc::new(Backlog::new(queue)));
        let (dated, held) = (Arc::clone(&in_use), Arc::clone(&backlog));
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || write_loop(rx, dated, held))?;
        Ok(StoreWriter {
            tx,
            thread,
            backlog,
            in_use,
        })
    }

    /// How often the sinks have stalled on this writer, to be read while
    /// it runs, and after.
    pub fn stalls(&self) -> StallCounter {
        StallCounter(Arc::clone(&self.backlog))
    }

    /// The sinks of a job of `workers` workers computing `metrics`: the
    /// store keys what they write by the version of each metric. A job
    /// that writes no dead letters gets no sinks for them, which would
    /// otherwise hold its durable frontier back.
    pub fn sinks(&self, metrics: &[MetricSpec], workers: usize, dead_letters: bool) -> JobSinks {
        let (names, durable) = (Arc::new(names(metrics)), Durable::default());
        let feed = || Feed {
            tx: self.tx.clone(),
            durable: durable.clone(),
            sink: durable.register(),
            backlog: Arc::clone(&self.backlog),
            stalled: false,
        };
        JobSinks {
            windows: (0..workers)
                .map(|_| WindowSink(feed(), Arc::clone(&names)))
                .collect(),
            dead_letters: (0..workers)
                .filter(|_| dead_letters)
                .map(|_| DeadLetterSink(feed()))
                .collect(),
            durable: durable.clone(),
        }
    }

    /// Says which metrics' versions are in use from now on: see
    /// [`VERSIONS_EVERY`].
    pub fn in_use(&self, metrics: Vec<MetricSpec>) {
        *self.in_use.lock().unwrap_or_else(|e| e.into_inner()) = metrics;
    }

    /// Waits until everything queued has been written. Drop every sink
    /// first: the writer finishes when the last of them is gone.
    pub fn close(self) {
        drop(self.tx);
        if self.thread.join().is_err() {
            error!("the store writer panicked; results queued at shutdown may be missing until the log is replayed");
        }
    }
}

/// One sink's way to the writer.
#[derive(Clone)]
struct Feed {
    tx: Sender<Write>,
    /// The job's frontiers, and the sink's index there.
    durable: Durable,
    sink: usize,
    backlog: Arc<Backlog>,
    /// Whether its last offer left results behind: a stall is counted
    /// once, when it begins.
    stalled: bool,
}

impl Feed {
    /// Queues `items`, in chunks, while the writer is writing and has
    /// room, and leaves the rest for a later offer.
    fn offer<T>(
        &mut self,
        items: &mut Vec<T>,
        wrap: impl Fn(Vec<T>) -> Write,
        unwrap: fn(Write) -> Vec<T>,
    ) {
        let failing = self.backlog.is_failing();
        let mut rest = std::mem::take(items).into_iter();
        while !failing && rest.len() > 0 {
            let rows = rest.len().min(CHUNK);
            if !self.backlog.reserve(rows) {
                break;
            }
            let chunk: Vec<T> = rest.by_ref().take(rows).collect();
            if let Err(back) = self.tx.send(wrap(chunk)) {
                // Only at shutdown; the log still holds these events.
                *items = unwrap(back.into_inner());
                break;
            }
        }
        items.extend(rest);
        let stalled = !items.is_empty();
        if stalled && !self.stalled {
            let count = if failing {
                &self.backlog.stalled_failing
            } else {
                &self.backlog.full
            };
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.stalled = stalled;
    }

    /// Reports the sink's frontier, unless the writer is failing: then
    /// the frontier waits, as the results do.
    fn advance(&self, frontier: u64) -> bool {
        !self.backlog.is_failing()
            && self
                .tx
                .send(Write::Frontier(self.durable.clone(), self.sink, frontier))
                .is_ok()
    }
}

/// The store as a sink of final window values, of one job's metrics.
#[derive(Clone)]
pub struct WindowSink(Feed, Names);

impl Sink<Arc<WindowUpdate>> for WindowSink {
    fn offer(&mut self, items: &mut Vec<Arc<WindowUpdate>>) {
        let names = Arc::clone(&self.1);
        self.0.offer(
            items,
            |v| Write::Windows(Arc::clone(&names), v),
            |w| match w {
                Write::Windows(_, v) => v,
                _ => unreachable!("only windows are offered here"),
            },
        );
    }

    fn advance(&mut self, frontier: u64) -> bool {
        self.0.advance(frontier)
    }
}

/// The store as a sink of dead letters.
#[derive(Clone)]
pub struct DeadLetterSink(Feed);

impl Sink<DeadLetter> for DeadLetterSink {
    fn offer(&mut self, items: &mut Vec<DeadLetter>) {
        self.0.offer(items, Write::DeadLetters, |w| match w {
            Write::DeadLetters(v) => v,
            _ => unreachable!("only dead letters are offered here"),
        });
    }

    fn advance(&mut self, frontier: u64) -> bool {
        self.0.advance(frontier)
    }
}

/// Each metric's stored name, its version (the fingerprint of its
/// definition) and its windows' stored specs, by index, followed by its
/// rollups', as the job indexes them ([`rollup::expand`]).
fn names(metrics: &[MetricSpec]) -> Vec<(String, String, Vec<String>)> {
    rollup::expand(metrics)
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                fingerprint::metric(m),
                m.windows.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

/// The stored name and version of each metric and each of its rollups.
fn versions(metrics: &[MetricSpec]) -> Vec<(String, String)> {
    rollup::expand(metrics)
        .iter()
        .map(|m| (m.name.clone(), fingerprint::metric(m)))
        .collect()
}

/// The stored name and version of each metric itself, which results from
/// before versions take.
fn metric_versions(metrics: &[MetricSpec]) -> Vec<(String, String)> {
    metrics
        .iter()
        .map(|m| (m.name.clone(), fingerprint::metric(m)))
        .collect()
}

/// The stored rows of one window of one table that its retention no
/// longer keeps: those that start before `before`.
#[derive(Clone, Debug, PartialEq)]
struct Expired {
    metric: String,
    version: String,
    window: String,
    /// The width of the window.
    size: i64,
    before: i64,
}

/// What the retention of each window of `metrics` and their rollups
/// removes at `now`, with `before` rounded down to a whole `unit`.
fn expired(metrics: &[MetricSpec], now: i64, unit: i64) -> Vec<Expired> {
    let mut expired = Vec::new();
    for table in rollup::expand(metrics) {
        let version = fingerprint::metric(&table);
        for (w, window) in table.windows.iter().enumerate() {
            if let Some(keep) = table.keep(w) {
                expired.push(Expired {
                    metric: table.name.clone(),
                    version: version.clone(),
                    window: window.to_string(),
                    size: window.size(),
                    before: (now.saturating_sub(keep)).div_euclid(unit) * unit,
                });
            }
        }
    }
    expired
}

/// How often a store looks for results past their retention.
const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The time before which a version must last have been in use for its
/// results to be deleted, `keep_old` before `now`.
fn unused_since(now: i64, keep_old: std::time::Duration) -> i64 {
    now.saturating_sub(i64::try_from(keep_old.as_millis()).unwrap_or(i64::MAX))
}

/// How often a store records that the configured versions are in use, and
/// deletes the results of versions unused for longer than `keep_old`.
const VERSIONS_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a live subscription that resumes reads of the store: the stored
/// results of one window of one version of a metric, from the window
/// starting at `since` on, newest first, at most `limit` rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Recent {
    /// The metric's name.
    pub metric: String,
    /// Its version.
    pub version: String,
    /// The window, as its spec's text.
    pub window: String,
    /// How many dimensions the metric has.
    pub dimensions: usize,
    /// The first window start read.
    pub since: i64,
    /// Rows read at most.
    pub limit: usize,
}

/// One group's stored result of one window.
#[derive(Clone, Debug)]
pub struct StoredWindow {
    /// The window's start.
    pub start: i64,
    /// Its end.
    pub end: i64,
    /// The group's dimension values.
    pub group: Vec<String>,
    /// Its state.
    pub state: tally_dataflow::aggregate::AggState,
    /// Its revision: 0 for the final, raised by each late event.
    pub revision: u32,
}

/// A group's dimension values from its stored key, for a table of
/// `dimensions` dimensions: a table of none stores the empty key.
fn split_group(grp: &str, dimensions: usize) -> Vec<String> {
    if dimensions == 0 {
        Vec::new()
    } else {
        grp.split(SEP).map(str::to_owned).collect()
    }
}

/// A group's stored key: its dimension values joined by [`SEP`].
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

    fn letter(offset: u64) -> DeadLetter {
        DeadLetter {
            partition: 0,
            offset,
            index: 0,
            reason: "late".into(),
            watermark: 0,
            record: b"{}".to_vec(),
        }
    }

    /// A writer of `queue` results that writes nothing until `go` says so,
    /// then fails once if told, then writes everything.
    fn gated(queue: usize) -> (StoreWriter, crossbeam_channel::Sender<bool>) {
        let (go, gate) = crossbeam_channel::unbounded::<bool>();
        let writer = StoreWriter::start("test-writer", Vec::new(), queue, move |rx, _, backlog| {
            for write in rx {
                if gate.recv() == Ok(false) {
                    let _ = backlog.note(Err::<(), ()>(()));
                    let _ = gate.recv();
                    let _ = backlog.note(Ok::<(), ()>(()));
                }
                backlog.written(write.rows());
            }
        })
        .unwrap();
        (writer, go)
    }

    fn wait_until(done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_full_or_failing_writer_stalls_its_sinks_and_each_stall_counts_once() {
        let (writer, go) = gated(3);
        let stalls = writer.stalls();
        let mut sinks = writer.sinks(&[], 2, true).dead_letters;
        let held = || writer.backlog.held.load(Ordering::Relaxed);
        // An empty writer takes more than its queue at once.
        let mut letters: Vec<_> = (0..5).map(letter).collect();
        sinks[0].offer(&mut letters);
        assert!(letters.is_empty());
        // Full: what is offered stays with the sink, however often.
        for offset in 5..8 {
            letters.push(letter(offset));
            sinks[0].offer(&mut letters);
        }
        assert_eq!(letters.len(), 3);
        assert_eq!(
            stalls.read(),
            Stalls {
                full: 1,
                failing: 0
            }
        );
        // Written: the sink goes on, until the writer is full again.
        go.send(true).unwrap();
        wait_until(|| held() == 0);
        sinks[0].offer(&mut letters);
        assert!(letters.is_empty());
        letters.push(letter(8));
        sinks[0].offer(&mut letters);
        assert_eq!(
            stalls.read(),
            Stalls {
                full: 2,
                failing: 0
            }
        );
        // A failing writer stalls every sink, and takes no frontier.
        go.send(false).unwrap();
        wait_until(|| writer.backlog.is_failing());
        let mut other = vec![letter(9)];
        sinks[1].offer(&mut other);
        assert_eq!(other.len(), 1);
        assert!(!sinks[1].advance(1));
        assert_eq!(
            stalls.read(),
            Stalls {
                full: 2,
                failing: 1
            }
        );
        go.send(true).unwrap();
        wait_until(|| held() == 0 && !writer.backlog.is_failing());
        sinks[1].offer(&mut other);
        assert!(other.is_empty());
        assert!(sinks[1].advance(1));
        drop((sinks, go));
        writer.close();
    }
}
