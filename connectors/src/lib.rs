//! tally's connections to the world outside the dataflow.
//!
//! # Layout
//!
//! - [`log`]: the embedded event log (segment files).
//! - [`kafka`]: the cluster's event log: topics, the producer the gateway
//!   appends with, and the workers' source.
//! - [`store`]: the result store (embedded SQLite, or ClickHouse).
//! - [`bus`]: the live bus (in-process, or Redis pub/sub).
//! - [`archive`]: the cluster's raw events, copied from Kafka to ClickHouse.
//! - [`checkpoint`]: checkpoints in an object store or a directory.
//! - [`retry`]: backoff for services that are down.
//!
//! **Architecture invariant:** only this crate touches the disk log, SQLite
//! or any network service other than the gateway's own listener.

pub mod archive;
pub mod bus;
pub mod checkpoint;
pub mod kafka;
pub mod log;
pub mod retry;
pub mod store;
