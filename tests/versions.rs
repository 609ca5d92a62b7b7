//! A changed metric: its results belong to the version of its definition,
//! so history never mixes what two definitions computed, and a backfill
//! computes the new one beside the old, which serves until it is done.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::util::{
    at, base_ms, clicks_per_minute_are, clickstream, eventually, per_minute_clicks, post_all,
    range, values, Generated, Tally,
};

const BY_CAMPAIGN: &str = r#"
[[metric]]
name = "ad_clicks"
event_type = "ad_click"
dimensions = ["campaignId"]
windows = ["tumbling 1m"]
"#;

/// The same metric with a dimension added.
const BY_CAMPAIGN_AND_COUNTRY: &str = r#"
[[metric]]
name = "ad_clicks"
event_type = "ad_click"
dimensions = ["campaignId", "country"]
windows = ["tumbling 1m"]
"#;

/// Before the change: clicks by campaign, and purchases.
pub const BEFORE: &str = r#"
[[metric]]
name = "ad_clicks"
event_type = "ad_click"
dimensions = ["campaignId"]
windows = ["tumbling 1m"]

[[metric]]
name = "purchases"
event_type = "purchase"
windows = ["tumbling 1m"]
"#;

/// After: clicks gain a dimension and a window, purchases are gone, and
/// revenue is new.
pub const AFTER: &str = r#"
[[metric]]
name = "ad_clicks"
event_type = "ad_click"
dimensions = ["campaignId", "country"]
windows = ["tumbling 1m", "tumbling 10s"]

[[metric]]
name = "revenue"
event_type = "purchase"
aggregate = "sum"
field = "values.amount"
dimensions = ["country"]
windows = ["tumbling 1m"]
"#;

/// The five minutes of a clickstream, by minute.
fn by_minute() -> String {
    format!("{}&resolution=1m", range())
}

fn start(data: &Path, config: &str) -> Tally {
    let file = data.with_extension("toml");
    std::fs::write(&file, config).unwrap();
    Tally::start_with_config(data, &file, &[CHECKPOINTS], &[])
}

/// Checkpoints every second of event time, so that a backfill meets the
/// live job within seconds of traffic.
const CHECKPOINTS: (&str, &str) = ("TALLY__CHECKPOINT__INTERVAL", "1s");

fn clicks_are(tally: &Tally, expected: &[u64]) {
    clicks_per_minute_are(tally, expected, Duration::from_secs(30));
}

fn catalog(tally: &Tally) -> Vec<Value> {
    let (status, catalog) = tally.get("/v1/catalog");
    assert_eq!(status, 200, "{catalog}");
    catalog["metrics"].as_array().unwrap().clone()
}

/// The catalog's entry for `name`.
fn entry(tally: &Tally, name: &str) -> Option<Value> {
    catalog(tally).into_iter().find(|m| m["name"] == name)
}

/// Moves event time on from `at` about as fast as the wall clock, as live
/// traffic does, until no backfill runs; returns the catalog then. Each
/// job takes a boundary at most once per half interval of wall time, so
/// the two meet at a checkpoint only when event time passes at most one
/// boundary in that time.
fn backfilled(tally: &Tally, mut at: i64) -> Vec<Value> {
    eventually(Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_millis(600));
        at += 1_000;
        tally.flush(at);
        let metrics = catalog(tally);
        match metrics.iter().find(|m| m.get("backfill").is_some()) {
            Some(m) => Err(format!("still backfilling: {m}")),
            None => Ok(metrics),
        }
    })
}

