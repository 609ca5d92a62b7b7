//! `GET /v1/live`: WebSocket fan-out of live window values.
//!
//! The workers publish per-group window values (partials, finals and
//! revisions) on the live bus. The [`Hub`], one task, keeps the recent
//! windows of every metric and the subscriptions of every client. For each
//! batch from the bus it recomputes the topics that batch touched, by merging
//! the matching groups' states, and queues for each subscribed client one
//! update per subscription: a message per window, or per group and window.
//!
//! A topic is `metrics:<metric>[:<dimension>:<value>]…`; a subscription may
//! add a `window` (default: the metric's first) and a `groupBy` dimension, in
//! which case each group's value is a message of its own.
//!
//! **Slow consumers.** Each client has a bounded queue of updates
//! (`live.queue`, 50 by default). The bound counts updates, not messages, so
//! a grouped topic with hundreds of groups takes one place. The hub never
//! waits on a client: when a queue is full the client is disconnected, and
//! nobody else is delayed.
//!
//! **Revisions.** A topic's open window is sent with `final: false`. Its
//! final value carries the sum of the revisions of the groups it merges: 0 at
//! first, raised by every late event. The job keeps group revisions across
//! restarts (they are in its checkpoints), so `(window, revision)` tells a
//! repeat from a correction even across a restart of the server.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tally_dataflow::aggregate::AggState;
use tally_dataflow::config::MetricSpec;
use tally_dataflow::model::Group;
use tally_dataflow::model::WindowUpdate;
use tally_dataflow::time::{format_rfc3339, Millis};
use tally_dataflow::window::WindowSpec;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use warp::http::{header, HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::backend::LiveInterest;
use crate::now_ms;
use crate::ops::Ops;
use crate::reply::{number, ApiError};

/// How often the server pings a client.
const PING_EVERY: Duration = Duration::from_secs(15);
/// A client silent for this long (no pong, no message) is disconnected.
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
/// A client that takes this long to accept one write (a message, and what
/// was queued behind it) is disconnected, so a stalled socket never holds
/// its task.
const SEND_LIMIT: Duration = Duration::from_secs(10);
/// How long a client dropped for a full queue has to answer its close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// What a connection reads into at a time. Clients send only small
/// subscription messages.
const READ_BUFFER: usize = 4096;
/// The largest message a client may send.
const MAX_REQUEST: usize = 64 * 1024;

/// One entry of a client's queue: what one subscription has for it from one
/// batch of the bus (a value per window, or per group and window), a
/// subscription's current values, or an error. The queue's bound counts
/// entries, so a grouped topic with many groups takes one place, not one
/// per group.
type Batch = Arc<[Utf8Bytes]>;

/// A client's connection.
type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// `GET /v1/live`: the WebSocket handshake, then [`Hub::serve`].
///
/// The handshake is done here rather than by warp's `ws()` filter so that
/// the connection's buffers can be sized. warp gives each connection the
/// WebSocket library's default 128 KiB read buffer, which is zero-filled
/// before every read: 128 KiB of memory per client and, under fan-out, a
/// large share of the server's CPU.
pub fn route(
    hub: Hub,
    queue: usize,
    ops: Arc<Ops>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("v1" / "live")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .map(move |headers: HeaderMap, upgrade: Option<OnUpgrade>| {
            let (key, upgrade) = match handshake(&headers, upgrade) {
                Ok(accepted) => accepted,
                Err(refusal) => return refusal.into_response(),
            };
            let (hub, ops) = (hub.clone(), Arc::clone(&ops));
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(upgraded) => {
                        let config = WebSocketConfig::default()
                            .read_buffer_size(READ_BUFFER)
                            .max_message_size(Some(MAX_REQUEST))
                            .max_frame_size(Some(MAX_REQUEST));
                        let socket = WebSocketStream::from_raw_socket(
                            TokioIo::new(upgraded),
                            Role::Server,
                            Some(config),
                        )
                        .await;
                        hub.serve(socket, queue, ops).await;
                    }
                    Err(e) => tracing::debug!("a WebSocket upgrade failed: {e}"),
                }
            });
            let mut response = Response::default();
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(header::CONNECTION, "upgrade".parse().unwrap());
            headers.insert(header::UPGRADE, "websocket".parse().unwrap());
            headers.insert(
                header::SEC_WEBSOCKET_ACCEPT,
                derive_accept_key(key.as_bytes()).parse().unwrap(),
            );
            response
        })
}

