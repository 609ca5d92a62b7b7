//! The window state of one worker: panes per group, which windows are open,
//! which closed ones are kept for late data, and their revisions.
//!
//! This is the state machine of [`crate::operators::windows`], without
//! timely: the operator stashes contributions by the time they travelled at
//! and calls, for each time the frontier passes, [`WindowState::close_some`]
//! (a budget at a time), [`WindowState::expire`], then
//! [`WindowState::apply`]; the first two again when the frontier moves;
//! and whenever [`WindowState::next_partials`] comes,
//! [`WindowState::partials`]. Every emission is a function of the
//! calls, so the unit tests below check the semantics without a dataflow.
//!
//! Partials are coalesced per group, on ticks one live interval apart: a
//! group shown since the last tick shows its next changes at the next one
//! (the trailing edge), where every busy group goes out together, and a
//! group not shown since then shows a change at once (the leading edge). So
//! a window is sent at most twice an interval and once an interval while it
//! is busy, a change waits at most until the next tick, and a busy group
//! never holds back a quiet one.
//!
//! A group (a metric's dimension values) is interned when its first
//! contribution arrives, and freed once it has no pane, no window and no
//! contribution waiting: a dimension with ever-new values costs memory only
//! while its windows are kept.
//!
//! A checkpoint's snapshot shares the panes with the state rather than
//! copying them (a `uniq` pane is a sketch of kilobytes): the state copies a
//! pane only if it changes one that a snapshot still holds, which the
//! checkpoint thread lets go once it has written it.
//!
//! A time rollup ([`crate::rollup::Made::Table`]) takes no contributions of
//! its own. Its groups have the dimension values of a group of the table it
//! is made from, under the rollup's index, and take that group's panes: each
//! pane once, when time passes its end and it holds all its on-time data,
//! and after that each late contribution to it as it is applied. A rollup
//! window therefore closes, takes late data and expires as any other, at the
//! cost of one merge per pane rather than per contribution.

use std::collections::hash_map::Entry;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::aggregate::AggState;
use crate::checkpoint::GroupSnapshot;
use crate::config::MetricSpec;
use crate::model::{Contribution, Group, WindowUpdate};
use crate::rollup::{made, Made};
use crate::time::Millis;
use crate::window::{align, Span};

/// A window of one group: (group index, window spec index, window end).
type WindowKey = (usize, u8, Millis);

/// All window state of one worker.
pub struct WindowState {
    metrics: Rc<Vec<MetricSpec>>,
    allowed_lateness: Millis,
    /// The widest window of each metric.
    widest: Vec<Millis>,
    /// The time rollups made from each metric's contributions.
    rollups: Vec<Vec<u16>>,
    /// Panes of groups with rollups not merged into them yet, by end:
    /// (end, group, pane start).
    unrolled: BTreeSet<(Millis, usize, Millis)>,
    /// Interned (metric, group) keys, as indices into `groups`, by their
    /// routing hash.
    index: HashTable<usize>,
    /// Groups by index; `None` for a freed slot, which [`Self::free`] lists.
    groups: Vec<Option<GroupState>>,
    /// Freed slots of `groups`, reused before it grows.
    free: Vec<usize>,
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
    /// A group shows its partials at most this often.
    live_interval: Duration,
    /// When the earliest group with a dirty pane may show it.
    due: Option<Instant>,
    /// The first tick: ticks are a live interval apart from it.
    epoch: Instant,
}

/// When a group last shown at `shown` may show a change made at `now`: at
/// once if never, else at the first tick after `shown` (ticks `interval`
/// apart from `epoch`), and never before `now`.
fn may_show(epoch: Instant, interval: Duration, shown: Option<Instant>, now: Instant) -> Instant {
    let Some(shown) = shown else {
        return now;
    };
    let interval = interval.as_nanos();
    if interval == 0 {
        return now;
    }
    let ticks = shown.saturating_duration_since(epoch).as_nanos() / interval + 1;
    (epoch + Duration::from_nanos((ticks * interval) as u64)).max(now)
}

/// A contribution waiting for the frontier, its group interned.
pub struct Staged {
    group: usize,
    pane: Millis,
    state: AggState,
}

/// The contributions that travelled at one time, waiting for the frontier
/// to pass it: one per (group, pane), the later ones merged into it as they
/// are staged, so what waits is bounded by the groups and panes, not by the
/// batches.
#[derive(Default)]
pub struct Stash {
    staged: Vec<Staged>,
    /// Indices into `staged`, by (group, pane).
    index: HashMap<(usize, Millis), usize>,
}

impl Stash {
    /// The contributions, for [`WindowState::apply`].
    pub fn into_staged(self) -> Vec<Staged> {
        self.staged
    }
}

/// A group's panes by start, in a sorted vector: most groups have one or
/// two, which a map's nodes would hold in ten times the memory.
#[derive(Default)]
struct Panes(Vec<(Millis, Arc<AggState>)>);

impl Panes {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find(&self, start: Millis) -> Result<usize, usize> {
        self.0.binary_search_by_key(&start, |&(s, _)| s)
    }

    fn get(&self, start: Millis) -> Option<&Arc<AggState>> {
        self.find(start).ok().map(|i| &self.0[i].1)
    }

    /// Whether the pane starting at `start` is new, and the pane, made
    /// empty if it was.
    fn entry(&mut self, start: Millis) -> (bool, &mut Arc<AggState>) {
        let (new, i) = match self.find(start) {
            Ok(i) => (false, i),
            Err(i) => {
                self.0.insert(i, (start, Arc::default()));
                (true, i)
            }
        };
        (new, &mut self.0[i].1)
    }

