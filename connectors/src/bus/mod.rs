//! The live bus: carries window values from the workers to the gateways'
//! WebSocket fan-out.
//!
//! The embedded bus ([`inprocess`]) is a bounded in-process channel. The
//! cluster's ([`redis`]) is Redis pub/sub, one channel per metric, with the
//! latest values kept under a key for new subscribers.
//!
//! **Delivery guarantee.** Best effort. When the gateway falls behind, a
//! worker drops the batch rather than wait, and counts the drop. Stored
//! history is unaffected, and every message carries (window, revision), so a
//! client can tell a repeat from a correction.

use std::sync::{Arc, Mutex};

use tally_dataflow::config::MetricSpec;
use tally_dataflow::model::WindowUpdate;

/// What a bus hands the gateway's fan-out.
#[derive(Debug)]
pub enum Live {
    /// Window values, in the order the workers emitted them.
    Updates(Vec<Arc<WindowUpdate>>),
    /// Every worker has emitted everything stamped before this watermark,
    /// so a window that ended more than the allowed lateness before it will
    /// not change again, and the fan-out may forget it.
    Through(u64),
    /// From here on, updates are of these metrics: a backfill has finished,
    /// and its new definitions are active. The job's publisher hears it
    /// first, then the hub: from the in-process bus, or from a gateway's
    /// Redis subscriber once the gateway has read the activation.
    Metrics(Arc<Vec<MetricSpec>>),
}

/// The watermarks of several reporters (a process's workers, or a
/// cluster's processes), and the lowest of them passed on so far. A
/// reporter counts as 0 until it reports, so nothing passes on before
/// every reporter has.
#[derive(Default)]
struct Lowest {
    reported: Vec<u64>,
    passed: u64,
}

impl Lowest {
    /// Records `reporter` at `watermark`, and returns the lowest of all
    /// reporters if it has risen past what was passed on.
    fn report(&mut self, reporter: usize, watermark: u64) -> Option<u64> {
        let slot = &mut self.reported[reporter];
        *slot = (*slot).max(watermark);
        let lowest = self.reported.iter().copied().min().unwrap_or(0);
        (lowest > self.passed).then_some(lowest)
    }
}

/// The watermark of a process's workers: each worker's publisher reports
/// its own, and the lowest is what the bus passes on.
#[derive(Clone, Default)]
struct Watermarks(Arc<Mutex<Lowest>>);

impl Watermarks {
    /// A slot for one more worker.
    fn register(&self) -> usize {
        let mut lowest = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lowest.reported.push(0);
        lowest.reported.len() - 1
    }

    /// Records `worker` (if it has a slot) at `watermark` and, if the
    /// lowest of all workers has risen past what was passed on, offers it
    /// to `send`, which says whether its channel was full. Returns false
    /// when it is to be offered again at the next advance: the fan-out then
    /// keeps its windows a little longer.
    fn pass_on(
        &self,
        worker: Option<usize>,
        watermark: u64,
        send: impl FnOnce(Live) -> Result<(), Full>,
    ) -> bool {
        let Some(worker) = worker else {
            return true;
        };
        let mut lowest = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(risen) = lowest.report(worker, watermark) else {
            return true;
        };
        match send(Live::Through(risen)) {
            Ok(()) => {
                lowest.passed = risen;
                true
            }
            Err(Full) => false,
        }
    }
}

/// A bus channel had no room.
struct Full;

pub mod inprocess;
pub mod redis;
