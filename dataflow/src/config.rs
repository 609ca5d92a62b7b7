//! Configuration: defaults, then `cluster.toml`, then environment variables.
//!
//! The layers apply in that order, each overriding the one before:
//! 1. the defaults written on each field below;
//! 2. the TOML file (`cluster.toml`);
//! 3. variables named `TALLY__<SECTION>__<KEY>`, such as
//!    `TALLY__LIVE__INTERVAL=500ms`. A value is read as TOML when it parses as
//!    TOML (`8`, `true`, `["a"]`) and as a string otherwise.
//!
//! Validation does not stop at the first problem: [`Config::load`] returns
//! every error it found, each with the key it belongs to, so one failed
//! start-up shows everything to fix. Unknown keys are errors too, since a
//! misspelt key would otherwise be silently ignored.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::aggregate::{AggregateKind, Field};
use crate::event::EventLimits;
use crate::time::{format_millis, parse_duration, parse_millis, Millis};
use crate::window::{pane_width, WindowSpec};

/// The whole configuration of a tally deployment.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `[server]`: the HTTP and WebSocket listener.
    pub server: ServerConfig,
    /// `[storage]`: where embedded state lives.
    pub storage: StorageConfig,
    /// `[log]`: the embedded event log.
    pub log: LogConfig,
    /// `[dataflow]`: the timely job and its event-time rules.
    pub dataflow: DataflowConfig,
    /// `[dedupe]`: dropping repeated events by `eventId`.
    pub dedupe: DedupeConfig,
    /// `[live]`: pushing values to WebSocket subscribers.
    pub live: LiveConfig,
    /// `[history]`: what one history query may cost.
    pub history: HistoryConfig,
    /// `[backfill]`: metric versions that are no longer configured.
    pub backfill: BackfillConfig,
    /// `[checkpoint]`: snapshots of the job, for restarts without replay.
    pub checkpoint: CheckpointConfig,
    /// `[cluster]`: the timely processes of `tally worker`.
    pub cluster: ClusterConfig,
    /// `[kafka]`: the event log of the cluster.
    pub kafka: KafkaConfig,
    /// `[clickhouse]`: the result store of the cluster.
    pub clickhouse: ClickHouseConfig,
    /// `[redis]`: the live bus of the cluster.
    pub redis: RedisConfig,
    /// `[auth]`: who may call the API, and how fast.
    pub auth: AuthConfig,
    /// `[[metric]]`: what to compute.
    pub metrics: Vec<MetricSpec>,
}

/// `[server]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Largest request body accepted by `POST /v1/events`. Default `10MB`.
    pub max_body_bytes: u64,
    /// How far past the receive time an event's timestamp may be. Later
    /// ones are refused: one event from a wrong clock would otherwise pull
    /// the watermark ahead and turn everything after it into late data.
    /// Default `5m`.
    pub max_future: Millis,
    /// Connections served at once, WebSockets included. tally lowers it at
    /// start to fit the process's descriptor limit. Default
    /// [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// How long a connection may take to send a complete request head, from
    /// when it is accepted or from its previous answer; a connection that
    /// does not is closed. Default [`DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// How long an ingest request's body may take to arrive, from its head;
    /// a slower one gets a `408` and its connection is closed. Default
    /// [`DEFAULT_BODY_TIMEOUT`].
    pub body_timeout: Duration,
    /// How large an event's fields may be, and how many it may have.
    /// Defaults: [`EventLimits::default`].
    pub event_limits: EventLimits,
    /// Web origins (`https://app.example.com`) whose pages may call the API
    /// and open `/v1/live` from a browser, besides the server's own. Default
    /// none.
    pub allowed_origins: Vec<String>,
    /// Threads of the runtime that serves HTTP and WebSocket and drives the
    /// connectors; 0 is one per core. Gateways that share a machine do
    /// better with a share of its cores each than with all of them: fewer
    /// wakeups cross threads. Default 0.
    pub threads: usize,
}

/// The default of `server.max_connections`: 10,000 connections, far more
/// than one node serves in practice, and lowered at start wherever the
/// descriptor limit is smaller.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The default of `server.header_timeout`: 10 s. A client sends a request
/// head in one write, so even a slow network delivers it within a second;
/// a socket silent for longer is a client gone, or one holding a
/// descriptor on purpose.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The default of `server.body_timeout`: 30 s. The SDK's batches are at
/// most 500 events, some 150 KB, which take well under a second; the
/// largest body allowed (`max_body`, 10 MB) needs about 330 KB/s.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// `[storage]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageConfig {
    /// Directory for the event log and the result store. Default `./data`.
    pub data_dir: PathBuf,
}

/// When the embedded log forces appends to disk, trading latency for
/// durability. Default [`Fsync::Always`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fsync {
    /// An append resolves only after `fdatasync` of its segment, so the
    /// `202` waits for it; appends that arrive together share one sync
    /// (group commit). An acknowledged append survives a machine crash.
    #[default]
    Always,
    /// The log syncs every dirty segment once per interval, and an append
    /// resolves once it is in the page cache. A machine crash or power loss
    /// may lose up to one interval of acknowledged appends.
    Interval(Duration),
    /// The log syncs only when it is closed, and the operating system
    /// decides when data reaches disk. A machine crash may lose any
    /// acknowledged append not yet written back.
    Never,
}

/// The default size at which a log segment is closed and a new one begun:
/// 128 MiB, 2^27 bytes. In the configuration that is `"128MiB"`, since
/// `MB` means 10^6 bytes there.
pub const DEFAULT_SEGMENT_BYTES: u64 = 128 << 20;

/// The default time the embedded log keeps events: seven days (`"7d"`), as
/// Kafka does.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86_400);

/// `[log]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    /// Partitions of the event log, fixed when the log is created. Default 8.
    pub partitions: u32,
    /// A partition starts a new segment file before a batch would take its
    /// active one past this size; a single larger batch gets a segment of
    /// its own. Default [`DEFAULT_SEGMENT_BYTES`] (128 MiB).
    pub segment_bytes: u64,
    /// `always`, `never`, or an interval such as `100ms`. Default `always`.
    pub fsync: Fsync,
    /// How long events are kept: older segments are deleted, except each
    /// partition's active one. Default [`DEFAULT_RETENTION`] (`7d`).
    pub retention: Duration,
}

impl LogConfig {
    /// A log of `partitions` partitions with the defaults for everything
    /// else, as a `[log]` section naming only `partitions` gives.
    pub fn new(partitions: u32) -> LogConfig {
        LogConfig {
            partitions,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            fsync: Fsync::default(),
            retention: DEFAULT_RETENTION,
        }
    }
}

/// `[dataflow]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DataflowConfig {
    /// Timely worker threads; 0 means one per core. Default 0.
    pub workers: usize,
    /// How far behind the newest event time the watermark trails. Default `2s`.
    pub out_of_orderness: Millis,
    /// After this long without new events, a partition stops holding the
    /// watermark back. Default `5s`.
    pub idle_timeout: Duration,
    /// How long a window's state is kept after it closes, for late events.
    /// Default `30s`.
    pub allowed_lateness: Millis,
    /// The groups a metric holds unless it says otherwise. Default
    /// [`DEFAULT_MAX_GROUPS`].
    pub max_groups: usize,
    /// Results (window values and dead letters) the result store's writer
    /// may hold, queued or being written; past it the workers stop reading
    /// the log until it catches up. Default [`DEFAULT_STORE_QUEUE`].
    pub store_queue: usize,
}

