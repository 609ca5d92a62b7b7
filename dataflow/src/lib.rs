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
//! update whatever windows its metric declares.
//!
//! The **job** ([`job`]) is the dataflow: a source per worker over its log
//! partitions, which stamps batches with their partition's watermark and
//! pre-aggregates them; an exchange by (metric, group); the window operator,
//! which emits partial values while a window is open, a final value when the
//! watermark passes its end, and revisions for late events; and sinks, which
//! hand results to the store, the live bus and the dead letters without ever
//! blocking a worker.
//!
//! # Layout
//!
//! - [`event`]: the event model and its parser.
//! - [`config`]: layered configuration and its validation.
//! - [`window`]: window specs and pane arithmetic.
//! - [`aggregate`]: aggregate state and merging.
//! - [`operators`]: the source, window and sink operators.
//! - [`job`]: the operators wired together.
//! - [`query`]: history queries and how stored windows answer them.
//! - [`stats`]: counters for operators.

pub mod aggregate;
pub mod checkpoint;
pub mod config;
pub mod event;
pub mod job;
pub mod operators;
pub mod query;
pub mod stats;
pub mod window;
