//! (c) Freshness: the time from sending a POST to the first WebSocket frame
//! whose value includes its events, at a fixed offered rate.
//!
//! Senders post batches of 1000 events stamped with the current time, on a
//! fixed schedule (an open loop: a late send does not push the schedule
//! back). Beside them a probe posts one event of campaign `probe` every
//! 100 ms, as a dashboard's own traffic would. One subscriber follows the
//! probe's campaign, `metrics:ad_clicks:campaignId:probe` in 1 m windows,
//! which changes with each probe; and `metrics:events` in 10 s windows,
//! which changes with every batch and so is always busy. A POST is seen
//! when a frame for its window carries a count at least the number of
//! events posted to that window up to and including it. The baseline is the
//! load's POSTs' own round trip to their `202`. Beside the probe's figure go
//! the part of it until the log took the probe (its frame's `ingestedAt`)
//! and the server's `tally_live_freshness_seconds` over the run, and the
//! probe's figure without the first second of load, when every group is new
//! to the job.
//!
//! It measures `tally run` at 100,000 and 20,000 events/s, then, with the
//! services of `scripts/services.sh` named by `KAFKA_BROKERS`,
//! `CLICKHOUSE_URL` and `REDIS_URL`, `tally run` and the cluster of (g) at
//! 50,000 events/s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

use tally_dataflow::time::{format_rfc3339, parse_rfc3339};

use crate::cluster::{Cluster, Services};
use crate::support::{
    agent, bucket_quantile, buckets, now_ms, post_events, quantile, stamp, templates, Tally,
};

type Socket = tungstenite::WebSocket<MaybeTlsStream<std::net::TcpStream>>;

const RATE: usize = 100_000;
const BATCH: usize = 1000;
const SECONDS: u64 = 20;
const SENDERS: usize = 4;
/// How often the probe posts its one event.
const PROBE_EVERY: Duration = Duration::from_millis(100);
const PROBE_TOPIC: &str = "metrics:ad_clicks:campaignId:probe";
/// The load starts from idle: every group is new to the job then, and the
/// first second of it is reported apart as well.
const COLD: Duration = Duration::from_secs(1);
/// The server's histogram of partials' freshness at the live hub.
const HUB_FRESHNESS: &str = "tally_live_freshness_seconds";

/// The cluster's load: the target for it.
const CLUSTER_RATE: usize = 50_000;

pub fn run() {
    // The targets' rates: the load and a fifth of it.
    for rate in [RATE, RATE / 5]
        .into_iter()
        .filter(|_| std::env::var("ONLY_CLUSTER").is_err())
    {
        let dir = tempfile::tempdir().unwrap();
        // The defaults, as a user runs them (a `TALLY__*` variable in the
        // bench's environment reaches tally too).
        let tally = Tally::start(dir.path(), &[]);
        report("tally run", rate, measure(&tally, rate, SECONDS));
    }
    let Some(services) = Services::from_env() else {
        println!("(c) freshness on the cluster: skipped; start the services with scripts/services.sh and export their addresses");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[]);
    let embedded = measure(&tally, CLUSTER_RATE, SECONDS);
    drop(tally);
    let cluster = Cluster::start(&services, &dir.path().join("cluster"), &[], 1);
    let measured = measure(&cluster.gateways[0], CLUSTER_RATE, SECONDS);
    drop(cluster);
    report("tally run", CLUSTER_RATE, embedded);
    report(
        "cluster: gateway, Kafka, a worker process, Redis, gateway",
        CLUSTER_RATE,
        measured,
    );
}

