//! The data that crosses between operators, and out of the job: what the
//! source folds a batch into, what the window operator emits, and what
//! cannot be counted.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::aggregate::AggState;
use crate::time::Millis;
use crate::window::Span;

/// A group: the values of a metric's dimensions, in declaration order. A
/// dimension an event lacks has the empty string. It is shared, not
/// copied, by the contributions, window state and window updates of the
/// group: a partial of every open window goes out at each live tick, and
/// each carries its group.
pub type Group = Arc<[String]>;

/// One batch's worth of one (metric, group, pane).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Contribution {
    /// Index of the metric in the configuration.
    pub metric: u16,
    /// The group's dimension values.
    pub group: Group,
    /// [`group_hash`](crate::routing::group_hash) of (metric, group), computed once at the source: it
    /// routes the exchange and keys the window operator's group index.
    pub hash: u64,
    /// Start of the pane.
    pub pane: Millis,
    /// The aggregate of the batch's events in this pane.
    pub state: AggState,
    /// When the log took the batch, if it says: how fresh a live value
    /// showing it is.
    pub appended_at: Option<Millis>,
}

/// The value of one window of one group, as emitted. The operator emits
/// them in an `Arc`, so the store and the live bus share one copy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WindowUpdate {
    /// Index of the metric in the configuration.
    pub metric: u16,
    /// Index of the window spec within the metric.
    pub window: u8,
    /// The window instance.
    pub span: Span,
    /// The group's dimension values.
    pub group: Group,
    /// The aggregate over the window.
    pub state: AggState,
    /// 0 for the first final value; raised by one for each late correction.
    pub revision: u32,
    /// False for a partial value of a window that is still open.
    pub is_final: bool,
    /// When the log took the newest batch this group's live values have
    /// shown, if known; `None` after a restart until a new batch arrives.
    /// For freshness alone: it is never stored.
    pub appended_at: Option<Millis>,
}

/// An event that arrived too late for any window that still has state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Partition of the log it was read from.
    pub partition: u32,
    /// Its offset there and its index at that offset (see [`SourceBatch`](crate::ports::SourceBatch)),
    /// which identify it across replays.
    pub offset: u64,
    /// See `offset`.
    pub index: u32,
    /// Why it was not counted.
    pub reason: String,
    /// The watermark it was judged against.
    pub watermark: Millis,
    /// The event, in canonical JSON.
    pub record: Vec<u8>,
}
