//! tally's semantics, as a timely dataflow. Nothing in this crate does I/O.
//!
//! An **event** ([`event`]) is a JSON object with a type, a time, string
//! dimensions and numeric values. The gateway validates it with the parser
//! here and appends it to the log in canonical form.
//!
//! A **metric** ([`config`]) selects events by type, keeps an aggregate
//! ([`aggregate`]: count, sum, avg, or uniq by HyperLogLog) per group of
//! dimension values, over tumbling and sliding **windows** ([`window`]) in
//! event time. Windows are built from panes, so an event costs one state
//! update whatever windows its metric declares. Each metric's results belong
//! to the **fingerprint** of its definition ([`fingerprint`]).
//!
//! The **job** ([`job`]) is the dataflow: a source per worker over its log
//! partitions, which stamps batches with their partition's watermark and
//! pre-aggregates them; an exchange by (metric, group) ([`routing`]); the
//! cap, which keeps each metric within its groups ([`cap`]); the
//! window operator around the window state ([`state`]), which emits partial
//! values while a window is open, a final value when the watermark passes
//! its end, and revisions for late events; and sinks, which hand results to
//! the store, the live bus and the dead letters without ever blocking a
//! worker. What it reads and writes crosses [`ports`]; what its operators
//! hand each other is [`model`].
//!
//! # Layout
//!
//! Modules depend only on those above them in this list.
//!
//! - [`time`]: event time, RFC 3339 and durations.
//! - [`dedupe`]: the partition of an event's id, and the ids a source
//!   remembers to drop its repeats.
//! - [`event`]: the event model, its parser, and request-body framing,
//!   spread over partitions by id.
//! - [`window`]: window specs and pane arithmetic.
//! - [`aggregate`]: aggregate state and merging.
//! - [`config`]: layered configuration and its validation.
//! - [`fingerprint`]: the stable identity of a metric's definition.
//! - [`rollup`]: the tables a metric is kept in, and the query planner.
//! - [`model`]: the records operators exchange and emit.
//! - [`routing`]: which worker owns a group, and reads a partition.
//! - [`checkpoint`]: what a checkpoint holds, and when one is taken.
//! - [`ports`]: the sources, sinks and checkpoint sinks the job talks to.
//! - [`coordination`]: the high watermark and backpressure workers share.
//! - [`stats`]: counters for `/metrics`.
//! - [`cap`]: the groups each metric holds, and its overflow group.
//! - [`state`]: the window state machine.
//! - [`operators`]: the source, cap, window, deliver and gossip operators.
//! - [`job`]: the operators wired together.
//! - [`query`]: history queries and how stored windows answer them.

pub mod aggregate;
pub mod backfill;
pub mod cap;
pub mod checkpoint;
pub mod config;
pub mod coordination;
pub mod dedupe;
pub mod event;
pub mod fingerprint;
pub mod job;
pub mod model;
pub mod operators;
pub mod ports;
pub mod query;
pub mod rollup;
pub mod routing;
pub mod state;
pub mod stats;
pub mod time;
pub mod window;
