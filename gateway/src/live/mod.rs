//! `GET /v1/live`: WebSocket fan-out of live window values.
//!
//! The workers publish per-group window values (partials, finals and
//! revisions) on the live bus. The [`Hub`], one task, keeps the recent
//! windows of every metric and the subscriptions of every client. For each
//! batch from the bus it recomputes the topics that batch touched, by merging
//! the matching groups' states, and queues for each subscribed client one
//! update per subscription: a message per window, or per group and window.
//!
//! A topic is `metrics:<metric>[:<dimension>:<value>]…`; a subscription may
//! add a `window` (default: the metric's first) and a `groupBy` dimension, in
//! which case each group's value is a message of its own.
//!
//! **Slow consumers.** Each client has a bounded queue of updates
//! (`live.queue`, 50 by default). The bound counts updates, not messages, so
//! a grouped topic with hundreds of groups takes one place. The hub never
//! waits on a client: when a queue is full the client is disconnected, and
//! nobody else is delayed.
//!
//! **Answers and bounds.** Every subscribe is answered, first with an
//! acknowledgement or an error, and a connection holds at most
//! `live.max_subscriptions` subscriptions, since each costs the hub work on
//! every batch of its metric. A binary frame closes the connection with
//! 1003.
//!
//! **Revisions.** A topic's open window is sent with `final: false`. Its
//! final value carries the sum of the revisions of the groups it merges: 0 at
//! first, raised by every late event. The job keeps group revisions across
//! restarts (they are in its checkpoints), so `(window, revision)` tells a
//! repeat from a correction even across a restart of the server.
//!
//! **Resume.** A subscribe may carry `since`, an RFC 3339 time: the
//! subscription then first gets, in window order, the latest value of every
//! window that starts at or after it, final or revised, from the hub where
//! it still holds the window and from the store where it forgot it, then
//! the current value, then the live stream. The acknowledgement says from
//! which window start the replay is complete (`since`), later than asked
//! when the rows past `live.max_resume_rows` were left out or the store
//! could not be read, and how long after its end a window may still be
//! revised (`lateness`, in milliseconds of event time) and, once the
//! workers have reported their watermark, the oldest window a late event
//! may still revise (`revisableFrom`), from which a client works out where
//! to resume after its next disconnect. The stored values also complete
//! the hub's windows, which after a restart hold only the groups that
//! changed since; `tally run`'s hub also reads the stored windows a late
//! event may still revise when it starts ([`Hub::seed`]).
//!
//! # Layout
//!
//! - `handshake`: the route, and the WebSocket opening handshake.
//! - `connection`: one client's connection, and the task that reads it.
//! - `hub`: the fan-out task and its state.
//! - `writers`: the tasks that write to the clients, each to many, with
//!   pings and each client's bounded queue.
//! - `resume`: what a subscription that resumes reads of the store.
//! - `topic`: a subscription's topic, parsed once when it arrives.

mod connection;
mod handshake;
mod hub;
mod resume;
mod topic;
mod writers;

pub use handshake::{route, Handshake};

use std::sync::Arc;

use tally_dataflow::config::MetricSpec;

/// Reads a client's message as a connection does: `Ok` for a request the
/// hub would take (a subscription, valid or refused with a reason, or an
/// unsubscription), else the error the client would get. It never panics,
/// whatever the text: the fuzz target `subscribe` checks that.
pub fn read_message(text: &str, metrics: &Arc<Vec<MetricSpec>>) -> Result<(), String> {
    connection::read_request(text, metrics).map(|_| ())
}
pub use hub::Hub;
