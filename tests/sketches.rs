//! `quantiles` and `topk`: the default metrics `ad_latency` (KLL) and
//! `top_creatives` (frequent items), in history and live, checked against
//! the events' own values.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use tally_dataflow::aggregate::AggregateKind;
use tungstenite::Message;

use crate::live::{connect, wait_for};
use crate::util::{at, base_ms, clickstream, post_all, range, Generated, Tally};

/// KLL's stated rank error for the default `k`.
fn epsilon() -> f64 {
    AggregateKind::Quantiles { k: 200 }.rank_error().unwrap()
}

/// Checks that every quantile of `value` (an object from quantile to
/// value) answers within the stated rank error of `latencies`.
#[track_caller]
fn within_rank_error(value: &Value, latencies: &[f64], asked: &[&str]) {
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let answers = value.as_object().unwrap_or_else(|| panic!("{value}"));
    assert_eq!(
        answers.keys().map(String::as_str).collect::<Vec<_>>(),
        asked,
        "{value}"
    );
    for (q, v) in answers {
        let (q, v) = (q.parse::<f64>().unwrap(), v.as_f64().unwrap());
        let below = sorted.partition_point(|x| *x < v) as f64 / n;
        let at_or_below = sorted.partition_point(|x| *x <= v) as f64 / n;
        assert!(
            below <= q + epsilon() && at_or_below >= q - epsilon(),
            "quantile {q} is {v}, of true ranks {below}..{at_or_below}, beyond {}",
            epsilon()
        );
    }
}

/// Checks every series of a grouped `quantiles` answer against the
/// latencies of the events of its group, `group_of` naming an event's.
#[track_caller]
pub fn series_within_rank_error<'e>(
    answer: &Value,
    events: impl IntoIterator<Item = &'e Generated> + Clone,
    group_of: impl Fn(&Generated) -> &str,
    asked: &[&str],
) {
    for s in answer["series"].as_array().unwrap() {
        let group = s["group"].as_object().unwrap().values().next().unwrap();
        let latencies: Vec<f64> = events
            .clone()
            .into_iter()
            .filter(|e| group_of(e) == group)
            .filter_map(|e| e.latency_ms)
            .collect();
        within_rank_error(&s["dataPoints"][0]["value"], &latencies, asked);
    }
}

/// The creatives of `events` with their counts, largest first, ties in
/// the order of their names.
fn ranked(events: &[&Generated]) -> Vec<(String, u64)> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        *counts.entry(e.creative.clone()).or_default() += 1;
    }
    let mut ranked: Vec<_> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    ranked
}