/// The default of `dataflow.store_queue`: a million results, some hundreds
/// of megabytes at most, which a writer commits in a few seconds. A store
/// that falls further behind stalls the job, and its backlog stays in the
/// log.
pub const DEFAULT_STORE_QUEUE: usize = 1_000_000;

impl DataflowConfig {
    /// How long after a window's end it may still be revised, as live views
    /// keep it: the watermark passes the end `out_of_orderness` after event
    /// time does, and the closed window takes late events for
    /// `allowed_lateness` more.
    pub fn revision_horizon(&self) -> Millis {
        self.allowed_lateness + self.out_of_orderness
    }
}

/// `[dedupe]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DedupeConfig {
    /// An event whose `eventId` was seen this long before, in event time,
    /// is counted once; 0 turns deduplication off. Default
    /// [`DEFAULT_DEDUPE_HORIZON`].
    pub horizon: Millis,
}

/// The default of `dedupe.horizon`: 10 minutes of event time, longer than
/// a client retries a request. Each id remembered costs 18 to 37 bytes
/// ([`crate::dedupe::Remembered`]): at 100,000 identified events a second,
/// 60 million ids, 1.1 to 2.2 GB.
pub const DEFAULT_DEDUPE_HORIZON: Millis = 600_000;

/// `[live]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveConfig {
    /// How often a busy window's partials go out: on ticks this far apart,
    /// a group's first change since the last tick at once, later ones at the
    /// next tick. Default [`DEFAULT_LIVE_INTERVAL`].
    pub interval: Duration,
    /// Updates a WebSocket client may have queued before it is dropped: what
    /// one subscription gets at once, one message or one per group. Default 50.
    pub queue: usize,
    /// Subscriptions one WebSocket connection may hold; past it a subscribe
    /// gets an error. Default [`DEFAULT_MAX_SUBSCRIPTIONS`].
    pub max_subscriptions: usize,
    /// Stored window rows (one per group and window) a subscription that
    /// resumes `since` a time may read from the store, newest first; past
    /// it the replay starts later, and says so. Default
    /// [`DEFAULT_MAX_RESUME_ROWS`].
    pub max_resume_rows: usize,
    /// Resuming subscriptions whose rows a gateway reads at once; the others
    /// wait their turn. Default [`DEFAULT_RESUME_READS`].
    pub resume_reads: usize,
    /// Batches of live updates in flight from the workers to the fan-out:
    /// on the in-process bus, to the hub; in the cluster, to a worker's
    /// publisher to Redis, and from Redis to a gateway's hub. Past it a
    /// worker drops the next batch, and counts its updates. Default
    /// [`DEFAULT_BUS_QUEUE`].
    pub bus_queue: usize,
}

/// The default of `live.bus_queue`: 1,024 batches, each what one worker's
/// activation changed, so about a second of a busy job's live updates.
pub const DEFAULT_BUS_QUEUE: usize = 1024;

/// The default of `live.max_resume_rows`: 20,000. An ungrouped topic of a
/// metric with 50 groups and 10-second windows replays more than an hour
/// of windows within it. A resume holds its rows (sketches included) from
/// the read until the hub has replayed them.
pub const DEFAULT_MAX_RESUME_ROWS: usize = 20_000;

/// The default of `live.resume_reads`: 4 reads of the store at once per
/// gateway, so a crowd of clients that reconnect together after a restart
/// takes its turns rather than the store.
pub const DEFAULT_RESUME_READS: usize = 4;

/// The default of `live.interval`: 100 ms. A change to a group not shown
/// since the last tick goes out at once; a busy group's waits for the next
/// tick, at most this long and on average half of it. At 100k events/s on
/// two cores 1 s put a busy window's events on the screen within 1,013 ms
/// at p99, 100 ms within 117 ms, and 50 ms, with the workers busier, 133 ms
/// (BENCHMARKS.md (c)). A busy window sends a subscriber about ten
/// messages a second; a gateway with many thousands of clients on busy
/// topics may want a longer one.
pub const DEFAULT_LIVE_INTERVAL: Duration = Duration::from_millis(100);

/// The default of `live.max_subscriptions`: 1,000 per connection. A
/// dashboard holds one or two per chart; every subscription costs the hub
/// work on each batch of its metric, so one client must not hold an
/// unbounded number.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 1000;

/// A metric's rollups when it declares none: an hour and a day, kept for
/// ever, less any it declares as a window or its panes do not divide.
pub const DEFAULT_ROLLUPS: [&str; 2] = ["tumbling 1h", "tumbling 1d"];

/// `[history]`: the bounds of one `GET /v1/metrics`. Its memory is
/// bounded by `max_groups` totals while it ranks groups and by `max_points`
/// buckets while it assembles the answer; neither grows with the rows it
/// reads.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryConfig {
    /// Groups a `groupBy` answer holds when the query names no `top`: the
    /// largest by their total over the range. Default 10.
    pub top: usize,
    /// The largest `top` a query may ask for. Default 1,000.
    pub max_top: usize,
    /// Points (series × buckets) one answer may hold. Default 100,000.
    pub max_points: usize,
    /// Groups of its `groupBy` dimension one query may rank; past it the
    /// query gets a `400` that asks for a filter or a shorter range. Each
    /// costs about 100 bytes while it ranks, and up to 4 KiB for `uniq`.
    /// Default 100,000.
    pub max_groups: usize,
    /// Sketches of `quantiles` and `topk` one query may hold at once: its
    /// points, and for `quantiles` the groups it ranks (a `topk` ranks by
    /// events, with no sketch). Each takes up to about 6 KiB for
    /// `quantiles` and 50 KiB for `topk` (k = 10). Default 2,000.
    pub max_sketches: usize,
}

/// `[backfill]`.
#[derive(Clone, Debug, PartialEq)]
pub struct BackfillConfig {
    /// How long the results of a metric version that is no longer
    /// configured are kept after it last was, so that putting its
    /// definition back within that time finds them; then they are deleted.
    /// Default 7 days.
    pub keep_old: Duration,
}

/// `[checkpoint]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointConfig {
    /// A checkpoint is taken every this much event time, and at most about
    /// once per half of it in processing time. Default `10s`.
    pub interval: Duration,
    /// Where checkpoints go: an object store URL such as `s3://bucket/tally`
    /// (credentials from the `AWS_*` variables) or `file:///dir`. Default:
    /// `<data_dir>/checkpoints`.
    pub url: Option<String>,
    /// Committed checkpoints kept; older ones are deleted. Default 2.
    pub keep: usize,
}

/// `[cluster]`: how `tally worker` processes form one timely computation.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    /// Timely processes. Default 1.
    pub processes: usize,
    /// Worker threads per process; 0 means one per core. Default 0.
    pub threads: usize,
    /// `host:port` of each process, in process order, for timely's own
    /// connections between them. Default `127.0.0.1:4100`, `:4101`, ….
    pub addresses: Vec<String>,
    /// `host:port` of each process for the backfill's computation, which
    /// runs beside the live job's while a changed metric is recomputed.
    /// Default: each of `addresses` with its port plus 100.
    pub backfill_addresses: Vec<String>,
}

