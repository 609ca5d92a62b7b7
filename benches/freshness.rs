//! (c) Freshness: the time from sending a POST to the first WebSocket frame
//! whose value includes its events, at a fixed offered rate.
//!
//! Senders post batches of 1000 events stamped with the current time, on a
//! fixed schedule (an open loop: a late send does not push the schedule
//! back). A subscriber follows `metrics:events` in 10 s windows. A batch is
//! seen when a frame for its window carries a count at least the number of
//! events posted to that window up to and including the batch. The baseline
//! is the same POST's own round trip to its `202`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

use tally_dataflow::time::format_rfc3339;

use crate::support::{agent, now_ms, post_events, quantile, stamp, templates, Tally};

const RATE: usize = 100_000;
const BATCH: usize = 1000;
const SECONDS: u64 = 20;
const SENDERS: usize = 4;

pub fn run() {
    // The target rate, and half of it, to show where the knee is.
    for rate in [RATE, RATE / 2] {
        run_at(rate);
    }
}

fn run_at(rate: usize) {
    let dir = tempfile::tempdir().unwrap();
    // The defaults, as a user runs them (a `TALLY__*` variable in the
    // bench's environment reaches tally too).
    let tally = Tally::start(dir.path(), &[]);
    let mut measured = measure(&tally, rate, SECONDS);
    let mut latencies: Vec<f64> = measured.latencies.iter().map(|l| l.1).collect();
    latencies.sort_by(f64::total_cmp);
    let interval = std::env::var("TALLY__LIVE__INTERVAL").unwrap_or_else(|_| "the default".into());
    println!("(c) freshness, POST to the first WebSocket frame that includes it, live.interval = {interval}");
    println!(
        "    offered {rate} events/s in batches of {BATCH} for {SECONDS} s from {SENDERS} senders (achieved {:.0}/s, {} sends behind schedule), {} batches never seen",
        measured.achieved, measured.late_sends, measured.unseen
    );
    measured.acks.sort_by(f64::total_cmp);
    println!(
        "    baseline, POST to its 202 (durable):  p50 {:>6.1} ms, p99 {:>6.1} ms",
        quantile(&measured.acks, 0.5),
        quantile(&measured.acks, 0.99)
    );
    println!(
        "    POST to the first frame with it:      p50 {:>6.1} ms, p99 {:>6.1} ms, max {:.1} ms",
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        latencies.last().unwrap()
    );
}

/// What [`measure`] saw.
pub struct Measured {
    /// Per batch seen, when it was sent (from the start) and its freshness
    /// in milliseconds.
    pub latencies: Vec<(Duration, f64)>,
    /// Each POST's round trip to its `202`, in milliseconds.
    pub acks: Vec<f64>,
    /// Events per second sent.
    pub achieved: f64,
    /// Requests sent later than their schedule.
    pub late_sends: usize,
    /// Batches never seen in a frame.
    pub unseen: usize,
}

/// Offers `rate` events/s to `tally` for `seconds`, stamped with the
/// current time, and times each batch from its POST to the first frame of
/// `metrics:events` in 10 s windows that includes it.
pub fn measure(tally: &Tally, rate: usize, seconds: u64) -> Measured {
    let (mut socket, _) =
        tungstenite::connect(format!("{}/v1/live", tally.url.replace("http://", "ws://"))).unwrap();
    if let MaybeTlsStream::Plain(s) = socket.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
    }
    let subscribe =
        json!({"action": "subscribe", "topic": "metrics:events", "window": "tumbling 10s"});
    socket.send(Message::text(subscribe.to_string())).unwrap();

    let epoch = Instant::now();
    let frames: Arc<Mutex<Vec<(Duration, String, u64)>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (frames, done) = (Arc::clone(&frames), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                match socket.read() {
                    Ok(Message::Text(text)) => {
                        let m: Value = serde_json::from_str(&text).unwrap();
                        if let (Some(start), Some(value)) =
                            (m["windowStart"].as_str(), m["value"].as_u64())
                        {
                            frames.lock().unwrap().push((
                                epoch.elapsed(),
                                start.to_string(),
                                value,
                            ));
                        }
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("WebSocket: {e}"),
                }
            }
        })
    };

    let templates = Arc::new(templates(3, BATCH));

    // Senders on a shared open-loop schedule: request i is due at i * interval,
    // whoever sends it. Each request is noted as (sent at, window start, the
    // events posted to that window by requests sent up to and including it);
    // a request sent later but finished sooner can only make this estimate
    // later, never earlier.
    let interval = Duration::from_secs_f64(BATCH as f64 / rate as f64);
    let total = (rate as u64 * seconds) as usize / BATCH;
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (ledger, url, templates) = (
                Arc::clone(&ledger),
                tally.url.clone(),
                Arc::clone(&templates),
            );
            std::thread::spawn(move || {
                let agent = agent();
                loop {
                    let i = {
                        let mut l = ledger.lock().unwrap();
                        l.next += 1;
                        l.next - 1
                    };
                    if i >= total {
                        break;
                    }
                    match (interval * i as u32).checked_sub(epoch.elapsed()) {
                        Some(wait) => std::thread::sleep(wait),
                        None => ledger.lock().unwrap().behind += 1,
                    }
                    let now_ms = now_ms();
                    let body = stamp(&templates[i % templates.len()], now_ms);
                    let window = now_ms - now_ms.rem_euclid(10_000);
                    let sent = {
                        let mut l = ledger.lock().unwrap();
                        let count = l.posted.entry(window).or_default();
                        *count += BATCH as u64;
                        let count = *count;
                        let sent = epoch.elapsed();
                        l.sends.push((sent, window, count));
                        sent
                    };
                    post_events(&agent, &url, &body);
                    ledger
                        .lock()
                        .unwrap()
                        .acks
                        .push((epoch.elapsed() - sent).as_secs_f64() * 1000.0);
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let Ledger {
        sends,
        mut acks,
        behind: late_sends,
        ..
    } = std::mem::take(&mut *ledger.lock().unwrap());
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();

    let frames = frames.lock().unwrap();
    let mut latencies = Vec::new();
    let mut unseen = 0;
    for (sent, window, count) in &sends {
        let start = format_rfc3339(*window);
        match frames
            .iter()
            .find(|(at, s, v)| at >= sent && *s == start && v >= count)
        {
            Some((at, _, _)) => latencies.push((*sent, (*at - *sent).as_secs_f64() * 1000.0)),
            None => unseen += 1,
        }
    }
    let last_sent = sends.iter().map(|s| s.0).max().unwrap();
    Measured {
        latencies,
        acks: std::mem::take(&mut acks),
        achieved: (total * BATCH) as f64 / last_sent.as_secs_f64(),
        late_sends,
        unseen,
    }
}

/// What the senders share.
#[derive(Default)]
struct Ledger {
    /// The next request to send.
    next: usize,
    /// Events posted so far, per 10 s window.
    posted: HashMap<i64, u64>,
    /// (sent at, window start, events posted to that window up to this request).
    sends: Vec<(Duration, i64, u64)>,
    /// Each request's round trip to its 202, in milliseconds.
    acks: Vec<f64>,
    /// Requests sent later than their schedule.
    behind: usize,
}