    fn insert(&mut self, start: Millis, state: Arc<AggState>) {
        *self.entry(start).1 = state;
    }

    fn remove(&mut self, start: Millis) {
        if let Ok(i) = self.find(start) {
            self.0.remove(i);
            if self.0.capacity() > 4 * self.0.len().max(1) {
                self.0.shrink_to_fit();
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = &(Millis, Arc<AggState>)> {
        self.0.iter()
    }

    /// The panes that start in `start..end`, by start.
    fn range(&self, start: Millis, end: Millis) -> impl Iterator<Item = &(Millis, Arc<AggState>)> {
        let from = self.find(start).unwrap_or_else(|i| i);
        self.0[from..].iter().take_while(move |&&(s, _)| s < end)
    }
}

struct GroupState {
    metric: u16,
    group: Group,
    hash: u64,
    /// Shared with the snapshots that hold them: a pane is copied when it
    /// changes while a snapshot still holds it, never when it is taken.
    panes: Panes,
    /// Entries of `open` and `closed` for this group.
    windows: u32,
    /// Contributions staged for this group and not applied yet.
    staged: u32,
    /// Its panes with contributions staged, as live views show them, by
    /// start: for a group with partials only.
    live: Vec<LivePane>,
    /// When its partials last went out.
    shown: Option<Instant>,
    /// When the log took the newest batch staged for it.
    appended_at: Option<Millis>,
}

/// A pane with contributions staged for it, merged with them: what a
/// partial shows of the pane. Partials come at every live tick, and staged
/// data waits up to a tick of event time; merging it into the pane again
/// at every partial would cost a sketch merge per window and live tick. A
/// live pane is made when a partial first shows the pane, takes each
/// contribution staged after that as it comes, and stays what the pane
/// and its staged data make while they are applied; it goes when nothing
/// is staged for the pane any more.
struct LivePane {
    start: Millis,
    state: AggState,
}

impl GroupState {
    /// The position of the live pane starting at `start`, or where it goes.
    fn live_at(&self, start: Millis) -> Result<usize, usize> {
        self.live.binary_search_by_key(&start, |l| l.start)
    }

    /// Notes that a contribution staged for pane `start` left the stash,
    /// and drops the pane's live pane, if it has one, unless more is
    /// `still_staged` for it.
    fn unstage(&mut self, start: Millis, still_staged: impl FnOnce() -> bool) {
        self.staged -= 1;
        if let Ok(i) = self.live_at(start) {
            if !still_staged() {
                self.live.remove(i);
            }
        }
    }

    fn unused(&self) -> bool {
        self.panes.is_empty() && self.windows == 0 && self.staged == 0
    }
}

impl WindowState {
    /// Empty state for `metrics`, keeping closed windows for
    /// `allowed_lateness` and showing each group's partials at most once per
    /// `live_interval`.
    pub fn new(
        metrics: Rc<Vec<MetricSpec>>,
        allowed_lateness: Millis,
        live_interval: Duration,
    ) -> Self {
        let widest = metrics.iter().map(MetricSpec::widest).collect();
        let mut rollups = vec![Vec::new(); metrics.len()];
        for (table, made) in made(&metrics).into_iter().enumerate() {
            if let Made::Table(from) = made {
                rollups[from as usize].push(table as u16);
            }
        }
        WindowState {
            metrics,
            allowed_lateness,
            widest,
            rollups,
            unrolled: BTreeSet::new(),
            index: HashTable::new(),
            groups: Vec::new(),
            free: Vec::new(),
            open: BTreeSet::new(),
            closed: HashMap::default(),
            closed_by_end: BTreeSet::new(),
            pane_expiry: BTreeSet::new(),
            dirty_panes: HashSet::default(),
            live_interval,
            due: None,
            epoch: Instant::now(),
        }
    }

    /// The number of groups held.
    #[cfg(test)]
    fn groups(&self) -> usize {
        self.groups.len() - self.free.len()
    }

    fn group(&self, g: usize) -> &GroupState {
        // A group index comes from `intern` and is freed only once nothing
        // refers to it (see `GroupState::unused`).
        self.groups[g].as_ref().expect("a live group index")
    }

    fn group_mut(&mut self, g: usize) -> &mut GroupState {
        self.groups[g].as_mut().expect("a live group index")
    }

    /// Emits every open window that ends at or before `time` as final, as
    /// the tests step the state.
    #[cfg(test)]
    fn close_until(&mut self, time: Millis, out: &mut Vec<WindowUpdate>) {
        self.close_some(time, out, usize::MAX);
    }

    /// Emits open windows that end at or before `time` as final, in order
    /// of their end, until `out` holds `limit` updates; returns whether
    /// every such window is closed.
    pub fn close_some(&mut self, time: Millis, out: &mut Vec<WindowUpdate>, limit: usize) -> bool {
        self.roll_until(time);
        while let Some(&(end, group, window)) = self.open.first() {
            if end > time {
                break;
            }
            if out.len() >= limit {
                return false;
            }
            self.open.pop_first();
            let key = (group, window, end);
            // The window moves from `open` to `closed`: its group's count of
            // windows stays the same.
            self.closed.insert(key, 0);
            self.closed_by_end.insert((end, group, window));
            out.push(self.update(key, 0, true));
        }
        true
    }

    /// Applies the contributions that travelled at `time`, with the
    /// others still `waiting`, and returns how many closed windows they
    /// revised.
    pub fn apply<'a>(
        &mut self,
        time: Millis,
        batch: Vec<Staged>,
        waiting: impl Iterator<Item = &'a Stash> + Clone,
        out: &mut Vec<WindowUpdate>,
    ) -> usize {
        // Merges commute, and late windows are emitted in key order, so the
        // order contributions arrive in does not matter.
        let mut late = BTreeSet::new();
        for c in batch {
            let g = c.group;
            let metric = self.group(g).metric as usize;
            let new_pane = self.merge_pane(g, c.pane, &c.state, time, &mut late);
            let still_staged = || {
                waiting
                    .clone()
                    .any(|stash| stash.index.contains_key(&(g, c.pane)))
            };
            self.group_mut(g).unstage(c.pane, still_staged);
            if self.rollups[metric].is_empty() {
                continue;
            }
            let end = c.pane + self.metrics[metric].pane;
            if end <= time {
                // The pane is in its rollups already: late data follows it.
                self.roll(g, c.pane, &c.state, time, &mut late);
            } else if new_pane {
                self.unrolled.insert((end, g, c.pane));
            }
        }
        let revised = late.len();
        for key in late {
            let revision = self.closed.get_mut(&key).map(|r| {
                *r += 1;
                *r
            });
            if let Some(revision) = revision {
                out.push(self.update(key, revision, true));
            }
        }
        revised
    }

    /// Takes out of `batch` the contributions of the groups the cap sent to
    /// the overflow group ([`crate::cap`]), and frees those groups if they
    /// have nothing else.
    pub fn drop_overflowed(
        &mut self,
        batch: Vec<Staged>,
        overflowed: &HashSet<(u16, u64, Group)>,
    ) -> Vec<Staged> {
        if overflowed.is_empty() {
            return batch;
        }
        let mut freed = false;
        let mut kept = Vec::with_capacity(batch.len());
        for c in batch {
            let group = self.group(c.group);
            // The cap turns away only groups it does not hold, which have
            // nothing left once their time has expired what they had: the
            // key is built for those alone.
            if group.panes.is_empty()
                && group.windows == 0
                && overflowed.contains(&(group.metric, group.hash, group.group.clone()))
            {
                let group = self.group_mut(c.group);
                // Its data is dropped: so is what its live pane showed.
                group.unstage(c.pane, || false);
                if group.unused() {
                    self.release(c.group);
                    freed = true;
                }
            } else {
                kept.push(c);
            }
        }
        if freed {
            self.dirty_panes.retain(|(g, _)| self.groups[*g].is_some());
        }
        kept
    }

    /// Merges the panes that end at or before `time` into their groups'
    /// rollups. Every window of a rollup over such a pane ends at or after
    /// the pane does, and is still open.
    fn roll_until(&mut self, time: Millis) {
        let mut late = BTreeSet::new();
        while let Some(&(end, g, pane)) = self.unrolled.first() {
            if end > time {
                break;
            }
            self.unrolled.pop_first();
            let state = Arc::clone(self.group(g).panes.get(pane).expect("an unrolled pane"));
            self.roll(g, pane, &state, end - 1, &mut late);
        }
        debug_assert!(late.is_empty(), "a rollup window closed before its panes");
    }

    /// Merges `state`, of pane `pane` of group `g`, into the group's
    /// rollups at `time`.
    fn roll(
        &mut self,
        g: usize,
        pane: Millis,
        state: &AggState,
        time: Millis,
        late: &mut BTreeSet<WindowKey>,
    ) {
        let metric = self.group(g).metric as usize;
        for k in 0..self.rollups[metric].len() {
            let table = self.rollups[metric][k];
            let rollup = self.intern_rollup(table, g);
            let pane = align(pane, self.metrics[table as usize].pane);
            self.merge_pane(rollup, pane, state, time, late);
        }
    }

    /// Merges `state` into pane `pane` of group `g`, at `time`, and
    /// registers the pane's windows: open ones, or in `late` the closed
    /// ones it revises. Returns whether the pane is new.
    fn merge_pane(
        &mut self,
        g: usize,
        pane: Millis,
        state: &AggState,
        time: Millis,
        late: &mut BTreeSet<WindowKey>,
    ) -> bool {
        let group = self.groups[g].as_mut().expect("a live group index");
        let metric = group.metric as usize;
        let (new_pane, pane_state) = group.panes.entry(pane);
        Arc::make_mut(pane_state).merge(state);
        // The earliest window containing a pane ends at or after the
        // pane's end. Before that time, none of its windows can have
        // closed, and an existing pane's windows are registered already:
        // the common case costs one merge. The pane was marked for
        // partials when the contribution arrived (`stage`), and applying
        // it does not change the value a partial shows.
        if !new_pane && time < pane + self.metrics[metric].pane {
            return false;
        }
        if new_pane {
            let expiry = pane + self.widest[metric] + self.allowed_lateness;
            self.pane_expiry.insert((expiry, g, pane));
        }
        let metrics = Rc::clone(&self.metrics);
        let mut added = 0;
        for (w, window) in metrics[metric].windows.iter().enumerate() {
            for span in window.windows_of_pane(pane) {
                let key = (g, w as u8, span.end);
                match self.closed.entry(key) {
                    Entry::Occupied(_) => {
                        late.insert(key);
                    }
                    Entry::Vacant(closed) if span.end <= time => {
                        // A window that closed empty gets its first data late.
                        closed.insert(0);
                        self.closed_by_end.insert((span.end, g, w as u8));
                        added += 1;
                        late.insert(key);
                    }
                    Entry::Vacant(_) => {
                        added += u32::from(self.open.insert((span.end, g, w as u8)));
                    }
                }
            }
        }
        self.group_mut(g).windows += added;
        new_pane
    }

    /// Drops closed windows and panes that no kept window needs any more,
    /// and frees the groups left with nothing.
    pub fn expire(&mut self, frontier: Millis) {
        let mut touched = Vec::new();
        while let Some(&(end, g, w)) = self.closed_by_end.first() {
            if end + self.allowed_lateness > frontier {
                break;
            }
            self.closed_by_end.pop_first();
            self.closed.remove(&(g, w, end));
            self.group_mut(g).windows -= 1;
            touched.push(g);
        }
        while let Some(&(expiry, g, pane)) = self.pane_expiry.first() {
            if expiry > frontier {
                break;
            }
            self.pane_expiry.pop_first();
            self.group_mut(g).panes.remove(pane);
            touched.push(g);
        }
        let mut freed = false;
        for g in touched {
            if self.groups[g].as_ref().is_some_and(GroupState::unused) {
                self.release(g);
                freed = true;
            }
        }
        if freed {
            self.dirty_panes.retain(|(g, _)| self.groups[*g].is_some());
            self.compact();
        }
    }

    /// Gives back the capacity a burst of groups left behind: collections
    /// keep theirs when emptied, and the groups' slots are kept for reuse.
    fn compact(&mut self) {
        fn sparse(len: usize, capacity: usize) -> bool {
            capacity > 64 && len * 4 < capacity
        }
        if sparse(self.index.len(), self.index.capacity()) {
            let groups = &self.groups;
            self.index.shrink_to_fit(|&g| hash_of(groups, g));
        }
        if sparse(self.closed.len(), self.closed.capacity()) {
            self.closed.shrink_to_fit();
        }
        if sparse(self.dirty_panes.len(), self.dirty_panes.capacity()) {
            self.dirty_panes.shrink_to_fit();
        }
        let live = self.groups.len() - self.free.len();
        if sparse(live, self.groups.len()) && matches!(self.groups.last(), Some(None)) {
            // Freed slots at the end are dropped rather than reused.
            while matches!(self.groups.last(), Some(None)) {
                self.groups.pop();
            }
            let len = self.groups.len();
            self.free.retain(|&g| g < len);
            self.groups.shrink_to_fit();
            self.free.shrink_to_fit();
        }
    }

    fn release(&mut self, g: usize) {
        let Some(group) = self.groups[g].take() else {
            return;
        };
        if let Ok(entry) = self.index.find_entry(group.hash, |&c| c == g) {
            entry.remove();
        }
        self.free.push(g);
    }

    /// Emits, at `now`, partial values of the open windows changed since
    /// their group last showed them, for the groups whose interval has
    /// passed since (see the [module](self)); the others wait for
    /// [`Self::next_partials`].
    ///
    /// Partials include the staged data the frontier has not released yet
    /// (see [`LivePane`]), so live views do not wait for the slowest
    /// partition. They are never stored, so this does not touch the
    /// determinism of finals.
    pub fn partials<'a>(
        &mut self,
        now: Instant,
        stashes: impl Iterator<Item = &'a Stash> + Clone,
        out: &mut Vec<WindowUpdate>,
    ) {
        if self.due.is_none_or(|due| due > now) {
            return;
        }
        let groups = &self.groups;
        let (epoch, interval) = (self.epoch, self.live_interval);
        let due = |g: usize| {
            let group = groups[g].as_ref().expect("dirty groups are live");
            may_show(epoch, interval, group.shown, now)
        };
        let mut showing: Vec<(usize, Millis)> = Vec::new();
        let mut next: Option<Instant> = None;
        self.dirty_panes.retain(|&(g, pane)| {
            let at = due(g);
            if at <= now {
                showing.push((g, pane));
                false
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
                true
            }
        });
        self.due = next;
        let shown: HashSet<usize> = showing.iter().map(|&(g, _)| g).collect();
        for &g in &shown {
            self.group_mut(g).shown = Some(now);
        }
        let mut dirty = BTreeSet::new();
        for &(g, pane) in &showing {
            self.make_live(g, pane, stashes.clone());
        }
        for (g, pane) in showing {
            let metric = self.groups[g]
                .as_ref()
                .expect("dirty groups are live")
                .metric as usize;
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
        out.extend(dirty.into_iter().map(|key| self.update(key, 0, false)));
    }

    /// Makes the live pane of pane `start` of group `g`, if it has
    /// contributions staged in `stashes` and no live pane yet.
    fn make_live<'a>(&mut self, g: usize, start: Millis, stashes: impl Iterator<Item = &'a Stash>) {
        let group = self.groups[g].as_mut().expect("dirty groups are live");
        let Err(at) = group.live_at(start) else {
            return;
        };
        let mut staged = stashes
            .filter_map(|stash| {
                stash
                    .index
                    .get(&(g, start))
                    .map(|&i| &stash.staged[i].state)
            })
            .peekable();
        if staged.peek().is_none() {
            return;
        }
        let mut state = group
            .panes
            .get(start)
            .map(|p| (**p).clone())
            .unwrap_or_default();
        for contribution in staged {
            state.merge(contribution);
        }
        group.live.insert(at, LivePane { start, state });
    }

    /// Interns a contribution's group as it arrives at `now`, merges it
    /// into `stash`, and marks its pane so that the group's next partials
    /// show it.
    pub fn stage(&mut self, c: Contribution, now: Instant, stash: &mut Stash) {
        let group = self.intern(c.metric, &c.group, c.hash);
        let state = self.group_mut(group);
        if let Ok(i) = state.live_at(c.pane) {
            state.live[i].state.merge(&c.state);
        }
        match stash.index.entry((group, c.pane)) {
            Entry::Occupied(at) => stash.staged[*at.get()].state.merge(&c.state),
            Entry::Vacant(at) => {
                at.insert(stash.staged.len());
                stash.staged.push(Staged {
                    group,
                    pane: c.pane,
                    state: c.state,
                });
                state.staged += 1;
            }
        }
        state.appended_at = state.appended_at.max(c.appended_at);
        let shown = state.shown;
        // Rollups are for history alone: they have no partials.
        if self.metrics[c.metric as usize].rollup_of.is_none() {
            self.dirty_panes.insert((group, c.pane));
            let at = may_show(self.epoch, self.live_interval, shown, now);
            self.due = Some(self.due.map_or(at, |due| due.min(at)));
        }
    }

    /// The state, group by group, for a checkpoint at `boundary`, when the
    /// data before it has been applied and none after it: the panes it has
    /// ended are merged into their rollups first. Groups with nothing left
    /// are not written, which is how a restart forgets them. Panes are
    /// shared with the snapshot, not copied: taking it costs a pointer per
    /// pane, so the worker does not stall on it while its live views wait.
    pub fn snapshot(&mut self, boundary: Millis) -> Vec<GroupSnapshot> {
        self.roll_until(boundary);
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
                let group = group.as_ref()?;
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
                        .map(|(start, state)| (*start, Arc::clone(state)))
                        .collect(),
                    open: open.remove(&g).unwrap_or_default(),
                    closed,
                })
            })
            .collect()
    }

    /// Takes back the state of groups a checkpoint at `boundary` restored.
    pub fn restore(&mut self, groups: Vec<GroupSnapshot>, boundary: Millis) {
        for snapshot in groups {
            let g = self.intern(snapshot.metric, &snapshot.group, snapshot.hash);
            let metric = snapshot.metric as usize;
            let mut windows = 0;
            for (pane, state) in snapshot.panes {
                let expiry = pane + self.widest[metric] + self.allowed_lateness;
                self.pane_expiry.insert((expiry, g, pane));
                let end = pane + self.metrics[metric].pane;
                if !self.rollups[metric].is_empty() && end > boundary {
                    self.unrolled.insert((end, g, pane));
                }
                self.group_mut(g).panes.insert(pane, state);
            }
            for (w, end) in snapshot.open {
                windows += u32::from(self.open.insert((end, g, w)));
            }
            for (w, end, revision) in snapshot.closed {
                windows += u32::from(self.closed.insert((g, w, end), revision).is_none());
                self.closed_by_end.insert((end, g, w));
            }
            self.group_mut(g).windows += windows;
        }
    }

    /// When [`Self::partials`] next has something to show: `None` while no
    /// pane has changed since its group's last partials.
    pub fn next_partials(&self) -> Option<Instant> {
        self.due
    }

    /// The group of time rollup `table` with the dimension values of group
    /// `of`, and its routing hash.
    fn intern_rollup(&mut self, table: u16, of: usize) -> usize {
        let from = self.group(of);
        if let Some(g) = self.find(table, &from.group, from.hash) {
            return g;
        }
        let (group, hash) = (from.group.clone(), from.hash);
        self.intern(table, &group, hash)
    }

    /// The interned (`metric`, `group`), whose routing hash is `hash`.
    fn find(&self, metric: u16, group: &Group, hash: u64) -> Option<usize> {
        self.index
            .find(hash, |&g| {
                self.groups[g]
                    .as_ref()
                    .is_some_and(|s| s.metric == metric && s.group == *group)
            })
            .copied()
    }

    fn intern(&mut self, metric: u16, group: &Group, hash: u64) -> usize {
        if let Some(g) = self.find(metric, group, hash) {
            return g;
        }
        let state = GroupState {
            metric,
            group: group.clone(),
            hash,
            panes: Panes::default(),
            windows: 0,
            staged: 0,
            live: Vec::new(),
            shown: None,
            appended_at: None,
        };
        let g = match self.free.pop() {
            Some(g) => {
                self.groups[g] = Some(state);
                g
            }
            None => {
                self.groups.push(Some(state));
                self.groups.len() - 1
            }
        };
        let groups = &self.groups;
        self.index.insert_unique(hash, g, |&g| hash_of(groups, g));
        g
    }

    /// The current value of a window: of the data applied if it is final,
    /// and with the data staged if not.
    fn update(&self, (g, w, end): WindowKey, revision: u32, is_final: bool) -> WindowUpdate {
        let group = self.group(g);
        let spec = self.metrics[group.metric as usize].windows[w as usize];
        let span = Span {
            start: end - spec.size(),
            end,
        };
        let mut state = AggState::default();
        let mut live = group
            .live
            .iter()
            .filter(|l| !is_final && (span.start..span.end).contains(&l.start))
            .peekable();
        for (start, pane) in group.panes.range(span.start, span.end) {
            while let Some(l) = live.next_if(|l| l.start < *start) {
                state.merge(&l.state);
            }
            match live.next_if(|l| l.start == *start) {
                Some(l) => state.merge(&l.state),
                None => state.merge(pane),
            }
        }
        for l in live {
            state.merge(&l.state);
        }
        WindowUpdate {
            metric: group.metric,
            window: w,
            span,
            group: group.group.clone(),
            state,
            revision,
            is_final,
            appended_at: group.appended_at,
        }
    }
}

