//! (a) HTTP ingest, end to end: batches of 1000 events posted to `tally run`
//! until each is fsync'd in the log, against parsing the same bytes with
//! serde_json into `Value`s on one thread.

use std::time::Instant;

use crate::support::{bodies, now_ms, post_bodies, Tally};

const BATCH: usize = 1000;
const BATCHES: usize = 600;
const CONNECTIONS: usize = 4;

pub fn run() {
    let bodies = bodies(1, BATCHES, BATCH, now_ms());
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let events = BATCH * BATCHES;

    // Baseline: the raw parse rate of the same bytes.
    let started = Instant::now();
    let mut parsed = 0;
    for body in bodies.iter() {
        let values: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
        parsed += values.len();
    }
    let parse_rate = parsed as f64 / started.elapsed().as_secs_f64();

    // End to end: concurrent keep-alive connections, each waiting for its 202.
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[]);
    let started = Instant::now();
    post_bodies(&tally.url, &bodies, CONNECTIONS);
    let ingest_rate = events as f64 / started.elapsed().as_secs_f64();

    println!("(a) HTTP ingest, batches of {BATCH}, {CONNECTIONS} connections, fsync always, {events} events, {:.0} bytes/event", bytes as f64 / events as f64);
    println!(
        "    baseline serde_json parse to Value, 1 thread: {:>10.0} events/s",
        parse_rate
    );
    println!("    tally run, POST until durable:                {:>10.0} events/s  ({:.2}x the parse rate)", ingest_rate, ingest_rate / parse_rate);
}