/// `[kafka]`.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// The events topic. Default `tally-events`.
    pub topic: String,
    /// Partitions the events topic is created with when missing. Default 8.
    pub partitions: u32,
    /// Replication factor of created topics. Default 1.
    pub replication: u16,
}

impl KafkaConfig {
    /// The topic dead letters are written to: the events topic's name
    /// followed by `-dlq`.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}-dlq", self.topic)
    }
}

/// `[clickhouse]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClickHouseConfig {
    /// HTTP endpoint. Default `http://127.0.0.1:8123`.
    pub url: String,
    /// Database, created if missing. Default `tally`.
    pub database: String,
    /// User. Default `default`.
    pub user: String,
    /// Password. Default empty.
    pub password: String,
    /// An insert is sent once it has this many rows… Default 10000.
    pub batch_rows: usize,
    /// …or once its oldest row has waited this long. Default `1s`.
    pub batch_interval: Duration,
    /// An insert not answered within this long fails and is sent again, so
    /// that a server that takes connections but answers nothing stalls the
    /// job as one that is down does. Default `10s`.
    pub insert_timeout: Duration,
    /// Raw events are kept this long, in daily partitions. Default `7d`.
    pub raw_retention: Duration,
}

/// `[redis]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RedisConfig {
    /// Server URL. Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prefix of every channel and key tally uses. Default `tally`.
    pub prefix: String,
}

/// `[auth]`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct AuthConfig {
    /// `[[auth.keys]]`: the secrets that may call the API. Default none.
    pub keys: Vec<ApiKey>,
    /// Serve without keys on a non-loopback address. Without keys, tally
    /// refuses to start on such an address unless this is set. Default
    /// `false`.
    pub allow_anonymous: bool,
}

/// One `[[auth.keys]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiKey {
    /// A name for logs and `/metrics`; never the secret.
    pub name: String,
    /// The secret a client sends as `Authorization: Bearer <secret>`, from
    /// `secret` or from the variable `secret_env` names.
    pub secret: Secret,
    /// What the key may do.
    pub scopes: Vec<Scope>,
    /// Events per second this key may send, refilling a bucket of
    /// `burst`; `None` for no limit.
    pub events_per_second: Option<u32>,
    /// The bucket's size: the most events the key may send at once.
    /// Default: one second of `events_per_second`.
    pub burst: Option<u32>,
}

/// A secret: compared, never printed.
#[derive(Clone, PartialEq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `POST /v1/events`.
    Write,
    /// `/v1/metrics`, `/v1/catalog` and `/v1/live`.
    Read,
    /// Everything, including `/v1/deadletters` and `/metrics`.
    Admin,
}

impl Scope {
    /// The scope as `cluster.toml` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Write => "write",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Result<Scope, String> {
        [Scope::Write, Scope::Read, Scope::Admin]
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| format!("'{text}' is not a scope: write, read or admin"))
    }
}

/// One `[[metric]]`. Checkpoints record the definitions their state was
/// made by, so that a changed configuration can keep running the old ones
/// while the new ones are backfilled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricSpec {
    /// The name queries and topics use.
    pub name: String,
    /// Only events of this type count; `None` takes every event.
    pub event_type: Option<String>,
    /// What to compute.
    pub aggregate: AggregateKind,
    /// The field `sum`, `avg` and `uniq` read.
    pub field: Option<Field>,
    /// Dimensions results are kept by, so they can be filtered and grouped.
    pub dimensions: Vec<String>,
    /// Windows to compute; at least one is tumbling.
    pub windows: Vec<WindowSpec>,
    /// How long the results of each window, by its index, are kept; `None`
    /// keeps them for ever. Not part of the definition: changing it
    /// changes no result.
    #[serde(default)]
    pub keep: Vec<Option<Millis>>,
    /// Coarser tumbling windows kept for history only, each on panes of its
    /// own width, with how long they are kept (see [`crate::rollup`]).
    #[serde(default)]
    pub rollups: Vec<(WindowSpec, Option<Millis>)>,
    /// Subsets of `dimensions`, in their order, that results are also kept
    /// by, so that a query grouping by or filtering on fewer dimensions
    /// reads fewer rows (see [`crate::rollup`]).
    #[serde(default)]
    pub projections: Vec<Vec<String>>,
    /// For a table [`crate::rollup::expand`] made of a metric, the index of
    /// that metric; `None` for a configured metric.
    #[serde(default)]
    pub rollup_of: Option<u16>,
    /// The pane width: the gcd of the windows' sizes and slides.
    pub pane: Millis,
    /// The groups the metric holds, and each of its tables (see
    /// [`crate::cap`]): past it, events of new groups count in the overflow
    /// group. Not part of the definition: it bounds memory, and changing it
    /// changes which groups later events may start.
    #[serde(default = "default_max_groups")]
    pub max_groups: usize,
}

/// The default of `dataflow.max_groups`.
pub const DEFAULT_MAX_GROUPS: usize = 100_000;

fn default_max_groups() -> usize {
    DEFAULT_MAX_GROUPS
}

impl MetricSpec {
    /// Whether an event of type `event_type` counts toward this metric.
    pub fn accepts(&self, event_type: &str) -> bool {
        self.event_type.as_deref().is_none_or(|t| t == event_type)
    }

    /// The size of the widest window: how long after its start a pane is
    /// needed.
    pub fn widest(&self) -> Millis {
        self.windows.iter().map(WindowSpec::size).max().unwrap_or(0)
    }

    /// How long the results of window `w` are kept; `None` for ever.
    pub fn keep(&self, w: usize) -> Option<Millis> {
        self.keep.get(w).copied().flatten()
    }
}

/// How long a window's results are kept when its declaration does not say:
/// a day for windows a new row every few seconds, 30 days for windows of
/// minutes, for ever from an hour up.
pub fn default_keep(window: &WindowSpec) -> Option<Millis> {
    const MINUTE: Millis = 60_000;
    match window.slide() {
        s if s < MINUTE => Some(24 * 60 * MINUTE),
        s if s < 60 * MINUTE => Some(30 * 24 * 60 * MINUTE),
        _ => None,
    }
}

/// Parses a window declaration with an optional retention: `tumbling 1m`,
/// `tumbling 1m keep 30d`, `tumbling 1h keep forever`.
pub fn parse_kept_window(text: &str) -> Result<(WindowSpec, Option<Millis>), String> {
    let (window, keep) = match text.split_once(" keep ") {
        None => (text, None),
        Some((window, keep)) => (window, Some(keep.trim())),
    };
    let spec = WindowSpec::parse(window)?;
    let keep = match keep {
        None => default_keep(&spec),
        Some("forever") => None,
        Some(d) => {
            let keep = parse_millis(d).map_err(|e| format!("in '{text}', keep: {e}"))?;
            if keep < spec.size() {
                return Err(format!(
                    "in '{text}', results would be deleted before their window ends: keep at least {}",
                    format_millis(spec.size())
                ));
            }
            Some(keep)
        }
    };
    Ok((spec, keep))
}

impl Config {
    /// Builds the configuration from the file's text (if any) and the
    /// environment's `(name, value)` pairs, or returns every error found.
    pub fn load(
        file: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let mut root = match file.map(str::parse::<Table>) {
            None => Table::new(),
            Some(Ok(table)) => table,
            Some(Err(e)) => return Err(vec![format!("cluster.toml is not valid TOML: {e}")]),
        };
        let env: Vec<(String, String)> = env.into_iter().collect();
        overlay_env(&mut root, env.iter().cloned(), &mut errors);
        let mut reader = Reader { errors, env };
        let config = reader.config(root);
        if reader.errors.is_empty() {
            Ok(config)
        } else {
            Err(reader.errors)
        }
    }

