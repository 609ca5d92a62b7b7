//! The same log gives the same stored results for one worker and for four,
//! revisions, dead letters and overflow groups included.

use std::time::Duration;

use rusqlite::Connection;
use serde_json::json;

use crate::util::{
    base_ms, clickstream, dead_letters, eventually, sketch_summary, Generated, Tally,
};

/// A stored window: metric, window, start, group, count, sum, what its
/// sketch says, revision.
type Row = (String, String, i64, String, i64, f64, Option<String>, i64);

/// Every stored window, in a canonical order. Sketches are compared by
/// what they say ([`sketch_summary`]): the bytes of a sparse HLL sketch
/// keep insertion order, and a KLL sketch's flip coins.
fn stored(dir: &std::path::Path) -> Vec<Row> {
    let conn = Connection::open(dir.join("results.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT metric, window, start, grp, count, sum, sketch, revision FROM windows ORDER BY metric, window, start, grp")
        .unwrap();
    let estimate = |bytes: Option<Vec<u8>>| bytes.map(|b| sketch_summary(&b));
    stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            estimate(r.get(6)?),
            r.get(7)?,
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Waits until the store stops changing and holds the flush windows.
fn settle(tally: &Tally) {
    let mut last = None;
    eventually(Duration::from_secs(60), || {
        let rows = stored(&tally.dir);
        let closed_last = rows
            .iter()
            .any(|r| r.0 == "events" && r.2 == base_ms() + 290_000);
        let same = last.as_ref() == Some(&rows);
        last = Some(rows);
        if closed_last && same {
            Ok(())
        } else {
            Err("the store is still changing".into())
        }
    });
}

#[test]
fn one_worker_and_four_store_the_same_results() {
    let first = tempfile::tempdir().unwrap();
    // The default idle timeout: idle partitions are marked in the log, so
    // the second run reads the first one's marks. A cap of about a group
    // per shard: which groups overflow must not depend on the workers
    // either.
    let env = [("TALLY__DATAFLOW__MAX_GROUPS", "1")];
    let tally = Tally::start(first.path(), &env, &["--workers", "4"]);
    let events = clickstream(3, 2000);
    let chunks: Vec<&[Generated]> = events.chunks(40).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut batch: Vec<_> = chunk.iter().map(Generated::json).collect();
        // Campaigns seen once, more than the cap holds.
        batch.extend(chunk.iter().take(8).enumerate().map(|(k, e)| {
            json!({"eventType": "ad_click", "timestamp": e.time_ms as f64 / 1000.0,
                   "dimensions": {"campaignId": format!("once_{i}_{k}"), "country": "US"}})
        }));
        // Requests go to the partitions in turn, so request i lands behind
        // request i - 8, whose newest event, less the 2 s out-of-orderness,
        // is the partition's watermark. Lateness is judged against it.
        if let Some(previous) = i.checked_sub(crate::util::PARTITIONS).map(|p| chunks[p]) {
            let watermark = previous.iter().map(|e| e.time_ms).max().unwrap() - 2_000;
            if i % 3 == 0 {
                // Late, within the 30 s allowed: a revision.
                batch.push(json!({"eventType": "ad_click", "timestamp": (watermark - 20_000) as f64 / 1000.0, "dimensions": {"country": "US"}}));
            }
            if i % 7 == 0 {
                // Past the allowed lateness: a dead letter.
                batch.push(json!({"eventType": "ad_click", "timestamp": (watermark - 45_000) as f64 / 1000.0}));
            }
        }
        tally.post_events(&batch);
    }
    tally.flush(base_ms() + 600_000);
    settle(&tally);
    tally.stop();
    let four = stored(first.path());
    assert!(
        four.iter().any(|r| r.7 > 0),
        "the input should cause revisions"
    );
    assert!(
        dead_letters(first.path()) > 0,
        "the input should cause dead letters"
    );
    assert!(
        four.iter().any(|r| r.3.contains("__overflow__")),
        "the input should overflow the cap"
    );
    for sketched in ["unique_users", "ad_latency", "top_creatives"] {
        assert!(
            four.iter().any(|r| r.0 == sketched && r.6.is_some()),
            "{sketched} should store sketches"
        );
    }

    // The same log, replayed by one worker into a fresh store.
    let second = tempfile::tempdir().unwrap();
    copy_dir(&first.path().join("log"), &second.path().join("log"));
    let tally = Tally::start(second.path(), &env, &["--workers", "1"]);
    settle(&tally);
    tally.stop();
    let one = stored(second.path());
    let differing: Vec<_> = four
        .iter()
        .zip(&one)
        .filter(|(a, b)| a != b)
        .take(5)
        .collect();
    assert!(
        differing.is_empty(),
        "one worker and four stored different results, first: {differing:#?}"
    );
    assert_eq!(one.len(), four.len());
    assert_eq!(dead_letters(second.path()), dead_letters(first.path()));
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
