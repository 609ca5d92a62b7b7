//! Windows close without new traffic: once every partition has been idle
//! for `idle_timeout`, the watermark follows the wall clock, less the
//! out-of-orderness, and the last window of a burst is stored.

use std::time::Duration;

use serde_json::json;

use tally_dataflow::time::now_ms;

use crate::util::{eventually, Tally};

/// The defaults of `cluster.toml`.
const IDLE_TIMEOUT_MS: i64 = 5_000;
const OUT_OF_ORDERNESS_MS: i64 = 2_000;
const WINDOW_MS: i64 = 10_000;

fn clicks(at_ms: i64, count: usize) -> Vec<serde_json::Value> {
    (0..count)
        .map(|i| {
            json!({"eventType": "ad_click", "timestamp": at_ms,
                   "dimensions": {"campaignId": "camp_quiet", "country": "US", "userId": format!("u{i}")}})
        })
        .collect()
}

#[test]
fn the_last_window_of_a_burst_is_stored_without_more_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    let sent = now_ms();
    tally.post_events(&clicks(sent, 40));
    let start = sent.div_euclid(WINDOW_MS) * WINDOW_MS;
    let end = start + WINDOW_MS;
    let query = format!(
        "metric=ad_clicks&campaignId=camp_quiet&resolution=10s&start={}&end={}",
        start / 1000,
        end / 1000
    );
    let stored = |count: u64| {
        let answer = tally.metrics(&query);
        match answer["dataPoints"][0]["value"].as_u64() {
            Some(n) if n == count => Ok(now_ms()),
            _ => Err(format!("{answer}")),
        }
    };
    // Nothing more is sent. The watermark reaches the window's end at
    // `end + out_of_orderness` by the wall clock, and the partitions are
    // marked every `idle_timeout` once they are all idle.
    let final_at = eventually(Duration::from_secs(60), || stored(40));
    let bound = end + OUT_OF_ORDERNESS_MS + IDLE_TIMEOUT_MS;
    assert!(
        final_at >= end + OUT_OF_ORDERNESS_MS,
        "stored {} ms after its end, before the wall clock passed it",
        final_at - end
    );
    assert!(
        final_at <= bound + 2_000,
        "stored {} ms after its end; the bound is {} ms and a second or two to store it",
        final_at - end,
        bound - end
    );

    // A late event is a revision, as any late event is.
    tally.post_events(&clicks(start + 1, 1));
    eventually(Duration::from_secs(30), || stored(41));
    eprintln!(
        "quiet: the last window stored {} ms after its end (bound {} ms)",
        final_at - end,
        bound - end
    );
}
