//! The cluster's live bus: Redis pub/sub, plus the latest values under a key.
//!
//! Workers publish each metric's window values on a channel of its
//! version, `<prefix>:live:<metric>:<version>:<encoding>`, and keep every
//! group's latest value of the windows that can still change in a hash,
//! `<prefix>:latest:<metric>:<version>:<encoding>`, field
//! `<window>:<start>:<group>`. `<encoding>` is [`ENCODING`], so processes
//! of releases whose messages differ never read each other's.
//! A gateway subscribes to the channel of a metric's active version only
//! while one of its clients holds a topic of that metric, and on
//! subscribing reads the hash, so its first subscriber gets the current
//! value at once. When a backfill makes a new version active, what the old
//! one still publishes goes to a channel nobody reads any more.
//!
//! Each process also publishes its workers' watermark on
//! `<prefix>:through`, as `(process, processes, watermark)`: a gateway
//! forgets the windows that ended more than the lateness before the lowest
//! of all processes, and the workers delete them from the hash.
//!
//! While a backfill runs, each process keeps its share of the progress
//! under `<prefix>:backfill:<process>` ([`Progress`]), for the gateways'
//! catalog.
//!
//! Messages are bincode-encoded [`WindowUpdate`]s. Publishing is best
//! effort, like every live path: while Redis is unreachable, updates are
//! dropped and counted, and history is unaffected.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use futures_util::StreamExt;
use redis::{AsyncCommands, Commands};
use tally_dataflow::config::{MetricSpec, RedisConfig};
use tally_dataflow::fingerprint;
use tally_dataflow::model::WindowUpdate;
use tally_dataflow::ports::Sink;
use tally_dataflow::time::Millis;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Full, Live, Lowest, Watermarks};
use crate::retry::{self, Backoff};

/// The latest-value hash expires this long after its last write, so a
/// metric that stops flowing leaves nothing behind.
const LATEST_TTL_SECS: i64 = 3600;

/// A process's backfill progress expires this long after its last report,
/// so a process that is gone does not report one for ever.
const PROGRESS_TTL_SECS: u64 = 5;

/// The encoding of the messages, as channel and hash names carry it. It
/// changes whenever [`WindowUpdate`] does.
const ENCODING: &str = "e2";

/// A metric's version and the encoding, as its channel and its hash name
/// them.
fn versioned(metric: &MetricSpec) -> String {
    format!("{}:{}:{ENCODING}", metric.name, fingerprint::metric(metric))
}

fn channel(prefix: &str, metric: &str) -> String {
    format!("{prefix}:live:{metric}")
}

fn through_channel(prefix: &str) -> String {
    format!("{prefix}:through")
}

fn latest_key(prefix: &str, metric: &str) -> String {
    format!("{prefix}:latest:{metric}")
}

/// The publishing end. Each worker takes its own with
/// [`RedisPublisher::worker`].
#[derive(Clone)]
pub struct RedisPublisher {
    tx: Sender<Live>,
    dropped: Arc<AtomicU64>,
    watermarks: Watermarks,
    /// This worker's slot in `watermarks`.
    worker: Option<usize>,
}

impl RedisPublisher {
    /// Starts the publisher thread of worker process `process` of
    /// `processes`, taking at most `queue` batches of updates ahead of it.
    /// Windows are kept in the latest-value hash while a late event can
    /// still revise them: `lateness` is the allowed lateness plus the
    /// out-of-orderness.
    pub fn start(
        config: &RedisConfig,
        metrics: &[MetricSpec],
        lateness: Millis,
        (process, processes): (usize, usize),
        queue: usize,
    ) -> Result<(RedisPublisher, JoinHandle<()>), redis::RedisError> {
        let client = redis::Client::open(config.url.as_str())?;
        let (tx, rx) = bounded(queue);
        let dropped = Arc::new(AtomicU64::new(0));
        let publisher = Publisher {
            client,
            prefix: config.prefix.clone(),
            names: metrics.iter().map(versioned).collect(),
            lateness,
            process: (process, processes),
            written: HashMap::new(),
            dropped: Arc::clone(&dropped),
            message: Vec::new(),
            round: Round::default(),
        };
        let thread = std::thread::Builder::new()
            .name("redis-publisher".into())
            .spawn(move || publisher.run(&rx))
            .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
        let publisher = RedisPublisher {
            tx,
            dropped,
            watermarks: Watermarks::default(),
            worker: None,
        };
        Ok((publisher, thread))
    }

