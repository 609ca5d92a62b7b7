//! `GET /v1/metrics` against an expectation computed here, independently.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::util::{clickstream, eventually, post_all, values, Generated, Tally, BASE_MS};

const MINUTE: i64 = 60_000;

/// Per-minute buckets over `minutes` minutes from BASE_MS.
fn per_minute<T: Default + Clone>(
    minutes: usize,
    events: &[Generated],
    mut add: impl FnMut(&mut T, &Generated),
) -> Vec<T> {
    let mut buckets = vec![T::default(); minutes];
    for e in events {
        let i = ((e.time_ms - BASE_MS) / MINUTE) as usize;
        if i < minutes {
            add(&mut buckets[i], e);
        }
    }
    buckets
}

fn counts(answer: &Value) -> Vec<u64> {
    values(answer)
        .iter()
        .map(|v| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}")))
        .collect()
}

#[test]
fn history_matches_an_independent_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    let events = clickstream(7, 3000);
    post_all(&tally, &events, 100);
    tally.flush(BASE_MS + 3_600_000);

    let range = format!(
        "start={}&end={}",
        BASE_MS / 1000,
        (BASE_MS + 7 * MINUTE) / 1000
    );
    let clicks: Vec<&Generated> = events
        .iter()
        .filter(|e| e.event_type == "ad_click")
        .collect();
    let expected: Vec<u64> = per_minute(7, &events, |n: &mut u64, e| {
        *n += (e.event_type == "ad_click") as u64
    });
    assert_eq!(expected[5..], [0, 0], "the last two minutes hold no events");
    eventually(Duration::from_secs(30), || {
        let got = counts(&tally.metrics(&format!("metric=ad_clicks&resolution=1m&{range}")));
        if got == expected {
            Ok(())
        } else {
            Err(format!("ad_clicks {got:?}, expected {expected:?}"))
        }
    });

    // RFC 3339 times, a filter, and a resolution of several windows.
    let answer = tally.metrics("metric=ad_clicks&campaignId=camp_1&resolution=5m&start=2026-06-07T10:00:00Z&end=2026-06-07T10:05:00Z");
    let camp1 = clicks.iter().filter(|e| e.campaign == "camp_1").count() as u64;
    assert_eq!(counts(&answer), [camp1]);
    assert_eq!(answer["dimensions"]["campaignId"], "camp_1");
    assert_eq!(answer["dataPoints"][0]["time"], "2026-06-07T10:00:00Z");

    // groupBy: one series per country, with every bucket present.
    let answer = tally.metrics(&format!(
        "metric=ad_clicks&campaignId=camp_2&groupBy=country&resolution=1m&{range}"
    ));
    let mut expected_groups: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in clicks.iter().filter(|e| e.campaign == "camp_2") {
        expected_groups
            .entry(e.country.to_string())
            .or_insert_with(|| vec![0; 7])[((e.time_ms - BASE_MS) / MINUTE) as usize] += 1;
    }
    let got: BTreeMap<String, Vec<u64>> = answer["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["group"]["country"].as_str().unwrap().to_string(),
                counts(s),
            )
        })
        .collect();
    assert_eq!(got, expected_groups);
    assert_eq!(answer["groupBy"], "country");

    // sum and avg of values.amount over purchases; avg of nothing is null.
    let sums: Vec<f64> = per_minute(7, &events, |s: &mut f64, e| *s += e.amount.unwrap_or(0.0));
    let orders: Vec<u64> = per_minute(7, &events, |n: &mut u64, e| *n += e.amount.is_some() as u64);
    let revenue = values(&tally.metrics(&format!("metric=revenue&resolution=1m&{range}")));
    let avg = values(&tally.metrics(&format!("metric=avg_order_value&resolution=1m&{range}")));
    for i in 0..7 {
        assert!(
            (revenue[i].as_f64().unwrap() - sums[i]).abs() < 1e-6,
            "revenue[{i}] {} vs {}",
            revenue[i],
            sums[i]
        );
        if orders[i] == 0 {
            assert!(avg[i].is_null(), "avg[{i}] of no orders is {}", avg[i]);
        } else {
            let want = sums[i] / orders[i] as f64;
            assert!(
                (avg[i].as_f64().unwrap() - want).abs() < 1e-6,
                "avg[{i}] {} vs {want}",
                avg[i]
            );
        }
    }

    // uniq: HyperLogLog estimates within a few percent of the exact count.
    let uniq = values(&tally.metrics(&format!("metric=unique_users&resolution=1m&{range}")));
    let users: Vec<BTreeSet<String>> = per_minute(7, &events, |s: &mut BTreeSet<String>, e| {
        if e.event_type == "ad_click" {
            s.insert(e.user.clone());
        }
    });
    for i in 0..7 {
        let (got, exact) = (uniq[i].as_f64().unwrap(), users[i].len() as f64);
        assert!(
            (got - exact).abs() <= (exact * 0.03).max(1.0),
            "unique_users[{i}] {got} vs exact {exact}"
        );
    }
    // Sketches merge across groups and windows: the whole range at once.
    let all: BTreeSet<&String> = clicks.iter().map(|e| &e.user).collect();
    let whole = values(&tally.metrics(
        "metric=unique_users&resolution=5m&start=2026-06-07T10:00:00Z&end=2026-06-07T10:05:00Z",
    ));
    assert!((whole[0].as_f64().unwrap() - all.len() as f64).abs() <= all.len() as f64 * 0.03);
}

#[test]
fn bad_queries_get_a_400_that_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    for (query, needle) in [
        ("metric=nope", "unknown metric"),
        ("metric=ad_clicks&planet=mars", "planet"),
        ("metric=ad_clicks&groupBy=planet", "groupBy"),
        ("metric=ad_clicks&start=yesterday", "start"),
        ("metric=ad_clicks&resolution=15s", "resolution"),
        ("metric=ad_clicks&resolution=fast", "resolution"),
        ("", "metric"),
    ] {
        let (status, answer) = tally.get(&format!("/v1/metrics?{query}"));
        assert_eq!(status, 400, "{query}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(needle),
            "{query}: {answer}"
        );
    }
}