/// The routing hash of interned group `g`, which the index is keyed by:
/// a group is taken out of the index before its slot is freed.
fn hash_of(groups: &[Option<GroupState>], g: usize) -> u64 {
    groups[g].as_ref().expect("an indexed group is live").hash
}

#[cfg(test)]
mod tests {
    //! The state machine on hand-made contributions: one `count` metric by
    //! country, with `tumbling 10s` (window 0) and `sliding 30s every 10s`
    //! (window 1), and 30 s of allowed lateness.

    use super::*;
    use crate::aggregate::AggregateKind;
    use crate::routing::group_hash;
    use crate::window::{pane_width, WindowSpec};

    const LATENESS: Millis = 30_000;
    const INTERVAL: Duration = Duration::from_millis(100);

    fn state() -> WindowState {
        let windows: Vec<_> = ["tumbling 10s", "sliding 30s every 10s"]
            .map(|w| WindowSpec::parse(w).unwrap())
            .to_vec();
        let metric = MetricSpec {
            name: "clicks".into(),
            event_type: None,
            aggregate: AggregateKind::Count,
            field: None,
            dimensions: vec!["country".into()],
            pane: pane_width(&windows),
            windows,
            keep: Vec::new(),
            rollups: Vec::new(),
            projections: Vec::new(),
            rollup_of: None,
            max_groups: crate::config::DEFAULT_MAX_GROUPS,
        };
        WindowState::new(Rc::new(vec![metric]), LATENESS, INTERVAL)
    }