    /// A worker's publisher. The process passes on a watermark once every
    /// worker that took one has passed it.
    pub fn worker(&self) -> RedisPublisher {
        RedisPublisher {
            worker: Some(self.watermarks.register()),
            ..self.clone()
        }
    }

    /// The publisher of a new live job, of `metrics`: what comes after
    /// this is of them. A backfill has finished and made them active.
    pub fn renew(&self, metrics: &[MetricSpec]) -> RedisPublisher {
        // Closed only once the process stops.
        let _ = self.tx.send(Live::Metrics(Arc::new(metrics.to_vec())));
        RedisPublisher {
            watermarks: Watermarks::default(),
            worker: None,
            ..self.clone()
        }
    }

    /// Updates dropped because Redis was unreachable or behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Sink<Arc<WindowUpdate>> for RedisPublisher {
    fn offer(&mut self, items: &mut Vec<Arc<WindowUpdate>>) {
        match self.tx.try_send(Live::Updates(std::mem::take(items))) {
            Ok(()) => {}
            Err(
                TrySendError::Full(Live::Updates(lost))
                | TrySendError::Disconnected(Live::Updates(lost)),
            ) => {
                self.dropped.fetch_add(lost.len() as u64, Ordering::Relaxed);
            }
            Err(_) => unreachable!("updates were sent"),
        }
    }

    fn advance(&mut self, frontier: u64) -> bool {
        self.watermarks
            .pass_on(self.worker, frontier, |live| match self.tx.try_send(live) {
                Err(TrySendError::Full(_)) => Err(Full),
                Ok(()) | Err(TrySendError::Disconnected(_)) => Ok(()),
            })
    }
}

struct Publisher {
    client: redis::Client,
    prefix: String,
    /// Each metric's name and version, by index.
    names: Vec<String>,
    lateness: Millis,
    /// This process's index and the number of processes.
    process: (usize, usize),
    /// Per (metric, window spec), the hash fields written, by window end,
    /// so those past the lateness can be deleted. Specs are kept apart: a
    /// sliding window closes long before the tumbling one beside it.
    written: HashMap<(u16, u8), BTreeMap<Millis, HashSet<String>>>,
    dropped: Arc<AtomicU64>,
    /// The message being encoded, kept so that its memory is reused.
    message: Vec<u8>,
    /// The commands of the round under way, kept likewise.
    round: Round,
}

/// One round trip's commands, kept from round to round with their buffers.
/// A busy round's commands run to megabytes, and fresh memory of that size
/// is zeroed by the kernel each time it is taken: `redis::Pipeline` makes
/// its commands, and the bytes it sends, anew for every query.
#[derive(Default)]
struct Round {
    commands: Vec<redis::Cmd>,
    /// The commands of this round: the first `used`.
    used: usize,
    packed: Vec<u8>,
}

impl Round {
    /// The round's next command, empty.
    fn command(&mut self) -> &mut redis::Cmd {
        if self.used == self.commands.len() {
            self.commands.push(redis::Cmd::new());
        }
        let command = &mut self.commands[self.used];
        command.clear();
        self.used += 1;
        command
    }

    /// Sends the round's commands at once, and reads every answer: a
    /// command Redis refused fails the round.
    fn send(&mut self, conn: &mut redis::Connection) -> redis::RedisResult<()> {
        let sent = std::mem::take(&mut self.used);
        if sent == 0 {
            return Ok(());
        }
        self.packed.clear();
        for command in &self.commands[..sent] {
            command.write_packed_command(&mut self.packed);
        }
        conn.send_packed_command(&self.packed)?;
        let mut refused = Ok(());
        for _ in 0..sent {
            if let Err(e) = conn.recv_response()?.extract_error() {
                refused = refused.and(Err(e));
            }
        }
        refused
    }
}

