//! `GET /v1/metrics` against an expectation computed here, independently.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::util::{at, base_ms, clickstream, eventually, post_all, values, Generated, Tally};

const MINUTE: i64 = 60_000;

/// Per-minute buckets over `minutes` minutes from base_ms().
fn per_minute<T: Default + Clone>(
    minutes: usize,
    events: &[Generated],
    mut add: impl FnMut(&mut T, &Generated),
) -> Vec<T> {
    let mut buckets = vec![T::default(); minutes];
    for e in events {
        let i = ((e.time_ms - base_ms()) / MINUTE) as usize;
        if i < minutes {
            add(&mut buckets[i], e);
        }
    }
    buckets
}

/// Per country, the per-minute counts of `events` over `minutes` minutes.
fn by_country<'a>(
    minutes: usize,
    events: impl IntoIterator<Item = &'a &'a Generated>,
) -> BTreeMap<String, Vec<u64>> {
    let mut counts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in events {
        counts
            .entry(e.country.to_string())
            .or_insert_with(|| vec![0; minutes])[((e.time_ms - base_ms()) / MINUTE) as usize] += 1;
    }
    counts
}

/// The counts of an answer grouped by country, per country.
fn series_by_country(answer: &Value) -> BTreeMap<String, Vec<u64>> {
    answer["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["group"]["country"].as_str().unwrap().to_string(),
                counts(s),
            )
        })
        .collect()
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
    tally.flush(base_ms() + 3_600_000);

    let range = format!(
        "start={}&end={}",
        base_ms() / 1000,
        (base_ms() + 7 * MINUTE) / 1000
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
        // Until the first result is stored, the range is not covered.
        let answer = tally.metrics(&format!("metric=ad_clicks&resolution=1m&{range}"));
        if answer["coverage"]["since"].is_null() {
            return Err(format!("nothing stored yet: {answer}"));
        }
        // A minute not stored yet has no value.
        let got: Vec<Option<u64>> = values(&answer).iter().map(Value::as_u64).collect();
        if got.iter().copied().eq(expected.iter().copied().map(Some)) {
            Ok(())
        } else {
            Err(format!("ad_clicks {got:?}, expected {expected:?}"))
        }
    });

    // RFC 3339 times, a filter, and a resolution of several windows.
    let answer = tally.metrics(&format!(
        "metric=ad_clicks&campaignId=camp_1&resolution=5m&{}",
        crate::util::range()
    ));
    let camp1 = clicks.iter().filter(|e| e.campaign == "camp_1").count() as u64;
    assert_eq!(counts(&answer), [camp1]);
    assert_eq!(answer["dimensions"]["campaignId"], "camp_1");
    assert_eq!(answer["dataPoints"][0]["time"], at(0).as_str());

    // groupBy: one series per country, with every bucket present.
    let answer = tally.metrics(&format!(
        "metric=ad_clicks&campaignId=camp_2&groupBy=country&resolution=1m&{range}"
    ));
    assert_eq!(
        series_by_country(&answer),
        by_country(7, clicks.iter().filter(|e| e.campaign == "camp_2"))
    );
    assert_eq!(answer["groupBy"], "country");
    // No rollup holds (campaign, country): the metric's own rows answer.
    assert_eq!(answer["read"]["rollup"], false, "{}", answer["read"]);

    // By country alone, the country rollup answers: a row per minute and
    // country, not one per group of every dimension.
    let answer = tally.metrics(&format!(
        "metric=ad_clicks&groupBy=country&resolution=1m&{range}"
    ));
    assert_eq!(
        (&answer["read"]["rollup"], &answer["read"]["dimensions"]),
        (&json!(true), &json!(["country"])),
        "{}",
        answer["read"]
    );
    assert!(
        answer["read"]["rows"].as_u64().unwrap() <= 5 * 3,
        "{}",
        answer["read"]
    );
    assert_eq!(series_by_country(&answer), by_country(7, &clicks));
    let read = |table: &str| {
        tally.prometheus(&format!(
            "tally_history_rows_read_total{{table=\"{table}\"}}"
        ))
    };
    assert!(read("rollup") > Some(0) && read("metric") > Some(0));

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
    let whole = values(&tally.metrics(&format!(
        "metric=unique_users&resolution=5m&{}",
        crate::util::range()
    )));
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

