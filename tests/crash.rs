//! The kill harness: exactly-once under `kill -9`, from the client's retry on.
//!
//! A seeded event set, with events out of order, late within the allowed
//! lateness, and too late, each with an `eventId`, is posted to `tally run`.
//! The process is killed with SIGKILL at random moments while a request is
//! in flight and its workers are busy with the backlog, and restarted each
//! time with another number of workers, so every restart restores a
//! checkpoint onto a different layout. The client sends the request it
//! lost the answer of again, as a client does, and sends some requests twice
//! although they were answered. At the end, every stored window must equal
//! what a plain batch aggregation of the same events, each once, gives, the
//! dead letters must be exactly the too-late events, and the sketches must
//! say what those of a run without failures or repeats say (see
//! [`sketch_summary`]), with every quantile within KLL's rank error of the
//! events' own and every top item's count exact.
//!
//! `TALLY_HARNESS_SEED`, `TALLY_HARNESS_EVENTS` and `TALLY_HARNESS_KILLS`
//! change the trial; `scripts/kill-harness.sh` runs many, larger ones.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tally_dataflow::aggregate::{AggregateKind, Sketch};

use serde_json::Value as Json;

use crate::util::{base_ms, dead_letters, eventually, sketch_summary, Generated, Sketched, Tally};

/// The metrics whose windows hold sketches.
pub(crate) const SKETCHED: [&str; 3] = ["unique_users", "ad_latency", "top_creatives"];

/// Events per request.
pub(crate) const BATCH: usize = 500;
/// Event-time step between consecutive events.
pub(crate) const STEP_MS: i64 = 10;
/// Log partitions in the harness. Events go to the partition of their id,
/// so each request lands behind the one before it, in both.
const PARTITIONS: &str = "2";
/// One request in this many is sent twice, as if its answer were lost.
pub(crate) const RETRIED: u32 = 20;

/// What a harness's client has had accepted: the events a batch
/// aggregation counts, how many were too late (the dead letters), and how
/// many answered requests it sent again.
#[derive(Default)]
pub(crate) struct Sent {
    pub(crate) posted: Vec<Generated>,
    pub(crate) too_late: usize,
    pub(crate) retried: usize,
}

impl Sent {
    /// Notes `request`, answered `202`. Returns whether the client did not
    /// hear the answer (one request in [`RETRIED`]), and so sends it again.
    pub(crate) fn accepted(
        &mut self,
        request: &[(Generated, Kind)],
        rng: &mut fastrand::Rng,
    ) -> bool {
        self.posted.extend(
            request
                .iter()
                .filter(|(_, k)| *k != Kind::TooLate)
                .map(|(e, _)| e.clone()),
        );
        self.too_late += request.iter().filter(|(_, k)| *k == Kind::TooLate).count();
        let again = rng.u32(..RETRIED) == 0;
        self.retried += usize::from(again);
        again
    }
}

/// What the harness does with an event.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    OnTime,
    /// Behind the watermark, within the allowed lateness: it revises.
    Late,
    /// Past the allowed lateness whatever the partition layout: dead letter.
    TooLate,
}

pub(crate) fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The event set of `seed`, cut into requests. Times advance by `STEP_MS`
/// per event, with a jitter inside the 2 s out-of-orderness.
///
/// A request starting at `t` lands behind the previous request, which
/// ended at most 3 requests (15 s) before `t` after a restart, so the
/// watermark it is judged against lies in
/// `[t - 17 s, t - 2 s]`. Late events sit 10-25 s back, within the 30 s
/// lateness of any such watermark; too-late ones 60-200 s back, beyond it.
pub(crate) fn generate(seed: u64, count: usize) -> Vec<Vec<(Generated, Kind)>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut sketched = Sketched::new(seed);
    let events: Vec<(Generated, Kind)> = (0..count)
        .map(|i| {
            let purchase = rng.u32(..8) == 0;
            let nominal = base_ms() + i as i64 * STEP_MS;
            // The first requests have no watermark to be late against.
            let warm = i >= 20 * BATCH;
            let (kind, time_ms) = match rng.u32(..1000) {
                0..=19 if warm => (Kind::Late, nominal - rng.i64(10_000..25_000)),
                20..=24 if warm => (Kind::TooLate, nominal - rng.i64(60_000..200_000)),
                _ => (Kind::OnTime, nominal + rng.i64(-1_500..1_500)),
            };
            let event = Generated {
                event_type: if purchase { "purchase" } else { "ad_click" },
                time_ms,
                campaign: format!("camp_{}", rng.u32(..4)),
                country: ["US", "DE", "IN"][rng.usize(..3)],
                device: ["MOBILE", "DESKTOP"][rng.usize(..2)],
                user: format!("usr_{}", rng.u32(..5000)),
                amount: purchase.then(|| rng.u32(100..50_000) as f64 / 100.0),
                latency_ms: (!purchase).then(|| sketched.latency()),
                creative: sketched.creative(),
            };
            (event, kind)
        })
        .collect();
    events.chunks(BATCH).map(<[_]>::to_vec).collect()
}