fn report(what: &str, rate: usize, mut measured: Measured) {
    let sorted = |latencies: &[(Duration, f64)]| {
        let mut sorted: Vec<f64> = latencies.iter().map(|l| l.1).collect();
        sorted.sort_by(f64::total_cmp);
        sorted
    };
    let (probe, latencies) = (sorted(&measured.probe), sorted(&measured.latencies));
    let interval = std::env::var("TALLY__LIVE__INTERVAL").unwrap_or_else(|_| "the default".into());
    println!("(c) freshness of {what}, POST to the first WebSocket frame that includes it, live.interval = {interval}");
    println!(
        "    offered {rate} events/s in batches of {BATCH} for {SECONDS} s from {SENDERS} senders (achieved {:.0}/s, {} sends behind schedule), {} batches never seen",
        measured.achieved, measured.late_sends, measured.unseen
    );
    measured.acks.sort_by(f64::total_cmp);
    measured.probe_to_log.sort_by(f64::total_cmp);
    println!(
        "    baseline, POST to its 202 (durable):  {}",
        p50_p99(&measured.acks)
    );
    println!(
        "    probe POST to the first frame with it: p50 {:>6.1} ms, p99 {:>6.1} ms, max {:.1} ms ({} probes, {} never seen)",
        quantile(&probe, 0.5),
        quantile(&probe, 0.99),
        probe.last().unwrap(),
        probe.len(),
        measured.probes_unseen
    );
    let warm = sorted(
        &measured
            .probe
            .iter()
            .filter(|(sent, _)| *sent >= COLD)
            .copied()
            .collect::<Vec<_>>(),
    );
    println!(
        "      after the first {:?} of load (from idle before): p50 {:>6.1} ms, p99 {:>6.1} ms, max {:.1} ms ({} probes)",
        COLD,
        quantile(&warm, 0.5),
        quantile(&warm, 0.99),
        warm.last().unwrap(),
        warm.len()
    );
    println!(
        "      of which POST to the log taking it:  {}",
        p50_p99(&measured.probe_to_log)
    );
    println!(
        "    every partial, the log to the live hub (tally_live_freshness_seconds): p50 {:>6.1} ms, p99 {:>6.1} ms",
        measured.log_to_hub.0, measured.log_to_hub.1
    );
    println!(
        "    load POST to the first frame of metrics:events with it (always busy): p50 {:>6.1} ms, p99 {:>6.1} ms, max {:.1} ms",
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        latencies.last().unwrap()
    );
}

/// The median and the 99th percentile of `sorted` milliseconds.
fn p50_p99(sorted: &[f64]) -> String {
    format!(
        "p50 {:>6.1} ms, p99 {:>6.1} ms",
        quantile(sorted, 0.5),
        quantile(sorted, 0.99)
    )
}

/// What [`measure`] saw.
pub struct Measured {
    /// Per batch seen in `metrics:events`, when it was sent (from the
    /// start) and its freshness in milliseconds.
    pub latencies: Vec<(Duration, f64)>,
    /// The same for each probe seen in its campaign's topic.
    pub probe: Vec<(Duration, f64)>,
    /// Of each probe's freshness, the milliseconds from its POST to when
    /// the log took it, as its frame's `ingestedAt` says: the rest is the
    /// way from the log to the screen.
    pub probe_to_log: Vec<f64>,
    /// The p50 and p99 in milliseconds of the server's own
    /// `tally_live_freshness_seconds` over the run: every partial, from the
    /// log to the live hub.
    pub log_to_hub: (f64, f64),
    /// Probes never seen in a frame.
    pub probes_unseen: usize,
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
/// current time, and a probe event every [`PROBE_EVERY`]; times each batch
/// from its POST to the first frame of `metrics:events` in 10 s windows that
/// includes it, and each probe to the first of its campaign's topic.
pub fn measure(tally: &Tally, rate: usize, seconds: u64) -> Measured {
    let (mut socket, _) =
        tungstenite::connect(format!("{}/v1/live", tally.url.replace("http://", "ws://"))).unwrap();
    if let MaybeTlsStream::Plain(s) = socket.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
    }
    for (topic, window) in [
        ("metrics:events", "tumbling 10s"),
        (PROBE_TOPIC, "tumbling 1m"),
    ] {
        let subscribe = json!({"action": "subscribe", "topic": topic, "window": window});
        socket.send(Message::text(subscribe.to_string())).unwrap();
    }
    warm_up(tally, &mut socket);
    let hub_before = buckets(&tally.url, HUB_FRESHNESS);

