//! The `cap` operator: between the source and the windows, it keeps each
//! table within its `max_groups` (see [`crate::cap`]).
//!
//! Contributions arrive exchanged by shard. Those of held groups, and of
//! new groups while their shard has room, leave at once, unchanged, for the
//! window operator of the same worker, so live views lose nothing by it;
//! the others wait for their time to be decided. When the frontier passes
//! a time, the operator decides it, in time order, and sends on what it
//! admitted that waited, and the overflow groups' data, exchanged to their
//! owners, at that time. The groups that overflowed after they were sent
//! on go, by time, to the window operator of its worker, which applies
//! that time only after this operator has let it go.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use crate::cap::{CapState, Overflowed, Waiting};
use crate::checkpoint::GroupSnapshot;
use crate::config::MetricSpec;
use crate::model::Contribution;
use crate::routing;
use crate::stats::JobStats;
use crate::time::Millis;

/// Extension trait for the `cap` operator.
pub trait Cap<'scope> {
    /// Caps the groups of `tables`, whose closed windows are kept for
    /// `lateness`, starting from the groups the window state `restored`.
    /// The groups that overflowed at each time go to `overflowed`.
    fn cap(
        self,
        tables: Rc<Vec<MetricSpec>>,
        lateness: Millis,
        restored: &[GroupSnapshot],
        stats: Arc<JobStats>,
        overflowed: Rc<RefCell<Overflowed>>,
    ) -> Stream<'scope, u64, Vec<Contribution>>;
}

impl<'scope> Cap<'scope> for Stream<'scope, u64, Vec<Contribution>> {
    fn cap(
        self,
        tables: Rc<Vec<MetricSpec>>,
        lateness: Millis,
        restored: &[GroupSnapshot],
        stats: Arc<JobStats>,
        overflowed: Rc<RefCell<Overflowed>>,
    ) -> Stream<'scope, u64, Vec<Contribution>> {
        let mut state = CapState::new(&tables, lateness);
        state.restore(restored);
        let worker = self.scope().index();
        self.unary_frontier(routing::exchange(), "Cap", move |_, _| {
            let mut pending: BTreeMap<u64, (Capability<u64>, Waiting)> = BTreeMap::new();
            let mut published = false;
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    let (_, waiting) = pending
                        .entry(time)
                        .or_insert_with(|| (cap.delayed(&time, 0), Waiting::default()));
                    let mut send = Vec::with_capacity(data.as_slice().iter().map(Vec::len).sum());
                    for container in data {
                        for c in container.drain(..) {
                            state.arrive(c, time as Millis, waiting, &mut send);
                        }
                    }
                    if !send.is_empty() {
                        output.session(&cap).give_container(&mut send);
                    }
                });
                let frontier = frontier.frontier().iter().next().copied();
                let ready: Vec<u64> = pending
                    .keys()
                    .copied()
                    .take_while(|t| frontier.is_none_or(|f| *t < f))
                    .collect();
                let decided = !ready.is_empty();
                for time in ready {
                    let (cap, waiting) = pending.remove(&time).expect("a ready time");
                    let mut turned_away = Default::default();
                    let mut send = state.decide(time as Millis, waiting, &mut turned_away);
                    if !turned_away.is_empty() {
                        overflowed.borrow_mut().insert(time, turned_away);
                    }
                    if !send.is_empty() {
                        output.session(&cap).give_container(&mut send);
                    }
                }
                let released = frontier.is_some_and(|f| state.expire(f as Millis));
                if decided || released || !published {
                    stats.set_groups(worker, &tables, |table| state.held(table));
                    stats.add_overflowed(&tables, &state.take_overflowed());
                    published = true;
                }
            }
        })
    }
}