/// Why a handshake was refused: 426 for a request that is not a WebSocket
/// upgrade or asks for a version other than 13, 400 for a malformed one.
enum Refusal {
    UpgradeRequired(&'static str),
    BadRequest(&'static str),
}

impl Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::BadRequest(message) => ApiError::bad_request(message).into_response(),
            Refusal::UpgradeRequired(message) => {
                let mut response =
                    ApiError::new(StatusCode::UPGRADE_REQUIRED, message).into_response();
                let headers = response.headers_mut();
                headers.insert(header::CONNECTION, "upgrade".parse().unwrap());
                headers.insert(header::UPGRADE, "websocket".parse().unwrap());
                headers.insert(header::SEC_WEBSOCKET_VERSION, "13".parse().unwrap());
                response
            }
        }
    }
}

/// Checks a WebSocket opening handshake (RFC 6455, 4.2.1), and returns its
/// `Sec-WebSocket-Key` and the connection to take over.
fn handshake(
    headers: &HeaderMap,
    upgrade: Option<OnUpgrade>,
) -> Result<(header::HeaderValue, OnUpgrade), Refusal> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !(has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")) {
        return Err(Refusal::UpgradeRequired(
            "GET /v1/live is a WebSocket: connect with a WebSocket client",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(Refusal::UpgradeRequired(
            "this server speaks WebSocket version 13 only",
        ));
    }
    // The key is 16 random bytes in base64.
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|key| key.len() == 24)
        .ok_or(Refusal::BadRequest(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ))?;
    // hyper offers the connection only for an HTTP/1.1 upgrade request.
    let upgrade = upgrade.ok_or(Refusal::BadRequest(
        "a WebSocket needs an HTTP/1.1 connection",
    ))?;
    Ok((key.clone(), upgrade))
}

/// A handle to the fan-out task.
#[derive(Clone)]
pub struct Hub {
    commands: mpsc::Sender<Command>,
    next_client: Arc<AtomicU64>,
}

enum Command {
    Join {
        client: u64,
        queue: mpsc::Sender<Batch>,
    },
    Subscribe {
        client: u64,
        request: Request,
    },
    Unsubscribe {
        client: u64,
        request: Request,
    },
    Leave {
        client: u64,
    },
}

/// A client's message.
#[derive(Clone, Debug, Deserialize)]
struct Request {
    action: String,
    topic: String,
    window: Option<String>,
    #[serde(rename = "groupBy")]
    group_by: Option<String>,
}

