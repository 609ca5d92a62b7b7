//! The `windows` operator: panes in, window results out.
//!
//! Contributions arrive exchanged by (metric, group), stamped with the
//! watermark of the partition they came from. They are stashed by that time
//! and applied in time order once the input frontier has passed it, in the
//! manner of timely's `wordcount` example. Processing time by time is what
//! makes every emission deterministic:
//!
//! - before the data at time `t` is applied, every window with `end <= t` is
//!   closed and emitted as final, revision 0: it holds exactly the data that
//!   travelled at times before its end;
//! - data at `t` for a window already closed is late: after time `t` is
//!   applied, the window is emitted again, with its revision raised by one;
//! - a closed window's state is kept until the frontier reaches
//!   `end + allowed_lateness`, then dropped, panes and all.
//!
//! Between those points, windows touched since the last tick are emitted as
//! partials (`is_final: false`), at most once per `live_interval` of
//! processing time. Partials also count data still waiting for the frontier,
//! so a live view is as fresh as the data that has arrived. They are for live
//! views only and are not stored.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use crate::aggregate::AggState;
use crate::config::MetricSpec;
use crate::event::Millis;
use crate::operators::source::{Contribution, Group};
use crate::stats::JobStats;
use crate::window::{Span, WindowSpec};

/// The value of one window of one group, as emitted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowUpdate {
    /// Index of the metric in the configuration.
    pub metric: u16,
    /// Index of the window spec within the metric.
    pub window: u8,
    /// The window instance.
    pub span: Span,
    /// The group's dimension values.
    pub group: Group,
    /// The aggregate over the window.
    pub state: AggState,
    /// 0 for the first final value; raised by one for each late correction.
    pub revision: u32,
    /// False for a partial value of a window that is still open.
    pub is_final: bool,
}

/// Timing rules of the operator.
#[derive(Clone, Debug)]
pub struct WindowSettings {
    /// State of a closed window is kept this long for late data.
    pub allowed_lateness: Millis,
    /// Partial values of open windows are emitted at most this often.
    pub live_interval: Duration,
}

/// Extension trait for the `windows` operator.
pub trait Windows<'scope> {
    /// Aggregates contributions into the windows of `metrics`.
    fn windows(
        self,
        metrics: Rc<Vec<MetricSpec>>,
        settings: WindowSettings,
        stats: Arc<JobStats>,
    ) -> Stream<'scope, u64, Vec<WindowUpdate>>;
}

/// The routing hash of a (metric, group): the same on every worker and
/// process, so each group's state lives in exactly one place.
pub fn group_hash(metric: u16, group: &Group) -> u64 {
    let mut hasher = DefaultHasher::new();
    metric.hash(&mut hasher);
    group.hash(&mut hasher);
    hasher.finish()
}

impl<'scope> Windows<'scope> for Stream<'scope, u64, Vec<Contribution>> {
    fn windows(
        self,
        metrics: Rc<Vec<MetricSpec>>,
        settings: WindowSettings,
        stats: Arc<JobStats>,
    ) -> Stream<'scope, u64, Vec<WindowUpdate>> {
        let exchange = Exchange::new(|c: &Contribution| group_hash(c.metric, &c.group));
        let scope = self.scope();
        self.unary_frontier(exchange, "Windows", move |capability, info| {
            let activator = scope.activator_for(Rc::clone(&info.address));
            let mut held: Option<Capability<u64>> = Some(capability);
            let mut stash: BTreeMap<u64, Vec<Contribution>> = BTreeMap::new();
            let mut state = WindowState::new(metrics, settings.allowed_lateness);
            let mut last_partials = Instant::now();
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    // Every message of the source carries a capability.
                    let Some(&time) = cap.least() else { return };
                    let batch = stash.entry(time).or_default();
                    for container in data {
                        state.note_arrival(time as Millis, container);
                        batch.append(container);
                    }
                });
                let frontier = frontier.frontier().iter().next().copied();
                let mut emitted = Vec::new();
                let ready: Vec<u64> = stash.keys().copied().take_while(|t| frontier.is_none_or(|f| *t < f)).collect();
                for time in ready {
                    let batch = stash.remove(&time).unwrap_or_default();
                    state.close_until(time as Millis, &mut emitted);
                    state.apply(time as Millis, batch, &mut emitted, &stats);
                }
                match frontier {
                    Some(f) => {
                        state.close_until(f as Millis, &mut emitted);
                        state.expire(f as Millis);
                    }
                    None => state.close_until(Millis::MAX, &mut emitted),
                }
                if last_partials.elapsed() >= settings.live_interval {
                    state.partials(&stash, &mut emitted);
                    last_partials = Instant::now();
                }
                if state.has_partials() {
                    activator.activate_after(settings.live_interval);
                }
                if let Some(cap) = held.as_mut() {
                    let finals = emitted.iter().filter(|u| u.is_final).count();
                    if finals > 0 {
                        stats.windows_emitted.fetch_add(finals as u64, Ordering::Relaxed);
                    }
                    if !emitted.is_empty() {
                        output.session(&*cap).give_iterator(emitted.into_iter());
                    }
                    match frontier {
                        Some(f) if f > *cap.time() => cap.downgrade(&f),
                        Some(_) => {}
                        None => held = None,
                    }
                }
            }
        })
    }
}