    fn contribution(country: &str, pane_s: i64, count: u64) -> Contribution {
        let state = AggState::from_parts(count, 0.0, None);
        Contribution::new(0, vec![country.to_owned()], pane_s * 1000, state, None)
    }

    /// (country, window, start s, end s, count, revision, final) per update.
    type Row = (String, u8, i64, i64, u64, u32, bool);

    fn rows(updates: &[WindowUpdate]) -> Vec<Row> {
        updates
            .iter()
            .map(|u| {
                (
                    u.group[0].clone(),
                    u.window,
                    u.span.start / 1000,
                    u.span.end / 1000,
                    u.state.count,
                    u.revision,
                    u.is_final,
                )
            })
            .collect()
    }

    fn row(country: &str, window: u8, span: (i64, i64), count: u64, revision: u32) -> Row {
        (
            country.into(),
            window,
            span.0,
            span.1,
            count,
            revision,
            true,
        )
    }

    /// Stages `contributions`, then applies them at `time_s`, as the operator
    /// does once the frontier passes that time.
    fn step(
        state: &mut WindowState,
        time_s: i64,
        contributions: Vec<Contribution>,
    ) -> Vec<WindowUpdate> {
        let now = Instant::now();
        let mut stash = Stash::default();
        for c in contributions {
            state.stage(c, now, &mut stash);
        }
        let mut out = Vec::new();
        state.close_until(time_s * 1000, &mut out);
        state.apply(
            time_s * 1000,
            stash.into_staged(),
            std::iter::empty(),
            &mut out,
        );
        out
    }

