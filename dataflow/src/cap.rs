//! The cardinality cap: which groups each table holds, and which events
//! count in its overflow group instead.
//!
//! A dimension with ever-new values (a request id sent as a campaign, say)
//! would grow the window state until the worker runs out of memory. So each
//! metric has `max_groups`, and each of its tables ([`crate::rollup`]) holds
//! at most about that many groups. The contributions of a group the table
//! does not hold, once it is full, go to the table's overflow group, whose
//! every dimension value is [`OVERFLOW`]: totals stay right, and memory
//! stays bounded.
//!
//! A group is held from the first contribution admitted for it until the
//! state of every window it has, its time rollups' included, has expired:
//! for a contribution to pane `p`, until `p + widest window + allowed
//! lateness`, the latest of the table's and its time rollups'. That is when
//! the window state forgets the group (see [`crate::state`]), so a held
//! group is one the window state keeps, and a table's time rollups hold no
//! group it does not.
//!
//! Which contributions overflow is a function of the log, whatever the
//! number of workers. The cap is kept per shard ([`crate::routing::SHARDS`]),
//! which one worker owns whole, and decided time by time in the order of
//! timely's timestamps, as the window state applies them: at time `t`, the
//! groups whose hold ended at or before `t` are let go, then the groups new
//! at `t` are admitted in the order of (table, hash, values) while their
//! shard has room. A shard's room is [`share`] of `max_groups`: groups do
//! not spread exactly evenly over the shards, so a share is a little more
//! than an even split, and a table starts to overflow at about `max_groups`
//! groups and never holds more than `SHARDS × share(max_groups)`.
//!
//! A contribution of a held group goes on to the window state as it
//! arrives. So do those of a new group whose first contribution at a time
//! found its shard with room for every new group waiting to be decided:
//! live views show a new group at once. Should such a group overflow after
//! all (another group, decided first, took the room), the state drops its
//! contributions when it applies their time ([`Overflowed`]), and the cap,
//! which kept their sum per pane, counts it in the overflow group. Once a
//! shard is full, the contributions of new groups wait for their time to
//! be decided, summed per pane, and go on only if it admits them: a flood
//! of new groups reaches neither the window state nor the live views.

use std::collections::{BTreeMap, BTreeSet};

use hashbrown::HashTable;
use rustc_hash::FxHashSet as HashSet;

use crate::aggregate::AggState;
use crate::checkpoint::GroupSnapshot;
use crate::config::MetricSpec;
use crate::model::{Contribution, Group};
use crate::rollup::{made, routes, Made};
use crate::routing::{shard, SHARDS};
use crate::time::Millis;
use crate::window::align;

/// The dimension value of a table's overflow group, in every dimension.
pub const OVERFLOW: &str = "__overflow__";

/// The overflow group of a table with `dimensions` dimensions.
pub fn overflow_group(dimensions: usize) -> Group {
    vec![OVERFLOW.to_owned(); dimensions].into()
}

/// Whether `group` is an overflow group. It is never capped: an event whose
/// dimensions all say [`OVERFLOW`] counts in it.
pub fn is_overflow(group: &Group) -> bool {
    !group.is_empty() && group.iter().all(|v| v == OVERFLOW)
}

/// The groups one shard of a table with `max_groups` may hold: an even
/// split, plus three standard deviations of how many groups a shard gets
/// when `max_groups` groups spread over the shards by hash.
pub fn share(max_groups: usize) -> usize {
    let even = max_groups as f64 / SHARDS as f64;
    ((even + 3.0 * even.sqrt()).ceil() as usize).max(1)
}

/// The groups, by (table, routing hash, values), that the cap sent to the
/// overflow group at each time. The window state drops their contributions
/// when it applies that time.
pub type Overflowed = BTreeMap<u64, HashSet<(u16, u64, Group)>>;

/// The contributions of new groups that travel at one time, waiting for
/// it to be decided: per group, what each pane of it adds up to. A group
/// waits once per time, however many contributions it has, so a burst
/// waits in the memory of its groups, not of its contributions.
#[derive(Default)]
pub struct Waiting {
    groups: Vec<NewGroup>,
    /// Indices into `groups`, by routing hash.
    index: HashTable<usize>,
}

