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
}

/// The watermark of a process's workers: each worker's publisher reports
/// its own, and the lowest is what the bus passes on.
#[derive(Clone, Default)]
struct Watermarks(Arc<Mutex<Reported>>);

#[derive(Default)]
struct Reported {
    workers: Vec<u64>,
    sent: u64,
}

impl Watermarks {
    /// A slot for one more worker, at 0 until it reports.
    fn register(&self) -> usize {
        let mut reported = self.0.lock().unwrap_or_else(|e| e.into_inner());
        reported.workers.push(0);
        reported.workers.len() - 1
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
        let mut reported = self.0.lock().unwrap_or_else(|e| e.into_inner());
        reported.workers[worker] = reported.workers[worker].max(watermark);
        let lowest = reported.workers.iter().copied().min().unwrap_or(0);
        if lowest <= reported.sent {
            return true;
        }
        match send(Live::Through(lowest)) {
            Ok(()) => {
                reported.sent = lowest;
                true
            }
            Err(Full) => false,
        }
    }
}

/// A bus channel had no room.
struct Full;

/// Batches of live updates in flight between the workers and a gateway's
/// fan-out, on either bus, before a worker drops the next one.
pub const BATCHES_IN_FLIGHT: usize = 1024;

pub mod inprocess;
pub mod redis;