impl Publisher {
    fn run(mut self, rx: &Receiver<Live>) {
        let mut connection = None;
        let mut backoff = Backoff::new("publish live updates to Redis");
        while let Ok(first) = rx.recv() {
            let (mut updates, mut through, mut renewed) = (Vec::new(), None, None);
            for live in std::iter::once(first).chain(rx.try_iter()) {
                match live {
                    Live::Updates(more) => updates.extend(more),
                    Live::Through(t) => through = Some(t),
                    Live::Metrics(metrics) => {
                        // What follows is of other metrics: it waits for
                        // the next round.
                        renewed = Some(metrics);
                        break;
                    }
                }
            }
            if let Some(metrics) = renewed {
                // The old job's last updates go nowhere now: gateways read
                // the new versions' channels, which the new job fills from
                // its checkpoint on.
                updates.clear();
                self.renew(&metrics);
            }
            if connection.is_none() {
                match self.client.get_connection() {
                    Ok(c) => connection = Some(c),
                    Err(e) => {
                        self.drop_batch(&updates);
                        std::thread::sleep(backoff.failed(&e));
                        continue;
                    }
                }
            }
            let conn = connection.as_mut().expect("connected above");
            self.updates(&updates);
            if let Some(t) = through {
                self.through(t);
            }
            match self.round.send(conn) {
                Ok(()) => backoff.succeeded(),
                Err(e) => {
                    self.drop_batch(&updates);
                    connection = None;
                    std::thread::sleep(backoff.failed(&e));
                }
            }
        }
        info!("redis publisher stopped");
    }

    /// Publishes `metrics` from here on. The old versions' hashes expire
    /// unread.
    fn renew(&mut self, metrics: &[MetricSpec]) {
        self.names = metrics.iter().map(versioned).collect();
        self.written.clear();
    }

    /// Deletes the windows that ended more than the lateness before the
    /// process's watermark, and tells the gateways how far it has got.
    fn through(&mut self, watermark: u64) {
        let watermark = Millis::try_from(watermark).unwrap_or(Millis::MAX);
        for (&(metric, _), written) in self.written.iter_mut() {
            let expired = ended_before(written, watermark.saturating_sub(self.lateness));
            if !expired.is_empty() {
                let key = latest_key(&self.prefix, &self.names[metric as usize]);
                self.round.command().arg("HDEL").arg(key).arg(expired);
            }
        }
        self.written.retain(|_, written| !written.is_empty());
        let (process, processes) = self.process;
        let message = bincode::serialize(&(process as u32, processes as u32, watermark))
            .expect("a watermark serializes");
        self.round
            .command()
            .arg("PUBLISH")
            .arg(through_channel(&self.prefix))
            .arg(message);
    }

    fn drop_batch(&self, updates: &[Arc<WindowUpdate>]) {
        self.dropped
            .fetch_add(updates.len() as u64, Ordering::Relaxed);
    }

    /// The round's commands for `updates`: per metric, a message on its
    /// channel, the new latest values, and the deletion of windows past
    /// the lateness.
    fn updates(&mut self, updates: &[Arc<WindowUpdate>]) {
        let mut by_metric: BTreeMap<u16, Vec<&WindowUpdate>> = BTreeMap::new();
        for u in updates {
            by_metric.entry(u.metric).or_default().push(u);
        }
        for (metric, updates) in by_metric {
            let name = &self.names[metric as usize];
            let key = latest_key(&self.prefix, name);
            let ends = encode(&updates, &mut self.message);
            self.round
                .command()
                .arg("PUBLISH")
                .arg(channel(&self.prefix, name))
                .arg(self.message.as_slice());
            let mut newest: BTreeMap<u8, Millis> = BTreeMap::new();
            // One HSET of every field: the redis crate encodes each command
            // on its own.
            let hset = self.round.command().arg("HSET").arg(&key);
            let starts = std::iter::once(MESSAGE_HEAD).chain(ends.iter().copied());
            for ((u, start), end) in updates.iter().zip(starts).zip(ends.iter().copied()) {
                let field = format!("{}:{}:{}", u.window, u.span.start, u.group.join("\u{1f}"));
                hset.arg(&field).arg(&self.message[start..end]);
                self.written
                    .entry((metric, u.window))
                    .or_default()
                    .entry(u.span.end)
                    .or_default()
                    .insert(field);
                // As the hub keeps them: windows ending within the lateness
                // of the newest window's start.
                let start = newest.entry(u.window).or_insert(u.span.start);
                *start = (*start).max(u.span.start);
            }
            let mut expired: Vec<String> = Vec::new();
            for (window, newest) in newest {
                let written = self.written.entry((metric, window)).or_default();
                expired.extend(ended_before(written, newest - self.lateness));
            }
            if !expired.is_empty() {
                self.round.command().arg("HDEL").arg(&key).arg(expired);
            }
            self.round
                .command()
                .arg("EXPIRE")
                .arg(&key)
                .arg(LATEST_TTL_SECS);
        }
    }
}