/// A group not held when its first contribution at a time arrived.
struct NewGroup {
    table: u16,
    hash: u64,
    group: Group,
    /// The end of the hold its contributions ask for.
    until: Millis,
    /// Whether its contributions went on as they arrived. Should the time
    /// not admit it, the window state drops them, and `panes` goes to the
    /// overflow group instead.
    sent: bool,
    /// (pane, state, appended at) of its contributions, one per pane.
    panes: Vec<(Millis, AggState, Option<Millis>)>,
}

impl NewGroup {
    fn add(&mut self, pane: Millis, state: AggState, appended_at: Option<Millis>) {
        match self.panes.iter_mut().find(|(p, ..)| *p == pane) {
            Some((_, mine, at)) => {
                mine.merge(&state);
                *at = (*at).max(appended_at);
            }
            None => self.panes.push((pane, state, appended_at)),
        }
    }
}

struct Held {
    table: u16,
    group: Group,
    hash: u64,
    until: Millis,
}

/// The cap of one worker's shards.
pub struct CapState {
    /// Per table: (pane width, widest window) of it and of its time rollups,
    /// which decide how long a contribution holds its group.
    spans: Vec<Vec<(Millis, Millis)>>,
    /// Per table: the table whose groups it counts with, itself or for a
    /// time rollup the table it is made from.
    routes: Vec<u16>,
    lateness: Millis,
    /// Per table: the dimensions, and the groups a shard may hold.
    dimensions: Vec<usize>,
    shares: Vec<usize>,
    /// Per table and shard: the groups held, and the new groups waiting
    /// for their time to be decided (once per time they wait at).
    counts: Vec<Vec<usize>>,
    waiting: Vec<Vec<usize>>,
    /// Held groups, as indices into `slots`, by routing hash.
    index: HashTable<usize>,
    slots: Vec<Option<Held>>,
    free: Vec<usize>,
    /// Held groups by the end of their hold.
    by_until: BTreeSet<(Millis, usize)>,
    /// Per table: events sent to the overflow group since the last
    /// [`Self::take_overflowed`].
    overflowed: Vec<u64>,
}

impl CapState {
    /// An empty cap for `tables` (as [`crate::rollup::expand`] lists them),
    /// whose closed windows are kept for `lateness`.
    pub fn new(tables: &[MetricSpec], lateness: Millis) -> CapState {
        let mut spans: Vec<Vec<(Millis, Millis)>> =
            tables.iter().map(|t| vec![(t.pane, t.widest())]).collect();
        for (table, made) in made(tables).into_iter().enumerate() {
            if let Made::Table(from) = made {
                let t = &tables[table];
                spans[from as usize].push((t.pane, t.widest()));
            }
        }
        CapState {
            spans,
            routes: routes(tables),
            lateness,
            dimensions: tables.iter().map(|t| t.dimensions.len()).collect(),
            shares: tables.iter().map(|t| share(t.max_groups)).collect(),
            counts: vec![vec![0; SHARDS]; tables.len()],
            waiting: vec![vec![0; SHARDS]; tables.len()],
            index: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            by_until: BTreeSet::new(),
            overflowed: vec![0; tables.len()],
        }
    }

    /// Until when a contribution to pane `pane` of `table` holds its group.
    fn until(&self, table: u16, pane: Millis) -> Millis {
        self.spans[table as usize]
            .iter()
            .map(|&(width, widest)| align(pane, width) + widest + self.lateness)
            .max()
            .unwrap_or(pane)
    }

    fn find(&self, table: u16, hash: u64, group: &Group) -> Option<usize> {
        self.index
            .find(hash, |&slot| {
                self.slots[slot]
                    .as_ref()
                    .is_some_and(|h| h.table == table && h.group == *group)
            })
            .copied()
    }

