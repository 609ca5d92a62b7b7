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
use std::time::Duration;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::Stream;

use crate::ports::{Backpressure, Sink};

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
