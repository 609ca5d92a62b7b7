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
//! processing time; of the sliding windows over a pane, only the one closing
//! next. Partials also count data still waiting for the frontier,
//! so a live view is as fresh as the data that has arrived. They are for live
//! views only and are not stored.
//!
//! The operator also takes checkpoints (see [`crate::checkpoint`]): when it
//! is about to apply the first data at or past a chosen boundary, its state
//! holds exactly the data stamped before the boundary, and it hands a copy to
//! the checkpoint sink with the source's offsets at that boundary. On start,
//! it takes back the state a restored checkpoint gave it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet, FxHasher};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use crate::aggregate::AggState;
use crate::checkpoint::{CheckpointSink, GroupSnapshot, Progress, Schedule, WorkerPart};
use crate::config::MetricSpec;
use crate::event::Millis;
use crate::operators::source::{Contribution, Group};
use crate::stats::JobStats;
use crate::window::{Span, WindowSpec};

/// The value of one window of one group, as emitted. The operator emits
/// them in an `Arc`, so the store and the live bus share one copy.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// How a worker's `windows` operator takes part in checkpoints.
pub struct Checkpointing {
    /// Where the worker's source has got to, by stamp.
    pub progress: Rc<RefCell<Progress>>,
    /// The partitions the worker's source reads.
    pub partitions: Vec<u32>,
    /// The boundary the worker resumed from, and the state it restores.
    pub resume: (u64, Vec<GroupSnapshot>),
    /// Which boundaries to take, and where parts go; `None` takes none.
    pub target: Option<(Arc<Schedule>, Box<dyn CheckpointSink>)>,
}

/// Extension trait for the `windows` operator.
pub trait Windows<'scope> {
    /// Aggregates contributions into the windows of `metrics`.
    fn windows(
        self,
        metrics: Rc<Vec<MetricSpec>>,
        settings: WindowSettings,
        stats: Arc<JobStats>,
        checkpointing: Checkpointing,
    ) -> Stream<'scope, u64, Vec<Arc<WindowUpdate>>>;
}