    /// Takes contribution `c`, which travels at `time`: pushes it to `send`
    /// if it goes on now, and otherwise, or also when its group is new,
    /// adds it to what waits for `time` to be decided.
    pub fn arrive(
        &mut self,
        mut c: Contribution,
        time: Millis,
        waiting: &mut Waiting,
        send: &mut Vec<Contribution>,
    ) {
        if is_overflow(&c.group) {
            send.push(c);
            return;
        }
        let until = self.until(c.metric, c.pane);
        // A hold that outlasts `time` is lengthened at once: no time still
        // to be decided before `time` could have let it go, and those after
        // it see the same hold either way.
        let held = self
            .find(c.metric, c.hash, &c.group)
            .filter(|&slot| self.slots[slot].as_ref().is_some_and(|h| h.until > time));
        if let Some(slot) = held {
            self.hold(slot, until);
            send.push(c);
            return;
        }
        let groups = &waiting.groups;
        let found = waiting.index.find(c.hash, |&g| {
            let g = &groups[g];
            g.table == c.metric && g.group == c.group
        });
        let g = match found {
            Some(&g) => g,
            None => {
                // A new group goes on at once, for the whole time, if its
                // first contribution finds room.
                let (table, s) = (c.metric as usize, shard(c.hash));
                let room = self.counts[table][s] + self.waiting[table][s] < self.shares[table];
                self.waiting[table][s] += 1;
                let group = if room {
                    c.group.clone()
                } else {
                    std::mem::take(&mut c.group)
                };
                let g = waiting.groups.len();
                waiting.groups.push(NewGroup {
                    table: c.metric,
                    hash: c.hash,
                    group,
                    until,
                    sent: room,
                    panes: Vec::new(),
                });
                let groups = &waiting.groups;
                waiting.index.insert_unique(c.hash, g, |&g| groups[g].hash);
                g
            }
        };
        let group = &mut waiting.groups[g];
        group.until = group.until.max(until);
        if group.sent {
            group.add(c.pane, c.state.clone(), c.appended_at);
            send.push(c);
        } else {
            group.add(c.pane, c.state, c.appended_at);
        }
    }

    /// Decides `time`, the next time the frontier has passed, with the
    /// new groups `waiting` at it: lets the holds that ended go, then
    /// admits new groups in order while their shard has room. Returns what
    /// goes on now: the admitted groups' contributions that waited, and the
    /// overflow groups' contributions, one per (table, pane). Adds the
    /// groups that overflowed after their contributions were sent on to
    /// `overflowed`.
    pub fn decide(
        &mut self,
        time: Millis,
        waiting: Waiting,
        overflowed: &mut HashSet<(u16, u64, Group)>,
    ) -> Vec<Contribution> {
        self.expire(time);
        let mut new = waiting.groups;
        new.sort_unstable_by(|a, b| (a.table, a.hash, &a.group).cmp(&(b.table, b.hash, &b.group)));
        let mut send = Vec::new();
        let mut overflow: BTreeMap<(u16, Millis), (AggState, Option<Millis>)> = BTreeMap::new();
        for g in new {
            let (table, s) = (g.table as usize, shard(g.hash));
            self.waiting[table][s] -= 1;
            let admitted = match self.find(g.table, g.hash, &g.group) {
                Some(slot) => {
                    self.hold(slot, g.until);
                    true
                }
                None if self.counts[table][s] < self.shares[table] => {
                    self.admit(g.table, g.group.clone(), g.hash, g.until);
                    true
                }
                None => false,
            };
            match (admitted, g.sent) {
                (true, true) => {}
                (true, false) => {
                    send.extend(g.panes.into_iter().map(|(pane, state, appended_at)| {
                        Contribution {
                            metric: g.table,
                            group: g.group.clone(),
                            hash: g.hash,
                            pane,
                            state,
                            appended_at,
                        }
                    }))
                }
                (false, sent) => {
                    for (pane, state, at) in g.panes {
                        self.overflowed[table] += state.count;
                        let (mine, appended_at) = overflow.entry((g.table, pane)).or_default();
                        mine.merge(&state);
                        *appended_at = (*appended_at).max(at);
                    }
                    if sent {
                        overflowed.insert((g.table, g.hash, g.group));
                    }
                }
            }
        }
        send.extend(
            overflow
                .into_iter()
                .map(|((table, pane), (state, appended_at))| {
                    let group = overflow_group(self.dimensions[table as usize]);
                    Contribution::new(table, group, pane, state, appended_at)
                }),
        );
        send
    }

    fn hold(&mut self, slot: usize, until: Millis) {
        let held = self.slots[slot].as_mut().expect("a held slot");
        if until > held.until {
            self.by_until.remove(&(held.until, slot));
            held.until = until;
            self.by_until.insert((until, slot));
        }
    }

