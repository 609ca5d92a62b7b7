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

use std::sync::Arc;

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

/// Batches of live updates in flight between the workers and a gateway's
/// fan-out, on either bus, before a worker drops the next one.
pub const BATCHES_IN_FLIGHT: usize = 1024;

pub mod inprocess;
pub mod redis;