    #[test]
    fn what_travels_at_one_time_waits_merged_per_group_and_pane() {
        let mut state = state();
        let (now, mut stash) = (Instant::now(), Stash::default());
        for c in [
            contribution("US", 0, 2),
            contribution("FR", 0, 1),
            contribution("US", 0, 3),
            contribution("US", 10, 1),
        ] {
            state.stage(c, now, &mut stash);
        }
        let staged = stash.into_staged();
        let waiting: Vec<(u64, Millis)> = staged.iter().map(|c| (c.state.count, c.pane)).collect();
        assert_eq!(waiting, [(5, 0), (1, 0), (1, 10_000)]);
        let mut out = Vec::new();
        state.apply(0, staged, std::iter::empty(), &mut out);
        state.close_until(10_000, &mut out);
        assert_eq!(
            rows(&out),
            [
                row("US", 0, (0, 10), 5, 0),
                row("US", 1, (-20, 10), 5, 0),
                row("FR", 0, (0, 10), 1, 0),
                row("FR", 1, (-20, 10), 1, 0)
            ]
        );
        // Each group's staged count went back to nothing: expired, both are freed.
        state.close_until(40_000, &mut out);
        state.expire(70_000);
        assert_eq!(state.groups(), 0);
    }

    #[test]
    fn windows_close_as_final_when_time_passes_their_end() {
        let mut state = state();
        assert!(step(
            &mut state,
            0,
            vec![contribution("US", 0, 2), contribution("US", 10, 1)]
        )
        .is_empty());
        let closed = step(&mut state, 10, vec![]);
        assert_eq!(
            rows(&closed),
            [row("US", 0, (0, 10), 2, 0), row("US", 1, (-20, 10), 2, 0)]
        );
        let mut out = Vec::new();
        state.close_until(20_000, &mut out);
        assert_eq!(
            rows(&out),
            [row("US", 0, (10, 20), 1, 0), row("US", 1, (-10, 20), 3, 0)]
        );
    }