/// Campaign `c` of 200 has `(7c mod 23) + 1` clicks, all in one minute:
/// campaigns 0 to 99 in the first three minutes, the rest in the two after.
fn campaigns() -> Vec<(String, usize, u64)> {
    (0..200u64)
        .map(|c| {
            let minute = if c < 100 { c % 3 } else { 3 + c % 2 };
            (format!("camp_{c:03}"), minute as usize, (c * 7) % 23 + 1)
        })
        .collect()
}

#[test]
fn grouped_history_answers_the_top_groups_within_its_bounds() {
    let dir = tempfile::tempdir().unwrap();
    // Three minutes of 100 campaigns are 300 points: more than the answer
    // may hold, so the server must rank first and read the buckets after.
    let tally = Tally::start(
        dir.path(),
        &[
            ("TALLY__HISTORY__MAX_POINTS", "200"),
            ("TALLY__HISTORY__MAX_GROUPS", "150"),
        ],
        &[],
    );
    let mut events: Vec<Value> = Vec::new();
    for (campaign, minute, clicks) in campaigns() {
        for k in 0..clicks {
            let at = base_ms() + minute as i64 * MINUTE + k as i64 * 100;
            events.push(serde_json::json!({"eventType": "ad_click", "timestamp": at, "dimensions": {"campaignId": campaign}}));
        }
    }
    events.sort_by_key(|e| e["timestamp"].as_i64());
    for chunk in events.chunks(500) {
        tally.post_events(chunk);
    }
    tally.flush(base_ms() + 3_600_000);

    // Every window is stored before any exact answer is asked of them: the
    // five minutes, without groupBy, are one series holding every click.
    let five_minutes = format!(
        "metric=ad_clicks&groupBy=campaignId&resolution=1m&start={}&end={}",
        base_ms() / 1000,
        (base_ms() + 5 * MINUTE) / 1000
    );
    let total: u64 = campaigns().iter().map(|c| c.2).sum();
    eventually(Duration::from_secs(60), || {
        // A minute not stored yet has no value.
        let stored: u64 = values(&tally.metrics(&five_minutes.replace("&groupBy=campaignId", "")))
            .iter()
            .filter_map(Value::as_u64)
            .sum();
        if stored == total {
            Ok(())
        } else {
            Err(format!("{stored} clicks stored of {total}"))
        }
    });

    let three_minutes = format!(
        "metric=ad_clicks&groupBy=campaignId&resolution=1m&start={}&end={}",
        base_ms() / 1000,
        (base_ms() + 3 * MINUTE) / 1000
    );
    let mut expected: Vec<(String, usize, u64)> = campaigns().into_iter().take(100).collect();
    expected.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    let top = |answer: &Value| -> Vec<(String, Vec<u64>)> {
        answer["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["group"]["campaignId"].as_str().unwrap().to_string(),
                    counts(s),
                )
            })
            .collect()
    };
    let want = |n: usize| -> Vec<(String, Vec<u64>)> {
        expected[..n]
            .iter()
            .map(|(c, minute, clicks)| {
                let mut buckets = vec![0; 3];
                buckets[*minute] = *clicks;
                (c.clone(), buckets)
            })
            .collect()
    };
    // history.top (10) without a top parameter, largest first.
    let answer = tally.metrics(&three_minutes);
    assert_eq!(top(&answer), want(10));
    assert_eq!(
        (answer["top"].as_u64(), answer["groups"].as_u64()),
        (Some(10), Some(100))
    );
    assert_eq!(
        top(&tally.metrics(&format!("{three_minutes}&top=3"))),
        want(3)
    );

    // Past a bound: a 400 that names the parameter, counted by reason.
    let refused = |query: &str, parameter: &str| {
        let (status, answer) = tally.get(&format!("/v1/metrics?{query}"));
        assert_eq!(status, 400, "{query}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.starts_with(&format!("{parameter}: ")),
            "{query}: {error}"
        );
        error.to_string()
    };
    let error = refused(&format!("{three_minutes}&top=100"), "top");
    assert!(error.contains("history.max_points"), "{error}");
    let error = refused(&five_minutes, "groupBy");
    assert!(
        error.contains("more than 150 groups of campaignId"),
        "{error}"
    );
    assert_eq!(
        tally.prometheus("tally_history_queries_refused_total{reason=\"max_points\"}"),
        Some(1)
    );
    assert_eq!(
        tally.prometheus("tally_history_queries_refused_total{reason=\"max_groups\"}"),
        Some(1)
    );
}