/// Every stored window of `version` of `metric`, as (window, start, group)
/// to its value.
fn stored(data: &Path, metric: &str, version: &str) -> BTreeMap<(String, i64, String), f64> {
    let db = rusqlite::Connection::open(data.join("results.db")).unwrap();
    let mut stmt = db
        .prepare(
            "SELECT window, start, grp, count, sum FROM windows WHERE metric = ?1 AND version = ?2",
        )
        .unwrap();
    let rows = stmt
        .query_map([metric, version], |row| {
            let count: i64 = row.get(3)?;
            let sum: f64 = row.get(4)?;
            let value = if metric == "revenue" {
                sum
            } else {
                count as f64
            };
            Ok(((row.get(0)?, row.get(1)?, row.get(2)?), value))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// The same, aggregated in one pass over the events.
pub fn batch(events: &[Generated], metric: &str) -> BTreeMap<(String, i64, String), f64> {
    let mut out = BTreeMap::new();
    let spans: &[(&str, i64)] = match metric {
        "ad_clicks" => &[("tumbling 1m", 60_000), ("tumbling 10s", 10_000)],
        _ => &[("tumbling 1m", 60_000)],
    };
    for e in events {
        let (kind, group, value) = match metric {
            "ad_clicks" => (
                "ad_click",
                format!("{}\u{1f}{}", e.campaign, e.country),
                1.0,
            ),
            _ => ("purchase", e.country.to_string(), e.amount.unwrap_or(0.0)),
        };
        if e.event_type != kind {
            continue;
        }
        for (window, width) in spans {
            let start = e.time_ms - e.time_ms.rem_euclid(*width);
            *out.entry((window.to_string(), start, group.clone()))
                .or_insert(0.0) += value;
        }
    }
    out
}

pub fn assert_equal(
    stored: &BTreeMap<(String, i64, String), f64>,
    batch: &BTreeMap<(String, i64, String), f64>,
) {
    assert_eq!(
        stored.len(),
        batch.len(),
        "windows stored and computed in batch"
    );
    for (key, value) in batch {
        let got = stored
            .get(key)
            .unwrap_or_else(|| panic!("window {key:?} is not stored"));
        assert!(
            (got - value).abs() < 1e-6,
            "window {key:?}: stored {got}, batch {value}"
        );
    }
}

/// Event time moved to past the clickstream's minutes and their lateness,
/// but within its hour: no hour or day rollup closes, so the earliest
/// stored window is the first minute's, whatever the hour of the day the
/// test runs at.
const PAST_THE_MINUTES: i64 = 10 * 60_000;

/// Changes one metric, adds one and removes one, then runs the backfill
/// once straight through, and once with a kill -9 in the middle.
fn backfill_after_a_change(kill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let events = clickstream(14, 3000);
    let expected = per_minute_clicks(&events);

    let tally = start(&data, BEFORE);
    let old = entry(&tally, "ad_clicks").unwrap()["version"].clone();
    post_all(&tally, &events, 100);
    tally.flush(base_ms() + PAST_THE_MINUTES);
    clicks_are(&tally, &expected);
    tally.stop();

    let mut tally = start(&data, AFTER);
    // While the backfill runs, the old definition answers, history and
    // live: it has no country, and the totals are what they were.
    let clicks = entry(&tally, "ad_clicks").unwrap();
    assert_eq!(clicks["version"], old, "{clicks}");
    let (status, answer) = tally.get(&format!(
        "/v1/metrics?metric=ad_clicks&groupBy=country&{}",
        by_minute()
    ));
    assert_eq!(status, 400, "the old definition has no country: {answer}");
    clicks_are(&tally, &expected);
    // The removed metric is gone; the new one is not served before its
    // backfill is done.
    let (status, _) = tally.get(&format!("/v1/metrics?metric=purchases&{}", by_minute()));
    assert_eq!(status, 400);
    let (status, answer) = tally.get(&format!("/v1/metrics?metric=revenue&{}", by_minute()));
    assert_eq!(status, 503, "{answer}");
    let revenue = eventually(Duration::from_secs(10), || {
        let revenue = entry(&tally, "revenue").ok_or("revenue is not listed")?;
        revenue
            .get("backfill")
            .is_some()
            .then_some(revenue.clone())
            .ok_or(format!("{revenue}"))
    });
    assert!(revenue["version"].is_null(), "{revenue}");
    let progress = &revenue["backfill"];
    assert!(progress["progress"].as_f64().unwrap() <= 1.0, "{progress}");
    assert!(
        progress["eventsToRead"].as_u64().unwrap() >= 3000,
        "{progress}"
    );
    if kill {
        tally.kill9();
        tally = start(&data, AFTER);
        assert_eq!(entry(&tally, "ad_clicks").unwrap()["version"], old);
    }

    let metrics = backfilled(&tally, base_ms() + PAST_THE_MINUTES);
    let names: Vec<&str> = metrics
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ad_clicks", "revenue"]);
    for metric in &metrics {
        let version = metric["version"].as_str().unwrap();
        assert_ne!(metric["version"], old);
        assert_eq!(metric["coverage"]["since"], at(0).as_str(), "{metric}");
        let name = metric["name"].as_str().unwrap();
        assert_equal(&stored(&data, name, version), &batch(&events, name));
    }
    // The new definition answers, and no total is doubled.
    let answer = tally.metrics(&format!("metric=ad_clicks&groupBy=country&{}", by_minute()));
    let mut sums = vec![0; 5];
    for series in answer["series"].as_array().unwrap() {
        for (i, v) in values(series).iter().enumerate() {
            sums[i] += v.as_u64().unwrap();
        }
    }
    assert_eq!(sums, expected);
    clicks_are(&tally, &expected);
    let (status, _) = tally.get(&format!("/v1/metrics?metric=purchases&{}", by_minute()));
    assert_eq!(status, 400, "a removed metric stays unknown");
    tally.stop();

    // A restart goes on from the merged checkpoint: nothing to backfill.
    let tally = start(&data, AFTER);
    assert!(catalog(&tally).iter().all(|m| m.get("backfill").is_none()));
    clicks_are(&tally, &expected);
    tally.stop();
}

#[test]
fn a_changed_metric_is_backfilled_beside_the_old_one_and_then_replaces_it() {
    backfill_after_a_change(false);
}

#[test]
fn a_backfill_killed_midway_resumes_and_computes_the_same() {
    backfill_after_a_change(true);
}

#[test]
fn the_old_definition_put_back_cancels_the_backfill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let events = clickstream(16, 600);
    let expected = per_minute_clicks(&events);

    let tally = start(&data, BY_CAMPAIGN);
    let old = entry(&tally, "ad_clicks").unwrap()["version"].clone();
    post_all(&tally, &events, 100);
    tally.flush(base_ms() + 3_600_000);
    clicks_are(&tally, &expected);
    tally.stop();

    let tally = start(&data, BY_CAMPAIGN_AND_COUNTRY);
    eventually(Duration::from_secs(10), || {
        let clicks = entry(&tally, "ad_clicks").unwrap();
        clicks
            .get("backfill")
            .map(|_| ())
            .ok_or(format!("{clicks}"))
    });
    let committed = || {
        let dirs = data.join("checkpoints/backfill").read_dir().unwrap();
        dirs.flatten()
            .any(|d| d.path().join("manifest.json").exists())
    };
    eventually(Duration::from_secs(10), || {
        committed()
            .then_some(())
            .ok_or("no backfill checkpoint yet".to_string())
    });
    tally.stop();

    let tally = start(&data, BY_CAMPAIGN);
    let clicks = entry(&tally, "ad_clicks").unwrap();
    assert_eq!(clicks["version"], old);
    std::thread::sleep(Duration::from_millis(500));
    assert!(entry(&tally, "ad_clicks")
        .unwrap()
        .get("backfill")
        .is_none());
    assert!(
        data.join("checkpoints/backfill")
            .read_dir()
            .unwrap()
            .next()
            .is_none(),
        "the backfill's checkpoints are deleted"
    );
    clicks_are(&tally, &expected);
    tally.stop();
}

/// The rows a metric version holds in the store.
fn stored_rows(data: &Path, version: &str) -> i64 {
    let db = rusqlite::Connection::open(data.join("results.db")).unwrap();
    db.query_row(
        "SELECT count(*) FROM windows WHERE metric = 'ad_clicks' AND version = ?1",
        [version],
        |row| row.get(0),
    )
    .unwrap()
}

fn version(tally: &Tally) -> String {
    let (_, catalog) = tally.get("/v1/catalog");
    catalog["metrics"][0]["version"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn an_old_version_is_deleted_once_unused_for_longer_than_keep_old() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let events = clickstream(15, 600);

    let tally = start(&data, BY_CAMPAIGN);
    let old = version(&tally);
    post_all(&tally, &events, 100);
    tally.flush(base_ms() + 3_600_000);
    clicks_are(&tally, &per_minute_clicks(&events));
    tally.stop();
    assert!(stored_rows(&data, &old) > 0);

    // Another definition, with the default week to keep: the old one stays.
    let tally = start(&data, BY_CAMPAIGN_AND_COUNTRY);
    backfilled(&tally, base_ms() + 3_600_000);
    let new = version(&tally);
    assert_ne!(new, old, "a changed definition is another version");
    clicks_are(&tally, &per_minute_clicks(&events));
    tally.stop();
    assert!(stored_rows(&data, &old) > 0);

    std::thread::sleep(Duration::from_millis(1500));
    let file = data.with_extension("toml");
    std::fs::write(&file, BY_CAMPAIGN_AND_COUNTRY).unwrap();
    let tally = Tally::start_with_config(
        &data,
        &file,
        &[("TALLY__BACKFILL__KEEP_OLD", "1s"), CHECKPOINTS],
        &[],
    );
    assert_eq!(
        stored_rows(&data, &old),
        0,
        "unused for longer than keep_old"
    );
    assert!(stored_rows(&data, &new) > 0, "the configured version stays");
    tally.stop();
}