    #[test]
    fn late_data_revises_a_closed_window_and_counts_it() {
        let mut state = state();
        step(&mut state, 0, vec![contribution("US", 0, 2)]);
        step(&mut state, 12, vec![]);
        // Data for pane 0 that travelled at 12 s: both windows over it that
        // have closed are emitted again, one revision up.
        let late = step(&mut state, 12, vec![contribution("US", 0, 1)]);
        assert_eq!(
            rows(&late),
            [row("US", 0, (0, 10), 3, 1), row("US", 1, (-20, 10), 3, 1)]
        );
        // A window that closed empty takes its first data as revision 1.
        let empty = step(&mut state, 25, vec![contribution("FR", 10, 4)]);
        assert!(rows(&empty).contains(&row("FR", 0, (10, 20), 4, 1)));
    }

    #[test]
    fn partials_show_staged_data_and_only_the_next_sliding_window() {
        let mut state = state();
        step(&mut state, 0, vec![contribution("US", 0, 2)]);
        // Staged, not yet applied: the partial includes it.
        let (now, mut waiting) = (Instant::now(), Stash::default());
        state.stage(contribution("US", 0, 5), now, &mut waiting);
        assert!(state.next_partials().is_some_and(|due| due <= now));
        let mut out = Vec::new();
        state.partials(now, [&waiting].into_iter(), &mut out);
        assert_eq!(
            rows(&out),
            [
                ("US".into(), 0, 0, 10, 7, 0, false),
                ("US".into(), 1, -20, 10, 7, 0, false)
            ]
        );
        assert_eq!(state.next_partials(), None);
        out.clear();
        state.partials(now + INTERVAL, [&waiting].into_iter(), &mut out);
        assert!(out.is_empty(), "nothing changed since the last partials");
    }

