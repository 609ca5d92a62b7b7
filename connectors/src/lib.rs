//! tally's connections to the world outside the dataflow.
//!
//! # Layout
//!
//! - [`log`]: the event log (embedded segment files).
//! - [`store`]: the result store (embedded SQLite).
//! - [`bus`]: the live bus (in-process).
//!
//! **Architecture invariant:** only this crate touches the disk log, SQLite
//! or any network service other than the gateway's own listener.

pub mod bus;
pub mod checkpoint;
pub mod log;
pub mod store;