    /// The number of worker threads to run.
    pub fn workers(&self) -> usize {
        threads_or_cores(self.dataflow.workers)
    }

    /// Worker threads per `tally worker` process.
    pub fn cluster_threads(&self) -> usize {
        threads_or_cores(self.cluster.threads)
    }
}

fn threads_or_cores(n: usize) -> usize {
    match n {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Applies `TALLY__SECTION__KEY` variables on top of the file.
fn overlay_env(
    root: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<String>,
) {
    for (name, raw) in env {
        let Some(path) = name.strip_prefix("TALLY__") else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(str::to_lowercase).collect();
        let [section, key] = parts.as_slice() else {
            errors.push(format!("{name}: expected TALLY__<SECTION>__<KEY>"));
            continue;
        };
        let value = format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| Value::String(raw.clone()));
        match root
            .entry(section.clone())
            .or_insert_with(|| Value::Table(Table::new()))
        {
            Value::Table(table) => {
                table.insert(key.clone(), value);
            }
            _ => errors.push(format!("{name}: [{section}] is not a section")),
        }
    }
}

/// Reads typed values out of TOML tables, collecting errors as it goes.
struct Reader {
    errors: Vec<String>,
    /// Every variable, for the secrets a key names with `secret_env`.
    env: Vec<(String, String)>,
}

/// One TOML table being read, with the keys not yet consumed.
struct Section {
    path: String,
    table: Table,
}

impl Section {
    fn take(&mut self, key: &str) -> Option<(String, Value)> {
        self.table
            .remove(key)
            .map(|v| (format!("{}{key}", self.path), v))
    }
}

impl Reader {
    fn config(&mut self, mut root: Table) -> Config {
        let metrics = root.remove("metric");
        let mut section = |name: &str| {
            let table = match root.remove(name) {
                None => Table::new(),
                Some(Value::Table(t)) => t,
                Some(_) => {
                    self.errors
                        .push(format!("{name}: must be a table, written [{name}]"));
                    Table::new()
                }
            };
            Section {
                path: format!("{name}."),
                table,
            }
        };
        let (mut server, mut storage, mut log, mut dataflow, mut dedupe, mut live) = (
            section("server"),
            section("storage"),
            section("log"),
            section("dataflow"),
            section("dedupe"),
            section("live"),
        );
        let (mut history, mut backfill, mut checkpoint) = (
            section("history"),
            section("backfill"),
            section("checkpoint"),
        );
        let (mut cluster, mut kafka, mut clickhouse, mut redis, mut auth) = (
            section("cluster"),
            section("kafka"),
            section("clickhouse"),
            section("redis"),
            section("auth"),
        );
        for (key, _) in root {
            self.errors.push(format!("{key}: unknown section"));
        }
        let max_groups = self.integer(
            &mut dataflow,
            "max_groups",
            DEFAULT_MAX_GROUPS as i64,
            1..=1_000_000_000,
        ) as usize;
        let metrics = match metrics {
            None => Vec::new(),
            Some(Value::Array(items)) => self.metrics(items, max_groups),
            Some(_) => {
                self.errors
                    .push("metric: must be an array of tables, written [[metric]]".into());
                Vec::new()
            }
        };
        if metrics.is_empty() {
            self.errors
                .push("metric: declare at least one [[metric]]".into());
        }
        let config = Config {
            server: ServerConfig {
                listen: self.parsed(
                    &mut server,
                    "listen",
                    "127.0.0.1:8080".parse().expect("literal"),
                ),
                max_body_bytes: self.bytes(&mut server, "max_body", 10_000_000),
                max_future: self.millis(&mut server, "max_future", 300_000),
                max_connections: self.integer(
                    &mut server,
                    "max_connections",
                    DEFAULT_MAX_CONNECTIONS as i64,
                    1..=10_000_000,
                ) as usize,
                header_timeout: self.timeout(&mut server, "header_timeout", DEFAULT_HEADER_TIMEOUT),
                body_timeout: self.timeout(&mut server, "body_timeout", DEFAULT_BODY_TIMEOUT),
                event_limits: self.event_limits(&mut server),
                allowed_origins: self.origins(&mut server),
                threads: self.integer(&mut server, "threads", 0, 0..=1024) as usize,
            },
            storage: StorageConfig {
                data_dir: PathBuf::from(self.string(&mut storage, "data_dir", "./data")),
            },
            log: LogConfig {
                partitions: self.integer(&mut log, "partitions", 8, 1..=1024) as u32,
                segment_bytes: self.bytes(&mut log, "segment_size", DEFAULT_SEGMENT_BYTES),
                fsync: self.fsync(&mut log),
                retention: self.duration(&mut log, "retention", DEFAULT_RETENTION),
            },
            dataflow: DataflowConfig {
                workers: self.integer(&mut dataflow, "workers", 0, 0..=1024) as usize,
                out_of_orderness: self.millis(&mut dataflow, "out_of_orderness", 2_000),
                idle_timeout: self.duration(&mut dataflow, "idle_timeout", Duration::from_secs(5)),
                allowed_lateness: self.millis(&mut dataflow, "allowed_lateness", 30_000),
                max_groups,
                store_queue: self.integer(
                    &mut dataflow,
                    "store_queue",
                    DEFAULT_STORE_QUEUE as i64,
                    1..=1_000_000_000,
                ) as usize,
            },
            dedupe: DedupeConfig {
                horizon: self.millis(&mut dedupe, "horizon", DEFAULT_DEDUPE_HORIZON),
            },
            live: LiveConfig {
                interval: self.duration(&mut live, "interval", DEFAULT_LIVE_INTERVAL),
                queue: self.integer(&mut live, "queue", 50, 1..=100_000) as usize,
                max_subscriptions: self.integer(
                    &mut live,
                    "max_subscriptions",
                    DEFAULT_MAX_SUBSCRIPTIONS as i64,
                    1..=1_000_000,
                ) as usize,
                max_resume_rows: self.integer(
                    &mut live,
                    "max_resume_rows",
                    DEFAULT_MAX_RESUME_ROWS as i64,
                    1..=100_000_000,
                ) as usize,
                resume_reads: self.integer(
                    &mut live,
                    "resume_reads",
                    DEFAULT_RESUME_READS as i64,
                    1..=1024,
                ) as usize,
                bus_queue: self.integer(
                    &mut live,
                    "bus_queue",
                    DEFAULT_BUS_QUEUE as i64,
                    1..=10_000_000,
                ) as usize,
            },
            history: self.history(&mut history),
            backfill: BackfillConfig {
                keep_old: self.duration(&mut backfill, "keep_old", Duration::from_secs(7 * 86_400)),
            },
            checkpoint: CheckpointConfig {
                interval: self.duration(&mut checkpoint, "interval", Duration::from_secs(10)),
                url: checkpoint
                    .take("url")
                    .and_then(|(path, v)| self.as_string(&path, v))
                    .filter(|u| !u.is_empty()),
                keep: self.integer(&mut checkpoint, "keep", 2, 1..=1000) as usize,
            },
            cluster: self.cluster(&mut cluster),
            kafka: KafkaConfig {
                brokers: self.string(&mut kafka, "brokers", "127.0.0.1:9092"),
                topic: self.string(&mut kafka, "topic", "tally-events"),
                partitions: self.integer(&mut kafka, "partitions", 8, 1..=10_000) as u32,
                replication: self.integer(&mut kafka, "replication", 1, 1..=100) as u16,
            },
            clickhouse: ClickHouseConfig {
                url: self.string(&mut clickhouse, "url", "http://127.0.0.1:8123"),
                database: self.string(&mut clickhouse, "database", "tally"),
                user: self.string(&mut clickhouse, "user", "default"),
                password: self.string(&mut clickhouse, "password", ""),
                batch_rows: self.integer(&mut clickhouse, "batch_rows", 10_000, 1..=1_000_000)
                    as usize,
                batch_interval: self.duration(
                    &mut clickhouse,
                    "batch_interval",
                    Duration::from_secs(1),
                ),
                insert_timeout: self.duration(
                    &mut clickhouse,
                    "insert_timeout",
                    Duration::from_secs(10),
                ),
                raw_retention: self.duration(
                    &mut clickhouse,
                    "raw_retention",
                    Duration::from_secs(7 * 86_400),
                ),
            },
            redis: RedisConfig {
                url: self.string(&mut redis, "url", "redis://127.0.0.1:6379"),
                prefix: self.string(&mut redis, "prefix", "tally"),
            },
            auth: self.auth(&mut auth),
            metrics,
        };
        if config.auth.keys.is_empty()
            && !config.auth.allow_anonymous
            && !config.server.listen.ip().is_loopback()
        {
            self.errors.push(format!(
                "server.listen: {} is not a loopback address, and no [[auth.keys]] are configured, so anyone who can reach it could write and read everything; add a key (a [[auth.keys]] table with name, secret or secret_env, and scopes), or set auth.allow_anonymous = true",
                config.server.listen
            ));
        }
        if !is_identifier(&config.clickhouse.database) {
            self.errors.push(format!(
                "clickhouse.database: '{}' must be letters, digits and '_'",
                config.clickhouse.database
            ));
        }
        if config.checkpoint.interval < Duration::from_millis(100) {
            self.errors
                .push("checkpoint.interval: must be at least 100ms".into());
        }
        for section in [
            server, storage, log, dataflow, dedupe, live, history, backfill, checkpoint, cluster,
            kafka, clickhouse, redis, auth,
        ] {
            self.unknown_keys(section);
        }
        config
    }

    fn origins(&mut self, s: &mut Section) -> Vec<String> {
        let origins = self.strings(s, "allowed_origins");
        for origin in &origins {
            let valid = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"))
                .is_some_and(|host| !host.is_empty() && !host.contains(['/', '?', '#', ' ']));
            if !valid {
                self.errors.push(format!(
                    "server.allowed_origins: '{origin}' is not an origin such as https://app.example.com (a scheme and a host, with an optional port, and no path)"
                ));
            }
        }
        origins
    }

    fn auth(&mut self, s: &mut Section) -> AuthConfig {
        let allow_anonymous = match s.take("allow_anonymous") {
            None => false,
            Some((_, Value::Boolean(b))) => b,
            Some((path, other)) => {
                self.errors.push(format!(
                    "{path}: must be true or false, found {}",
                    other.type_str()
                ));
                false
            }
        };
        let items = match s.take("keys") {
            None => Vec::new(),
            Some((_, Value::Array(items))) => items,
            Some((path, _)) => {
                self.errors.push(format!(
                    "{path}: must be an array of tables, written [[auth.keys]]"
                ));
                Vec::new()
            }
        };
        let mut names = BTreeSet::new();
        let mut keys: Vec<ApiKey> = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let Value::Table(table) = item else {
                self.errors.push(format!("auth.keys[{i}]: must be a table"));
                continue;
            };
            let mut k = Section {
                path: format!("auth.keys[{i}]."),
                table,
            };
            let name = self.string(&mut k, "name", "");
            if name.is_empty() {
                self.errors
                    .push(format!("auth.keys[{i}].name: give each key a name"));
            } else if !names.insert(name.clone()) {
                self.errors
                    .push(format!("auth.keys[{i}].name: '{name}' is declared twice"));
            }
            let secret = self.secret(&mut k, i);
            let scopes: Vec<Scope> = self
                .strings(&mut k, "scopes")
                .iter()
                .filter_map(|text| {
                    Scope::parse(text)
                        .map_err(|e| self.errors.push(format!("auth.keys[{i}].scopes: {e}")))
                        .ok()
                })
                .collect();
            if scopes.is_empty() {
                self.errors.push(format!(
                    "auth.keys[{i}].scopes: give at least one of write, read and admin"
                ));
            }
            let limit = |reader: &mut Reader, k: &mut Section, key: &str| {
                k.table
                    .contains_key(key)
                    .then(|| reader.integer(k, key, 1, 1..=u32::MAX as i64) as u32)
            };
            let events_per_second = limit(self, &mut k, "events_per_second");
            let burst = limit(self, &mut k, "burst");
            if burst.is_some() && events_per_second.is_none() {
                self.errors.push(format!(
                    "auth.keys[{i}].burst: a burst needs events_per_second"
                ));
            }
            if let Some(secret) = secret {
                if keys.iter().any(|other| other.secret == secret) {
                    self.errors.push(format!(
                        "auth.keys[{i}]: its secret is another key's too; give each key its own"
                    ));
                }
                keys.push(ApiKey {
                    name,
                    secret,
                    scopes,
                    events_per_second,
                    burst,
                });
            }
            self.unknown_keys(k);
        }
        AuthConfig {
            keys,
            allow_anonymous,
        }
    }

    /// Key `i`'s secret: `secret`, or the variable `secret_env` names. A
    /// secret is at least 16 bytes, so that guessing it is hopeless.
    fn secret(&mut self, k: &mut Section, i: usize) -> Option<Secret> {
        let inline = k
            .take("secret")
            .and_then(|(path, v)| self.as_string(&path, v));
        let named = k
            .take("secret_env")
            .and_then(|(path, v)| self.as_string(&path, v));
        let secret = match (inline, named) {
            (Some(_), Some(_)) => {
                self.errors.push(format!(
                    "auth.keys[{i}]: give secret or secret_env, not both"
                ));
                return None;
            }
            (Some(secret), None) => secret,
            (None, Some(variable)) => match self.env.iter().find(|(name, _)| *name == variable) {
                Some((_, value)) => value.clone(),
                None => {
                    self.errors.push(format!(
                        "auth.keys[{i}].secret_env: the variable {variable} is not set"
                    ));
                    return None;
                }
            },
            (None, None) => {
                self.errors
                    .push(format!("auth.keys[{i}]: give secret or secret_env"));
                return None;
            }
        };
        if secret.len() < 16 || secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.errors.push(format!(
                "auth.keys[{i}]: a secret must be at least 16 characters, without spaces"
            ));
            return None;
        }
        Some(Secret(secret))
    }

    fn history(&mut self, s: &mut Section) -> HistoryConfig {
        let mut count =
            |key: &str, default: i64| self.integer(s, key, default, 1..=100_000_000) as usize;
        let history = HistoryConfig {
            top: count("top", 10),
            max_top: count("max_top", 1000),
            max_points: count("max_points", 100_000),
            max_groups: count("max_groups", 100_000),
            max_sketches: count("max_sketches", 2_000),
        };
        if history.top > history.max_top {
            self.errors.push(format!(
                "history.top: {} is more than history.max_top ({})",
                history.top, history.max_top
            ));
        }
        history
    }

    fn cluster(&mut self, s: &mut Section) -> ClusterConfig {
        let processes = self.integer(s, "processes", 1, 1..=1024) as usize;
        let threads = self.integer(s, "threads", 0, 0..=1024) as usize;
        let mut addresses = self.strings(s, "addresses");
        if addresses.is_empty() {
            addresses = (0..processes)
                .map(|i| format!("127.0.0.1:{}", 4100 + i))
                .collect();
        } else if addresses.len() != processes {
            self.errors.push(format!(
                "cluster.addresses: {} addresses for {processes} processes; give one per process",
                addresses.len()
            ));
        }
        let mut backfill_addresses = self.strings(s, "backfill_addresses");
        if backfill_addresses.is_empty() {
            backfill_addresses = addresses.iter().filter_map(|a| shifted(a, 100)).collect();
            if backfill_addresses.len() != addresses.len() {
                self.errors.push(
                    "cluster.backfill_addresses: give them, one per process, when an address has no port below 65436".into(),
                );
            }
        } else if backfill_addresses.len() != processes {
            self.errors.push(format!(
                "cluster.backfill_addresses: {} addresses for {processes} processes; give one per process",
                backfill_addresses.len()
            ));
        }
        ClusterConfig {
            processes,
            threads,
            addresses,
            backfill_addresses,
        }
    }

    fn event_limits(&mut self, s: &mut Section) -> EventLimits {
        let defaults = EventLimits::default();
        let mut size = |key: &str, default: usize| {
            let bytes = self.bytes(s, key, default as u64);
            usize::try_from(bytes).unwrap_or(usize::MAX)
        };
        let (max_event_id, max_name, max_dimension_value) = (
            size("max_event_id", defaults.max_event_id),
            size("max_name", defaults.max_name),
            size("max_dimension_value", defaults.max_dimension_value),
        );
        EventLimits {
            max_event_id,
            max_name,
            max_dimension_value,
            max_dimensions: self.integer(
                s,
                "max_dimensions",
                defaults.max_dimensions as i64,
                1..=100_000,
            ) as usize,
            max_values: self.integer(s, "max_values", defaults.max_values as i64, 1..=100_000)
                as usize,
        }
    }

    fn metrics(&mut self, items: Vec<Value>, max_groups: usize) -> Vec<MetricSpec> {
        let mut names = BTreeSet::new();
        let mut metrics = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let Value::Table(table) = item else {
                self.errors.push(format!("metric[{i}]: must be a table"));
                continue;
            };
            let mut m = Section {
                path: format!("metric[{i}]."),
                table,
            };
            let name = self.string(&mut m, "name", "");
            if !is_identifier(&name) {
                self.errors.push(format!(
                    "metric[{i}].name: '{name}' must be letters, digits and '_'"
                ));
            } else if !names.insert(name.clone()) {
                self.errors
                    .push(format!("metric[{i}].name: '{name}' is declared twice"));
            }
            let event_type = m
                .take("event_type")
                .and_then(|(path, v)| self.as_string(&path, v));
            let aggregate = m
                .take("aggregate")
                .and_then(|(path, v)| {
                    let text = self.as_string(&path, v)?;
                    AggregateKind::parse(&text)
                        .map_err(|e| self.errors.push(format!("{path}: {e}")))
                        .ok()
                })
                .unwrap_or(AggregateKind::Count);
            let field = m.take("field").and_then(|(path, v)| {
                let text = self.as_string(&path, v)?;
                Field::parse(&text)
                    .map_err(|e| self.errors.push(format!("{path}: {e}")))
                    .ok()
            });
            if aggregate.needs_field() && field.is_none() {
                self.errors.push(format!(
                    "metric[{i}].field: '{aggregate}' needs a field, such as 'values.amount'"
                ));
            }
            match (aggregate, &field) {
                (AggregateKind::Quantiles { .. }, Some(Field::Dimension(_))) => {
                    self.errors.push(format!(
                        "metric[{i}].field: 'quantiles' reads a number, such as 'values.latency_ms'"
                    ))
                }
                (AggregateKind::TopK { .. }, Some(Field::Value(_))) => self.errors.push(format!(
                    "metric[{i}].field: 'topk' counts the values of a dimension, such as 'dimensions.videoId'"
                )),
                _ => {}
            }
            let aggregate = match aggregate {
                AggregateKind::Quantiles { k } => AggregateKind::Quantiles {
                    k: self.integer(&mut m, "k", k as i64, 8..=4096) as u16,
                },
                AggregateKind::TopK { k } => AggregateKind::TopK {
                    k: self.integer(&mut m, "k", k as i64, 1..=1000) as u16,
                },
                _ => aggregate,
            };
            let dimensions = self.strings(&mut m, "dimensions");
            for d in &dimensions {
                if !is_identifier(d) {
                    self.errors.push(format!(
                        "metric[{i}].dimensions: '{d}' must be letters, digits and '_'"
                    ));
                }
            }
            let (windows, keep): (Vec<WindowSpec>, Vec<Option<Millis>>) = self
                .strings(&mut m, "windows")
                .iter()
                .filter_map(|w| {
                    parse_kept_window(w)
                        .map_err(|e| self.errors.push(format!("metric[{i}].windows: {e}")))
                        .ok()
                })
                .unzip();
            if !windows.iter().any(WindowSpec::is_tumbling) {
                self.errors.push(format!(
                    "metric[{i}].windows: at least one tumbling window is needed for history"
                ));
            }
            let pane = pane_width(&windows).max(1);
            let rollups = match m.table.contains_key("rollups") {
                false => DEFAULT_ROLLUPS
                    .iter()
                    .filter_map(|w| parse_kept_window(w).ok())
                    .filter(|(w, _)| w.size() % pane == 0 && !windows.contains(w))
                    .collect(),
                true => self
                    .strings(&mut m, "rollups")
                    .iter()
                    .filter_map(|w| {
                        let rollup = parse_kept_window(w).and_then(|(spec, keep)| match spec {
                            WindowSpec::Tumbling { size } if size % pane == 0 => Ok((spec, keep)),
                            WindowSpec::Tumbling { .. } => Err(format!(
                                "'{w}' is not a whole number of the metric's panes ({})",
                                format_millis(pane)
                            )),
                            WindowSpec::Sliding { .. } => {
                                Err(format!("'{w}': a rollup is a tumbling window"))
                            }
                        });
                        rollup
                            .map_err(|e| self.errors.push(format!("metric[{i}].rollups: {e}")))
                            .ok()
                    })
                    .collect(),
            };
            let projections = match m.take("projections") {
                None => std::iter::once(Vec::new())
                    .chain(dimensions.iter().map(|d| vec![d.clone()]))
                    .collect(),
                Some((path, value)) => self.projections(&path, value, &dimensions),
            };
            let max_groups =
                self.integer(&mut m, "max_groups", max_groups as i64, 1..=1_000_000_000) as usize;
            self.unknown_keys(m);
            metrics.push(MetricSpec {
                name,
                event_type,
                aggregate,
                field,
                dimensions,
                windows,
                keep,
                rollups,
                projections,
                rollup_of: None,
                pane,
                max_groups,
            });
        }
        metrics
    }

    /// `projections = [[], ["country"], ["campaignId", "country"]]`: each a
    /// list of the metric's dimensions, put in their declared order.
    fn projections(&mut self, path: &str, value: Value, dimensions: &[String]) -> Vec<Vec<String>> {
        let Value::Array(items) = value else {
            self.errors.push(format!(
                "{path}: must be an array of arrays of dimension names, such as [[], [\"country\"]]"
            ));
            return Vec::new();
        };
        let mut projections = Vec::new();
        for item in items {
            let Value::Array(names) = item else {
                self.errors.push(format!(
                    "{path}: each projection is an array of dimension names"
                ));
                continue;
            };
            let names: Vec<String> = names
                .into_iter()
                .filter_map(|v| self.as_string(path, v))
                .collect();
            if let Some(unknown) = names.iter().find(|n| !dimensions.contains(n)) {
                self.errors.push(format!(
                    "{path}: '{unknown}' is not one of the metric's dimensions ({})",
                    dimensions.join(", ")
                ));
                continue;
            }
            let ordered: Vec<String> = dimensions
                .iter()
                .filter(|d| names.contains(d))
                .cloned()
                .collect();
            if !projections.contains(&ordered) {
                projections.push(ordered);
            }
        }
        projections
    }

    fn unknown_keys(&mut self, section: Section) {
        for key in section.table.keys() {
            self.errors
                .push(format!("{}{key}: unknown key", section.path));
        }
    }

    fn as_string(&mut self, path: &str, value: Value) -> Option<String> {
        match value {
            Value::String(s) => Some(s),
            other => {
                self.errors.push(format!(
                    "{path}: must be a string, found {}",
                    other.type_str()
                ));
                None
            }
        }
    }

    fn string(&mut self, s: &mut Section, key: &str, default: &str) -> String {
        s.take(key)
            .and_then(|(path, v)| self.as_string(&path, v))
            .unwrap_or_else(|| default.to_owned())
    }

    fn strings(&mut self, s: &mut Section, key: &str) -> Vec<String> {
        match s.take(key) {
            None => Vec::new(),
            Some((path, Value::Array(items))) => items
                .into_iter()
                .filter_map(|v| self.as_string(&path, v))
                .collect(),
            Some((path, other)) => {
                self.errors.push(format!(
                    "{path}: must be an array of strings, found {}",
                    other.type_str()
                ));
                Vec::new()
            }
        }
    }

    fn integer(
        &mut self,
        s: &mut Section,
        key: &str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> i64 {
        match s.take(key) {
            None => default,
            Some((_, Value::Integer(n))) if range.contains(&n) => n,
            Some((path, Value::Integer(n))) => {
                self.errors.push(format!(
                    "{path}: {n} is outside {}..={}",
                    range.start(),
                    range.end()
                ));
                default
            }
            Some((path, other)) => {
                self.errors.push(format!(
                    "{path}: must be an integer, found {}",
                    other.type_str()
                ));
                default
            }
        }
    }

    fn parsed<T: std::str::FromStr>(&mut self, s: &mut Section, key: &str, default: T) -> T
    where
        T::Err: std::fmt::Display,
    {
        let Some((path, value)) = s.take(key) else {
            return default;
        };
        let Some(text) = self.as_string(&path, value) else {
            return default;
        };
        text.parse().unwrap_or_else(|e| {
            self.errors.push(format!("{path}: '{text}': {e}"));
            default
        })
    }

    fn duration(&mut self, s: &mut Section, key: &str, default: Duration) -> Duration {
        let Some((path, value)) = s.take(key) else {
            return default;
        };
        let Some(text) = self.as_string(&path, value) else {
            return default;
        };
        parse_duration(&text).unwrap_or_else(|e| {
            self.errors.push(format!("{path}: {e}"));
            default
        })
    }

    /// A duration that must not be zero: a timeout of nothing would close
    /// every connection.
    fn timeout(&mut self, s: &mut Section, key: &str, default: Duration) -> Duration {
        let path = format!("{}{key}", s.path);
        let timeout = self.duration(s, key, default);
        if timeout.is_zero() {
            self.errors.push(format!("{path}: must be longer than 0s"));
            return default;
        }
        timeout
    }

    fn millis(&mut self, s: &mut Section, key: &str, default: Millis) -> Millis {
        let Some((path, value)) = s.take(key) else {
            return default;
        };
        let Some(text) = self.as_string(&path, value) else {
            return default;
        };
        if text.trim() == "0s" || text.trim() == "0" {
            return 0;
        }
        parse_millis(&text).unwrap_or_else(|e| {
            self.errors.push(format!("{path}: {e}"));
            default
        })
    }

    fn bytes(&mut self, s: &mut Section, key: &str, default: u64) -> u64 {
        match s.take(key) {
            None => default,
            Some((_, Value::Integer(n))) if n > 0 => n as u64,
            Some((path, Value::String(text))) => parse_bytes(&text).unwrap_or_else(|e| {
                self.errors.push(format!("{path}: {e}"));
                default
            }),
            Some((path, other)) => {
                self.errors.push(format!(
                    "{path}: must be a size such as '10MB', found {}",
                    other.type_str()
                ));
                default
            }
        }
    }

    fn fsync(&mut self, s: &mut Section) -> Fsync {
        let Some((path, value)) = s.take("fsync") else {
            return Fsync::default();
        };
        let Some(text) = self.as_string(&path, value) else {
            return Fsync::default();
        };
        match text.as_str() {
            "always" => Fsync::Always,
            "never" => Fsync::Never,
            interval => {
                match parse_duration(interval) {
                    Ok(d) if !d.is_zero() => Fsync::Interval(d),
                    _ => {
                        self.errors.push(format!("{path}: '{text}' must be 'always', 'never' or an interval such as '100ms'"));
                        Fsync::default()
                    }
                }
            }
        }
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `10MB`, `512KiB`, `1GB` or a plain number of bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size such as '10MB'"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "'{other}' is not a size unit: use B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    match n.checked_mul(scale) {
        Some(0) | None => Err(format!("'{text}' must be a positive size")),
        Some(bytes) => Ok(bytes),
    }
}

/// `host:port` with the port moved on by `by`, if it has one that can be.
fn shifted(address: &str, by: u16) -> Option<String> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?.checked_add(by)?;
    Some(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[server]
listen = "127.0.0.1:9000"

[[metric]]
name = "ad_clicks"
event_type = "ad_click"
aggregate = "count"
dimensions = ["campaignId", "country"]
windows = ["tumbling 10s", "sliding 5m every 10s"]
"#;

    #[test]
    fn layers_apply_in_order() {
        let env = [
            (
                "TALLY__SERVER__LISTEN".to_string(),
                "127.0.0.1:9100".to_string(),
            ),
            ("TALLY__LIVE__INTERVAL".to_string(), "250ms".to_string()),
            ("TALLY__LOG__PARTITIONS".to_string(), "3".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let config = Config::load(Some(FILE), env).unwrap();
        assert_eq!(config.server.listen.port(), 9100);
        assert_eq!(config.live.interval, Duration::from_millis(250));
        assert_eq!(config.log.partitions, 3);
        assert_eq!(config.dataflow.allowed_lateness, 30_000);
        assert_eq!(config.metrics[0].pane, 10_000);
    }

    #[test]
    fn a_metric_caps_its_groups_at_its_own_max_or_the_default() {
        let file = format!(
            "{FILE}\n[dataflow]\nmax_groups = 500\n\n[[metric]]\nname = \"sessions\"\n\
             windows = [\"tumbling 1m\"]\nmax_groups = 20\n"
        );
        let config = Config::load(Some(&file), []).unwrap();
        let caps: Vec<usize> = config.metrics.iter().map(|m| m.max_groups).collect();
        assert_eq!(caps[0], 500);
        assert_eq!(caps.last(), Some(&20));
        let errors = Config::load(Some(&format!("{FILE}\n[dataflow]\nmax_groups = 0\n")), [])
            .unwrap_err()
            .join("\n");
        assert!(errors.contains("dataflow.max_groups"), "{errors}");
    }

    #[test]
    fn every_error_is_listed() {
        let file = r#"
[server]
listen = "nowhere"
max_body = "ten"

[dataflow]
out_of_orderness = "soon"
workres = 2

[[metric]]
name = "revenue"
aggregate = "sum"
windows = ["sliding 5m every 7s"]
"#;
        let errors = Config::load(Some(file), []).unwrap_err();
        let joined = errors.join("\n");
        for needle in [
            "server.listen",
            "server.max_body",
            "dataflow.out_of_orderness",
            "dataflow.workres: unknown key",
            "metric[0].field",
            "metric[0].windows: in 'sliding 5m every 7s'",
            "at least one tumbling",
        ] {
            assert!(joined.contains(needle), "missing {needle} in:\n{joined}");
        }
    }

    #[test]
    fn the_log_defaults_are_the_named_constants_and_cluster_toml_says_them() {
        let config = Config::load(Some(FILE), []).unwrap();
        assert_eq!(config.log, LogConfig::new(8));
        assert_eq!(parse_bytes("128MiB").unwrap(), DEFAULT_SEGMENT_BYTES);
        // The default configuration file spells every default out, so it
        // must give exactly what the reader gives without it.
        let file = Config::load(Some(include_str!("../../cluster.toml")), []).unwrap();
        assert_eq!(file.log, LogConfig::new(8));
    }

    #[test]
    fn the_edge_bounds_default_to_the_named_constants_and_cluster_toml_says_them() {
        let config = Config::load(Some(FILE), []).unwrap();
        assert_eq!(config.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(config.server.header_timeout, DEFAULT_HEADER_TIMEOUT);
        assert_eq!(config.server.body_timeout, DEFAULT_BODY_TIMEOUT);
        assert_eq!(config.server.event_limits, EventLimits::default());
        assert_eq!(config.live.max_subscriptions, DEFAULT_MAX_SUBSCRIPTIONS);
        assert_eq!(config.live.bus_queue, DEFAULT_BUS_QUEUE);
        let file = Config::load(Some(include_str!("../../cluster.toml")), []).unwrap();
        // FILE listens elsewhere; every bound is the default in both.
        assert_eq!(
            file.server,
            ServerConfig {
                listen: file.server.listen,
                ..config.server
            }
        );
        assert_eq!(file.live, config.live);
        assert_eq!(file.history, config.history);
        assert_eq!(file.backfill, config.backfill);
        assert_eq!(config.dedupe.horizon, DEFAULT_DEDUPE_HORIZON);
        assert_eq!(file.dedupe, config.dedupe);
        assert_eq!(config.dataflow.max_groups, DEFAULT_MAX_GROUPS);
        assert_eq!(file.dataflow.max_groups, DEFAULT_MAX_GROUPS);
        assert_eq!(config.dataflow.store_queue, DEFAULT_STORE_QUEUE);
        assert_eq!(file.dataflow.store_queue, DEFAULT_STORE_QUEUE);
        assert!(file
            .metrics
            .iter()
            .all(|m| m.max_groups == DEFAULT_MAX_GROUPS));
        let errors = Config::load(
            Some(&format!(
                "{FILE}\n[live]\nmax_subscriptions = 0\n[history]\ntop = 20\nmax_top = 5\n"
            )),
            [("TALLY__SERVER__HEADER_TIMEOUT".into(), "0s".into())],
        )
        .unwrap_err()
        .join("\n");
        assert!(errors.contains("server.header_timeout"), "{errors}");
        assert!(errors.contains("live.max_subscriptions"), "{errors}");
        assert!(errors.contains("history.top"), "{errors}");
    }

    #[test]
    fn keys_are_read_with_their_secrets_and_every_mistake_is_listed() {
        let keys = r#"
[[auth.keys]]
name = "sdk"
secret = "wk_0123456789abcdef"
scopes = ["write"]
events_per_second = 100

[[auth.keys]]
name = "ops"
secret_env = "OPS_SECRET"
scopes = ["read", "admin"]
"#;
        let env = [("OPS_SECRET".to_string(), "ak_0123456789abcdef".to_string())];
        let config = Config::load(Some(&format!("{FILE}{keys}")), env).unwrap();
        let [sdk, ops] = &config.auth.keys[..] else {
            panic!("two keys: {:?}", config.auth.keys);
        };
        assert_eq!((sdk.events_per_second, sdk.burst), (Some(100), None));
        assert_eq!(ops.secret.0, "ak_0123456789abcdef");
        assert_eq!(ops.scopes, [Scope::Read, Scope::Admin]);
        // The secrets never print.
        assert!(!format!("{config:?}").contains("0123456789abcdef"));

        let bad = r#"
[server]
listen = "0.0.0.0:8080"
allowed_origins = ["https://ok.example", "ok.example/path"]

[[auth.keys]]
name = "a"
secret = "short"
scopes = ["write"]

[[auth.keys]]
name = "a"
secret_env = "MISSING"
scopes = ["everything"]
burst = 5
"#;
        let metric = &FILE[FILE.find("[[metric]]").expect("a metric")..];
        let errors = Config::load(Some(&format!("{bad}{metric}")), [])
            .unwrap_err()
            .join("\n");
        for expected in [
            "auth.keys[0]: a secret must be at least 16 characters",
            "auth.keys[1].name: 'a' is declared twice",
            "auth.keys[1].secret_env: the variable MISSING is not set",
            "auth.keys[1].scopes: 'everything' is not a scope",
            "auth.keys[1].burst: a burst needs events_per_second",
            "server.allowed_origins: 'ok.example/path' is not an origin",
        ] {
            assert!(errors.contains(expected), "{expected} not in {errors}");
        }

        // No keys on a public address: refused, unless anonymous is allowed.
        let public = FILE.replace("127.0.0.1:9000", "0.0.0.0:9000");
        let errors = Config::load(Some(&public), []).unwrap_err().join("\n");
        assert!(errors.contains("not a loopback address"), "{errors}");
        let env = [(
            "TALLY__AUTH__ALLOW_ANONYMOUS".to_string(),
            "true".to_string(),
        )];
        assert!(Config::load(Some(&public), env).is_ok());
        assert!(Config::load(
            Some(&format!("{public}{keys}")),
            [("OPS_SECRET".into(), "ak_0123456789abcdef".into())]
        )
        .is_ok());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_bytes("1KiB").unwrap(), 1024);
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }
}
