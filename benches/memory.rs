//! (h) Memory after a burst of new groups: resident memory of `tally run`
//! before, at the peak of, and after 200,000 events that each bring a new
//! `campaignId`, once their windows have closed and expired.
//!
//! The burst is stamped 15 minutes in the past, so that one later event per
//! partition moves the watermark past every window of the burst and past
//! its allowed lateness: from then on, no state of those groups is needed.
//! The baseline is the same process's memory before the burst.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{now_ms, post_bodies, rss_kb, scrape, Tally};

const GROUPS: usize = 200_000;
const BATCH: usize = 1000;
const PARTITIONS: usize = 8;
/// How long the process is watched once the burst's state has expired.
const AFTER: Duration = Duration::from_secs(120);

pub fn run() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[]);
    let pid = tally.pid();
    std::thread::sleep(Duration::from_secs(2));
    let before = rss_kb(pid);

    let start = now_ms() - 15 * 60_000;
    let bodies: Vec<Vec<u8>> = (0..GROUPS / BATCH)
        .map(|b| {
            let events: Vec<_> = (0..BATCH)
                .map(|i| {
                    let n = b * BATCH + i;
                    json!({
                        "eventType": "ad_click",
                        // A minute of event time, in order.
                        "timestamp": start + (n as i64 * 60_000 / GROUPS as i64),
                        "dimensions": {
                            "campaignId": format!("burst_{n:06}"),
                            "country": "US", "deviceType": "MOBILE",
                            "userId": format!("usr_{:06}", n % 5000),
                        },
                    })
                })
                .collect();
            serde_json::to_vec(&events).unwrap()
        })
        .collect();
    let mut peak = before;
    let sample = |peak: &mut u64| {
        let rss = rss_kb(pid);
        *peak = (*peak).max(rss);
        rss
    };
    let posting = {
        let (url, bodies) = (tally.url.clone(), Arc::new(bodies));
        std::thread::spawn(move || post_bodies(&url, &bodies, 4))
    };
    while !posting.is_finished() {
        sample(&mut peak);
        std::thread::sleep(Duration::from_millis(100));
    }
    posting.join().unwrap();
    let read = || {
        scrape(&tally.url)
            .get("tally_events_read_total")
            .copied()
            .unwrap_or(0.0)
    };
    while read() < GROUPS as f64 {
        sample(&mut peak);
        std::thread::sleep(Duration::from_millis(100));
    }
    // One event per partition just after the burst: the watermark passes a
    // checkpoint boundary while every group's windows are still kept.
    flush(&tally.url, start + 80_000);
    let at_peak_checkpoint =
        wait_for_checkpoint(&tally.url, start + 70_000, &mut || sample(&mut peak));

    // One event per partition, now: every window of the burst closes, and
    // 30 s of allowed lateness later its state expires.
    let now = now_ms();
    flush(&tally.url, now);
    let emitted = || {
        scrape(&tally.url)
            .get("tally_windows_emitted_total")
            .copied()
            .unwrap_or(0.0)
    };
    let mut last = (emitted(), Instant::now());
    while last.1.elapsed() < Duration::from_secs(5) {
        sample(&mut peak);
        std::thread::sleep(Duration::from_millis(200));
        let now = emitted();
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let expired = Instant::now();
    let mut after = Vec::new();
    for mark in [0, 30, 60, 120] {
        let due = Duration::from_secs(mark);
        if let Some(wait) = due.checked_sub(expired.elapsed()) {
            std::thread::sleep(wait);
        }
        after.push((mark, sample(&mut peak)));
        if due >= AFTER {
            break;
        }
    }
    let after_checkpoint = wait_for_checkpoint(&tally.url, now - 20_000, &mut || sample(&mut peak));

    let mb = |kb: u64| kb as f64 / 1024.0;
    println!("(h) memory after a burst of {GROUPS} new groups, tally run with the default metrics");
    println!("  {:<46} {:>9}  {:>6}", "", "RSS", "ratio");
    println!(
        "  {:<46} {:>6.0} MB  {:>5.1}x",
        "baseline: before the burst",
        mb(before),
        1.0
    );
    println!(
        "  {:<46} {:>6.0} MB  {:>5.1}x",
        "peak",
        mb(peak),
        peak as f64 / before as f64
    );
    for (mark, rss) in &after {
        println!(
            "  {:<46} {:>6.0} MB  {:>5.1}x",
            format!("{mark} s after the burst's state expired"),
            mb(*rss),
            *rss as f64 / before as f64
        );
    }
    // The first checkpoint after the last flush is taken before that
    // flush's time is applied, so it still holds every group of the burst.
    println!(
        "  checkpoints: {:.1} MB during the burst, {:.1} MB holding all {GROUPS} groups",
        at_peak_checkpoint / 1e6,
        after_checkpoint / 1e6
    );
}

/// Posts one event at `at_ms` to every partition.
fn flush(url: &str, at_ms: i64) {
    let body = serde_json::to_vec(&[json!({"eventType": "flush", "timestamp": at_ms})]).unwrap();
    post_bodies(url, &Arc::new(vec![body; PARTITIONS]), 1);
}

/// Waits until a checkpoint at or past `boundary_ms` is committed, sampling
/// as it waits, and returns its size in bytes.
fn wait_for_checkpoint(url: &str, boundary_ms: i64, sample: &mut dyn FnMut() -> u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let metrics = scrape(url);
        let boundary = metrics
            .get("tally_checkpoint_boundary_seconds")
            .copied()
            .unwrap_or(0.0);
        if boundary * 1000.0 >= boundary_ms as f64 || Instant::now() > deadline {
            return metrics
                .get("tally_checkpoint_bytes")
                .copied()
                .unwrap_or(0.0);
        }
        sample();
        std::thread::sleep(Duration::from_millis(200));
    }
}
