//! A changed metric: its results belong to the version of its definition,
//! so history never mixes what two definitions computed.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::util::{
    clicks_per_minute_are, clickstream, eventually, per_minute_clicks, post_all, values, Tally,
    BASE_MS,
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

const RANGE: &str = "start=2026-06-07T10:00:00Z&end=2026-06-07T10:05:00Z&resolution=1m";

fn start(data: &Path, config: &str) -> Tally {
    let file = data.with_extension("toml");
    std::fs::write(&file, config).unwrap();
    Tally::start_with_config(data, &file, &[], &[])
}

fn clicks_are(tally: &Tally, expected: &[u64]) {
    clicks_per_minute_are(tally, expected, Duration::from_secs(30));
}

#[test]
fn a_changed_metric_answers_from_its_new_definition_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let events = clickstream(14, 3000);
    let expected = per_minute_clicks(&events);

    let tally = start(&data, BY_CAMPAIGN);
    post_all(&tally, &events, 100);
    tally.flush(BASE_MS + 3_600_000);
    clicks_are(&tally, &expected);
    tally.stop();

    // The definition changes: its results are computed again from the log,
    // beside the old ones, and only the new ones are read.
    let tally = start(&data, BY_CAMPAIGN_AND_COUNTRY);
    let want: BTreeSet<String> = events.iter().map(|e| e.country.to_string()).collect();
    eventually(Duration::from_secs(30), || {
        let answer = tally.metrics(&format!("metric=ad_clicks&groupBy=country&{RANGE}"));
        let mut countries = BTreeSet::new();
        let mut sums = vec![0; 5];
        for series in answer["series"].as_array().unwrap() {
            countries.insert(series["group"]["country"].as_str().unwrap().to_string());
            for (i, v) in values(series).iter().enumerate() {
                sums[i] += v.as_u64().unwrap();
            }
        }
        if countries == want && sums == expected {
            Ok(())
        } else {
            Err(format!(
                "groups {countries:?} with {sums:?}, expected {want:?} with {expected:?}"
            ))
        }
    });
    // The replay has counted every event again: the totals are not doubled.
    clicks_are(&tally, &expected);
    tally.stop();

    // The old definition again: its results were kept.
    let tally = start(&data, BY_CAMPAIGN);
    let answer: Value = tally.metrics(&format!("metric=ad_clicks&{RANGE}"));
    let got: Vec<u64> = values(&answer)
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(got, expected, "the old version's results, at once");
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
    tally.flush(BASE_MS + 3_600_000);
    clicks_are(&tally, &per_minute_clicks(&events));
    tally.stop();
    assert!(stored_rows(&data, &old) > 0);

    // Another definition, with the default week to keep: the old one stays.
    let tally = start(&data, BY_CAMPAIGN_AND_COUNTRY);
    let new = version(&tally);
    assert_ne!(new, old, "a changed definition is another version");
    clicks_are(&tally, &per_minute_clicks(&events));
    tally.stop();
    assert!(stored_rows(&data, &old) > 0);

    std::thread::sleep(Duration::from_millis(1500));
    let file = data.with_extension("toml");
    std::fs::write(&file, BY_CAMPAIGN_AND_COUNTRY).unwrap();
    let tally = Tally::start_with_config(&data, &file, &[("TALLY__BACKFILL__KEEP_OLD", "1s")], &[]);
    assert_eq!(
        stored_rows(&data, &old),
        0,
        "unused for longer than keep_old"
    );
    assert!(stored_rows(&data, &new) > 0, "the configured version stays");
    tally.stop();
}