#[test]
fn quantiles_and_top_items_are_answered_from_merged_sketches() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    let events = clickstream(17, 6_000);
    post_all(&tally, &events, 500);
    tally.flush(base_ms() + 305_000);
    let clicks: Vec<&Generated> = events
        .iter()
        .filter(|e| e.event_type == "ad_click")
        .collect();

    // A quantile per minute, of the five one-minute windows.
    let answer = crate::util::eventually(Duration::from_secs(30), || {
        let answer = tally.metrics(&format!("metric=ad_latency&resolution=1m&{}", range()));
        let points = answer["dataPoints"].as_array().unwrap().clone();
        if points.len() == 5 && points.iter().all(|p| p["value"].is_object()) {
            Ok(answer)
        } else {
            Err(format!("not all minutes are stored: {answer}"))
        }
    });
    assert_eq!(answer["quantiles"], json!([0.5, 0.9, 0.99]));
    assert_eq!(answer["rankError"].as_f64(), Some(epsilon()));
    for (minute, point) in answer["dataPoints"].as_array().unwrap().iter().enumerate() {
        let from = base_ms() + minute as i64 * 60_000;
        let latencies: Vec<f64> = clicks
            .iter()
            .filter(|e| (from..from + 60_000).contains(&e.time_ms))
            .filter_map(|e| e.latency_ms)
            .collect();
        within_rank_error(&point["value"], &latencies, &["0.5", "0.9", "0.99"]);
    }

    // The five minutes merged into one bucket, by country: each group is
    // merged from its devices' windows, and asked other quantiles.
    let by_country = tally.metrics(&format!(
        "metric=ad_latency&resolution=5m&groupBy=country&quantiles=0.1,0.5,0.999&{}",
        range()
    ));
    assert_eq!(
        by_country["series"].as_array().unwrap().len(),
        3,
        "{by_country}"
    );
    series_within_rank_error(
        &by_country,
        clicks.iter().copied(),
        |e| e.country,
        &["0.1", "0.5", "0.999"],
    );
    // The top creatives of the five minutes: 40 creatives fit the sketch
    // whole, so the counts are exact and the bounds closed on them.
    let top = tally.metrics(&format!("metric=top_creatives&resolution=5m&{}", range()));
    let items = top["dataPoints"][0]["value"].as_array().unwrap().clone();
    let truth = ranked(&clicks);
    assert_eq!(top["k"], 10);
    assert_eq!(items.len(), 10, "{top}");
    for (item, (creative, count)) in items.iter().zip(&truth) {
        assert_eq!(
            item,
            &json!({"item": creative, "count": count, "lower": count, "upper": count}),
            "{top}"
        );
    }
    // Three of them for Germany.
    let de = tally.metrics(&format!(
        "metric=top_creatives&resolution=5m&country=DE&k=3&{}",
        range()
    ));
    let de_clicks: Vec<&Generated> = clicks
        .iter()
        .copied()
        .filter(|e| e.country == "DE")
        .collect();
    let names: Vec<&str> = de["dataPoints"][0]["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item"].as_str().unwrap())
        .collect();
    let de_ranked = ranked(&de_clicks);
    let want: Vec<&str> = de_ranked[..3].iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(names, want, "{de}");

    // What they cannot be asked.
    for (query, problem) in [
        (
            "metric=ad_latency&quantiles=0.5,1.5",
            "quantiles: '1.5' must be a number from 0 to 1",
        ),
        (
            "metric=top_creatives&k=11",
            "k: '11' must be an integer from 1 to the metric's k, 10",
        ),
        (
            "metric=ad_clicks&quantiles=0.5",
            "quantiles: a count metric has none",
        ),
        (
            "metric=ad_latency&k=3",
            "k: a quantiles metric has no items",
        ),
    ] {
        let (status, body) = tally.get(&format!("/v1/metrics?{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(problem),
            "{query}: {body}"
        );
    }
}