    fn admit(&mut self, table: u16, group: Group, hash: u64, until: Millis) {
        self.counts[table as usize][shard(hash)] += 1;
        let held = Held {
            table,
            group,
            hash,
            until,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(held);
                slot
            }
            None => {
                self.slots.push(Some(held));
                self.slots.len() - 1
            }
        };
        let slots = &self.slots;
        self.index.insert_unique(hash, slot, |&s| hash_of(slots, s));
        self.by_until.insert((until, slot));
    }

    /// Lets go of the groups whose hold ended at or before `frontier`, and
    /// says whether there were any.
    pub fn expire(&mut self, frontier: Millis) -> bool {
        let mut released = false;
        while let Some(&(until, slot)) = self.by_until.first() {
            if until > frontier {
                break;
            }
            self.by_until.pop_first();
            let held = self.slots[slot].take().expect("a held slot");
            self.counts[held.table as usize][shard(held.hash)] -= 1;
            if let Ok(entry) = self.index.find_entry(held.hash, |&s| s == slot) {
                entry.remove();
            }
            self.free.push(slot);
            released = true;
        }
        let sparse = self.slots.len() > 64 && self.by_until.len() * 4 < self.slots.len();
        if released && sparse && matches!(self.slots.last(), Some(None)) {
            // A burst of groups has gone: give back its capacity.
            while matches!(self.slots.last(), Some(None)) {
                self.slots.pop();
            }
            let len = self.slots.len();
            self.free.retain(|&s| s < len);
            self.slots.shrink_to_fit();
            self.free.shrink_to_fit();
            let slots = &self.slots;
            self.index.shrink_to_fit(|&s| hash_of(slots, s));
        }
        released
    }

    /// Holds the groups of a restored checkpoint's window state: each for
    /// as long as its panes would have held it. They are held even past a
    /// share that a lowered `max_groups` made smaller, until their holds
    /// end; until then no new group is admitted in their shard.
    pub fn restore(&mut self, groups: &[GroupSnapshot]) {
        for g in groups {
            if is_overflow(&g.group) {
                continue;
            }
            // A time rollup's pane holds as long as its own windows need
            // it: a rollup has no rollups of its own.
            let until = g
                .panes
                .iter()
                .map(|&(pane, _)| self.until(g.metric, pane))
                .max();
            let Some(until) = until else { continue };
            let table = self.routes[g.metric as usize];
            match self.find(table, g.hash, &g.group) {
                Some(slot) => self.hold(slot, until),
                None => self.admit(table, g.group.clone(), g.hash, until),
            }
        }
    }

    /// The groups `table` holds in this worker's shards.
    pub fn held(&self, table: usize) -> usize {
        self.counts[table].iter().sum()
    }

    /// Per table, the events sent to its overflow group since the last
    /// call.
    pub fn take_overflowed(&mut self) -> Vec<u64> {
        let zero = vec![0; self.overflowed.len()];
        std::mem::replace(&mut self.overflowed, zero)
    }
}

/// The routing hash of the group held in `slot`, which the index is keyed
/// by: a slot is taken out of the index when its hold ends.
fn hash_of(slots: &[Option<Held>], slot: usize) -> u64 {
    slots[slot].as_ref().expect("an indexed slot is held").hash
}

#[cfg(test)]
mod tests {
    //! The cap of one `count` metric by campaign, with `tumbling 10s` and
    //! 30 s of allowed lateness: a contribution to pane `p` holds its group
    //! until `p + 40 s`.

    use std::sync::Arc;

    use super::*;
    use crate::aggregate::AggregateKind;
    use crate::routing::group_hash;
    use crate::window::WindowSpec;

    const LATENESS: Millis = 30_000;

    fn tables(max_groups: usize) -> Vec<MetricSpec> {
        vec![MetricSpec {
            name: "clicks".into(),
            event_type: None,
            aggregate: AggregateKind::Count,
            field: None,
            dimensions: vec!["campaignId".into()],
            windows: vec![WindowSpec::parse("tumbling 10s").unwrap()],
            keep: Vec::new(),
            rollups: Vec::new(),
            projections: Vec::new(),
            rollup_of: None,
            pane: 10_000,
            max_groups,
        }]
    }

    fn contribution(campaign: &str, pane_s: i64, count: u64) -> Contribution {
        let state = AggState::from_parts(count, 0.0, None);
        Contribution::new(0, vec![campaign.to_owned()], pane_s * 1000, state, None)
    }

    /// Campaigns `prefix0`, `prefix1`, … whose groups fall in shard `s`.
    fn in_shard(s: usize, prefix: &str, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .filter(|c| shard(group_hash(0, std::slice::from_ref(c))) == s)
            .take(n)
            .collect()
    }

