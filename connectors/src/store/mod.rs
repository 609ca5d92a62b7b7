//! The result store: final window values, kept for history queries.
//!
//! The embedded store is SQLite ([`sqlite`]), one file in the data directory.
//!
//! **Delivery guarantee.** A window result is keyed by (metric, window, start,
//! group) and carries a revision. Writing it is an upsert that replaces a
//! stored row only with a higher revision, so re-emitting results, as a
//! restart that replays the log does, overwrites and never adds.
//!
//! **Backpressure.** Workers hand results to a writer thread over a bounded
//! channel. When the channel is full the worker's sink keeps the results and
//! the dataflow stops reading the log until the writer catches up.

pub mod sqlite;