/// A window of one group: (group index, window spec index, window end).
type WindowKey = (usize, u8, Millis);

/// All window state of one worker.
struct WindowState {
    metrics: Rc<Vec<MetricSpec>>,
    allowed_lateness: Millis,
    /// The widest window of each metric.
    widest: Vec<Millis>,
    /// Interned (metric, group) keys.
    index: HashMap<(u16, Group), usize>,
    groups: Vec<GroupState>,
    /// Windows with data that have not closed, by end.
    open: BTreeSet<(Millis, usize, u8)>,
    /// Closed windows whose state is kept, with their latest revision.
    closed: HashMap<WindowKey, u32>,
    /// Closed windows by end, to drop them after the allowed lateness.
    closed_by_end: BTreeSet<(Millis, usize, u8)>,
    /// Panes by the time after which no kept window needs them.
    pane_expiry: BTreeSet<(Millis, usize, Millis)>,
    /// Open windows changed since the last partial emission.
    partial_dirty: HashSet<WindowKey>,
}

struct GroupState {
    metric: u16,
    group: Group,
    panes: BTreeMap<Millis, AggState>,
}

impl WindowState {
    fn new(metrics: Rc<Vec<MetricSpec>>, allowed_lateness: Millis) -> Self {
        let widest = metrics.iter().map(|m| m.windows.iter().map(WindowSpec::size).max().unwrap_or(0)).collect();
        WindowState {
            metrics,
            allowed_lateness,
            widest,
            index: HashMap::new(),
            groups: Vec::new(),
            open: BTreeSet::new(),
            closed: HashMap::new(),
            closed_by_end: BTreeSet::new(),
            pane_expiry: BTreeSet::new(),
            partial_dirty: HashSet::new(),
        }
    }

    /// Emits every open window that ends at or before `time` as final.
    fn close_until(&mut self, time: Millis, out: &mut Vec<WindowUpdate>) {
        while let Some(&(end, group, window)) = self.open.first() {
            if end > time {
                break;
            }
            self.open.pop_first();
            let key = (group, window, end);
            self.partial_dirty.remove(&key);
            self.closed.insert(key, 0);
            self.closed_by_end.insert((end, group, window));
            out.push(self.update(key, 0, true));
        }
    }

    /// Applies the contributions that travelled at `time`.
    fn apply(&mut self, time: Millis, mut batch: Vec<Contribution>, out: &mut Vec<WindowUpdate>, stats: &JobStats) {
        // Apply in a fixed order, so emission order does not depend on how
        // the exchange interleaved senders.
        batch.sort_unstable_by(|a, b| (a.metric, &a.group, a.pane).cmp(&(b.metric, &b.group, b.pane)));
        let mut late = BTreeSet::new();
        for c in batch {
            let metric = Rc::clone(&self.metrics);
            let spec = &metric[c.metric as usize];
            let g = self.intern(c.metric, c.group);
            let panes = &mut self.groups[g].panes;
            if !panes.contains_key(&c.pane) {
                let expiry = c.pane + self.widest[c.metric as usize] + self.allowed_lateness;
                self.pane_expiry.insert((expiry, g, c.pane));
            }
            panes.entry(c.pane).or_default().merge(&c.state);
            for (w, window) in spec.windows.iter().enumerate() {
                for span in window.windows_of_pane(c.pane) {
                    let key = (g, w as u8, span.end);
                    if self.closed.contains_key(&key) {
                        late.insert(key);
                    } else if span.end <= time {
                        // A window that closed empty gets its first data late.
                        self.closed.entry(key).or_insert(0);
                        self.closed_by_end.insert((span.end, g, w as u8));
                        late.insert(key);
                    } else {
                        self.open.insert((span.end, g, w as u8));
                        self.partial_dirty.insert(key);
                    }
                }
            }
        }
        if !late.is_empty() {
            stats.late_updates.fetch_add(late.len() as u64, Ordering::Relaxed);
        }
        for key in late {
            let revision = self.closed.get_mut(&key).map(|r| {
                *r += 1;
                *r
            });
            if let Some(revision) = revision {
                out.push(self.update(key, revision, true));
            }
        }
    }