/// The routing hash of a (metric, group): the same on every worker and
/// process (FxHash has no random seed), so each group's state lives in
/// exactly one place.
pub fn group_hash(metric: u16, group: &Group) -> u64 {
    let mut hasher = FxHasher::default();
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
        checkpointing: Checkpointing,
    ) -> Stream<'scope, u64, Vec<Arc<WindowUpdate>>> {
        let exchange = Exchange::new(|c: &Contribution| c.hash);
        let scope = self.scope();
        let (worker, workers) = (scope.index(), scope.peers());
        self.unary_frontier(exchange, "Windows", move |capability, info| {
            let activator = scope.activator_for(Rc::clone(&info.address));
            let mut held: Option<Capability<u64>> = Some(capability);
            let mut stash: BTreeMap<u64, Vec<Staged>> = BTreeMap::new();
            let mut state = WindowState::new(metrics, settings.allowed_lateness);
            let Checkpointing {
                progress,
                partitions,
                resume: (boundary, groups),
                mut target,
            } = checkpointing;
            state.restore(groups);
            // Everything before this time has been applied, and no boundary
            // at or below it is still to be taken.
            let mut passed = boundary;
            let mut take_checkpoints = move |through: u64, state: &WindowState| {
                if through <= passed {
                    return;
                }
                if let Some((schedule, sink)) = target.as_mut() {
                    for boundary in schedule.boundaries(passed, through) {
                        let cuts = progress.borrow().cut(&partitions, boundary);
                        sink.submit(WorkerPart {
                            boundary,
                            worker,
                            workers,
                            cuts,
                            groups: state.snapshot(),
                        });
                    }
                }
                progress.borrow_mut().forget_before(through);
                passed = through;
            };
            let mut last_partials = Instant::now();
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    // Every message of the source carries a capability.
                    let Some(&time) = cap.least() else { return };
                    let batch = stash.entry(time).or_default();
                    for container in data {
                        batch.extend(container.drain(..).map(|c| state.stage(c)));
                    }
                });
                let frontier = frontier.frontier().iter().next().copied();
                let mut emitted = Vec::new();
                let ready: Vec<u64> = stash
                    .keys()
                    .copied()
                    .take_while(|t| frontier.is_none_or(|f| *t < f))
                    .collect();
                for time in ready {
                    take_checkpoints(time, &state);
                    let batch = stash.remove(&time).unwrap_or_default();
                    state.close_until(time as Millis, &mut emitted);
                    state.apply(time as Millis, batch, &mut emitted, &stats);
                }
                match frontier {
                    Some(f) => {
                        take_checkpoints(f, &state);
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
                        stats
                            .windows_emitted
                            .fetch_add(finals as u64, Ordering::Relaxed);
                    }
                    if !emitted.is_empty() {
                        output
                            .session(&*cap)
                            .give_iterator(emitted.into_iter().map(Arc::new));
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
    /// Interned (metric, group) keys, by their routing hash.
    index: HashMap<u64, Vec<usize>>,
    groups: Vec<GroupState>,
    /// Windows with data that have not closed, by end.
    open: BTreeSet<(Millis, usize, u8)>,
    /// Closed windows whose state is kept, with their latest revision.
    closed: HashMap<WindowKey, u32>,
    /// Closed windows by end, to drop them after the allowed lateness.
    closed_by_end: BTreeSet<(Millis, usize, u8)>,
    /// Panes by the time after which no kept window needs them.
    pane_expiry: BTreeSet<(Millis, usize, Millis)>,
    /// Panes (group, pane start) changed or awaiting data since the last
    /// partial emission; their open windows get partials.
    dirty_panes: HashSet<(usize, Millis)>,
}

/// A contribution waiting for the frontier, its group interned.
struct Staged {
    group: usize,
    pane: Millis,
    state: AggState,
}

struct GroupState {
    metric: u16,
    group: Group,
    hash: u64,
    panes: BTreeMap<Millis, AggState>,
}

impl WindowState {
    fn new(metrics: Rc<Vec<MetricSpec>>, allowed_lateness: Millis) -> Self {
        let widest = metrics
            .iter()
            .map(|m| m.windows.iter().map(WindowSpec::size).max().unwrap_or(0))
            .collect();
        WindowState {
            metrics,
            allowed_lateness,
            widest,
            index: HashMap::default(),
            groups: Vec::new(),
            open: BTreeSet::new(),
            closed: HashMap::default(),
            closed_by_end: BTreeSet::new(),
            pane_expiry: BTreeSet::new(),
            dirty_panes: HashSet::default(),
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
            self.closed.insert(key, 0);
            self.closed_by_end.insert((end, group, window));
            out.push(self.update(key, 0, true));
        }
    }

    /// Applies the contributions that travelled at `time`.
    fn apply(
        &mut self,
        time: Millis,
        batch: Vec<Staged>,
        out: &mut Vec<WindowUpdate>,
        stats: &JobStats,
    ) {
        // Merges commute, and late windows are emitted in key order, so the
        // order contributions arrive in does not matter.
        let mut late = BTreeSet::new();
        let metrics = Rc::clone(&self.metrics);
        for c in batch {
            let g = c.group;
            let metric = self.groups[g].metric as usize;
            let spec = &metrics[metric];
            let panes = &mut self.groups[g].panes;
            let new_pane = !panes.contains_key(&c.pane);
            panes.entry(c.pane).or_default().merge(&c.state);
            // The earliest window containing a pane ends at or after the
            // pane's end. Before that time, none of its windows can have
            // closed, and an existing pane's windows are registered already:
            // the common case costs one merge. The pane was marked for
            // partials when the contribution arrived (`stage`), and applying
            // it does not change the value a partial shows.
            if !new_pane && time < c.pane + spec.pane {
                continue;
            }
            if new_pane {
                let expiry = c.pane + self.widest[metric] + self.allowed_lateness;
                self.pane_expiry.insert((expiry, g, c.pane));
            }
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
                    }
                }
            }
        }
        if !late.is_empty() {
            stats
                .late_updates
                .fetch_add(late.len() as u64, Ordering::Relaxed);
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
    /// so live views do not wait for the slowest partition. They are never stored, so this does not touch the
    /// determinism of finals.
    fn partials(&mut self, stash: &BTreeMap<u64, Vec<Staged>>, out: &mut Vec<WindowUpdate>) {
        if self.dirty_panes.is_empty() {
            return;
        }
        let mut pending: HashMap<usize, BTreeMap<Millis, AggState>> = HashMap::default();
        for c in stash.values().flatten() {
            pending
                .entry(c.group)
                .or_default()
                .entry(c.pane)
                .or_default()
                .merge(&c.state);
        }
        let mut dirty = BTreeSet::new();
        for (g, pane) in self.dirty_panes.drain() {
            let metric = self.groups[g].metric as usize;
            for (w, window) in self.metrics[metric].windows.iter().enumerate() {
                // Of the sliding windows over a pane, a live view shows the
                // one closing next, which holds the most recent full width;
                // the others get their value when they close.
                if let Some(span) = window.windows_of_pane(pane).next() {
                    if !self.closed.contains_key(&(g, w as u8, span.end)) {
                        dirty.insert((g, w as u8, span.end));
                    }
                }
            }
        }
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

    /// Interns an arriving contribution's group, and marks its pane so the
    /// next partials show it.
    fn stage(&mut self, c: Contribution) -> Staged {
        let group = self.intern(c.metric, &c.group, c.hash);
        self.dirty_panes.insert((group, c.pane));
        Staged {
            group,
            pane: c.pane,
            state: c.state,
        }
    }

    /// A copy of the state, group by group, for a checkpoint. Groups with
    /// nothing left are not written, which is how a restart forgets them.
    fn snapshot(&self) -> Vec<GroupSnapshot> {
        let mut open: HashMap<usize, Vec<(u8, Millis)>> = HashMap::default();
        for &(end, g, w) in &self.open {
            open.entry(g).or_default().push((w, end));
        }
        let mut closed: HashMap<usize, Vec<(u8, Millis, u32)>> = HashMap::default();
        for (&(g, w, end), &revision) in &self.closed {
            closed.entry(g).or_default().push((w, end, revision));
        }
        self.groups
            .iter()
            .enumerate()
            .filter_map(|(g, group)| {
                let mut closed = closed.remove(&g).unwrap_or_default();
                if group.panes.is_empty() && closed.is_empty() {
                    return None;
                }
                closed.sort_unstable();
                Some(GroupSnapshot {
                    metric: group.metric,
                    group: group.group.clone(),
                    hash: group.hash,
                    panes: group
                        .panes
                        .iter()
                        .map(|(&start, state)| (start, state.clone()))
                        .collect(),
                    open: open.remove(&g).unwrap_or_default(),
                    closed,
                })
            })
            .collect()
    }

    /// Takes back the state of restored groups.
    fn restore(&mut self, groups: Vec<GroupSnapshot>) {
        for snapshot in groups {
            let g = self.intern(snapshot.metric, &snapshot.group, snapshot.hash);
            let metric = snapshot.metric as usize;
            for (pane, state) in snapshot.panes {
                let expiry = pane + self.widest[metric] + self.allowed_lateness;
                self.pane_expiry.insert((expiry, g, pane));
                self.groups[g].panes.insert(pane, state);
            }
            for (w, end) in snapshot.open {
                self.open.insert((end, g, w));
            }
            for (w, end, revision) in snapshot.closed {
                self.closed.insert((g, w, end), revision);
                self.closed_by_end.insert((end, g, w));
            }
        }
    }

    fn has_partials(&self) -> bool {
        !self.dirty_panes.is_empty()
    }

    fn intern(&mut self, metric: u16, group: &Group, hash: u64) -> usize {
        let candidates = self.index.entry(hash).or_default();
        if let Some(&g) = candidates
            .iter()
            .find(|&&g| self.groups[g].metric == metric && self.groups[g].group == *group)
        {
            return g;
        }
        let g = self.groups.len();
        self.groups.push(GroupState {
            metric,
            group: group.clone(),
            hash,
            panes: BTreeMap::new(),
        });
        candidates.push(g);
        g
    }

    /// The current value of a window.
    fn update(&self, (g, w, end): WindowKey, revision: u32, is_final: bool) -> WindowUpdate {
        let group = &self.groups[g];
        let spec = self.metrics[group.metric as usize].windows[w as usize];
        let span = Span {
            start: end - spec.size(),
            end,
        };
        let mut state = AggState::default();
        for (_, pane) in group.panes.range(span.start..span.end) {
            state.merge(pane);
        }
        WindowUpdate {
            metric: group.metric,
            window: w,
            span,
            group: group.group.clone(),
            state,
            revision,
            is_final,
        }
    }
}