/// A stored window's key: metric, window, start, group.
pub(crate) type Key = (String, String, i64, String);

/// What a window holds: event count, and sum in billionths.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub(crate) struct Value {
    pub count: i64,
    pub sum: i128,
}

/// The plain batch aggregation of the default configuration's metrics and
/// their rollups, of the windows that end before `closed_before`: by every
/// dimension, by none and by each one alone, each over ten seconds, a
/// minute, an hour and a day.
pub(crate) fn reference(events: &[Generated], closed_before: i64) -> BTreeMap<Key, Value> {
    let mut windows: BTreeMap<Key, Value> = BTreeMap::new();
    for e in events {
        let full = [e.campaign.as_str(), e.country, e.device].join("\u{1f}");
        let groups = [full.as_str(), "", e.campaign.as_str(), e.country, e.device];
        let amount = e.amount.map_or(0, |a| (a * 1e9).round() as i128);
        let mut add = |metric: &str, window: &str, start: i64, group: &str, sum: i128| {
            let value = windows
                .entry((metric.into(), window.into(), start, group.to_owned()))
                .or_default();
            value.count += 1;
            value.sum += sum;
        };
        for (window, start) in closed(e, closed_before) {
            for group in groups {
                add("events", window, start, group, 0);
                if e.event_type == "ad_click" {
                    add("ad_clicks", window, start, group, 0);
                    add("unique_users", window, start, group, 0);
                } else if e.event_type == "purchase" {
                    add("revenue", window, start, group, amount);
                    add("avg_order_value", window, start, group, amount);
                }
            }
            if e.event_type == "ad_click" {
                for group in latency_groups(e) {
                    add("ad_latency", window, start, &group, 0);
                }
                for group in ["", e.country] {
                    add("top_creatives", window, start, group, 0);
                }
            }
        }
        if e.event_type == "ad_click" {
            let last = e.time_ms.div_euclid(10_000) * 10_000;
            for k in 0..30 {
                add(
                    "ad_clicks",
                    "sliding 5m every 10s",
                    last - k * 10_000,
                    &full,
                    0,
                );
            }
        }
    }
    windows
}