/// Where a message's first update starts: after its length.
const MESSAGE_HEAD: usize = 8;

/// Encodes `updates` into `message` as the bincode of a `Vec` of them, the
/// message their channel carries, each update once: bincode writes a
/// sequence as its length, a `u64`, then its items. Returns where each
/// update's own encoding ends, which the latest-value hash stores.
fn encode(updates: &[&WindowUpdate], message: &mut Vec<u8>) -> Vec<usize> {
    message.clear();
    bincode::serialize_into(&mut *message, &(updates.len() as u64)).expect("a length serializes");
    updates
        .iter()
        .map(|u| {
            bincode::serialize_into(&mut *message, u).expect("a window update serializes");
            message.len()
        })
        .collect()
}

/// Takes out the hash fields of the windows that ended before `end`.
fn ended_before(written: &mut BTreeMap<Millis, HashSet<String>>, end: Millis) -> Vec<String> {
    let keep = written.split_off(&end);
    std::mem::replace(written, keep)
        .into_values()
        .flatten()
        .collect()
}

/// A gateway's subscriptions: which metrics its clients want.
#[derive(Clone)]
pub struct RedisFeed {
    commands: mpsc::UnboundedSender<Command>,
}

/// What a gateway asks of its subscriber task.
enum Command {
    /// Start or stop receiving a metric.
    Want(String, bool),
    /// Read the channels of these versions from now on.
    Metrics(Arc<Vec<MetricSpec>>),
}

impl RedisFeed {
    /// Starts receiving a metric's updates (with its latest values first),
    /// or stops.
    pub fn want(&self, metric: &str, wanted: bool) {
        // The task only ends with the runtime.
        let _ = self.commands.send(Command::Want(metric.to_owned(), wanted));
    }

    /// Reads the versions of `metrics` from now on: a backfill has made
    /// them active. The hub hears of it before their first update.
    pub fn renew(&self, metrics: Arc<Vec<MetricSpec>>) {
        let _ = self.commands.send(Command::Metrics(metrics));
    }
}

/// Batches of window updates, as the hub takes them.
pub type Updates = mpsc::Receiver<Live>;

/// Starts the subscriber task of a gateway; updates come out of the
/// receiver, as from the in-process bus, but only for wanted metrics.
pub fn subscribe(
    config: &RedisConfig,
    metrics: Arc<Vec<MetricSpec>>,
    capacity: usize,
) -> Result<(RedisFeed, Updates), redis::RedisError> {
    let client = redis::Client::open(config.url.as_str())?;
    let (commands, rx) = mpsc::unbounded_channel();
    let (updates, out) = mpsc::channel(capacity);
    let mut subscriber = Subscriber {
        client,
        prefix: config.prefix.clone(),
        metrics: Arc::default(),
        channels: HashMap::new(),
        wanted: HashMap::new(),
        updates,
        processes: Lowest::default(),
    };
    subscriber.read(metrics);
    tokio::spawn(subscriber.run(rx));
    Ok((RedisFeed { commands }, out))
}

struct Subscriber {
    client: redis::Client,
    prefix: String,
    metrics: Arc<Vec<MetricSpec>>,
    /// The channel of each metric's version, to the metric's index.
    channels: HashMap<String, u16>,
    /// Each wanted metric, and the channel subscribed for it.
    wanted: HashMap<String, String>,
    updates: mpsc::Sender<Live>,
    /// Each worker process's watermark, as it last published it, and the
    /// lowest handed to the hub.
    processes: Lowest,
}

