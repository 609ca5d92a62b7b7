//! (i) Backfill: a changed metric recomputed from the log beside the live
//! job, which must stay real-time meanwhile.
//!
//! tally takes a backlog of generated events, then live traffic at a fixed
//! offered rate while the freshness of `metrics:events` is measured (the
//! baseline: no backfill). It stops, and starts again on the same data
//! with `ad_clicks` given one more window, which starts a backfill of
//! `ad_clicks` only. The same live traffic is offered and measured again,
//! and the catalog is read four times a second for the backfill's
//! progress. The backfill's rate is the log records it read per second;
//! the live job's is what it read of the offered traffic meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::freshness::{measure, Measured};
use crate::support::{
    agent, bodies, now_ms, post_bodies, quantile, repository_config, scrape, Tally,
};

/// Events in the log before the change.
const BACKLOG: usize = 4_000_000;
const BATCH: usize = 1000;
/// Live traffic, and for how long it is measured each time.
const RATE: usize = 50_000;
const SECONDS: u64 = 15;

pub fn run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let changed = dir.path().join("changed.toml");
    let text = std::fs::read_to_string(repository_config()).unwrap();
    let windows = r#"windows = ["tumbling 10s", "tumbling 1m", "sliding 5m every 10s"]"#;
    assert!(
        text.contains(windows),
        "ad_clicks's windows in cluster.toml"
    );
    let more =
        r#"windows = ["tumbling 10s", "tumbling 1m", "sliding 5m every 10s", "tumbling 5m"]"#;
    std::fs::write(&changed, text.replacen(windows, more, 1)).unwrap();
    // Checkpoints as often as the freshness bench has them: the defaults.
    let tally = Tally::start_with_config(&data, &repository_config(), &[]);
    // The backlog: an hour ago, at 100 events per millisecond.
    let backlog = bodies(11, BACKLOG / BATCH, BATCH, now_ms() - 3_600_000);
    let posted = Instant::now();
    post_bodies(&tally.url, &backlog, 4);
    let ingest = BACKLOG as f64 / posted.elapsed().as_secs_f64();
    caught_up(&tally);
    let quiet = measure(&tally, RATE, SECONDS);
    tally.stop();

    let tally = Tally::start_with_config(&data, &changed, &[]);
    // The live job reads what followed its last checkpoint first.
    caught_up(&tally);
    let done = Arc::new(AtomicBool::new(false));
    let progress: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let watcher = {
        let (url, done, progress) = (tally.url.clone(), Arc::clone(&done), Arc::clone(&progress));
        std::thread::spawn(move || {
            let agent = agent();
            while !done.load(Ordering::Relaxed) {
                let catalog: Value = agent
                    .get(format!("{url}/v1/catalog"))
                    .call()
                    .unwrap()
                    .body_mut()
                    .read_json()
                    .unwrap();
                let building = catalog["metrics"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find_map(|m| m.get("backfill").cloned());
                let live = scrape(&url)
                    .get("tally_events_read_total")
                    .copied()
                    .unwrap_or(0.0);
                match building {
                    Some(b) => progress.lock().unwrap().push(Sample {
                        at: Instant::now(),
                        backfill: b["eventsRead"].as_u64().unwrap_or(0),
                        live: live as u64,
                        progress: b["progress"].as_f64().unwrap_or(0.0),
                    }),
                    None if !progress.lock().unwrap().is_empty() => break,
                    None => {}
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let started = Instant::now();
    let busy = measure(&tally, RATE, SECONDS);
    // The backfill meets the live job on live traffic, which has stopped;
    // what is left is read without it.
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let samples = progress.lock().unwrap().clone();
    // Once it has read the backlog, it reads only what the live job does.
    let first = samples.first().unwrap();
    let last = samples
        .iter()
        .find(|s| s.progress >= 0.99)
        .unwrap_or_else(|| samples.last().unwrap());
    let span = last.at.duration_since(first.at).as_secs_f64();
    let backfill_rate = (last.backfill - first.backfill) as f64 / span;
    let live_rate = (last.live - first.live) as f64 / span;
    let running = samples.last().unwrap().at.duration_since(started);
    // Only the batches sent while the backfill ran.
    let during: Vec<f64> = busy
        .latencies
        .iter()
        .filter(|(sent, _)| *sent <= running)
        .map(|l| l.1)
        .collect();

    println!("(i) backfill of one changed metric (ad_clicks, a window added) beside the live job, {BACKLOG} events in the log");
    println!("    ingest of the backlog: {ingest:.0} events/s");
    println!(
        "    backfill read {backfill_rate:.0} events/s over {span:.1} s, to {:.0}% of the log, while the live job read {live_rate:.0} events/s (offered {RATE})",
        100.0 * last.progress
    );
    report(
        "without a backfill (baseline)",
        quiet.latencies.iter().map(|l| l.1).collect(),
        &quiet,
    );
    report(
        &format!("during the backfill, first {:.1} s", running.as_secs_f64()),
        during,
        &busy,
    );
}

/// The backfill's progress and the live job's count, at one look.
#[derive(Clone)]
struct Sample {
    at: Instant,
    /// Log records the backfill has read.
    backfill: u64,
    /// Records the live job has read.
    live: u64,
    /// The backfill's progress, from 0 to 1.
    progress: f64,
}

/// Waits until the live job has read everything in the log: its count of
/// records read stays the same for a second.
fn caught_up(tally: &Tally) {
    let read = || scrape(&tally.url).get("tally_events_read_total").copied();
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = read();
        if now.is_some() && now == last {
            return;
        }
        last = now;
    }
}

fn report(what: &str, mut latencies: Vec<f64>, measured: &Measured) {
    latencies.sort_by(f64::total_cmp);
    println!(
        "    live freshness {what}: p50 {:>6.1} ms, p99 {:>6.1} ms over {} batches ({} unseen, offered {:.0}/s)",
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        latencies.len(),
        measured.unseen,
        measured.achieved
    );
}
