//! What the processes of a cluster tell each other outside the data: their
//! highest watermark, when they last read an event, and whether their sinks
//! are behind.
//!
//! A worker whose partitions are all idle marks them just past the highest
//! watermark any worker has reached, and once no worker has read an event
//! for the idle timeout, up to the wall clock (see [`super::source`]).
//! Within a process that is a shared value in [`Coordination`]; without
//! gossip, a process whose partitions all went quiet would hold the job's
//! frontier at its own last watermark, and windows would never close after
//! traffic stops.
//!
//! A process whose sinks are behind stops its sources (its
//! [`Coordination::backpressure`]).
//! It also holds the frontier, so the other processes' windows stop closing
//! and their sinks get nothing to be behind on: without gossip they would
//! go on reading, and stash the backlog in memory instead of leaving it in
//! the log.
//!
//! Each worker sends its process's state to every worker whenever it
//! changes. The records travel at time 0 on a path of their own that feeds
//! nothing else, so holding that capability never holds back the job's
//! frontier.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use timely::dataflow::operators::core::Inspect;
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::{Scope, Stream};

use crate::coordination::Coordination;

/// How often a worker looks for news to send.
const EVERY: Duration = Duration::from_millis(100);

/// (sending worker, its process's high watermark, when it last read an
/// event, whether its process's sinks are behind).
type News = (usize, u64, u64, bool);

/// Builds the exchange of news in `scope`.
pub fn share(scope: Scope<'_, u64>, coordination: Coordination) {
    let heard = coordination.clone();
    let worker = scope.index();
    let news: Stream<'_, u64, Vec<News>> = source(scope, "Gossip", move |capability, info| {
        let activator = scope.activator_for(Rc::clone(&info.address));
        let mut sent = (0, 0, false);
        move |output| {
            let now = (
                coordination.high_watermark.get(),
                coordination.last_data.get(),
                coordination.backpressure.stalled_here(),
            );
            if now != sent {
                output
                    .session(&capability)
                    .give((worker, now.0, now.1, now.2));
                sent = now;
            }
            activator.activate_after(EVERY);
        }
    });
    let mut stalled: HashMap<usize, bool> = HashMap::new();
    news.broadcast()
        .inspect(move |&(from, high, last_data, behind)| {
            heard.high_watermark.raise(high);
            heard.last_data.raise(last_data);
            stalled.insert(from, behind);
            heard.backpressure.set_remote(stalled.values().any(|&s| s));
        });
}
