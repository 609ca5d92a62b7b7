//! (a) HTTP ingest, end to end: batches of 1000 events posted to `tally run`
//! until each is fsync'd in the log, against parsing the same bytes with
//! serde_json into `Value`s on one thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::support::{agent, event, now_ms, post_events, Tally};

const BATCH: usize = 1000;
const BATCHES: usize = 600;
const CONNECTIONS: usize = 4;

pub fn run() {
    let mut rng = fastrand::Rng::with_seed(1);
    let now = now_ms();
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..BATCHES)
            .map(|b| {
                let events: Vec<_> = (0..BATCH)
                    .map(|i| event(&mut rng, now + (b * BATCH + i) as i64 / 100))
                    .collect();
                serde_json::to_vec(&events).unwrap()
            })
            .collect(),
    );
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
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (bodies, next, url) = (Arc::clone(&bodies), Arc::clone(&next), tally.url.clone());
            std::thread::spawn(move || {
                let agent = agent();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    post_events(&agent, &url, body);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ingest_rate = events as f64 / started.elapsed().as_secs_f64();

    println!("(a) HTTP ingest, batches of {BATCH}, {CONNECTIONS} connections, fsync always, {events} events, {:.0} bytes/event", bytes as f64 / events as f64);
    println!(
        "    baseline serde_json parse to Value, 1 thread: {:>10.0} events/s",
        parse_rate
    );
    println!("    tally run, POST until durable:                {:>10.0} events/s  ({:.2}x the parse rate)", ingest_rate, ingest_rate / parse_rate);
}