impl Hub {
    /// Starts the fan-out task, fed by the live bus. Windows are kept while
    /// a late event can still revise them: `lateness` is the allowed
    /// lateness plus the out-of-orderness.
    ///
    /// With `interest`, the bus delivers only the metrics asked for: the hub
    /// asks for a metric when its first topic is subscribed, and releases
    /// it, forgetting its windows, when the last one is.
    pub fn start(
        metrics: Arc<Vec<MetricSpec>>,
        lateness: Millis,
        bus: mpsc::Receiver<Vec<Arc<WindowUpdate>>>,
        ops: Arc<Ops>,
        interest: Option<Arc<dyn LiveInterest>>,
    ) -> Hub {
        let (commands, rx) = mpsc::channel(4096);
        let mut state = HubState::new(metrics, lateness, ops);
        state.interest = interest;
        tokio::spawn(state.run(rx, bus));
        Hub {
            commands,
            next_client: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Serves one WebSocket client until it leaves or falls behind.
    async fn serve(self, ws: Socket, queue: usize, ops: Arc<Ops>) {
        let client = self.next_client.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Batch>(queue);
        if self
            .commands
            .send(Command::Join { client, queue: tx })
            .await
            .is_err()
        {
            return;
        }
        ops.ws_clients.inc();
        let (mut sink, stream) = ws.split();
        // Reading runs in a task of its own, woken only when the client sends
        // something, so sending never polls the socket for reads.
        let started = Instant::now();
        let heard = Arc::new(AtomicU64::new(0));
        let (replies_tx, mut replies) = mpsc::channel::<String>(8);
        let mut reader = tokio::spawn(read_requests(
            stream,
            client,
            self.commands.clone(),
            replies_tx,
            Arc::clone(&heard),
            started,
        ));
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            let outgoing = tokio::select! {
                batch = rx.recv() => match batch {
                    Some(batch) => Outgoing::Live(batch),
                    None => {
                        // The hub dropped us: our queue overflowed.
                        let close = CloseFrame {
                            code: CloseCode::Policy,
                            reason: "too slow: the message queue overflowed".into(),
                        };
                        let close = sink.send(Message::Close(Some(close)));
                        let _ = tokio::time::timeout(SEND_LIMIT, close).await;
                        // The reader reads on until the client's answering
                        // close, so the connection ends with a FIN rather
                        // than a reset that would discard what it has yet
                        // to read.
                        let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
                        break;
                    }
                },
                reply = replies.recv() => match reply {
                    Some(text) => Outgoing::Frame(Message::text(text)),
                    // The client closed, or its connection failed.
                    None => break,
                },
                _ = ping.tick() => {
                    let heard = Duration::from_millis(heard.load(Ordering::Relaxed));
                    if started.elapsed().saturating_sub(heard) > SILENCE_LIMIT {
                        break;
                    }
                    Outgoing::Frame(Message::Ping(Default::default()))
                }
            };
            // What else is queued, up to a queue's worth of entries, goes
            // out in the same write.
            let send = async {
                let mut batch = match outgoing {
                    Outgoing::Frame(frame) => {
                        sink.feed(frame).await?;
                        rx.try_recv().ok()
                    }
                    Outgoing::Live(batch) => Some(batch),
                };
                let mut taken = 0;
                while let Some(messages) = batch {
                    for text in messages.iter() {
                        sink.feed(Message::Text(text.clone())).await?;
                    }
                    taken += 1;
                    batch = if taken < queue {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                sink.flush().await
            };
            if !matches!(tokio::time::timeout(SEND_LIMIT, send).await, Ok(Ok(()))) {
                break;
            }
        }
        reader.abort();
        let _ = self.commands.send(Command::Leave { client }).await;
        ops.ws_clients.dec();
    }
}

/// What a client's task sends next.
enum Outgoing {
    Live(Batch),
    Frame(Message),
}

/// Reads a client's requests until it closes: subscriptions go to the hub,
/// errors back to the client through `replies`. Every frame, pongs
/// included, is noted in `heard`, in milliseconds since `started`.
async fn read_requests(
    mut stream: SplitStream<Socket>,
    client: u64,
    commands: mpsc::Sender<Command>,
    replies: mpsc::Sender<String>,
    heard: Arc<AtomicU64>,
    started: Instant,
) {
    while let Some(Ok(frame)) = stream.next().await {
        heard.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        let text = match frame {
            Message::Text(text) => text,
            // The next read sends the reply to a close, then ends.
            _ => continue,
        };
        let error = match serde_json::from_str::<Request>(&text) {
            Ok(request) if request.action == "subscribe" => {
                let _ = commands.send(Command::Subscribe { client, request }).await;
                continue;
            }
            Ok(request) if request.action == "unsubscribe" => {
                let _ = commands
                    .send(Command::Unsubscribe { client, request })
                    .await;
                continue;
            }
            Ok(request) => format!(
                "unknown action '{}': use subscribe or unsubscribe",
                request.action
            ),
            Err(e) => format!("cannot read the message: {e}"),
        };
        if replies
            .send(json!({ "error": error }).to_string())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A subscription's identity: its topic, window and grouping.
type SubKey = (String, u8, Option<usize>);

struct Subscription {
    metric: u16,
    window: u8,
    filters: Vec<(usize, String)>,
    group_by: Option<usize>,
    clients: HashSet<u64>,
    /// What was last sent, per window and group.
    sent: HashMap<(Millis, Option<String>), Sent>,
}

/// The last message of a subscription for one window and group.
#[derive(Clone, Copy, PartialEq)]
struct Sent {
    value: Option<f64>,
    is_final: bool,
}

/// The latest value of every group in one window: its state, whether it
/// is final, and its revision.
struct Slot {
    end: Millis,
    groups: HashMap<Group, (AggState, bool, u32)>,
}

struct HubState {
    metrics: Arc<Vec<MetricSpec>>,
    lateness: Millis,
    ops: Arc<Ops>,
    windows: HashMap<(u16, u8), BTreeMap<Millis, Slot>>,
    subs: HashMap<SubKey, Subscription>,
    clients: HashMap<u64, (mpsc::Sender<Batch>, HashSet<SubKey>)>,
    /// Subscriptions per metric.
    refs: HashMap<u16, usize>,
    interest: Option<Arc<dyn LiveInterest>>,
}

impl HubState {
    fn new(metrics: Arc<Vec<MetricSpec>>, lateness: Millis, ops: Arc<Ops>) -> HubState {
        HubState {
            metrics,
            lateness,
            ops,
            windows: HashMap::new(),
            subs: HashMap::new(),
            clients: HashMap::new(),
            refs: HashMap::new(),
            interest: None,
        }
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut bus: mpsc::Receiver<Vec<Arc<WindowUpdate>>>,
    ) {
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                updates = bus.recv() => match updates {
                    Some(mut updates) => {
                        // Take whatever else is queued too, so a topic is
                        // recomputed once for all of it.
                        while let Ok(more) = bus.try_recv() {
                            updates.extend(more);
                        }
                        self.updates(updates)
                    }
                    None => break,
                },
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Join { client, queue } => {
                self.clients.insert(client, (queue, HashSet::new()));
            }
            Command::Leave { client } => self.drop_client(client),
            Command::Subscribe { client, request } => match self.parse(&request) {
                Ok(key) => self.subscribe(client, key),
                Err(error) => {
                    let error = json!({"error": error, "topic": request.topic}).to_string();
                    self.send_to(client, Batch::from([Utf8Bytes::from(error)]));
                }
            },
            Command::Unsubscribe { client, request } => {
                let Some((_, keys)) = self.clients.get_mut(&client) else {
                    return;
                };
                let gone: Vec<SubKey> = keys
                    .iter()
                    .filter(|k| k.0 == request.topic)
                    .cloned()
                    .collect();
                for key in &gone {
                    keys.remove(key);
                }
                for key in gone {
                    self.release(client, &key);
                }
            }
        }
    }

    /// Checks a subscription against the configuration.
    fn parse(&self, request: &Request) -> Result<SubKey, String> {
        let mut parts = request.topic.split(':');
        if parts.next() != Some("metrics") {
            return Err("a topic is metrics:<metric>[:<dimension>:<value>]…".into());
        }
        let name = parts.next().unwrap_or_default();
        let metric = self
            .metrics
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| format!("unknown metric '{name}'"))?;
        let rest: Vec<&str> = parts.collect();
        if !rest.len().is_multiple_of(2) {
            return Err("filters come in pairs: <dimension>:<value>".into());
        }
        let dimension = |d: &str| {
            metric
                .dimensions
                .iter()
                .position(|x| x == d)
                .ok_or_else(|| format!("'{d}' is not a dimension of {name}"))
        };
        for pair in rest.chunks(2) {
            dimension(pair[0])?;
        }
        let window = match &request.window {
            None => 0,
            Some(text) => {
                let spec = WindowSpec::parse(text)?;
                metric
                    .windows
                    .iter()
                    .position(|w| *w == spec)
                    .ok_or_else(|| format!("{name} has no window '{text}'"))?
            }
        };
        let group_by = request.group_by.as_deref().map(dimension).transpose()?;
        Ok((request.topic.clone(), window as u8, group_by))
    }

    fn subscribe(&mut self, client: u64, key: SubKey) {
        let Some((_, keys)) = self.clients.get_mut(&client) else {
            return;
        };
        if !keys.insert(key.clone()) {
            return;
        }
        let (metrics, refs, interest) = (&self.metrics, &mut self.refs, &self.interest);
        let sub = self.subs.entry(key.clone()).or_insert_with(|| {
            let mut parts = key.0.split(':').skip(1);
            let name = parts.next().unwrap_or_default();
            let (metric, spec) = metrics
                .iter()
                .enumerate()
                .find(|(_, m)| m.name == name)
                .expect("checked by parse");
            let rest: Vec<&str> = parts.collect();
            let filters = rest
                .chunks(2)
                .map(|p| {
                    (
                        spec.dimensions
                            .iter()
                            .position(|d| d == p[0])
                            .expect("checked by parse"),
                        p[1].to_owned(),
                    )
                })
                .collect();
            let count = refs.entry(metric as u16).or_default();
            *count += 1;
            if *count == 1 {
                if let Some(interest) = interest {
                    interest.want(&spec.name, true);
                }
            }
            Subscription {
                metric: metric as u16,
                window: key.1,
                filters,
                group_by: key.2,
                clients: HashSet::new(),
                sent: HashMap::new(),
            }
        });
        sub.clients.insert(client);
        // A new subscriber first gets the current value: the newest window.
        let current = self
            .windows
            .get(&(sub.metric, sub.window))
            .and_then(|slots| slots.iter().next_back())
            .map(|(start, slot)| messages(&self.metrics, &key, sub, *start, slot, false))
            .unwrap_or_default();
        if !current.is_empty() {
            self.send_to(client, current.into());
        }
    }

    fn release(&mut self, client: u64, key: &SubKey) {
        if let Some(sub) = self.subs.get_mut(key) {
            sub.clients.remove(&client);
            if sub.clients.is_empty() {
                let metric = sub.metric;
                self.subs.remove(key);
                let count = self.refs.entry(metric).or_default();
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.refs.remove(&metric);
                    if let Some(interest) = &self.interest {
                        // Its windows stop being updated; they are read
                        // afresh if the metric is wanted again.
                        interest.want(&self.metrics[metric as usize].name, false);
                        self.windows.retain(|(m, _), _| *m != metric);
                    }
                }
            }
        }
    }

    fn drop_client(&mut self, client: u64) {
        if let Some((_, keys)) = self.clients.remove(&client) {
            for key in keys {
                self.release(client, &key);
            }
        }
    }

    fn send_to(&mut self, client: u64, batch: Batch) {
        let full = match self.clients.get(&client) {
            Some((queue, _)) => queue.try_send(batch).is_err(),
            None => false,
        };
        if full {
            self.ops.ws_slow_dropped.inc();
            self.drop_client(client);
        }
    }

    fn updates(&mut self, updates: Vec<Arc<WindowUpdate>>) {
        let mut touched = BTreeSet::new();
        for u in updates {
            let slots = self.windows.entry((u.metric, u.window)).or_default();
            let slot = slots.entry(u.span.start).or_insert_with(|| Slot {
                end: u.span.end,
                groups: HashMap::new(),
            });
            // A bus may repeat an older value of a final window (a latest
            // value read while the final or a correction was on its way):
            // keep the newest.
            if slot
                .groups
                .get(&u.group)
                .is_some_and(|&(_, is_final, revision)| {
                    is_final && (!u.is_final || u.revision < revision)
                })
            {
                continue;
            }
            slot.groups
                .insert(u.group.clone(), (u.state.clone(), u.is_final, u.revision));
            touched.insert((u.metric, u.window, u.span.start));
        }
        for slots in self.windows.values_mut() {
            // Keep the windows a late event can still revise: those ending
            // within the lateness of the newest window's start.
            let Some(newest) = slots.keys().next_back().copied() else {
                continue;
            };
            while slots
                .first_key_value()
                .is_some_and(|(_, slot)| slot.end + self.lateness < newest)
            {
                slots.pop_first();
            }
        }
        let mut outbox: Vec<(Vec<u64>, Batch)> = Vec::new();
        for (key, sub) in self.subs.iter_mut() {
            if let Some(oldest) = self
                .windows
                .get(&(sub.metric, sub.window))
                .and_then(|s| s.keys().next())
            {
                sub.sent.retain(|(start, _), _| start >= oldest);
            }
            let mut batch = Vec::new();
            for &(_, _, start) in touched.range(
                (sub.metric, sub.window, Millis::MIN)..=(sub.metric, sub.window, Millis::MAX),
            ) {
                let Some(slot) = self
                    .windows
                    .get(&(sub.metric, sub.window))
                    .and_then(|s| s.get(&start))
                else {
                    continue;
                };
                batch.extend(messages(&self.metrics, key, sub, start, slot, true));
            }
            if !batch.is_empty() {
                outbox.push((sub.clients.iter().copied().collect(), batch.into()));
            }
        }
        for (clients, batch) in outbox {
            for client in clients {
                self.send_to(client, Arc::clone(&batch));
            }
        }
    }
}

/// The messages a subscription gets for one window: one, or one per group.
///
/// With `changes_only`, values equal to the last one sent are left out, as
/// a batch may touch a window without changing what this topic sees. A final
/// value's revision is the sum of its groups' revisions.
fn messages(
    metrics: &[MetricSpec],
    key: &SubKey,
    sub: &mut Subscription,
    start: Millis,
    slot: &Slot,
    changes_only: bool,
) -> Vec<Utf8Bytes> {
    let metric = &metrics[sub.metric as usize];
    let spec = metric.windows[sub.window as usize];
    let mut merged: BTreeMap<Option<String>, (AggState, bool, u32)> = BTreeMap::new();
    for (group, (state, is_final, revision)) in &slot.groups {
        if !sub.filters.iter().all(|(d, v)| group.get(*d) == Some(v)) {
            continue;
        }
        let entry = merged
            .entry(sub.group_by.map(|d| group[d].clone()))
            .or_insert((AggState::default(), true, 0));
        entry.0.merge(state);
        entry.1 &= *is_final;
        entry.2 += revision;
    }
    let now = format_rfc3339(now_ms());
    merged
        .into_iter()
        .filter_map(|(group, (state, is_final, revisions))| {
            let value = state.value(metric.aggregate);
            let last = sub.sent.get(&(start, group.clone())).copied();
            if changes_only && last.is_some_and(|l| l.value == value && l.is_final == is_final) {
                return None;
            }
            let revision = if is_final { revisions } else { 0 };
            sub.sent
                .insert((start, group.clone()), Sent { value, is_final });
            let mut body = json!({
                "topic": key.0,
                "window": spec.to_string(),
                "windowStart": format_rfc3339(start),
                "windowEnd": format_rfc3339(slot.end),
                "value": value.map(number),
                "timestamp": now,
                "revision": revision,
                "final": is_final,
            });
            if let (Some(d), Some(value)) = (sub.group_by, group) {
                let mut g = Map::new();
                g.insert(metric.dimensions[d].clone(), Value::String(value));
                body["group"] = Value::Object(g);
            }
            Some(Utf8Bytes::from(body.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tally_dataflow::config::Config;
    use tally_dataflow::window::Span;
    use tokio::sync::mpsc::error::TryRecvError;

    use super::*;

    fn hub() -> (HubState, Arc<Ops>) {
        let config = Config::load(
            Some("[[metric]]\nname = \"ad_clicks\"\ndimensions = [\"country\"]\nwindows = [\"tumbling 10s\"]\n"),
            [],
        )
        .unwrap();
        let ops = Arc::new(Ops::new(None));
        (
            HubState::new(Arc::new(config.metrics), 32_000, Arc::clone(&ops)),
            ops,
        )
    }

    fn update(count: u64, is_final: bool, revision: u32) -> Arc<WindowUpdate> {
        Arc::new(WindowUpdate {
            metric: 0,
            window: 0,
            span: Span {
                start: 0,
                end: 10_000,
            },
            group: vec!["US".into()],
            state: AggState {
                count,
                ..Default::default()
            },
            revision,
            is_final,
        })
    }

    /// Joins `client` and subscribes it to `metrics:ad_clicks`, grouped by
    /// `group_by` if given.
    fn subscribe(
        hub: &mut HubState,
        client: u64,
        queue: usize,
        group_by: Option<&str>,
    ) -> mpsc::Receiver<Batch> {
        let (tx, rx) = mpsc::channel(queue);
        hub.command(Command::Join { client, queue: tx });
        let request = Request {
            action: "subscribe".into(),
            topic: "metrics:ad_clicks".into(),
            window: None,
            group_by: group_by.map(Into::into),
        };
        hub.command(Command::Subscribe { client, request });
        rx
    }

    #[test]
    fn a_slow_client_is_dropped_and_the_others_get_everything() {
        let (mut hub, ops) = hub();
        let mut healthy = subscribe(&mut hub, 1, 50, None);
        let mut stalled = subscribe(&mut hub, 2, 50, None);
        let mut received = 0;
        for count in 1..=200 {
            hub.updates(vec![update(count, false, 0)]);
            while healthy.try_recv().is_ok() {
                received += 1;
            }
        }
        assert_eq!(received, 200);
        let mut queued = 0;
        while stalled.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 50);
        assert_eq!(stalled.try_recv(), Err(TryRecvError::Disconnected));
        assert_eq!(ops.ws_slow_dropped.get(), 1);
    }

    #[test]
    fn finals_are_revised_only_when_they_change() {
        let (mut hub, _) = hub();
        let mut rx = subscribe(&mut hub, 1, 50, None);
        hub.updates(vec![update(3, false, 0)]);
        hub.updates(vec![update(3, false, 0)]);
        hub.updates(vec![update(3, true, 0)]);
        hub.updates(vec![update(3, true, 0)]);
        hub.updates(vec![update(4, true, 1)]);
        let mut got = Vec::new();
        while let Ok(batch) = rx.try_recv() {
            for m in batch.iter() {
                let m: Value = serde_json::from_str(m).unwrap();
                got.push((
                    m["value"].as_u64().unwrap(),
                    m["final"].as_bool().unwrap(),
                    m["revision"].as_u64().unwrap(),
                ));
            }
        }
        assert_eq!(got, [(3, false, 0), (3, true, 0), (4, true, 1)]);
    }

    #[test]
    fn a_grouped_topic_takes_one_place_in_the_queue_however_many_groups() {
        let (mut hub, ops) = hub();
        let mut rx = subscribe(&mut hub, 1, 50, Some("country"));
        let countries = |count: u64| -> Vec<Arc<WindowUpdate>> {
            (0..120)
                .map(|c| {
                    let mut u = (*update(count, false, 0)).clone();
                    u.group = vec![format!("C{c}")];
                    Arc::new(u)
                })
                .collect()
        };
        hub.updates(countries(1));
        hub.updates(countries(2));
        let batches: Vec<Batch> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            batches.iter().map(|b| b.len()).collect::<Vec<_>>(),
            [120, 120]
        );
        assert_eq!(ops.ws_slow_dropped.get(), 0);

        // A new subscriber gets every group's current value at once.
        let mut rx = subscribe(&mut hub, 2, 50, Some("country"));
        assert_eq!(rx.try_recv().map(|b| b.len()), Ok(120));
    }
}