    #[test]
    fn a_partial_shows_a_pane_with_what_is_staged_for_it_at_every_time() {
        let mut state = state();
        step(&mut state, 0, vec![contribution("US", 0, 2)]);
        let (now, mut first, mut second) = (Instant::now(), Stash::default(), Stash::default());
        state.stage(contribution("US", 0, 3), now, &mut first);
        state.stage(contribution("US", 0, 4), now, &mut second);
        // The counts of the partials of window `w`, and the final of the
        // tumbling window of pane 0.
        let partials = |state: &mut WindowState, at: Instant, w: u8, stashes: &[&Stash]| {
            let mut out = Vec::new();
            state.partials(at, stashes.iter().copied(), &mut out);
            let counts: Vec<u64> = out
                .iter()
                .filter(|u| u.window == w)
                .map(|u| u.state.count)
                .collect();
            (counts, state.update((0, 0, 10_000), 0, true).state.count)
        };
        assert_eq!(
            partials(&mut state, now, 0, &[&first, &second]),
            (vec![9], 2)
        );
        // Staged later, it joins the live pane.
        state.stage(contribution("US", 0, 1), now, &mut second);
        let tick = now + INTERVAL;
        assert_eq!(
            partials(&mut state, tick, 0, &[&first, &second]),
            (vec![10], 2)
        );
        // Part of it applied, the pane is not shown again, but a sliding
        // window over it and a changed pane still counts all of it.
        let mut out = Vec::new();
        state.apply(1_000, first.into_staged(), [&second].into_iter(), &mut out);
        let mut third = Stash::default();
        state.stage(contribution("US", 10, 1), tick, &mut third);
        assert_eq!(
            partials(&mut state, tick + INTERVAL, 1, &[&second, &third]),
            (vec![11], 5)
        );
        state.apply(2_000, second.into_staged(), [&third].into_iter(), &mut out);
        state.apply(3_000, third.into_staged(), std::iter::empty(), &mut out);
        assert_eq!(state.update((0, 0, 10_000), 0, true).state.count, 10);
        assert!(state.group(0).live.is_empty(), "nothing is staged");
    }

    #[test]
    fn a_change_after_a_quiet_tick_goes_at_once_and_a_busy_group_at_the_next() {
        let mut state = state();
        let t0 = Instant::now();
        let (mut out, mut stash) = (Vec::new(), Stash::default());
        state.stage(contribution("US", 0, 1), t0, &mut stash);
        state.partials(t0, [&stash].into_iter(), &mut out);
        assert_eq!(out.len(), 2, "the first change goes at once");
        // US changes again within its interval: it waits for the next tick...
        let later = t0 + INTERVAL / 4;
        state.stage(contribution("US", 0, 1), later, &mut stash);
        let tick = state.next_partials().unwrap();
        assert!(tick > later && tick <= t0 + INTERVAL);
        out.clear();
        state.partials(later, [&stash].into_iter(), &mut out);
        assert!(out.is_empty(), "{:?}", rows(&out));
        // ...and FR, quiet until now, does not wait for it.
        state.stage(contribution("FR", 0, 1), later, &mut stash);
        assert_eq!(state.next_partials(), Some(later));
        state.partials(later, [&stash].into_iter(), &mut out);
        let shown: Vec<String> = out.iter().map(|u| u.group[0].clone()).collect();
        assert_eq!(shown, ["FR", "FR"]);
        assert_eq!(state.next_partials(), Some(tick));
        out.clear();
        state.partials(tick, [&stash].into_iter(), &mut out);
        assert_eq!(
            rows(&out),
            [
                ("US".into(), 0, 0, 10, 2, 0, false),
                ("US".into(), 1, -20, 10, 2, 0, false)
            ]
        );
        assert_eq!(state.next_partials(), None);
    }