/// The tumbling windows of [`WINDOWS`] that hold `e` and end before
/// `closed_before`, with their starts.
fn closed(e: &Generated, closed_before: i64) -> impl Iterator<Item = (&'static str, i64)> + '_ {
    WINDOWS
        .iter()
        .map(|(window, size)| (*window, e.time_ms.div_euclid(*size) * size, *size))
        .filter(move |(_, start, size)| start + size <= closed_before)
        .map(|(window, start, _)| (window, start))
}

/// The groups of `ad_latency` (by country and device) an event is in.
fn latency_groups(e: &Generated) -> [String; 4] {
    [
        [e.country, e.device].join("\u{1f}"),
        String::new(),
        e.country.to_owned(),
        e.device.to_owned(),
    ]
}

/// The values the sketches of `ad_latency` and `top_creatives` took, by
/// window, for the windows of [`reference`].
#[derive(Default)]
struct Samples {
    latencies: BTreeMap<Key, Vec<f64>>,
    creatives: BTreeMap<Key, BTreeMap<String, u64>>,
}

fn samples(events: &[Generated], closed_before: i64) -> Samples {
    let mut samples = Samples::default();
    for e in events.iter().filter(|e| e.event_type == "ad_click") {
        for (window, start) in closed(e, closed_before) {
            let key =
                |metric: &str, group: &str| (metric.into(), window.into(), start, group.into());
            for group in latency_groups(e) {
                let values = samples
                    .latencies
                    .entry(key("ad_latency", &group))
                    .or_default();
                values.extend(e.latency_ms);
            }
            for group in ["", e.country] {
                let counts = samples
                    .creatives
                    .entry(key("top_creatives", group))
                    .or_default();
                *counts.entry(e.creative.clone()).or_default() += 1;
            }
        }
    }
    samples
}

/// Where the stored sketches of `ad_latency` and `top_creatives` miss the
/// events' true values: a count, minimum or maximum that is not exact, a
/// default quantile whose rank is off by more than KLL's stated error, or
/// a creative's count outside the bounds stored (with 40 creatives, the
/// frequent-items sketch is exact).
fn sketch_misses(dir: &Path, samples: &Samples) -> Vec<String> {
    let conn = Connection::open(dir.join("results.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT metric, window, start, grp, sketch FROM windows WHERE metric IN ('ad_latency', 'top_creatives')")
        .unwrap();
    let rows: Vec<(Key, Vec<u8>)> = stmt
        .query_map([], |r| {
            Ok(((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?), r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let epsilon = AggregateKind::Quantiles { k: 200 }.rank_error().unwrap();
    let mut misses = Vec::new();
    let (mut latencies, mut creatives) = (0, 0);
    for (key, bytes) in rows {
        let sketch = Sketch::from_bytes(&bytes).unwrap();
        if let Some(values) = samples.latencies.get(&key) {
            latencies += 1;
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let n = sorted.len();
            let exact = (n as u64, sorted[0], sorted[n - 1]);
            if sketch.extremes() != Some(exact) {
                misses.push(format!(
                    "{key:?}: {:?}, expected {exact:?}",
                    sketch.extremes()
                ));
            }
            for q in [0.5, 0.9, 0.99] {
                let v = sketch.quantile(q).unwrap();
                let below = sorted.partition_point(|x| *x < v) as f64 / n as f64;
                let at_or_below = sorted.partition_point(|x| *x <= v) as f64 / n as f64;
                if below > q + epsilon || at_or_below < q - epsilon {
                    misses.push(format!(
                        "{key:?}: quantile {q} is {v}, of ranks {below}..{at_or_below}"
                    ));
                }
            }
        } else if let Some(counts) = samples.creatives.get(&key) {
            creatives += 1;
            let (items, weight) = sketch.items().unwrap();
            let total: u64 = counts.values().sum();
            let held = items.len() == counts.len()
                && items.iter().all(|i| {
                    counts
                        .get(&i.item)
                        .is_some_and(|c| i.lower <= *c && *c <= i.upper)
                });
            if weight != total || !held {
                misses.push(format!(
                    "{key:?}: {items:?} of {weight}, expected {counts:?}"
                ));
            }
        }
    }
    if latencies < samples.latencies.len() || creatives < samples.creatives.len() {
        misses.push(format!(
            "{latencies} of {} ad_latency and {creatives} of {} top_creatives windows are stored",
            samples.latencies.len(),
            samples.creatives.len()
        ));
    }
    misses
}

/// Every stored window: its value, what its sketch says, its revision.
fn stored(dir: &Path) -> BTreeMap<Key, (Value, Option<String>)> {
    let conn = Connection::open(dir.join("results.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT metric, window, start, grp, count, sum, sketch FROM windows")
        .unwrap();
    stmt.query_map([], |r| {
        let sum: f64 = r.get(5)?;
        let sketch: Option<Vec<u8>> = r.get(6)?;
        Ok((
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?),
            (
                Value {
                    count: r.get(4)?,
                    sum: (sum * 1e9).round() as i128,
                },
                sketch.map(|b| sketch_summary(&b)),
            ),
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Every key where `got` differs from `expected`, as a short report.
pub(crate) fn differences(
    got: &BTreeMap<Key, (Value, Option<String>)>,
    expected: &BTreeMap<Key, Value>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (key, want) in expected {
        match got.get(key) {
            Some((value, _)) if value == want => {}
            Some((value, _)) => out.push(format!("{key:?}: stored {value:?}, expected {want:?}")),
            None => out.push(format!("{key:?}: missing, expected {want:?}")),
        }
    }
    for key in got.keys().filter(|k| !expected.contains_key(*k)) {
        out.push(format!("{key:?}: stored, but holds no events"));
    }
    out
}

/// A request's events as the client sends them: each with its id, the
/// seed and its place in the event set, the same on every send.
pub(crate) fn body(seed: u64, index: usize, request: &[(Generated, Kind)]) -> Vec<Json> {
    request
        .iter()
        .enumerate()
        .map(|(k, (event, _))| {
            let mut json = event.json();
            json["eventId"] = format!("h{seed}-{}", index * BATCH + k).into();
            json
        })
        .collect()
}

fn start(dir: &Path, workers: usize) -> Tally {
    // The default idle timeout: idle partitions are marked in the log, so
    // a restart reads the same decisions.
    let env = [
        ("TALLY__LOG__PARTITIONS", PARTITIONS),
        ("TALLY__CHECKPOINT__INTERVAL", "2s"),
    ];
    Tally::start(dir, &env, &["--workers", &workers.to_string()])
}

/// The windows of the reference, and their lengths.
pub(crate) const WINDOWS: [(&str, i64); 4] = [
    ("tumbling 10s", 10_000),
    ("tumbling 1m", 60_000),
    ("tumbling 1h", 3_600_000),
    ("tumbling 1d", 86_400_000),
];

/// Waits until the store's windows that end before `closed_before` equal
/// `expected`, or fails with what differs.
fn settle(
    tally: &Tally,
    expected: &BTreeMap<Key, Value>,
    closed_before: i64,
    timeout: Duration,
) -> BTreeMap<Key, (Value, Option<String>)> {
    let ends_before = |key: &Key| {
        let length = WINDOWS
            .iter()
            .find(|(name, _)| *name == key.1)
            .map_or(0, |w| w.1);
        key.2 + length <= closed_before
    };
    let deadline = Instant::now() + timeout;
    loop {
        let mut got = stored(&tally.dir);
        got.retain(|key, _| ends_before(key));
        let diff = differences(&got, expected);
        if diff.is_empty() {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} stored windows differ from the reference after {timeout:?}; first: {:#?}",
            diff.len(),
            &diff[..diff.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn committed_checkpoints(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("checkpoints"))
        .map(|entries| {
            entries
                .filter(|e| e.as_ref().unwrap().path().join("manifest.json").exists())
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn kill_9_at_random_moments_stores_exactly_the_failure_free_results() {
    let seed = setting("TALLY_HARNESS_SEED", 1);
    let count = setting("TALLY_HARNESS_EVENTS", 100_000) as usize;
    let kills = setting("TALLY_HARNESS_KILLS", 5) as usize;
    let requests = generate(seed, count);
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    // Kill during random requests, and once more while the backlog drains.
    let mut kill_during: Vec<usize> = (0..kills.saturating_sub(1))
        .map(|_| rng.usize(..requests.len()))
        .collect();
    kill_during.sort_unstable();

    let dir = tempfile::tempdir().unwrap();
    let layouts = [2, 1, 3, 4];
    let end_ms = base_ms() + count as i64 * STEP_MS + 600_000;
    let mut tally = start(dir.path(), layouts[0]);
    let mut killed = 0;
    let mut checkpoints_seen = 0;
    let mut sent = Sent::default();
    let mut kill = |tally: Tally, killed: &mut usize| -> Tally {
        checkpoints_seen = checkpoints_seen.max(committed_checkpoints(dir.path()));
        tally.kill9();
        *killed += 1;
        start(dir.path(), layouts[*killed % layouts.len()])
    };
    for (i, request) in requests.iter().enumerate() {
        let events = body(seed, i, request);
        while kill_during.first() == Some(&i) {
            kill_during.remove(0);
            // A random moment while the workers work through what was
            // posted, and this request is in flight: whether it reached
            // the log or not, its answer is lost, so the client sends it
            // again after the restart.
            std::thread::sleep(Duration::from_millis(rng.u64(0..1500)));
            let (url, sent) = (tally.url.clone(), events.clone());
            let in_flight = std::thread::spawn(move || Tally::try_post_events(&url, &sent));
            std::thread::sleep(Duration::from_micros(rng.u64(0..10_000)));
            tally = kill(tally, &mut killed);
            let _lost = in_flight.join().expect("the request thread");
        }
        tally.post_events(&events);
        if sent.accepted(request, &mut rng) {
            // Answered, but the client did not hear it: sent again.
            tally.post_events(&events);
        }
    }
    let Sent {
        posted,
        too_late,
        retried,
    } = sent;
    tally.flush(end_ms);
    // Once more while the backlog drains.
    std::thread::sleep(Duration::from_millis(rng.u64(0..1500)));
    tally = kill(tally, &mut killed);
    assert_eq!(killed, kills.max(1));
    assert!(retried > 0, "no request was sent twice");
    assert!(
        checkpoints_seen > 0,
        "no checkpoint was committed before a kill, so none was restored"
    );

    // Every partition's watermark ends 2 s (the out-of-orderness) before
    // the flush.
    let closed_before = end_ms - 2_000;
    let expected = reference(&posted, closed_before);
    assert!(expected.len() > 1000, "{} windows", expected.len());
    let with_failures = settle(&tally, &expected, closed_before, Duration::from_secs(180));
    let revised: i64 = Connection::open(dir.path().join("results.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM windows WHERE revision > 0", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(revised > 0, "late events should have revised windows");
    eventually(Duration::from_secs(30), || {
        let dead = dead_letters(dir.path());
        if dead == too_late {
            Ok(())
        } else {
            Err(format!("{dead} dead letters, {too_late} events too late"))
        }
    });
    tally.stop();

    // The same events, posted the same way, without failures.
    let clean = tempfile::tempdir().unwrap();
    let tally = start(clean.path(), 2);
    for (i, request) in requests.iter().enumerate() {
        tally.post_events(&body(seed, i, request));
    }
    tally.flush(end_ms);
    let without = settle(&tally, &expected, closed_before, Duration::from_secs(180));
    tally.stop();
    let sketches = |rows: &BTreeMap<Key, (Value, Option<String>)>| -> Vec<(Key, Option<String>)> {
        rows.iter()
            .filter(|(k, _)| SKETCHED.contains(&k.0.as_str()))
            .map(|(k, v)| (k.clone(), v.1.clone()))
            .collect()
    };
    let (a, b) = (sketches(&with_failures), sketches(&without));
    for metric in SKETCHED {
        assert!(a.iter().any(|(k, _)| k.0 == metric), "no {metric} windows");
    }
    assert!(a.iter().all(|(_, e)| e.is_some()));
    let differing: Vec<_> = a.iter().zip(&b).filter(|(x, y)| x != y).take(5).collect();
    assert!(
        differing.is_empty(),
        "sketches differ from the failure-free run: {differing:#?}"
    );
    let misses = sketch_misses(dir.path(), &samples(&posted, closed_before));
    assert!(
        misses.is_empty(),
        "{} sketches miss the events' values; first: {:#?}",
        misses.len(),
        &misses[..misses.len().min(5)]
    );
    eprintln!(
        "kill harness: seed {seed}, {count} events, {killed} kills in flight, {retried} requests sent twice, {} windows exact, {too_late} dead letters, {revised} revised",
        expected.len()
    );
}

#[test]
fn a_restart_reads_only_what_follows_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let tally = start(dir.path(), 2);
    let events: Vec<Generated> = generate(7, 20 * BATCH)
        .into_iter()
        .flatten()
        .map(|(e, _)| e)
        .collect();
    for chunk in events.chunks(BATCH) {
        tally.post_events(&chunk.iter().map(Generated::json).collect::<Vec<_>>());
    }
    eventually(Duration::from_secs(60), || {
        match tally.prometheus("tally_checkpoints_total").unwrap_or(0) {
            0 => Err("no checkpoint yet".to_string()),
            _ => Ok(()),
        }
    });
    tally.stop();
    let newest = std::fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path().join("manifest.json"))
        .filter(|m| m.exists())
        .max()
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(newest).unwrap()).unwrap();
    let before_cut: u64 = manifest["cuts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["next_offset"].as_u64().unwrap())
        .sum();
    assert!(
        before_cut > 0,
        "the checkpoint's cut is at the start of the log"
    );

    let tally = start(dir.path(), 1);
    tally.flush(base_ms() + 3_600_000);
    let closed_before = base_ms() + 3_600_000 - 2_000;
    settle(
        &tally,
        &reference(&events, closed_before),
        closed_before,
        Duration::from_secs(60),
    );
    // The restored job read the records after the cut, the flush
    // events, and no others.
    assert_eq!(
        tally.prometheus("tally_events_read_total").unwrap_or(0),
        events.len() as u64 + crate::util::PARTITIONS as u64 - before_cut
    );
    tally.stop();
}
