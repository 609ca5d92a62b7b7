//! The hub: one task that holds the recent windows of every metric and the
//! subscriptions of every client, and fans each batch from the live bus out
//! to the clients, through their writers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tally_connectors::bus::Live;
use tally_dataflow::aggregate::{self, AggState, Ask};
use tally_dataflow::config::{LiveConfig, MetricSpec};
use tally_dataflow::model::Group;
use tally_dataflow::model::WindowUpdate;
use tally_dataflow::time::{format_rfc3339, Millis};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::resume::{Resume, Resumes};
use super::topic::{Topic, TopicError};
use super::writers::{Mail, Outbox, Reply, Writers};
use crate::backend::{History, LiveInterest};
use crate::catalog::Catalog;
use crate::ops::Ops;
use crate::reply::value_json;
use tally_dataflow::time::now_ms;

/// One entry of a client's queue: what one subscription has for it from one
/// batch of the bus (a value per window, or per group and window), a
/// subscription's current values, or an error. The queue's bound counts
/// entries, so a grouped topic with many groups takes one place, not one
/// per group.
pub(super) type Batch = Arc<[Utf8Bytes]>;

/// A handle to the fan-out task.
#[derive(Clone)]
pub struct Hub {
    /// What the connections tell the hub.
    pub(super) commands: mpsc::Sender<Command>,
    /// The id the next client gets.
    pub(super) next_client: Arc<AtomicU64>,
    /// The metrics served, whose active list a client's topics are
    /// checked against.
    pub(super) catalog: Arc<Catalog>,
    /// The tasks that write to the clients.
    pub(super) writers: Writers,
}

/// What a connection tells the hub.
pub(super) enum Command {
    /// A client connected, whose writer `queue` reaches; it may hold
    /// `max_subscriptions` subscriptions.
    Join {
        client: u64,
        queue: Outbox,
        max_subscriptions: usize,
    },
    /// A client subscribed to `topic`, checked against `metrics`. The hub
    /// answers with an acknowledgement, then the current value, or with an
    /// error past the client's bound or if the metrics have changed since.
    /// With `resume`, it first replays the windows from its `since` on.
    Subscribe {
        client: u64,
        topic: Topic,
        metrics: Arc<Vec<MetricSpec>>,
        resume: Option<Resume>,
    },
    /// A client's subscription was refused. The error goes through the
    /// client's queue, so it arrives after what earlier subscriptions
    /// queued.
    Refuse {
        client: u64,
        topic: String,
        error: TopicError,
    },
    /// A client unsubscribed from every subscription of the topic with this
    /// text, whatever their window or grouping. The hub acknowledges it,
    /// whether or not the client held one.
    Unsubscribe { client: u64, topic: String },
    /// A client disconnected, or is disconnected.
    Leave { client: u64 },
    /// What the store holds of the windows of `metrics` a late event may
    /// still revise, to complete the hub's own.
    Seed {
        metrics: Arc<Vec<MetricSpec>>,
        stored: Vec<Arc<WindowUpdate>>,
    },
}

impl Hub {
    /// Starts the fan-out task, fed by the live bus. Windows are kept while
    /// a late event can still revise them: `lateness` is the allowed
    /// lateness plus the out-of-orderness.
    ///
    /// With `interest`, the bus delivers only the metrics asked for: the hub
    /// asks for a metric when its first topic is subscribed, and releases
    /// it, forgetting its windows, when the last one is.
    ///
    /// The bus says when the active metrics change: then every client is
    /// disconnected, to reconnect and subscribe anew to the new ones.
    pub fn start(
        catalog: Arc<Catalog>,
        lateness: Millis,
        bus: mpsc::Receiver<Live>,
        ops: Arc<Ops>,
        interest: Option<Arc<dyn LiveInterest>>,
    ) -> Hub {
        let (commands, rx) = mpsc::channel(4096);
        let writers = Writers::start(commands.clone(), Arc::clone(&ops));
        let mut state = HubState::new(catalog.active(), lateness, ops);
        state.interest = interest;
        tokio::spawn(state.run(rx, bus));
        Hub {
            commands,
            next_client: Arc::new(AtomicU64::new(1)),
            catalog,
            writers,
        }
    }
}

