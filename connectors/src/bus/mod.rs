//! The live bus: carries window values from the workers to the gateway's
//! WebSocket fan-out.
//!
//! The embedded bus ([`inprocess`]) is a bounded in-process channel.
//!
//! **Delivery guarantee.** Best effort. When the gateway falls behind, a
//! worker drops the batch rather than wait, and counts the drop. Stored
//! history is unaffected, and every message carries (window, revision), so a
//! client can tell a repeat from a correction.

pub mod inprocess;
