//! Restarts: after `kill -9` or SIGTERM, every accepted event is counted
//! exactly once.

use std::time::Duration;

use crate::util::{
    base_ms, clicks_per_minute_are, clickstream, eventually, per_minute_clicks, post_all, range,
    values, Tally,
};

#[test]
fn kill_9_and_sigterm_lose_nothing_and_double_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let events = clickstream(11, 4000);
    let (first, rest) = events.split_at(1500);
    let (second, third) = rest.split_at(1500);

    // Accepted, then killed while the workers are busy with it.
    let tally = Tally::start(dir.path(), &[], &[]);
    post_all(&tally, first, 50);
    tally.kill9();

    // Restarted on the same data: it restores its last checkpoint and reads
    // the log on from there, into the same store.
    let tally = Tally::start(dir.path(), &[], &[]);
    post_all(&tally, second, 50);
    tally.flush(base_ms() + 150_000);
    // Some windows are final now; a clean stop must not disturb them.
    eventually(Duration::from_secs(30), || {
        let got = values(&tally.metrics(&format!("metric=ad_clicks&resolution=1m&{}", range())));
        if got[0].as_u64() > Some(0) {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
    tally.stop();

    let tally = Tally::start(dir.path(), &[], &[]);
    post_all(&tally, third, 50);
    tally.flush(base_ms() + 3_600_000);
    clicks_per_minute_are(&tally, &per_minute_clicks(&events), Duration::from_secs(60));
}
