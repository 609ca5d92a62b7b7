//! The `deliver` operator: hands a stream to a [`Sink`] without blocking.
//!
//! A sink takes what it can. What it cannot take stays buffered in the
//! operator, which raises [`Backpressure`] until the sink has caught up. The
//! sources of every worker in the process stop reading while any sink is
//! behind, so a slow store leaves the backlog in the log rather than in
//! memory: a worker that stalls holds the frontier, and the others must not
//! go on stashing what they read. In the cluster, processes tell each other
//! (see [`super::gossip`]), so every process stops reading.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::Stream;

/// Where a stream's records leave the dataflow.
pub trait Sink<T>: 'static {
    /// Takes records from the front of `items`, as many as it can without
    /// blocking. What it leaves is offered again later, in order.
    fn offer(&mut self, items: &mut Vec<T>);

    /// Says that every record before `frontier` has been offered and taken.
    /// A durable sink reports, once those records are durable, that it holds
    /// everything before `frontier`; checkpoints wait for that. Returns
    /// false if it cannot take the note now; it is given again later.
    fn advance(&mut self, _frontier: u64) -> bool {
        true
    }
}

/// The number of sinks that are behind, shared by every worker of a process,
/// and whether another process of the job has sinks behind.
#[derive(Clone, Default)]
pub struct Backpressure {
    local: Arc<AtomicUsize>,
    remote: Arc<AtomicBool>,
}

impl Backpressure {
    /// True while any sink of the job is behind, here or, as far as this
    /// process has heard, in another process.
    pub fn stalled(&self) -> bool {
        self.stalled_here() || self.remote.load(Ordering::Relaxed)
    }

    /// True while any sink of this process is behind.
    pub fn stalled_here(&self) -> bool {
        self.local.load(Ordering::Relaxed) > 0
    }

    /// Records whether another process has said its sinks are behind.
    pub fn set_remote(&self, stalled: bool) {
        self.remote.store(stalled, Ordering::Relaxed);
    }

    fn set(&self, behind: bool, was_behind: &mut bool) {
        if behind != *was_behind {
            if behind {
                self.local.fetch_add(1, Ordering::Relaxed);
            } else {
                self.local.fetch_sub(1, Ordering::Relaxed);
            }
            *was_behind = behind;
        }
    }
}

/// Extension trait for the `deliver` operator.
pub trait Deliver<T> {
    /// Sends every record of the stream to `sink`.
    fn deliver(self, name: &str, sink: impl Sink<T>, backpressure: &Backpressure);
}

impl<'scope, T: Clone + 'static> Deliver<T> for Stream<'scope, u64, Vec<T>> {
    fn deliver(self, name: &str, mut sink: impl Sink<T>, backpressure: &Backpressure) {
        let backpressure = backpressure.clone();
        let scope = self.scope();
        let mut pending = Vec::new();
        let mut behind = false;
        let mut advanced = 0;
        // The output is unused: a sink ends its stream.
        self.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
            Pipeline,
            name,
            move |_cap, info| {
                let activator = scope.activator_for(Rc::clone(&info.address));
                move |(input, frontier), _output| {
                    input.for_each(|_time, data| pending.append(data));
                    if !pending.is_empty() {
                        sink.offer(&mut pending);
                    }
                    let through = frontier
                        .frontier()
                        .iter()
                        .next()
                        .copied()
                        .unwrap_or(u64::MAX);
                    if pending.is_empty() && through > advanced && sink.advance(through) {
                        advanced = through;
                    }
                    backpressure.set(!pending.is_empty(), &mut behind);
                    if behind || through > advanced {
                        activator.activate_after(Duration::from_millis(5));
                    }
                }
            },
        );
    }
}
