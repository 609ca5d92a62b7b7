//! The `windows` operator: panes in, window results out.
//!
//! Contributions arrive exchanged by (metric, group), at the time the
//! source sent them (their partition's watermark, rounded down to the
//! job's tick). They are stashed by that time, merged per (group, pane) as
//! they come, and applied in time order once the input frontier has passed
//! it, in the manner of timely's `wordcount` example. Processing time by time is what
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
//! Between those points, changed windows are emitted as partials
//! (`is_final: false`), coalesced per group on ticks one `live_interval` of
//! processing time apart: a group's first change since the last tick at
//! once, later ones at the next tick (see [`crate::state`]); of the sliding
//! windows over a pane, only the one closing next. Partials also count data
//! still waiting for the frontier, so a live view is as fresh as the data
//! that has arrived. They are for live views only and are not stored.
//!
//! The state and its rules are [`crate::state`]; this operator moves data
//! and capabilities around it. Before it applies a time, it lets the state
//! expire what that time has passed, and drops the contributions the cap
//! ([`crate::cap`]) sent to an overflow group at that time: the cap decides
//! a time before this operator's frontier can pass it.
//!
//! The operator also takes checkpoints (see [`crate::checkpoint`]): when it
//! is about to apply the first data at or past a chosen boundary, its state
//! holds exactly the data stamped before the boundary, and it hands a
//! snapshot of it (see [`WindowState::snapshot`]) to the checkpoint sink
//! with the source's offsets at that boundary. On start,
//! it takes back the state a restored checkpoint gave it.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use crate::cap::Overflowed;
use crate::checkpoint::{GroupSnapshot, Progress, Schedule, WorkerPart};
use crate::config::MetricSpec;
use crate::model::{Contribution, WindowUpdate};
use crate::ports::{Backpressure, CheckpointSink};
use crate::routing;
use crate::state::{Stash, WindowState};
use crate::stats::JobStats;
use crate::time::Millis;

/// The finals one activation emits at most; the rest wait in the state
/// for the next, which comes at once.
const FINALS_PER_ACTIVATION: usize = 65_536;
/// How soon an operator whose finals wait for a sink looks again.
const STALLED_RETRY: Duration = Duration::from_millis(10);

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
    /// Aggregates contributions into the windows of `metrics`, less those
    /// the cap of the same worker says `overflowed`. While a sink of the
    /// process is behind (`backpressure`), finals wait in the state.
    fn windows(
        self,
        metrics: Rc<Vec<MetricSpec>>,
        settings: WindowSettings,
        stats: Arc<JobStats>,
        checkpointing: Checkpointing,
        overflowed: Rc<RefCell<Overflowed>>,
        backpressure: Backpressure,
    ) -> Stream<'scope, u64, Vec<Arc<WindowUpdate>>>;
}

impl<'scope> Windows<'scope> for Stream<'scope, u64, Vec<Contribution>> {
    fn windows(
        self,
        metrics: Rc<Vec<MetricSpec>>,
        settings: WindowSettings,
        stats: Arc<JobStats>,
        checkpointing: Checkpointing,
        overflowed: Rc<RefCell<Overflowed>>,
        backpressure: Backpressure,
    ) -> Stream<'scope, u64, Vec<Arc<WindowUpdate>>> {
        let exchange = routing::exchange();
        let scope = self.scope();
        let (worker, workers) = (scope.index(), scope.peers());
        self.unary_frontier(exchange, "Windows", move |capability, info| {
            let activator = scope.activator_for(Rc::clone(&info.address));
            let mut held: Option<Capability<u64>> = Some(capability);
            let mut stash: BTreeMap<u64, Stash> = BTreeMap::new();
            let mut state =
                WindowState::new(metrics, settings.allowed_lateness, settings.live_interval);
            let Checkpointing {
                progress,
                partitions,
                resume: (boundary, groups),
                mut target,
            } = checkpointing;
            state.restore(groups, boundary as Millis);
            // Everything before this time has been applied, and no boundary
            // at or below it is still to be taken.
            let mut passed = boundary;
            let mut take_checkpoints = move |through: u64, state: &mut WindowState| {
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
                            groups: state.snapshot(boundary as Millis),
                        });
                    }
                }
                progress.borrow_mut().forget_before(through);
                passed = through;
            };
            move |(input, frontier), output| {
                let now = Instant::now();
                input.for_each_stamp(|cap, data| {
                    // Every message of the source carries a capability.
                    let Some(&time) = cap.least() else { return };
                    let batch = stash.entry(time).or_default();
                    for container in data {
                        for c in container.drain(..) {
                            state.stage(c, now, batch);
                        }
                    }
                });
                let frontier = frontier.frontier().iter().next().copied();
                let mut emitted = Vec::new();
                let ready: Vec<u64> = stash
                    .keys()
                    .copied()
                    .take_while(|t| frontier.is_none_or(|f| *t < f))
                    .collect();
                // Whether the finals due wait for a later activation: the
                // state holds them until a sink that is behind catches up,
                // or past a budget, so that a frontier that moves far at
                // once does not turn every window it closes into an update
                // in memory.
                let mut held_back = false;
                let limit = if backpressure.stalled_here() {
                    0
                } else {
                    FINALS_PER_ACTIVATION
                };
                for time in ready {
                    take_checkpoints(time, &mut state);
                    if !state.close_some(time as Millis, &mut emitted, limit) {
                        held_back = true;
                        break;
                    }
                    let batch = stash.remove(&time).unwrap_or_default().into_staged();
                    state.expire(time as Millis);
                    let turned_away = overflowed.borrow_mut().remove(&time);
                    let batch = match turned_away {
                        Some(groups) => state.drop_overflowed(batch, &groups),
                        None => batch,
                    };
                    let revised = state.apply(time as Millis, batch, stash.values(), &mut emitted);
                    if revised > 0 {
                        stats
                            .late_updates
                            .fetch_add(revised as u64, Ordering::Relaxed);
                    }
                }
                match frontier {
                    _ if held_back => {}
                    Some(f) => {
                        take_checkpoints(f, &mut state);
                        held_back = !state.close_some(f as Millis, &mut emitted, limit);
                        if !held_back {
                            state.expire(f as Millis);
                        }
                    }
                    None => held_back = !state.close_some(Millis::MAX, &mut emitted, limit),
                }
                if held_back {
                    activator.activate_after(match limit {
                        0 => STALLED_RETRY,
                        _ => Duration::ZERO,
                    });
                }
                state.partials(now, stash.values(), &mut emitted);
                if let Some(due) = state.next_partials() {
                    // The trailing edge of a busy group: an interval after
                    // its last partials, not after this change.
                    activator.activate_after(due.saturating_duration_since(now));
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
                        _ if held_back => {}
                        Some(f) if f > *cap.time() => cap.downgrade(&f),
                        Some(_) => {}
                        None => held = None,
                    }
                }
            }
        })
    }
}