impl Subscriber {
    /// Reads the versions of `metrics`.
    fn read(&mut self, metrics: Arc<Vec<MetricSpec>>) {
        self.channels = metrics
            .iter()
            .enumerate()
            .map(|(i, m)| (channel(&self.prefix, &versioned(m)), i as u16))
            .collect();
        self.metrics = metrics;
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            let (mut sink, mut stream, mut reader) =
                retry::until_ok("subscribe to live updates in Redis", || async {
                    let (sink, stream) = self.client.get_async_pubsub().await?.split();
                    let reader = self.client.get_multiplexed_async_connection().await?;
                    Ok::<_, redis::RedisError>((sink, stream, reader))
                })
                .await;
            // After a reconnect, everything wanted is subscribed again.
            let through = through_channel(&self.prefix);
            let mut healthy = sink.subscribe(&through).await.is_ok();
            let wanted: Vec<String> = self.wanted.drain().map(|(metric, _)| metric).collect();
            for metric in wanted {
                healthy &= self.start(&mut sink, &mut reader, metric).await;
            }
            while healthy {
                tokio::select! {
                    command = commands.recv() => match command {
                        None => return,
                        Some(Command::Want(metric, true)) if !self.wanted.contains_key(&metric) => {
                            healthy = self.start(&mut sink, &mut reader, metric).await;
                        }
                        Some(Command::Want(metric, false)) => {
                            if let Some(channel) = self.wanted.remove(&metric) {
                                healthy = sink.unsubscribe(channel).await.is_ok();
                            }
                        }
                        Some(Command::Want(..)) => {}
                        Some(Command::Metrics(metrics)) => {
                            // The hub lets its clients go and they subscribe
                            // anew, to the new versions.
                            self.read(Arc::clone(&metrics));
                            let _ = self.updates.send(Live::Metrics(metrics)).await;
                        }
                    },
                    message = stream.next() => match message {
                        Some(message) if message.get_channel_name() == through => {
                            match bincode::deserialize::<(u32, u32, Millis)>(message.get_payload_bytes()) {
                                Ok(report) => self.through(report).await,
                                Err(e) => warn!(error = %e, "unreadable watermark"),
                            }
                        }
                        Some(message) => {
                            // A version no longer active has none.
                            let Some(&index) = self.channels.get(message.get_channel_name()) else {
                                continue;
                            };
                            match bincode::deserialize::<Vec<WindowUpdate>>(message.get_payload_bytes()) {
                                Ok(updates) => self.forward(index, updates).await,
                                Err(e) => warn!(error = %e, channel = message.get_channel_name(), "unreadable live update"),
                            }
                        }
                        None => healthy = false,
                    },
                }
            }
            warn!("lost the Redis subscription; reconnecting");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Subscribes to the channel of the active version of `metric`, then
    /// forwards its latest values. Returns false if the connection failed;
    /// the metric is wanted either way.
    async fn start(
        &mut self,
        sink: &mut redis::aio::PubSubSink,
        reader: &mut redis::aio::MultiplexedConnection,
        metric: String,
    ) -> bool {
        let Some((index, spec)) = self
            .metrics
            .iter()
            .enumerate()
            .find(|(_, m)| m.name == metric)
        else {
            return true;
        };
        let version = versioned(spec);
        let subscribed = channel(&self.prefix, &version);
        self.wanted.insert(metric.clone(), subscribed.clone());
        if let Err(e) = sink.subscribe(&subscribed).await {
            warn!(error = %e, metric, "cannot subscribe to live updates");
            return false;
        }
        let latest: Vec<Vec<u8>> = match reader.hvals(latest_key(&self.prefix, &version)).await {
            Ok(values) => values,
            Err(e) => {
                warn!(error = %e, metric, "cannot read the latest live values");
                return false;
            }
        };
        let updates = latest
            .iter()
            .filter_map(|bytes| bincode::deserialize::<WindowUpdate>(bytes).ok())
            .collect();
        self.forward(index as u16, updates).await;
        true
    }

    /// Records a process's watermark, and hands the hub the lowest of all
    /// processes once each has reported and it has risen.
    async fn through(&mut self, (process, processes, watermark): (u32, u32, Millis)) {
        let (process, processes) = (process as usize, processes as usize);
        if process >= processes {
            return;
        }
        self.processes.reported.resize(processes, 0);
        if let Some(lowest) = self.processes.report(process, watermark.max(0) as u64) {
            self.processes.passed = lowest;
            let _ = self.updates.send(Live::Through(lowest)).await;
        }
    }

    /// Hands updates of the metric at `index` to the hub, renumbered to
    /// this gateway's metrics.
    async fn forward(&self, index: u16, mut updates: Vec<WindowUpdate>) {
        for u in &mut updates {
            u.metric = index;
        }
        if !updates.is_empty() {
            let _ = self
                .updates
                .send(Live::Updates(updates.into_iter().map(Arc::new).collect()))
                .await;
        }
    }
}

/// Where each worker process keeps its share of a backfill's progress, and
/// where the gateways read it: `<prefix>:backfill:<process>`, expiring
/// unless renewed. Best effort, like the live values.
pub struct Progress {
    client: redis::Client,
    prefix: String,
    /// A worker's, to report on.
    connection: Option<redis::Connection>,
    /// A gateway's, to read on.
    reader: Option<redis::aio::MultiplexedConnection>,
}

impl Progress {
    /// Progress kept on `config`'s server; nothing is sent until it is.
    pub fn new(config: &RedisConfig) -> Result<Progress, redis::RedisError> {
        Ok(Progress {
            client: redis::Client::open(config.url.as_str())?,
            prefix: config.prefix.clone(),
            connection: None,
            reader: None,
        })
    }

