//! Shares the highest watermark between the processes of a cluster.
//!
//! A worker whose partitions are all idle moves its capability just past
//! the highest watermark any worker has reached (see [`super::source`]).
//! Within a process that is a shared counter in [`JobStats`]; this operator
//! carries it to the other processes. Each worker sends its process's high
//! watermark to every worker whenever it rises, and each raises its own
//! process's counter. Without it, a process whose partitions all went quiet
//! would hold the job's frontier at its own last watermark, and windows
//! would never close after traffic stops.
//!
//! The records travel at time 0 on a path of their own that feeds nothing
//! else, so holding that capability never holds back the job's frontier.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use timely::dataflow::operators::core::Inspect;
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::{Scope, Stream};

use crate::stats::JobStats;

/// How often a worker looks for a higher watermark to send.
const EVERY: Duration = Duration::from_millis(100);

/// Builds the exchange of high watermarks in `scope`.
pub fn share_high_watermark(scope: Scope<'_, u64>, stats: Arc<JobStats>) {
    let received = Arc::clone(&stats);
    let marks: Stream<'_, u64, Vec<u64>> =
        source(scope, "HighWatermark", move |capability, info| {
            let activator = scope.activator_for(Rc::clone(&info.address));
            let mut sent = 0;
            move |output| {
                let high = stats.high_watermark();
                if high > sent {
                    output.session(&capability).give(high);
                    sent = high;
                }
                activator.activate_after(EVERY);
            }
        });
    marks
        .broadcast()
        .inspect(move |&high| received.raise_high_watermark(high));
}