impl Hub {
    /// Completes the hub's windows with what `history` holds of those a
    /// late event may still revise (`lateness`), read within `live`'s
    /// bounds, in a task of its own. For `tally run`, whose job does not
    /// send again the windows it restored: a cluster gateway's hub reads
    /// every group's latest value from its bus instead.
    pub fn seed(&self, history: Arc<dyn History>, live: &LiveConfig, lateness: Millis) {
        let resumes = Resumes::new(history, live);
        let (commands, metrics) = (self.commands.clone(), self.catalog.active());
        tokio::spawn(async move {
            let stored = resumes.revisable(&metrics, lateness).await;
            if !stored.is_empty() {
                let _ = commands.send(Command::Seed { metrics, stored }).await;
            }
        });
    }
}

/// The clients of one [`Topic`], and what it has sent them.
struct Subscription {
    clients: HashSet<u64>,
    /// What was last sent, per window and group.
    sent: HashMap<(Millis, Option<String>), Sent>,
}

/// The last message of a subscription for one window and group.
#[derive(Clone, PartialEq)]
struct Sent {
    value: Option<aggregate::Value>,
    is_final: bool,
}

/// The latest update of every group in one window.
struct Slot {
    end: Millis,
    groups: HashMap<Group, Arc<WindowUpdate>>,
}

impl Slot {
    /// A window ending at `end`, with no group yet.
    fn new(end: Millis) -> Slot {
        Slot {
            end,
            groups: HashMap::new(),
        }
    }
}

/// A connected client: the way to its writer, its subscriptions, and how
/// many it may hold.
struct Client {
    queue: Outbox,
    topics: HashSet<Topic>,
    max_subscriptions: usize,
}