#[test]
fn live_quantiles_and_top_items_have_the_shape_of_history() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[("TALLY__LIVE__INTERVAL", "200ms")], &[]);
    let mut socket = connect(&tally);
    for topic in ["metrics:ad_latency", "metrics:top_creatives:country:US"] {
        let subscribe = json!({"action": "subscribe", "topic": topic, "window": "tumbling 10s"});
        socket.send(Message::text(subscribe.to_string())).unwrap();
    }
    let click = |seconds: i64, latency: f64, creative: &str| {
        json!({"eventType": "ad_click", "timestamp": base_ms() / 1000 + seconds,
               "dimensions": {"country": "US", "deviceType": "MOBILE", "creativeId": creative},
               "values": {"latency_ms": latency}})
    };
    let window = at(30_000);
    tally.post_events(&[
        click(31, 10.0, "cr_a"),
        click(32, 20.0, "cr_b"),
        click(33, 30.0, "cr_a"),
        click(34, 40.0, "cr_c"),
    ]);
    // Every message of the window, by topic, as it arrives: a partial,
    // the final and a revision may each come sooner than the test looks.
    let mut seen: Vec<Value> = Vec::new();
    fn until(
        socket: &mut crate::live::Socket,
        seen: &mut Vec<Value>,
        window: &str,
        want: &dyn Fn(&[Value]) -> bool,
    ) {
        if want(seen) {
            return;
        }
        wait_for(socket, Duration::from_secs(20), |m| {
            if m["windowStart"] == window {
                seen.push(m.clone());
            }
            want(seen)
        });
    }
    let value_of = |seen: &[Value], topic: &str, final_: bool, revision: u64| {
        seen.iter()
            .rfind(|m| m["topic"] == topic && m["final"] == final_ && m["revision"] == revision)
            .map(|m| m["value"].clone())
    };
    let (latency, creatives) = ("metrics:ad_latency", "metrics:top_creatives:country:US");
    until(&mut socket, &mut seen, &window, &|seen| {
        value_of(seen, latency, false, 0).is_some() && value_of(seen, creatives, false, 0).is_some()
    });
    let item = |name: &str, n: u64| json!({"item": name, "count": n, "lower": n, "upper": n});
    assert_eq!(
        value_of(&seen, latency, false, 0),
        Some(json!({"0.5": 20, "0.9": 40, "0.99": 40}))
    );
    assert_eq!(
        value_of(&seen, creatives, false, 0),
        Some(json!([item("cr_a", 2), item("cr_b", 1), item("cr_c", 1)]))
    );

    // Final, then a late event that changes both.
    tally.flush(base_ms() + 45_000);
    until(&mut socket, &mut seen, &window, &|seen| {
        value_of(seen, latency, true, 0).is_some() && value_of(seen, creatives, true, 0).is_some()
    });
    assert_eq!(
        value_of(&seen, latency, true, 0),
        value_of(&seen, latency, false, 0)
    );
    tally.post_events(&[click(35, 500.0, "cr_c"), click(36, 600.0, "cr_c")]);
    until(&mut socket, &mut seen, &window, &|seen| {
        value_of(seen, latency, true, 1).is_some() && value_of(seen, creatives, true, 1).is_some()
    });
    assert_eq!(
        value_of(&seen, creatives, true, 1),
        Some(json!([item("cr_c", 3), item("cr_a", 2), item("cr_b", 1)]))
    );
    let revised = value_of(&seen, latency, true, 1);
    assert_eq!(revised, Some(json!({"0.5": 30, "0.9": 600, "0.99": 600})));

    // History has the same shape and the same values.
    let stored = tally.metrics(&format!(
        "metric=ad_latency&resolution=10s&start={}&end={}",
        at(30_000),
        at(40_000)
    ));
    assert_eq!(Some(stored["dataPoints"][0]["value"].clone()), revised);

    // Groups rank by the highest quantile asked.
    let at_device = |seconds: i64, device: &str, latency: f64| {
        json!({"eventType": "ad_click", "timestamp": base_ms() / 1000 + seconds,
               "dimensions": {"country": "US", "deviceType": device},
               "values": {"latency_ms": latency}})
    };
    tally.post_events(&[
        at_device(51, "DESKTOP", 5.0),
        at_device(52, "DESKTOP", 900.0),
        at_device(53, "TABLET", 100.0),
        at_device(54, "MOBILE", 50.0),
    ]);
    tally.flush(base_ms() + 65_000);
    let query = format!(
        "metric=ad_latency&groupBy=deviceType&resolution=10s&start={}&end={}",
        at(50_000),
        at(60_000)
    );
    let order = |quantiles: &str| {
        let answer = crate::util::eventually(Duration::from_secs(20), || {
            let answer = tally.metrics(&format!("{query}&quantiles={quantiles}"));
            match answer["series"].as_array().map(Vec::len) {
                Some(3) => Ok(answer),
                _ => Err(format!("not stored yet: {answer}")),
            }
        });
        answer["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["group"]["deviceType"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(order("0.5"), ["TABLET", "MOBILE", "DESKTOP"]);
    assert_eq!(order("0.1,0.99"), ["DESKTOP", "TABLET", "MOBILE"]);
}
