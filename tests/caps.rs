//! A client that sends ever-new dimension values: each metric holds at most
//! about `max_groups` groups, the rest of its events count in its overflow
//! group, and the server's memory stays bounded while it answers queries.

use std::time::{Duration, Instant};

use crate::util::{at, base_ms, eventually, Tally};

/// Events, each with a campaign of its own.
const EVENTS: usize = 1_000_000;
/// Events per request.
const BATCH: usize = 10_000;
/// What `tally run` may hold resident, on the default configuration, with
/// every metric at its default cap of 100,000 groups. A campaign is kept in
/// 18 groups of window state there (three metrics count `ad_click`, each by
/// all its dimensions and by campaign, each also by hour and by day), so
/// the state holds about two million groups, and this debug build peaks at
/// 3.1 to 3.6 GiB while it closes their windows and checkpoints them.
const RESIDENT_BOUND: u64 = 5 << 30;
/// The groups a metric holds at most with the default cap: 128 shards of
/// 866 (see `tally_dataflow::cap::share`).
const HELD_BOUND: u64 = 110_848;

#[test]
fn a_million_new_campaigns_overflow_into_one_group_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    // Ten minutes of event time, so windows close and expire as it goes.
    let span = 600_000;
    let mut peak = 0;
    let started = Instant::now();
    for (request, first) in (0..EVENTS).step_by(BATCH).enumerate() {
        let mut body = String::with_capacity(BATCH * 120);
        for i in first..first + BATCH {
            let time = base_ms() + (i as i64 * span) / EVENTS as i64;
            body.push_str(&format!(
                "{{\"eventType\":\"ad_click\",\"timestamp\":{time},\"dimensions\":{{\"campaignId\":\"cmp_{i}\",\"country\":\"US\",\"deviceType\":\"MOBILE\"}}}}\n"
            ));
        }
        let (status, answer) = tally.post("/v1/events", "application/x-ndjson", body.as_bytes());
        assert_eq!(status, 202, "request {request}: {answer}");
        if request % 10 == 0 {
            // Queries keep answering while the groups pour in.
            let answer = tally.metrics(&format!(
                "metric=ad_clicks&groupBy=campaignId&resolution=1m&start={}&end={}",
                at(0),
                at(span)
            ));
            assert!(
                answer["dataPoints"].is_array() || answer["series"].is_array(),
                "{answer}"
            );
        }
        peak = peak.max(tally.resident_bytes());
    }
    tally.flush(base_ms() + span + 120_000);
    // The events stored in the hour the load fell in, for a query's filters.
    let stored = |tally: &Tally, filters: &str| -> u64 {
        let answer = tally.metrics(&format!(
            "metric=ad_clicks{filters}&resolution=1h&start={}&end={}",
            at(0),
            at(3_600_000)
        ));
        answer["dataPoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["value"].as_u64())
            .sum()
    };
    // The counter and the gauge are of the metric's table by all its
    // dimensions, as is the overflow group's query; each projection has a
    // cap and an overflow group of its own. Every campaign has one event,
    // so once every event is decided, the events held and those
    // overflowed add up to all of them.
    let overflow = "&campaignId=__overflow__&country=__overflow__&deviceType=__overflow__";
    let (overflowed, held) = eventually(Duration::from_secs(600), || {
        peak = peak.max(tally.resident_bytes());
        let total = stored(&tally, "");
        let overflowed = tally
            .prometheus("tally_overflowed_events_total{metric=\"ad_clicks\"}")
            .unwrap_or(0);
        let held = tally
            .prometheus("tally_metric_groups{metric=\"ad_clicks\"}")
            .unwrap_or(0);
        let in_overflow = stored(&tally, overflow);
        match (total, overflowed + held, in_overflow) {
            (n, m, o) if n == EVENTS as u64 && m == n && o == overflowed => Ok((overflowed, held)),
            (n, m, o) => Err(format!(
                "{n} of {EVENTS} events stored, {m} decided, {o} of {overflowed} in the overflow group"
            )),
        }
    });
    let elapsed = started.elapsed();
    assert!(held <= HELD_BOUND, "{held} groups held");
    assert!(
        overflowed >= EVENTS as u64 - HELD_BOUND,
        "{overflowed} events overflowed"
    );
    peak = peak.max(tally.resident_bytes());
    eprintln!(
        "{EVENTS} new campaigns in {elapsed:.1?}: {overflowed} events overflowed, \
         {held} groups held, peak resident {} MiB (bound {} MiB)",
        peak >> 20,
        RESIDENT_BOUND >> 20
    );
    assert!(peak < RESIDENT_BOUND, "peak resident {} MiB", peak >> 20);
    tally.stop();
}