    #[test]
    fn expired_state_is_dropped_and_its_groups_freed() {
        let mut state = state();
        let many: Vec<_> = (0..1000)
            .map(|i| contribution(&format!("c{i}"), 0, 1))
            .collect();
        step(&mut state, 0, many);
        assert_eq!(state.groups(), 1000);
        let mut out = Vec::new();
        state.close_until(40_000, &mut out);
        // Closed windows are kept for the lateness after their end; the
        // widest ends at 30 s, so everything is kept until 60 s.
        state.expire(59_999);
        assert_eq!(state.groups(), 1000);
        assert!(!state.snapshot(59_999).is_empty());
        state.expire(60_000);
        assert_eq!(state.groups(), 0, "every group had nothing left");
        assert!(state.snapshot(60_000).is_empty());
        // And the burst's capacity is given back.
        assert!(state.groups.capacity() < 64, "{}", state.groups.capacity());
        assert!(state.closed.capacity() < 64, "{}", state.closed.capacity());
        // Freed slots are reused, and a returning group starts afresh.
        step(&mut state, 60, vec![contribution("c7", 60, 1)]);
        assert_eq!(state.groups(), 1);
        assert!(state.groups.len() <= 1000);
        out.clear();
        state.close_until(70_000, &mut out);
        assert!(rows(&out).contains(&row("c7", 0, (60, 70), 1, 0)));
    }

    #[test]
    fn a_group_with_staged_data_is_not_freed() {
        let mut state = state();
        step(&mut state, 0, vec![contribution("US", 0, 1)]);
        let mut out = Vec::new();
        state.close_until(40_000, &mut out);
        // A contribution arrives for a pane that expires with the others,
        // but waits in the stash while the frontier moves on.
        let mut waiting = Stash::default();
        state.stage(contribution("US", 60, 1), Instant::now(), &mut waiting);
        state.expire(60_000);
        assert_eq!(state.groups(), 1);
        state.apply(60_000, waiting.into_staged(), std::iter::empty(), &mut out);
        out.clear();
        state.close_until(70_000, &mut out);
        assert!(rows(&out).contains(&row("US", 0, (60, 70), 1, 0)));
    }

    #[test]
    fn a_time_rollup_takes_its_tables_contributions_and_their_late_data() {
        let metric = state().metrics[0].clone();
        let minute = MetricSpec {
            windows: vec![WindowSpec::parse("tumbling 1m").unwrap()],
            pane: 60_000,
            rollup_of: Some(0),
            ..metric.clone()
        };
        let mut state = WindowState::new(Rc::new(vec![metric, minute]), LATENESS, INTERVAL);
        let of_minute = |updates: &[WindowUpdate]| -> Vec<Row> {
            let minute: Vec<WindowUpdate> =
                updates.iter().filter(|u| u.metric == 1).cloned().collect();
            rows(&minute)
        };
        let first = step(
            &mut state,
            0,
            vec![contribution("US", 0, 2), contribution("US", 50, 1)],
        );
        assert!(first.is_empty());
        assert_eq!(of_minute(&step(&mut state, 30, vec![])), []);
        let closed = step(&mut state, 60, vec![]);
        assert_eq!(of_minute(&closed), [row("US", 0, (0, 60), 3, 0)]);
        // Late data for a pane of that minute revises it with its table.
        let late = step(&mut state, 70, vec![contribution("US", 20, 4)]);
        assert_eq!(of_minute(&late), [row("US", 0, (0, 60), 7, 1)]);
        // The rollup's group is routed with its table's.
        let hashes: Vec<u64> = state.snapshot(70_000).iter().map(|g| g.hash).collect();
        assert_eq!(hashes, [group_hash(0, &["US".into()]); 2]);
    }

    #[test]
    fn a_restored_snapshot_goes_on_as_the_original() {
        let script = |state: &mut WindowState| -> Vec<Row> {
            let mut all = Vec::new();
            all.extend(rows(&step(state, 15, vec![contribution("US", 10, 1)])));
            all.extend(rows(&step(
                state,
                25,
                vec![contribution("US", 0, 1), contribution("FR", 20, 2)],
            )));
            let mut out = Vec::new();
            state.close_until(50_000, &mut out);
            state.expire(50_000);
            all.extend(rows(&out));
            all
        };
        let mut original = state();
        step(
            &mut original,
            0,
            vec![contribution("US", 0, 2), contribution("US", 10, 1)],
        );
        step(&mut original, 12, vec![]);
        let snapshot = original.snapshot(12_000);
        let mut restored = state();
        restored.restore(snapshot, 12_000);
        assert_eq!(script(&mut restored), script(&mut original));
        assert_eq!(restored.groups(), original.groups());
        assert_eq!(
            format!("{:?}", restored.snapshot(50_000)),
            format!("{:?}", original.snapshot(50_000))
        );
    }

    #[test]
    fn a_snapshot_keeps_what_it_held_while_the_state_goes_on() {
        let mut state = state();
        step(&mut state, 0, vec![contribution("US", 0, 2)]);
        let snapshot = state.snapshot(5_000);
        // More data for the pane the snapshot shares: the state changes a
        // copy of its own, and the snapshot still holds 2.
        step(&mut state, 5, vec![contribution("US", 0, 3)]);
        let closed = step(&mut state, 10, vec![]);
        assert_eq!(
            rows(&closed),
            [row("US", 0, (0, 10), 5, 0), row("US", 1, (-20, 10), 5, 0)]
        );
        let counts: Vec<(Millis, u64)> = snapshot[0]
            .panes
            .iter()
            .map(|(start, pane)| (*start, pane.count))
            .collect();
        assert_eq!(counts, [(0, 2)]);
    }
}