    /// Decides `time_s` with `contributions`: the groups that overflowed,
    /// and the overflow group's (pane s, count) contributions.
    fn decide(
        cap: &mut CapState,
        time_s: i64,
        contributions: &[Contribution],
    ) -> (BTreeSet<String>, Vec<(i64, u64)>) {
        let (mut waiting, mut sent) = (Waiting::default(), Vec::new());
        for c in contributions {
            cap.arrive(c.clone(), time_s * 1000, &mut waiting, &mut sent);
        }
        decided(cap, time_s, contributions, waiting, sent)
    }

    /// Decides `time_s` with the `waiting` of `contributions`, where `sent`
    /// went on as they arrived: the groups that overflowed, and the
    /// overflow group's (pane s, count) contributions.
    fn decided(
        cap: &mut CapState,
        time_s: i64,
        contributions: &[Contribution],
        waiting: Waiting,
        sent: Vec<Contribution>,
    ) -> (BTreeSet<String>, Vec<(i64, u64)>) {
        let mut turned_away = HashSet::default();
        let send = cap.decide(time_s * 1000, waiting, &mut turned_away);
        let (overflow, admitted): (Vec<_>, Vec<_>) =
            send.into_iter().partition(|c| is_overflow(&c.group));
        let turned_away: BTreeSet<&str> =
            turned_away.iter().map(|(_, _, g)| g[0].as_str()).collect();
        // A group went on if it was sent and not turned away after, or was
        // admitted when its time was decided.
        let went_on: BTreeSet<&str> = sent
            .iter()
            .map(|c| c.group[0].as_str())
            .filter(|g| !turned_away.contains(g))
            .chain(admitted.iter().map(|c| c.group[0].as_str()))
            .collect();
        (
            contributions
                .iter()
                .map(|c| c.group[0].as_str())
                .filter(|g| !went_on.contains(g))
                .map(str::to_owned)
                .collect(),
            overflow
                .iter()
                .map(|c| (c.pane / 1000, c.state.count))
                .collect(),
        )
    }

    #[test]
    fn a_share_is_an_even_split_with_room_for_uneven_hashes() {
        assert_eq!(share(100_000), 866);
        assert_eq!(SHARDS * share(100_000), 110_848);
        assert_eq!(share(1), 1);
        assert!(share(1_000) * SHARDS < 2_200);
    }

    #[test]
    fn a_full_shard_sends_new_groups_to_the_overflow_group_in_key_order() {
        let mut cap = CapState::new(&tables(1), LATENESS);
        let names = in_shard(5, "camp_", 4);
        let batch: Vec<Contribution> = names.iter().map(|c| contribution(c, 0, 2)).collect();
        let (overflowed, overflow) = decide(&mut cap, 0, &batch);
        // One group fits the shard: the least by hash, then by value.
        let first = batch
            .iter()
            .min_by(|a, b| (a.hash, &a.group).cmp(&(b.hash, &b.group)))
            .unwrap();
        let expected: BTreeSet<String> = names
            .iter()
            .filter(|c| **c != first.group[0])
            .cloned()
            .collect();
        assert_eq!(overflowed, expected);
        // Their events are all counted, in the overflow group.
        assert_eq!(overflow, [(0, 6)]);
        assert_eq!(cap.held(0), 1);
        assert_eq!(cap.take_overflowed(), [6]);
        // A held group goes on being admitted; other shards have room.
        let other = in_shard(6, "camp_", 1);
        let (overflowed, _) = decide(
            &mut cap,
            1,
            &[
                contribution(&first.group[0], 0, 1),
                contribution(&other[0], 0, 1),
            ],
        );
        assert!(overflowed.is_empty());
        assert_eq!(cap.held(0), 2);
    }