    /// Drops closed windows and panes that no kept window needs any more.
    fn expire(&mut self, frontier: Millis) {
        while let Some(&(end, g, w)) = self.closed_by_end.first() {
            if end + self.allowed_lateness > frontier {
                break;
            }
            self.closed_by_end.pop_first();
            self.closed.remove(&(g, w, end));
        }
        while let Some(&(expiry, g, pane)) = self.pane_expiry.first() {
            if expiry > frontier {
                break;
            }
            self.pane_expiry.pop_first();
            self.groups[g].panes.remove(&pane);
        }
    }

    /// Emits partial values of the open windows changed since the last call.
    ///
    /// Partials include the stashed data the frontier has not released yet,
    /// when it is on time for its window, so live views do not wait for the
    /// slowest partition. They are never stored, so this does not touch the
    /// determinism of finals.
    fn partials(&mut self, stash: &BTreeMap<u64, Vec<Contribution>>, out: &mut Vec<WindowUpdate>) {
        if self.partial_dirty.is_empty() {
            return;
        }
        let mut pending: HashMap<usize, BTreeMap<Millis, AggState>> = HashMap::new();
        for c in stash.values().flatten() {
            let g = self.intern(c.metric, c.group.clone());
            pending.entry(g).or_default().entry(c.pane).or_default().merge(&c.state);
        }
        let mut dirty: Vec<WindowKey> = self.partial_dirty.drain().collect();
        dirty.sort_unstable();
        for key in dirty {
            let mut update = self.update(key, 0, false);
            if let Some(panes) = pending.get(&key.0) {
                for (_, state) in panes.range(update.span.start..update.span.end) {
                    update.state.merge(state);
                }
            }
            out.push(update);
        }
    }

    /// Marks the open windows that data arriving at `time` will change, so
    /// the next partials show it.
    fn note_arrival(&mut self, time: Millis, batch: &[Contribution]) {
        let metrics = Rc::clone(&self.metrics);
        for c in batch {
            let g = self.intern(c.metric, c.group.clone());
            for (w, window) in metrics[c.metric as usize].windows.iter().enumerate() {
                for span in window.windows_of_pane(c.pane) {
                    let key = (g, w as u8, span.end);
                    if span.end > time && !self.closed.contains_key(&key) {
                        self.partial_dirty.insert(key);
                    }
                }
            }
        }
    }

    fn has_partials(&self) -> bool {
        !self.partial_dirty.is_empty()
    }

    fn intern(&mut self, metric: u16, group: Group) -> usize {
        if let Some(&g) = self.index.get(&(metric, group.clone())) {
            return g;
        }
        let g = self.groups.len();
        self.groups.push(GroupState { metric, group: group.clone(), panes: BTreeMap::new() });
        self.index.insert((metric, group), g);
        g
    }

    /// The current value of a window.
    fn update(&self, (g, w, end): WindowKey, revision: u32, is_final: bool) -> WindowUpdate {
        let group = &self.groups[g];
        let spec = self.metrics[group.metric as usize].windows[w as usize];
        let span = Span { start: end - spec.size(), end };
        let mut state = AggState::default();
        for (_, pane) in group.panes.range(span.start..span.end) {
            state.merge(pane);
        }
        WindowUpdate { metric: group.metric, window: w, span, group: group.group.clone(), state, revision, is_final }
    }
}
