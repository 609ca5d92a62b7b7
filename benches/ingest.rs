//! (a) HTTP ingest, end to end: batches of 1000 events posted to `tally run`
//! until each is fsync'd in the log, and until every event is in a stored
//! window, against the raw parse of the same bytes
//! into `Value`s on one thread by sonic-rs, the parser the gateway uses,
//! and by serde_json; and, taken in turn in the same run, the same with a
//! key whose requests are checked and rate-limited, and without
//! deduplication by `eventId`, against neither. Beside the baselines, the
//! gateway's own validating parse of the same bytes on one thread, which
//! also writes each event's log record.

use std::time::Instant;

use tally_dataflow::event::{parse_batch, EventLimits};

use crate::support::{
    bodies, now_ms, past_load, post_bodies, post_bodies_as, repository_config, until_stored, Tally,
};

const BATCH: usize = 1000;
const BATCHES: usize = 600;
const CONNECTIONS: usize = 4;
/// Rounds of the contenders taken in turn.
const ROUNDS: usize = 3;

pub fn run() {
    let bodies = bodies(1, BATCHES, BATCH, now_ms());
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let events = BATCH * BATCHES;

    // Baselines: the raw parse rate of the same bytes, by the gateway's
    // parser and by serde_json.
    let started = Instant::now();
    let mut parsed = 0;
    for body in bodies.iter() {
        let values: Vec<sonic_rs::Value> = sonic_rs::from_slice(body).unwrap();
        parsed += values.len();
    }
    let parse_rate = parsed as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut parsed = 0;
    for body in bodies.iter() {
        let values: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
        parsed += values.len();
    }
    let serde_json_rate = parsed as f64 / started.elapsed().as_secs_f64();
    // The gateway's parse: each event validated, as the log takes it.
    let (received_at, limits) = (now_ms(), EventLimits::default());
    let started = Instant::now();
    let mut validated = 0;
    for body in bodies.iter() {
        validated += parse_batch(body, false, received_at, i64::MAX / 2, &limits)
            .unwrap()
            .len();
    }
    let validate_rate = validated as f64 / started.elapsed().as_secs_f64();

    // End to end: concurrent keep-alive connections, each waiting for its 202.
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[]);
    let started = Instant::now();
    post_bodies(&tally.url, &bodies, CONNECTIONS);
    let ingest_rate = events as f64 / started.elapsed().as_secs_f64();
    drop(tally);

    // End to end: the same load stamped two minutes back, then one event
    // now in every partition, which moves every partition's watermark past
    // the load's windows; until the store holds all of the load's events.
    let (load, span) = past_load(1, BATCHES, BATCH);
    let data = tempfile::tempdir().unwrap();
    let tally = Tally::start(data.path(), &[]);
    let started = Instant::now();
    post_bodies(&tally.url, &load, CONNECTIONS);
    until_stored(&tally.url, span, events);
    let stored_rate = events as f64 / started.elapsed().as_secs_f64();
    drop(tally);

    // Keys: each request's bearer token checked and its events taken from
    // a bucket that never runs dry, against no keys; two rounds in turn.
    let mut config = std::fs::read_to_string(repository_config()).unwrap();
    config.push_str(&format!(
        "\n[[auth.keys]]\nname = \"bench\"\nsecret = \"{KEY}\"\nscopes = [\"write\"]\nevents_per_second = 100000000\n"
    ));
    let keyed = dir.path().join("keys.toml");
    std::fs::write(&keyed, config).unwrap();
    let (mut open, mut checked, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (key, dedupe) in [(None, true), (Some(KEY), true), (None, false)] {
            let data = tempfile::tempdir().unwrap();
            let env: &[(&str, &str)] = if dedupe {
                &[]
            } else {
                &[("TALLY__DEDUPE__HORIZON", "0s")]
            };
            let tally = match key {
                None => Tally::start(data.path(), env),
                Some(_) => Tally::start_with_config(data.path(), &keyed, env),
            };
            let started = Instant::now();
            post_bodies_as(&tally.url, &bodies, CONNECTIONS, key);
            let rate = events as f64 / started.elapsed().as_secs_f64();
            match (key, dedupe) {
                (Some(_), _) => checked.push(rate),
                (None, true) => open.push(rate),
                (None, false) => kept.push(rate),
            }
        }
    }
    let (open, checked) = (median(&mut open), median(&mut checked));
    let kept = median(&mut kept);

    println!("(a) HTTP ingest, batches of {BATCH}, {CONNECTIONS} connections, fsync always, {events} events, {:.0} bytes/event", bytes as f64 / events as f64);
    println!(
        "    baseline sonic-rs parse to Value, 1 thread:   {:>10.0} events/s",
        parse_rate
    );
    println!(
        "    serde_json parse to Value, 1 thread:          {:>10.0} events/s  ({:.2}x the parse rate)",
        serde_json_rate,
        serde_json_rate / parse_rate
    );
    println!("    the gateway's validating parse, 1 thread:     {:>10.0} events/s  ({:.2}x the parse rate)", validate_rate, validate_rate / parse_rate);
    println!("    tally run, POST until durable:                {:>10.0} events/s  ({:.2}x the parse rate)", ingest_rate, ingest_rate / parse_rate);
    println!("    tally run, POST until every event is stored:  {:>10.0} events/s  ({:.2}x the parse rate)", stored_rate, stored_rate / parse_rate);
    println!(
        "    without keys (median of {ROUNDS} rounds):      {:>10.0} events/s",
        open
    );
    println!(
        "    without keys or deduplication, in turn:       {:>10.0} events/s  (deduplication costs {:.1}%)",
        kept,
        (1.0 - open / kept) * 100.0
    );
    println!(
        "    with a key and its rate limit, in turn:       {:>10.0} events/s  ({:+.1}% against without)",
        checked,
        (checked / open - 1.0) * 100.0
    );
}

/// The secret of the benchmark's key.
const KEY: &str = "wk_bench_0123456789abcdef";

fn median(rates: &mut [f64]) -> f64 {
    rates.sort_by(f64::total_cmp);
    (rates[(rates.len() - 1) / 2] + rates[rates.len() / 2]) / 2.0
}