    fn key(prefix: &str, process: usize) -> String {
        format!("{prefix}:backfill:{process}")
    }

    /// Keeps `report` as process `process`'s share for a few seconds, or
    /// deletes its share when there is none.
    pub fn report(&mut self, process: usize, report: Option<&str>) {
        let key = Progress::key(&self.prefix, process);
        let mut connection = match self.connection.take() {
            Some(c) => c,
            None => match self
                .client
                .get_connection_with_timeout(Duration::from_secs(1))
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot report the backfill's progress to Redis");
                    return;
                }
            },
        };
        let done = match report {
            Some(report) => connection.set_ex::<_, _, ()>(key, report, PROGRESS_TTL_SECS),
            None => connection.del::<_, ()>(key),
        };
        match done {
            Ok(()) => self.connection = Some(connection),
            Err(e) => tracing::debug!(error = %e, "cannot report the backfill's progress to Redis"),
        }
    }

    /// Every process's share, of `processes`; `None` for a process with
    /// none, or when Redis cannot be read.
    pub async fn read(&mut self, processes: usize) -> Vec<Option<String>> {
        let keys: Vec<String> = (0..processes)
            .map(|p| Progress::key(&self.prefix, p))
            .collect();
        let read = async {
            let mut reader = match self.reader.take() {
                Some(reader) => reader,
                None => self.client.get_multiplexed_async_connection().await?,
            };
            let shares = redis::cmd("MGET")
                .arg(&keys)
                .query_async::<Vec<Option<String>>>(&mut reader)
                .await?;
            self.reader = Some(reader);
            Ok::<_, redis::RedisError>(shares)
        };
        read.await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the backfill's progress from Redis");
            vec![None; processes]
        })
    }
}

#[cfg(test)]
mod tests {
    use tally_dataflow::aggregate::{AggState, Sketch};
    use tally_dataflow::window::Span;

    use super::*;

    #[test]
    fn updates_are_encoded_once_as_their_message_and_each_on_its_own() {
        let update = |count: u64, sketch: Option<Sketch>| WindowUpdate {
            metric: 1,
            window: 2,
            span: Span {
                start: 10_000,
                end: 20_000,
            },
            group: vec!["c1".into(), format!("country{count}")].into(),
            state: AggState::from_parts(count, 1.5 * count as f64, sketch),
            revision: 3,
            is_final: count.is_multiple_of(2),
            appended_at: Some(123),
        };
        let updates = [update(4, Some(Sketch::new())), update(7, None)];
        let borrowed: Vec<&WindowUpdate> = updates.iter().collect();
        let mut message = b"left from before".to_vec();
        let ends = encode(&borrowed, &mut message);
        assert_eq!(message, bincode::serialize(&borrowed).unwrap());
        let read: Vec<WindowUpdate> = bincode::deserialize(&message).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].state.count, 7);
        assert_eq!(
            message[MESSAGE_HEAD..ends[0]],
            bincode::serialize(&updates[0]).unwrap()
        );
        assert_eq!(
            message[ends[0]..ends[1]],
            bincode::serialize(&updates[1]).unwrap()
        );
        assert_eq!(ends[1], message.len());
        assert!(encode(&[], &mut message).is_empty());
        assert_eq!(
            message,
            bincode::serialize(&Vec::<WindowUpdate>::new()).unwrap()
        );
    }
}