#[test]
fn a_parameter_given_twice_or_badly_encoded_gets_a_400() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    let base = "metric=ad_clicks&start=0&end=600";
    for (query, needle) in [
        (format!("{base}&metric=events"), "metric: is given twice"),
        (
            format!("{base}&resolution=1m&resolution=10s"),
            "resolution: is given twice",
        ),
        (
            format!("{base}&groupBy=country&groupBy=campaignId"),
            "groupBy: is given twice",
        ),
        (format!("{base}&start=60"), "start: is given twice"),
        (
            format!("{base}&country=US&country=DE"),
            "country: is given twice",
        ),
        (format!("{base}&campaignId=%zz"), "not percent-encoded"),
        (format!("{base}&campaignId=%ff"), "not percent-encoded"),
        (format!("{base}&campaignId=camp_1%"), "not percent-encoded"),
        (format!("{base}&top=3"), "top: needs groupBy"),
    ] {
        let (status, answer) = tally.get(&format!("/v1/metrics?{query}"));
        assert_eq!(status, 400, "{query}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(needle), "{query}: {error}");
    }
    assert_eq!(
        tally.prometheus("tally_history_queries_refused_total{reason=\"invalid\"}"),
        Some(9)
    );
    // Escapes that decode to UTF-8 are read, `+` as a space.
    let answer = tally.metrics(&format!("{base}&campaignId=camp%5F1+%C3%A9"));
    assert_eq!(answer["dimensions"]["campaignId"], "camp_1 é");
    for query in ["limit=5&limit=6", "limit=5&planet=mars"] {
        let (status, answer) = tally.get(&format!("/v1/deadletters?{query}"));
        assert_eq!(status, 400, "{query}: {answer}");
    }
}

#[test]
fn a_range_older_than_the_minute_windows_keep_is_answered_by_the_hour() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    // Forty days ago, past the 30 days one-minute windows are kept.
    let day = 24 * 60 * MINUTE;
    let old = (base_ms() - 40 * day).div_euclid(day) * day;
    let events: Vec<Generated> = clickstream(3, 600)
        .into_iter()
        .map(|mut e| {
            e.time_ms += old - base_ms();
            e
        })
        .collect();
    post_all(&tally, &events, 100);
    // Past the end of that day: its hour and day windows close.
    tally.flush(old + day + 3_000);
    let clicks = events.iter().filter(|e| e.event_type == "ad_click").count() as u64;
    let range = format!("start={}&end={}", old / 1000, (old + 2 * 3_600_000) / 1000);
    let answer = eventually(Duration::from_secs(30), || {
        let answer = tally.metrics(&format!("metric=ad_clicks&resolution=1m&{range}"));
        match answer["dataPoints"][0]["value"].as_u64() {
            Some(n) if n == clicks => Ok(answer),
            _ => Err(format!("{answer}")),
        }
    });
    // Asked by minute, it answers by hour, and says so.
    assert_eq!(answer["resolution"], "1h", "{answer}");
    assert_eq!(answer["read"]["window"], "tumbling 1h", "{answer}");
    assert_eq!(counts(&answer), [clicks, 0]);
    let by_day = tally.metrics(&format!(
        "metric=ad_clicks&resolution=1d&start={}&end={}",
        old / 1000,
        (old + day) / 1000
    ));
    assert_eq!(by_day["read"]["window"], "tumbling 1d", "{by_day}");
    assert_eq!(counts(&by_day), [clicks]);

    // The store deletes the minute and ten-second rows it no longer keeps,
    // and keeps the hour's.
    let rows = |window: &str| -> i64 {
        rusqlite::Connection::open(dir.path().join("results.db"))
            .unwrap()
            .query_row(
                "SELECT count(*) FROM windows WHERE metric = 'ad_clicks' AND window = ?1",
                [window],
                |r| r.get(0),
            )
            .unwrap()
    };
    eventually(Duration::from_secs(90), || match rows("tumbling 1m") {
        0 => Ok(()),
        n => Err(format!("{n} one-minute rows past their retention")),
    });
    assert_eq!(rows("tumbling 10s"), 0);
    assert!(rows("tumbling 1h") > 0);
    tally.stop();
}