    let epoch = Instant::now();
    let epoch_ms = now_ms();
    let frames: Arc<Mutex<Vec<Frame>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (frames, done) = (Arc::clone(&frames), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let Some(m) = read(&mut socket) else { continue };
                let ingested = m["ingestedAt"].as_str().and_then(parse_rfc3339);
                if let (Some(topic), Some(start), Some(value)) = (
                    m["topic"].as_str(),
                    m["windowStart"].as_str(),
                    m["value"].as_u64(),
                ) {
                    frames.lock().unwrap().push(Frame {
                        at: epoch.elapsed(),
                        probe: topic == PROBE_TOPIC,
                        start: start.to_string(),
                        value,
                        ingested,
                    });
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
    let stop_probe = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (url, done) = (tally.url.clone(), Arc::clone(&stop_probe));
        std::thread::spawn(move || {
            let agent = agent();
            let mut rng = fastrand::Rng::with_seed(7);
            let mut posted: HashMap<i64, u64> = HashMap::new();
            let mut sends = Vec::new();
            for i in 1.. {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if let Some(wait) = (PROBE_EVERY * i).checked_sub(epoch.elapsed()) {
                    std::thread::sleep(wait);
                }
                let now_ms = now_ms();
                let mut event = crate::support::event(&mut rng, now_ms);
                event["eventType"] = json!("ad_click");
                event["dimensions"]["campaignId"] = json!("probe");
                let window = now_ms - now_ms.rem_euclid(60_000);
                let count = posted.entry(window).or_default();
                *count += 1;
                sends.push((epoch.elapsed(), window, *count));
                post_events(&agent, &url, &serde_json::to_vec(&[event]).unwrap());
            }
            sends
        })
    };
    for s in senders {
        s.join().unwrap();
    }
    let Ledger {
        sends,
        mut acks,
        behind: late_sends,
        ..
    } = std::mem::take(&mut *ledger.lock().unwrap());
    // The probe stops with the load; what it sent last gets time to show.
    stop_probe.store(true, std::sync::atomic::Ordering::Relaxed);
    let probes = probe.join().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();

    let hub_after = buckets(&tally.url, HUB_FRESHNESS);
    let log_to_hub = (
        bucket_quantile(&hub_before, &hub_after, 0.5) * 1000.0,
        bucket_quantile(&hub_before, &hub_after, 0.99) * 1000.0,
    );
    let frames = frames.lock().unwrap();
    let seen = |sends: &[(Duration, i64, u64)], probe: bool| {
        let mut latencies = Vec::new();
        let mut to_log = Vec::new();
        let mut unseen = 0;
        for (sent, window, count) in sends {
            let start = format_rfc3339(*window);
            match frames.iter().find(|f| {
                f.probe == probe && f.at >= *sent && f.start == start && f.value >= *count
            }) {
                Some(f) => {
                    latencies.push((*sent, (f.at - *sent).as_secs_f64() * 1000.0));
                    if let Some(ingested) = f.ingested {
                        to_log.push((ingested - epoch_ms) as f64 - sent.as_secs_f64() * 1000.0);
                    }
                }
                None => unseen += 1,
            }
        }
        (latencies, to_log, unseen)
    };
    let (latencies, _, unseen) = seen(&sends, false);
    let (probe, probe_to_log, probes_unseen) = seen(&probes, true);
    let last_sent = sends.iter().map(|s| s.0).max().unwrap();
    Measured {
        latencies,
        probe,
        probe_to_log,
        log_to_hub,
        probes_unseen,
        acks: std::mem::take(&mut acks),
        achieved: (total * BATCH) as f64 / last_sent.as_secs_f64(),
        late_sends,
        unseen,
    }
}

/// Posts one event and waits for `metrics:events` to show it, so the
/// measurement starts once the whole path is up: on a cluster, the worker
/// may join after the gateway is ready. It adds one event to the count of
/// its window, less than a batch, so no batch is seen sooner for it.
fn warm_up(tally: &Tally, socket: &mut Socket) {
    let now_ms = now_ms();
    let mut event = crate::support::event(&mut fastrand::Rng::with_seed(1), now_ms);
    event["eventType"] = json!("warm_up");
    post_events(&agent(), &tally.url, &serde_json::to_vec(&[event]).unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no frame within 60 s of the first event"
        );
        if read(socket)
            .is_some_and(|m| m["topic"] == "metrics:events" && m["value"].as_u64() > Some(0))
        {
            return;
        }
    }
}

/// The next text message, or `None` once the socket's read timeout passes
/// without one.
fn read(socket: &mut Socket) -> Option<Value> {
    match socket.read() {
        Ok(Message::Text(text)) => Some(serde_json::from_str(&text).unwrap()),
        Ok(_) => None,
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("WebSocket: {e}"),
    }
}

/// A frame of either topic, as the subscriber got it.
struct Frame {
    at: Duration,
    /// Whether it is of the probe's topic, else of `metrics:events`.
    probe: bool,
    start: String,
    value: u64,
    /// Its `ingestedAt`, in Unix milliseconds.
    ingested: Option<i64>,
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