/// The fan-out task's state: the recent windows of every metric, and who
/// holds which topic.
struct HubState {
    metrics: Arc<Vec<MetricSpec>>,
    lateness: Millis,
    ops: Arc<Ops>,
    windows: HashMap<(u16, u8), BTreeMap<Millis, Slot>>,
    subs: HashMap<Topic, Subscription>,
    clients: HashMap<u64, Client>,
    /// Subscriptions per metric.
    refs: HashMap<u16, usize>,
    interest: Option<Arc<dyn LiveInterest>>,
    /// The workers' lowest watermark, as the bus last said.
    watermark: Millis,
    /// What the clients are sent, until it goes to their writers: at the
    /// end of each command and of each batch from the bus.
    mail: Mail,
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
            watermark: Millis::MIN,
            mail: Mail::default(),
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut bus: mpsc::Receiver<Live>) {
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                live = bus.recv() => match live {
                    Some(live) => {
                        // Take whatever else is queued too, so a topic is
                        // recomputed once for all of it.
                        let mut updates = Vec::new();
                        let mut through = None;
                        for live in std::iter::once(live).chain(std::iter::from_fn(|| bus.try_recv().ok())) {
                            match live {
                                Live::Updates(more) => updates.extend(more),
                                Live::Through(t) => through = Some(t),
                                Live::Metrics(metrics) => {
                                    // What came before is of the old metrics.
                                    self.switch(metrics);
                                    updates.clear();
                                    through = None;
                                }
                            }
                        }
                        if !updates.is_empty() {
                            self.updates(updates);
                        }
                        if let Some(t) = through {
                            self.through(t);
                        }
                    }
                    None => break,
                },
            }
        }
    }

    fn command(&mut self, command: Command) {
        self.obey(command);
        self.mail.send();
    }

    fn obey(&mut self, command: Command) {
        match command {
            Command::Join {
                client,
                queue,
                max_subscriptions,
            } => {
                let client_state = Client {
                    queue,
                    topics: HashSet::new(),
                    max_subscriptions,
                };
                self.clients.insert(client, client_state);
            }
            Command::Leave { client } => self.drop_client(client),
            Command::Seed { metrics, stored } => {
                if Arc::ptr_eq(&metrics, &self.metrics) {
                    self.fill(stored);
                }
            }
            Command::Subscribe {
                client,
                topic,
                metrics,
                resume,
            } => {
                if Arc::ptr_eq(&metrics, &self.metrics) {
                    self.subscribe(client, topic, resume);
                } else {
                    self.ops.ws_refused("bad_subscription");
                    let error = "the metrics changed while subscribing; subscribe again";
                    self.refuse(client, topic.text(), error);
                }
            }
            Command::Refuse {
                client,
                topic,
                error,
            } => {
                self.ops.ws_refused("bad_subscription");
                self.refuse(client, &topic, &error.to_string());
            }
            Command::Unsubscribe { client, topic } => {
                let Some(state) = self.clients.get_mut(&client) else {
                    return;
                };
                let gone: Vec<Topic> = state
                    .topics
                    .iter()
                    .filter(|t| t.text() == topic)
                    .cloned()
                    .collect();
                for t in &gone {
                    state.topics.remove(t);
                }
                for t in gone {
                    self.release(client, &t);
                }
                let ack = json!({ "unsubscribed": topic }).to_string();
                self.send_to(client, Batch::from([Utf8Bytes::from(ack)]));
            }
        }
    }

    /// Serves `metrics` from now on: forgets every window and subscription
    /// of the old ones, whose indices mean other metrics now, and
    /// disconnects every client, each to subscribe anew.
    fn switch(&mut self, metrics: Arc<Vec<MetricSpec>>) {
        if let Some(interest) = &self.interest {
            for metric in self.refs.keys() {
                interest.want(&self.metrics[*metric as usize].name, false);
            }
        }
        tracing::info!(
            clients = self.clients.len(),
            "the active metrics changed; disconnecting live clients to subscribe anew"
        );
        self.metrics = metrics;
        self.windows.clear();
        self.subs.clear();
        self.refs.clear();
        for (_, state) in self.clients.drain() {
            state.queue.reply(Reply::Close(CloseFrame {
                code: CloseCode::Restart,
                reason: "the active metrics changed: subscribe again".into(),
            }));
        }
    }

    /// Sends `client` the error of a subscription to `topic`.
    fn refuse(&mut self, client: u64, topic: &str, error: &str) {
        let error = json!({"error": error, "topic": topic}).to_string();
        self.send_to(client, Batch::from([Utf8Bytes::from(error)]));
    }

    fn subscribe(&mut self, client: u64, topic: Topic, resume: Option<Resume>) {
        let Some(state) = self.clients.get(&client) else {
            return;
        };
        let metric = &self.metrics[topic.metric() as usize];
        let mut ack = json!({
            "subscribed": topic.text(),
            "window": metric.windows[topic.window() as usize].to_string(),
            "groupBy": topic.group_by().map(|d| &metric.dimensions[d]),
            "lateness": self.lateness,
        });
        // The oldest window a late event may still revise, once the
        // workers have said where their watermark is: where a client that
        // has seen no final yet resumes from.
        if self.watermark > Millis::MIN {
            let size = metric.windows[topic.window() as usize].size();
            let from = self.watermark.saturating_sub(self.lateness + size);
            ack["revisableFrom"] = Value::String(format_rfc3339(from));
        }
        if state.topics.contains(&topic) {
            // Held already: acknowledged again, and nothing more is sent.
            let ack = Utf8Bytes::from(ack.to_string());
            self.send_to(client, Batch::from([ack]));
            return;
        }
        if state.topics.len() >= state.max_subscriptions {
            let error = format!(
                "at most {} subscriptions per connection: unsubscribe from one first, or open another connection",
                state.max_subscriptions
            );
            self.ops.ws_refused("too_many_subscriptions");
            self.refuse(client, topic.text(), &error);
            return;
        }
        // What the store holds completes what the hub holds, for everyone:
        // after a restart the hub has only the groups that changed since.
        if let Some(resume) = &resume {
            self.fill(resume.stored.iter().cloned());
        }
        // The fan-out may have dropped the client for a full queue.
        let Some(state) = self.clients.get_mut(&client) else {
            return;
        };
        state.topics.insert(topic.clone());
        let (metrics, refs, interest) = (&self.metrics, &mut self.refs, &self.interest);
        let sub = self.subs.entry(topic.clone()).or_insert_with(|| {
            let count = refs.entry(topic.metric()).or_default();
            *count += 1;
            if *count == 1 {
                if let Some(interest) = interest {
                    interest.want(&metrics[topic.metric() as usize].name, true);
                }
            }
            Subscription {
                clients: HashSet::new(),
                sent: HashMap::new(),
            }
        });
        sub.clients.insert(client);
        let empty = BTreeMap::new();
        let slots = self
            .windows
            .get(&(topic.metric(), topic.window()))
            .unwrap_or(&empty);
        // The current value is the newest window the hub holds; a replay
        // sends every held window from `since` on too.
        let newest = slots.keys().next_back().copied().unwrap_or(Millis::MAX);
        let mut values = Vec::new();
        let mut held_from = newest;
        if let Some(resume) = resume {
            held_from = held_from.min(resume.since);
            // Windows the hub forgot come from the store, in order before
            // the held ones, and go with nobody's `sent`.
            let since = match resume.complete_from {
                Some(from) if from > resume.since => {
                    self.ops.live_resumed("truncated");
                    from
                }
                Some(_) => {
                    self.ops.live_resumed("complete");
                    resume.since
                }
                None => {
                    self.ops.live_resumed("unavailable");
                    slots
                        .keys()
                        .next()
                        .map_or(resume.since, |&s| s.max(resume.since))
                }
            };
            ack["since"] = Value::String(format_rfc3339(since));
            let mut forgotten: BTreeMap<Millis, Slot> = BTreeMap::new();
            for u in resume.stored {
                if u.span.start < since || slots.contains_key(&u.span.start) {
                    continue;
                }
                forgotten
                    .entry(u.span.start)
                    .or_insert_with(|| Slot::new(u.span.end))
                    .groups
                    .insert(u.group.clone(), u);
            }
            for (start, slot) in &forgotten {
                values.extend(messages(&self.metrics, &topic, None, *start, slot, false));
            }
        }
        for (start, slot) in slots.range(held_from..) {
            values.extend(messages(
                &self.metrics,
                &topic,
                Some(&mut *sub),
                *start,
                slot,
                false,
            ));
        }
        // The acknowledgement comes first, then the replay and the current
        // value. They take one place in the client's queue.
        let mut answer = vec![Utf8Bytes::from(ack.to_string())];
        answer.extend(values);
        self.send_to(client, answer.into());
    }

    fn release(&mut self, client: u64, topic: &Topic) {
        if let Some(sub) = self.subs.get_mut(topic) {
            sub.clients.remove(&client);
            if sub.clients.is_empty() {
                let metric = topic.metric();
                self.subs.remove(topic);
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
        if let Some(state) = self.clients.remove(&client) {
            for topic in state.topics {
                self.release(client, &topic);
            }
        }
    }

    /// Queues `batch` for `client`. Its writer drops it, and says so,
    /// past its queue's bound.
    fn send_to(&mut self, client: u64, batch: Batch) {
        if let Some(state) = self.clients.get(&client) {
            self.mail.put(&state.queue, batch);
        }
    }

    /// Forgets the windows no event can revise any more: those that ended
    /// more than the lateness before the workers' watermark. The windows of
    /// a metric that stops receiving events go too, which its own newest
    /// window never pushes out.
    fn through(&mut self, watermark: u64) {
        self.watermark = Millis::try_from(watermark).unwrap_or(Millis::MAX);
        self.forget();
    }

    /// Forgets the windows a late event can no longer revise: of each
    /// metric and window, those that ended more than the lateness before
    /// the watermark, or before the start of the newest one. And what each
    /// subscription was sent of them.
    fn forget(&mut self) {
        for slots in self.windows.values_mut() {
            let newest = slots.keys().next_back().copied().unwrap_or(Millis::MIN);
            forget_before(slots, self.lateness, newest.max(self.watermark));
        }
        self.windows.retain(|_, slots| !slots.is_empty());
        for (topic, sub) in self.subs.iter_mut() {
            let oldest = self
                .windows
                .get(&(topic.metric(), topic.window()))
                .and_then(|s| s.keys().next().copied())
                .unwrap_or(Millis::MAX);
            sub.sent.retain(|(start, _), _| *start >= oldest);
        }
    }

    fn updates(&mut self, updates: Vec<Arc<WindowUpdate>>) {
        let now = now_ms();
        let mut touched = BTreeSet::new();
        for u in updates {
            if let (false, Some(at)) = (u.is_final, u.appended_at) {
                self.ops
                    .live_freshness
                    .observe((now - at).max(0) as f64 / 1000.0);
            }
            touched.extend(self.insert(u, false));
        }
        self.fan_out(touched);
        self.mail.send();
    }

    /// Takes a group's value of a window, unless the hub holds a newer one,
    /// and says which window it changed. A `stored` value, read from the
    /// store, replaces only a partial or a lower revision.
    fn insert(&mut self, u: Arc<WindowUpdate>, stored: bool) -> Option<(u16, u8, Millis)> {
        let slots = self.windows.entry((u.metric, u.window)).or_default();
        let slot = slots
            .entry(u.span.start)
            .or_insert_with(|| Slot::new(u.span.end));
        let key = (u.metric, u.window, u.span.start);
        // Most updates are of a group the window holds already: one lookup,
        // and its dimension values are not copied again.
        match slot.groups.get_mut(&u.group) {
            // A bus may repeat an older value of a final window (a latest
            // value read while the final or a correction was on its way):
            // keep the newest.
            Some(last)
                if last.is_final
                    && (!u.is_final
                        || u.revision < last.revision
                        || (stored && u.revision == last.revision)) =>
            {
                return None
            }
            Some(last) => *last = u,
            None => {
                slot.groups.insert(u.group.clone(), u);
            }
        }
        Some(key)
    }

    /// Completes the hub's windows with values read from the store, and
    /// sends each subscription what that changed.
    fn fill(&mut self, stored: impl IntoIterator<Item = Arc<WindowUpdate>>) {
        let touched = stored
            .into_iter()
            .filter_map(|u| self.insert(u, true))
            .collect();
        self.fan_out(touched);
    }

    /// Forgets what no event can revise, then sends each subscription the
    /// changes of the `touched` windows it follows.
    fn fan_out(&mut self, touched: BTreeSet<(u16, u8, Millis)>) {
        self.forget();
        let mut outbox: Vec<(Vec<u64>, Batch)> = Vec::new();
        for (topic, sub) in self.subs.iter_mut() {
            let (metric, window) = (topic.metric(), topic.window());
            let mut batch = Vec::new();
            for &(_, _, start) in
                touched.range((metric, window, Millis::MIN)..=(metric, window, Millis::MAX))
            {
                let Some(slot) = self
                    .windows
                    .get(&(topic.metric(), topic.window()))
                    .and_then(|s| s.get(&start))
                else {
                    continue;
                };
                batch.extend(messages(&self.metrics, topic, Some(sub), start, slot, true));
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

/// Drops the windows that ended more than `lateness` before `time`.
fn forget_before(slots: &mut BTreeMap<Millis, Slot>, lateness: Millis, time: Millis) {
    while slots
        .first_key_value()
        .is_some_and(|(_, slot)| slot.end.saturating_add(lateness) < time)
    {
        slots.pop_first();
    }
}

/// The messages a subscription gets for one window: one, or one per group.
///
/// What is sent is noted in `sub`, if given; with `changes_only`, values
/// equal to the last one sent are left out, as a batch may touch a window
/// without changing what this topic sees. A final
/// value's revision is the sum of its groups' revisions. `ingestedAt` is
/// when the log took the newest batch the value includes: the dashboard's
/// freshness is the time since.
fn messages(
    metrics: &[MetricSpec],
    topic: &Topic,
    mut sub: Option<&mut Subscription>,
    start: Millis,
    slot: &Slot,
    changes_only: bool,
) -> Vec<Utf8Bytes> {
    let metric = &metrics[topic.metric() as usize];
    let spec = metric.windows[topic.window() as usize];
    let mut merged: BTreeMap<Option<String>, Merged> = BTreeMap::new();
    for (group, u) in &slot.groups {
        if !topic
            .filters()
            .iter()
            .all(|(d, v)| group.get(*d) == Some(v))
        {
            continue;
        }
        let entry = merged
            .entry(topic.group_by().map(|d| group[d].clone()))
            .or_default();
        entry.state.merge(&u.state);
        entry.is_final &= u.is_final;
        entry.revisions += u.revision;
        entry.appended_at = entry.appended_at.max(u.appended_at);
    }
    let now = format_rfc3339(now_ms());
    merged
        .into_iter()
        .filter_map(|(group, merged)| {
            let Merged {
                state,
                is_final,
                revisions,
                appended_at,
            } = merged;
            let value = state.value(metric.aggregate, &Ask::default_for(metric.aggregate));
            if let Some(sub) = sub.as_deref_mut() {
                let last = sub.sent.get(&(start, group.clone()));
                if changes_only && last.is_some_and(|l| l.value == value && l.is_final == is_final)
                {
                    return None;
                }
                sub.sent.insert(
                    (start, group.clone()),
                    Sent {
                        value: value.clone(),
                        is_final,
                    },
                );
            }
            let revision = if is_final { revisions } else { 0 };
            let mut body = json!({
                "topic": topic.text(),
                "window": spec.to_string(),
                "windowStart": format_rfc3339(start),
                "windowEnd": format_rfc3339(slot.end),
                "value": value.as_ref().map(value_json),
                "timestamp": now,
                "ingestedAt": appended_at.map(format_rfc3339),
                "revision": revision,
                "final": is_final,
            });
            if let (Some(d), Some(value)) = (topic.group_by(), group) {
                let mut g = Map::new();
                g.insert(metric.dimensions[d].clone(), Value::String(value));
                body["group"] = Value::Object(g);
            }
            Some(Utf8Bytes::from(body.to_string()))
        })
        .collect()
}

/// The groups of one window that a topic shows as one value.
struct Merged {
    state: AggState,
    is_final: bool,
    revisions: u32,
    appended_at: Option<Millis>,
}

impl Default for Merged {
    fn default() -> Self {
        Merged {
            state: AggState::default(),
            is_final: true,
            revisions: 0,
            appended_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tally_dataflow::config::Config;
    use tally_dataflow::window::Span;
    use tokio::sync::mpsc::error::TryRecvError;

    use crate::live::writers::Work;

    use super::*;
    use crate::live::resume::Resume;

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

    /// What the hub hands a client's writer: the client's entries.
    struct Entries(mpsc::UnboundedReceiver<Work>, VecDeque<Batch>);

    impl Entries {
        fn try_recv(&mut self) -> Result<Batch, TryRecvError> {
            loop {
                if let Some(batch) = self.1.pop_front() {
                    return Ok(batch);
                }
                if let Work::Deliver(entries) = self.0.try_recv()? {
                    self.1.extend(entries.into_iter().map(|(_, batch)| batch));
                }
            }
        }
    }

    /// Joins `client`, which may hold `max_subscriptions` subscriptions.
    fn connect(hub: &mut HubState, client: u64, max_subscriptions: usize) -> Entries {
        let (queue, rx) = Outbox::detached(client);
        hub.command(Command::Join {
            client,
            queue,
            max_subscriptions,
        });
        Entries(rx, VecDeque::new())
    }

    fn update(count: u64, is_final: bool, revision: u32) -> Arc<WindowUpdate> {
        Arc::new(WindowUpdate {
            metric: 0,
            window: 0,
            span: Span {
                start: 0,
                end: 10_000,
            },
            group: vec!["US".into()].into(),
            state: AggState {
                count,
                ..Default::default()
            },
            revision,
            is_final,
            appended_at: None,
        })
    }

    /// Joins `client` and subscribes it to `metrics:ad_clicks`, grouped by
    /// `group_by` if given, resuming with `resume` if given. Returns its
    /// entries, past the first answer, and that answer: the
    /// acknowledgement, then the values that came with it.
    fn join(
        hub: &mut HubState,
        client: u64,
        group_by: Option<&str>,
        resume: Option<Resume>,
    ) -> (Entries, Vec<Value>) {
        let mut rx = connect(hub, client, 10);
        let topic = Topic::parse("metrics:ad_clicks", None, group_by, &hub.metrics).unwrap();
        let metrics = Arc::clone(&hub.metrics);
        hub.command(Command::Subscribe {
            client,
            topic,
            metrics,
            resume,
        });
        let answer = rx.try_recv().expect("an acknowledgement");
        let answer: Vec<Value> = answer
            .iter()
            .map(|m| serde_json::from_str(m).unwrap())
            .collect();
        assert_eq!(
            answer[0]["subscribed"], "metrics:ad_clicks",
            "{}",
            answer[0]
        );
        assert_eq!(answer[0]["window"], "tumbling 10s", "{}", answer[0]);
        (rx, answer)
    }

    /// [`join`] without a resume: the entries, and how many current values
    /// came with the acknowledgement.
    fn subscribe(hub: &mut HubState, client: u64, group_by: Option<&str>) -> (Entries, usize) {
        let (rx, answer) = join(hub, client, group_by, None);
        (rx, answer.len() - 1)
    }

    #[test]
    fn subscriptions_past_a_clients_bound_are_refused_and_repeats_take_no_place() {
        let (mut hub, ops) = hub();
        let mut rx = connect(&mut hub, 1, 2);
        let metrics = Arc::clone(&hub.metrics);
        let topic = |country: &str| {
            let text = format!("metrics:ad_clicks:country:{country}");
            Topic::parse(&text, None, None, &metrics).unwrap()
        };
        for country in ["US", "DE", "US", "FR"] {
            let topic = topic(country);
            hub.command(Command::Subscribe {
                client: 1,
                topic,
                metrics: Arc::clone(&metrics),
                resume: None,
            });
        }
        hub.command(Command::Unsubscribe {
            client: 1,
            topic: "metrics:ad_clicks:country:DE".into(),
        });
        hub.command(Command::Subscribe {
            client: 1,
            topic: topic("FR"),
            metrics,
            resume: None,
        });
        let answers: Vec<Value> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|batch| serde_json::from_str(&batch[0]).unwrap())
            .collect();
        let keys: Vec<(&str, &str)> = answers
            .iter()
            .map(|a| {
                let key = ["subscribed", "unsubscribed", "topic"]
                    .into_iter()
                    .find(|k| a[k].is_string())
                    .unwrap();
                (key, a[key].as_str().unwrap().rsplit(':').next().unwrap())
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("subscribed", "US"),
                ("subscribed", "DE"),
                ("subscribed", "US"),
                ("topic", "FR"),
                ("unsubscribed", "DE"),
                ("subscribed", "FR"),
            ]
        );
        assert!(answers[3]["error"].as_str().unwrap().contains("at most 2"));
        assert_eq!(hub.clients[&1].topics.len(), 2);
        assert!(ops
            .render(0)
            .contains("tally_ws_refused_total{reason=\"too_many_subscriptions\"} 1"));
    }

    #[test]
    fn a_change_of_metrics_closes_every_client_to_subscribe_again() {
        let (mut hub, _) = hub();
        let (mut first, _) = subscribe(&mut hub, 1, None);
        let (mut second, _) = subscribe(&mut hub, 2, Some("country"));
        let metrics = Arc::clone(&hub.metrics);
        hub.switch(metrics);
        for entries in [&mut first, &mut second] {
            match entries.0.try_recv() {
                Ok(Work::Reply(_, Reply::Close(close))) => {
                    assert_eq!(close.code, CloseCode::Restart)
                }
                _ => panic!("a close, to subscribe again"),
            }
        }
        assert!(hub.clients.is_empty() && hub.subs.is_empty());
    }

    #[test]
    fn finals_are_revised_only_when_they_change() {
        let (mut hub, _) = hub();
        let (mut rx, _) = subscribe(&mut hub, 1, None);
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
        let (mut hub, _) = hub();
        let (mut rx, current) = subscribe(&mut hub, 1, Some("country"));
        assert_eq!(current, 0);
        let countries = |count: u64| -> Vec<Arc<WindowUpdate>> {
            (0..120)
                .map(|c| {
                    let mut u = (*update(count, false, 0)).clone();
                    u.group = vec![format!("C{c}")].into();
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

        // A new subscriber gets every group's current value at once, with
        // its acknowledgement.
        let (_, current) = subscribe(&mut hub, 2, Some("country"));
        assert_eq!(current, 120);
    }

    #[test]
    fn windows_are_forgotten_once_the_watermark_passes_their_lateness() {
        let (mut hub, _) = hub();
        hub.updates(vec![update(3, true, 0)]);
        let (_, current) = subscribe(&mut hub, 1, None);
        assert_eq!(current, 1, "a final within its lateness is kept");
        // The window ends at 10 s and may be revised for 32 s after.
        hub.through(42_000);
        assert_eq!(subscribe(&mut hub, 2, None).1, 1);
        hub.through(42_001);
        assert_eq!(subscribe(&mut hub, 3, None).1, 0, "no event can revise it");
        assert!(hub.windows.is_empty());
    }

    /// A group's value of the ten-second window starting at `start` s.
    fn at(
        start: Millis,
        country: &str,
        count: u64,
        is_final: bool,
        revision: u32,
    ) -> Arc<WindowUpdate> {
        let mut u = (*update(count, is_final, revision)).clone();
        u.span = Span {
            start: start * 1000,
            end: (start + 10) * 1000,
        };
        u.group = vec![country.into()].into();
        Arc::new(u)
    }

    /// [`join`] resuming with `resume`.
    fn resume(hub: &mut HubState, client: u64, resume: Resume) -> (Entries, Vec<Value>) {
        join(hub, client, None, Some(resume))
    }

    /// (window start in seconds, value, revision, final) of messages.
    fn seen(messages: &[Value]) -> Vec<(i64, u64, u64, bool)> {
        messages
            .iter()
            .map(|m| {
                let start = tally_dataflow::time::parse_rfc3339(m["windowStart"].as_str().unwrap())
                    .unwrap();
                (
                    start / 1000,
                    m["value"].as_u64().unwrap(),
                    m["revision"].as_u64().unwrap(),
                    m["final"].as_bool().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_resume_replays_forgotten_windows_from_the_store_then_the_held_ones() {
        let (mut hub, ops) = hub();
        // The hub holds the window at 100 s, open, and at 90 s, revised.
        hub.updates(vec![at(90, "US", 5, true, 1), at(100, "US", 2, false, 0)]);
        // The store has the windows at 0 s and 10 s, and the final of 90 s
        // before its revision.
        let stored = vec![
            at(90, "US", 4, true, 0),
            at(10, "DE", 3, true, 2),
            at(10, "US", 1, true, 0),
        ];
        let (_, answer) = resume(
            &mut hub,
            1,
            Resume {
                since: 10_000,
                stored,
                complete_from: Some(10_000),
            },
        );
        assert_eq!(answer[0]["since"], "1970-01-01T00:00:10Z", "{}", answer[0]);
        assert_eq!(answer[0]["lateness"], 32_000);
        assert_eq!(
            seen(&answer[1..]),
            [(10, 4, 2, true), (90, 5, 1, true), (100, 2, 0, false)]
        );
        assert!(ops
            .render(0)
            .contains("tally_live_resumes_total{outcome=\"complete\"} 1"));
    }

    #[test]
    fn stored_values_complete_a_window_the_hub_holds_in_part_for_every_subscriber() {
        let (mut hub, _) = hub();
        // After a restart the hub has seen only the group a late event
        // revised.
        hub.updates(vec![at(0, "US", 2, true, 1)]);
        let (mut connected, _) = subscribe(&mut hub, 1, None);
        let stored = vec![at(0, "DE", 7, true, 0), at(0, "US", 2, true, 1)];
        let (_, answer) = resume(
            &mut hub,
            2,
            Resume {
                since: 0,
                stored,
                complete_from: Some(0),
            },
        );
        assert_eq!(seen(&answer[1..]), [(0, 9, 1, true)]);
        let batch = connected.try_recv().expect("the corrected value");
        let got: Vec<Value> = batch
            .iter()
            .map(|m| serde_json::from_str(m).unwrap())
            .collect();
        assert_eq!(seen(&got), [(0, 9, 1, true)]);
        // A stored value older than the hub's is no news.
        let (_, answer) = resume(
            &mut hub,
            3,
            Resume {
                since: 0,
                stored: vec![at(0, "US", 1, true, 0)],
                complete_from: Some(0),
            },
        );
        assert_eq!(seen(&answer[1..]), [(0, 9, 1, true)]);
        assert!(connected.try_recv().is_err());
    }

    #[test]
    fn a_resume_the_store_could_not_serve_in_full_says_from_when_it_is_complete() {
        let (mut hub, ops) = hub();
        hub.updates(vec![at(100, "US", 2, false, 0)]);
        let (_, answer) = resume(
            &mut hub,
            1,
            Resume {
                since: 0,
                stored: vec![at(50, "US", 1, true, 0)],
                complete_from: Some(50_000),
            },
        );
        assert_eq!(answer[0]["since"], "1970-01-01T00:00:50Z");
        assert_eq!(seen(&answer[1..]), [(50, 1, 0, true), (100, 2, 0, false)]);
        let (_, answer) = resume(
            &mut hub,
            2,
            Resume {
                since: 0,
                stored: Vec::new(),
                complete_from: None,
            },
        );
        assert_eq!(answer[0]["since"], "1970-01-01T00:01:40Z");
        assert_eq!(seen(&answer[1..]), [(100, 2, 0, false)]);
        let text = ops.render(0);
        assert!(
            text.contains("tally_live_resumes_total{outcome=\"truncated\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tally_live_resumes_total{outcome=\"unavailable\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_client_its_writer_drops_leaves_no_subscription_behind() {
        let (mut hub, _) = hub();
        let (_rx, _) = subscribe(&mut hub, 1, None);
        let (_rx, _) = subscribe(&mut hub, 2, Some("country"));
        hub.command(Command::Leave { client: 1 });
        hub.command(Command::Leave { client: 2 });
        assert!(hub.clients.is_empty());
        assert!(
            hub.subs.is_empty(),
            "no subscription holds a dropped client"
        );
        assert!(hub.refs.is_empty());
    }

    #[test]
    fn a_seed_completes_the_windows_a_restart_left_in_part() {
        let (mut hub, _) = hub();
        hub.updates(vec![at(0, "US", 2, true, 1)]);
        let (mut connected, _) = subscribe(&mut hub, 1, None);
        let metrics = Arc::clone(&hub.metrics);
        hub.command(Command::Seed {
            metrics,
            stored: vec![at(0, "DE", 7, true, 0), at(0, "US", 1, true, 0)],
        });
        let batch = connected.try_recv().expect("the completed window");
        let got: Vec<Value> = batch
            .iter()
            .map(|m| serde_json::from_str(m).unwrap())
            .collect();
        assert_eq!(seen(&got), [(0, 9, 1, true)]);
    }
}