    #[test]
    fn decisions_do_not_depend_on_arrival_order_or_on_when_times_are_decided() {
        // Three times, each with new groups in two shards of one group each.
        let names: Vec<String> = [in_shard(1, "a", 6), in_shard(2, "b", 6)].concat();
        let times: Vec<(i64, Vec<Contribution>)> = (0..3)
            .map(|t| {
                let batch = names
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % 3 == t as usize || i % 4 == 0)
                    .map(|(_, c)| contribution(c, t * 10, 1))
                    .collect();
                (t * 20, batch)
            })
            .collect();
        // In order, each time decided as soon as it arrives.
        let mut one = CapState::new(&tables(1), LATENESS);
        let a: Vec<_> = times
            .iter()
            .map(|(t, batch)| decide(&mut one, *t, batch))
            .collect();
        // Every contribution arrives before any time is decided, each batch
        // reversed, and the later times first.
        let mut two = CapState::new(&tables(1), LATENESS);
        let mut arrived: Vec<(Waiting, Vec<Contribution>)> =
            times.iter().map(|_| Default::default()).collect();
        for (i, (t, batch)) in times.iter().enumerate().rev() {
            let (waiting, sent) = &mut arrived[i];
            for c in batch.iter().rev() {
                two.arrive(c.clone(), t * 1000, waiting, sent);
            }
        }
        let b: Vec<_> = times
            .iter()
            .zip(arrived)
            .map(|((t, batch), (waiting, sent))| decided(&mut two, *t, batch, waiting, sent))
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|(overflowed, _)| !overflowed.is_empty()));
    }

    #[test]
    fn a_group_sent_on_at_once_and_turned_away_after_counts_every_contribution_in_the_overflow_group(
    ) {
        let mut cap = CapState::new(&tables(1), LATENESS);
        let mut names = in_shard(4, "s", 2);
        names.sort_by_key(|c| group_hash(0, std::slice::from_ref(c)));
        let [first, second] = <[String; 2]>::try_from(names).unwrap();
        // The group that sorts second arrives first, finds room and goes
        // on: three contributions over two panes. The other waits.
        let batch = [
            contribution(&second, 0, 2),
            contribution(&second, 0, 3),
            contribution(&second, 10, 4),
            contribution(&first, 0, 1),
        ];
        let (mut waiting, mut sent) = (Waiting::default(), Vec::new());
        for c in &batch {
            cap.arrive(c.clone(), 0, &mut waiting, &mut sent);
        }
        assert_eq!(sent.len(), 3);
        assert_eq!(
            waiting.groups.len(),
            2,
            "a group waits once however many contributions it has"
        );
        let (overflowed, overflow) = decided(&mut cap, 0, &batch, waiting, sent);
        assert_eq!(overflowed, BTreeSet::from([second]));
        assert_eq!(overflow, [(0, 5), (10, 4)]);
        assert_eq!(cap.take_overflowed(), [9]);
        assert_eq!(cap.held(0), 1);
    }

    #[test]
    fn a_group_is_held_until_its_windows_state_expires() {
        let mut cap = CapState::new(&tables(1), LATENESS);
        let [first, second] = <[String; 2]>::try_from(in_shard(9, "c", 2)).unwrap();
        assert!(decide(&mut cap, 0, &[contribution(&first, 0, 1)])
            .0
            .is_empty());
        // The window [0, 10 s) is kept until 40 s: until then the shard is full.
        let (overflowed, _) = decide(&mut cap, 39, &[contribution(&second, 30, 1)]);
        assert_eq!(overflowed, BTreeSet::from([second.clone()]));
        let (overflowed, _) = decide(&mut cap, 40, &[contribution(&second, 40, 1)]);
        assert!(overflowed.is_empty());
        assert_eq!(cap.held(0), 1);
        // The overflow group itself is never capped, nor held.
        let (mut waiting, mut sent) = (Waiting::default(), Vec::new());
        cap.arrive(
            contribution(OVERFLOW, 40, 1),
            40_000,
            &mut waiting,
            &mut sent,
        );
        assert_eq!(sent.len(), 1);
        assert!(waiting.groups.is_empty());
    }

    #[test]
    fn a_restored_cap_holds_the_groups_of_the_restored_state() {
        let tables = tables(1);
        let [first, second] = <[String; 2]>::try_from(in_shard(3, "r", 2)).unwrap();
        let kept = contribution(&first, 20, 1);
        let snapshot = GroupSnapshot {
            metric: 0,
            group: kept.group.clone(),
            hash: kept.hash,
            panes: vec![(20_000, Arc::new(AggState::from_parts(1, 0.0, None)))],
            open: vec![(0, 30_000)],
            closed: Vec::new(),
        };
        let mut cap = CapState::new(&tables, LATENESS);
        cap.restore(&[snapshot]);
        assert_eq!(cap.held(0), 1);
        let (overflowed, _) = decide(&mut cap, 25, &[contribution(&second, 20, 1)]);
        assert_eq!(overflowed, BTreeSet::from([second.clone()]));
        // Held until 20 s + 40 s.
        let (overflowed, _) = decide(&mut cap, 60, &[contribution(&second, 60, 1)]);
        assert!(overflowed.is_empty());
    }
}
