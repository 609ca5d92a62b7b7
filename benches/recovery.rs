//! (e) Recovery: what checkpoints cost under load, and how fast a restart
//! with a backlog gets back to real time.
//!
//! Checkpoints: `tally run` with the default 10 s interval takes 100k
//! events/s for 40 s; `/metrics` is read every 250 ms for each committed
//! checkpoint's size and the time from its first part to its commit. The
//! baselines are the log bytes the same 10 s of events take, and the interval.
//!
//! Restart: `tally run` takes 50k events/s, is killed with SIGKILL, and for
//! 60 s the same rate is appended to its log directly, as a Kafka backlog
//! builds while workers are down. Then it restarts with live traffic at the
//! same rate, and the time until its watermark is back within 5 s of the wall
//! clock is measured. The baselines are the backlog's own 60 s, and the time
//! to read its records back from the log files without processing them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tally_connectors::log::EventLog;
use tally_dataflow::config::{Fsync, LogConfig};
use tally_dataflow::event::{parse_batch, EventLimits};

use crate::support::{agent, metrics_text, now_ms, post_events, scrape, stamp, templates, Tally};

const BATCH: usize = 1000;
const SENDERS: usize = 4;
const PARTITIONS: u32 = 8;

pub fn run() {
    checkpoints(100_000, Duration::from_secs(40));
    restart(50_000, Duration::from_secs(60));
}

fn checkpoints(rate: usize, length: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[]);
    let load = Load::start(&tally.url, rate);
    let started = Instant::now();
    let log_start = scrape(&tally.url)["tally_log_bytes"];
    let mut seen = 0.0;
    let mut taken: Vec<(f64, f64)> = Vec::new();
    while started.elapsed() < length {
        std::thread::sleep(Duration::from_millis(250));
        let m = scrape(&tally.url);
        if m["tally_checkpoints_total"] > seen {
            seen = m["tally_checkpoints_total"];
            taken.push((
                m["tally_checkpoint_bytes"],
                m["tally_checkpoint_duration_seconds"] * 1000.0,
            ));
        }
    }
    let log_bytes = scrape(&tally.url)["tally_log_bytes"] - log_start;
    let sent = load.stop();
    let per_interval = log_bytes * 10.0 / started.elapsed().as_secs_f64();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], *v.last().unwrap())
    };
    let (bytes, bytes_max) = median(taken.iter().map(|t| t.0).collect());
    let (ms, ms_max) = median(taken.iter().map(|t| t.1).collect());
    println!("(e) checkpoints at {rate} events/s offered ({:.0}/s sent), interval 10 s, {} committed in {:.0} s", sent as f64 / started.elapsed().as_secs_f64(), taken.len(), length.as_secs_f64());
    println!(
        "    baseline, the log bytes of 10 s of events:  {:>8.1} MB",
        per_interval / 1e6
    );
    println!("    checkpoint size:                             {:>8.1} KB median, {:.1} KB max  ({:.2}% of the events it covers)", bytes / 1e3, bytes_max / 1e3, 100.0 * bytes / per_interval);
    println!("    first part to commit:                        {:>8.1} ms median, {:.1} ms max  ({:.2}% of the interval)", ms, ms_max, ms / 100.0);
}

fn restart(rate: usize, backlog: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[]);
    let load = Load::start(&tally.url, rate);
    // Run until a checkpoint close to now is committed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while scrape(&tally.url)["tally_checkpoint_boundary_seconds"] < (now_ms() / 1000 - 15) as f64 {
        assert!(Instant::now() < deadline, "no checkpoint within a minute");
        std::thread::sleep(Duration::from_millis(250));
    }
    load.stop();
    drop(tally);

    // The backlog, appended at the same rate in real time while tally is down.
    let log = EventLog::open(
        &dir.path().join("log"),
        &LogConfig {
            fsync: Fsync::Never,
            ..LogConfig::new(PARTITIONS)
        },
    )
    .unwrap();
    let before = log.next_offsets();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let templates = templates(rate as u64, BATCH);
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < backlog {
        let due = Duration::from_secs_f64((i * BATCH) as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let body = stamp(&templates[i % templates.len()], now_ms());
        // The records the gateway writes of the body.
        let records: Vec<Vec<u8>> = parse_batch(
            &body,
            false,
            now_ms(),
            i64::MAX / 2,
            &EventLimits::default(),
        )
        .unwrap()
        .into_iter()
        .map(|accepted| accepted.record)
        .collect();
        runtime
            .block_on(log.append(i as u32 % PARTITIONS, records))
            .unwrap();
        i += 1;
    }
    let backlog_events: u64 = log
        .next_offsets()
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .sum();
    // Baseline: the backlog's records read back from the files alone.
    let read_started = Instant::now();
    let mut read = 0;
    for (p, &from) in before.iter().enumerate() {
        let mut reader = log.reader(p as u32, from).unwrap();
        loop {
            let batches = reader.poll(1 << 20).unwrap();
            if batches.is_empty() {
                break;
            }
            read += batches.iter().map(|b| b.records.len()).sum::<usize>();
        }
    }
    let read_time = read_started.elapsed();
    assert_eq!(read as u64, backlog_events);
    log.close().unwrap();

    let restarted = Instant::now();
    let tally = Tally::start(dir.path(), &[]);
    let load = Load::start(&tally.url, rate);
    let caught_up = loop {
        let lag = scrape_lag(&tally.url);
        if lag.is_some_and(|l| l <= 5.0) {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(600),
            "not caught up within 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    load.stop();
    println!("(e) restart with {:.0} s of backlog at {rate} events/s ({backlog_events} events), live traffic at the same rate", backlog.as_secs_f64());
    println!(
        "    baseline, reading the backlog from the log files: {:>6.2} s",
        read_time.as_secs_f64()
    );
    println!(
        "    restart to a watermark within 5 s of real time:   {:>6.2} s  ({:.1}x real time)",
        caught_up.as_secs_f64(),
        backlog.as_secs_f64() / caught_up.as_secs_f64()
    );
}

/// Open-loop senders posting `rate` events/s of current time until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    sent: Arc<AtomicUsize>,
}

impl Load {
    fn start(url: &str, rate: usize) -> Load {
        let templates = Arc::new(templates(rate as u64, BATCH));
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let next = Arc::new(AtomicUsize::new(0));
        let epoch = Instant::now();
        let threads = (0..SENDERS)
            .map(|_| {
                let (stop, sent, next, templates, url) = (
                    Arc::clone(&stop),
                    Arc::clone(&sent),
                    Arc::clone(&next),
                    Arc::clone(&templates),
                    url.to_owned(),
                );
                std::thread::spawn(move || {
                    let agent = agent();
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let due = Duration::from_secs_f64((i * BATCH) as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(epoch.elapsed()) {
                            std::thread::sleep(wait);
                        }
                        let body = stamp(&templates[i % templates.len()], now_ms());
                        post_events(&agent, &url, &body);
                        sent.fetch_add(BATCH, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            sent,
        }
    }

    /// Stops the senders; returns the events sent.
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.sent.load(Ordering::Relaxed)
    }
}

/// The largest worker watermark lag, once every worker has one.
fn scrape_lag(url: &str) -> Option<f64> {
    let lags: Vec<f64> = metrics_text(url)
        .lines()
        .filter(|l| l.starts_with("tally_watermark_lag_seconds{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
        .collect();
    (!lags.is_empty()).then(|| lags.into_iter().fold(f64::MIN, f64::max))
}
