//! (d) History queries on the SQLite store: a day of one-minute windows for
//! 252 groups, queried at one-hour resolution through the same code as
//! `GET /v1/metrics`, against SQLite summing the same rows by itself.

use std::sync::Arc;
use std::time::Instant;

use rusqlite::Connection;
use tally_connectors::store::sqlite::SqliteStore;
use tally_dataflow::aggregate::{AggState, Sketch};
use tally_dataflow::model::WindowUpdate;
use tally_dataflow::ports::Sink;
use tally_dataflow::query::{Fold, Pass, Query};
use tally_dataflow::window::Span;

use crate::support::default_config;

const DAY_START: i64 = 1_780_790_400_000;
const MINUTES: i64 = 24 * 60;

pub fn run() {
    let config = default_config();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.db");
    let (store, writer) =
        SqliteStore::open(&path, config.metrics.clone(), config.backfill.keep_old).unwrap();
    let (ad_clicks, unique_users) = (index(&config, "ad_clicks"), index(&config, "unique_users"));
    let one_minute = |m: usize| {
        config.metrics[m]
            .windows
            .iter()
            .position(|w| w.to_string() == "tumbling 1m")
            .unwrap() as u8
    };
    let mut sink = writer.sinks(&config.metrics, 1, false).windows.remove(0);
    let mut rng = fastrand::Rng::with_seed(4);
    let mut rows = 0;
    for minute in 0..MINUTES {
        let mut batch = Vec::new();
        for campaign in 0..12 {
            for country in ["US", "GB", "DE", "FR", "IN", "BR", "JP"] {
                for device in ["MOBILE", "DESKTOP", "TABLET"] {
                    let group = vec![
                        format!("camp_{}", 1000 + campaign),
                        country.to_string(),
                        device.to_string(),
                    ];
                    let span = Span {
                        start: DAY_START + minute * 60_000,
                        end: DAY_START + (minute + 1) * 60_000,
                    };
                    let count = rng.u64(1..50);
                    let mut sketch = Sketch::new();
                    for _ in 0..count {
                        let mut one = AggState::default();
                        one.observe(
                            tally_dataflow::aggregate::AggregateKind::Uniq,
                            config.metrics[unique_users].field.as_ref(),
                            &user(rng.u32(..5000)),
                        );
                        sketch.merge(one.sketch.as_ref().unwrap());
                    }
                    for (metric, state) in [
                        (
                            ad_clicks,
                            AggState {
                                count,
                                ..Default::default()
                            },
                        ),
                        (
                            unique_users,
                            AggState {
                                count,
                                sum: 0,
                                sketch: Some(sketch.clone()),
                            },
                        ),
                    ] {
                        batch.push(Arc::new(WindowUpdate {
                            metric: metric as u16,
                            window: one_minute(metric),
                            span,
                            group: group.clone(),
                            state,
                            revision: 0,
                            is_final: true,
                        }));
                        rows += 1;
                    }
                }
            }
        }
        while !batch.is_empty() {
            sink.offer(&mut batch);
        }
    }
    drop(sink);
    writer.close();

    let params = |extra: &str, metric: &str| -> Vec<(String, String)> {
        let q = format!(
            "metric={metric}&start={}&end={}&resolution=1h{extra}",
            DAY_START / 1000,
            (DAY_START + MINUTES * 60_000) / 1000
        );
        serde_urlencoded::from_str(&q).unwrap()
    };
    println!("(d) history queries, SQLite, a day of 1 m windows for 252 groups ({rows} rows), answered at 1 h resolution, median of 5");
    let conn = Connection::open(&path).unwrap();
    let baseline = median(|| {
        let _: (i64, i64) = conn
            .query_row(
                "SELECT count(*), sum(count) FROM windows WHERE metric = 'ad_clicks' AND window = 'tumbling 1m' AND start >= ?1 AND start < ?2",
                [DAY_START, DAY_START + MINUTES * 60_000],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
    });
    println!("    baseline, SQLite sums the same rows itself:        {baseline:>7.1} ms");
    for (label, metric, extra) in [
        ("ad_clicks, all groups", "ad_clicks", ""),
        (
            "ad_clicks, campaignId filter",
            "ad_clicks",
            "&campaignId=camp_1003",
        ),
        (
            "ad_clicks, groupBy country",
            "ad_clicks",
            "&groupBy=country",
        ),
        ("unique_users (HLL merge), all groups", "unique_users", ""),
    ] {
        let query =
            Query::parse(&params(extra, metric), &config.metrics, &config.history, 0).unwrap();
        let ms = median(|| {
            let mut fold = Fold::new(query.clone());
            store.scan(&mut fold).unwrap();
            let Ok(Pass::Done(answer)) = fold.finish() else {
                panic!("a day of 24 buckets takes one scan");
            };
            assert_eq!(answer.series[0].points.len(), 24);
        });
        println!(
            "    {label:<38} {ms:>7.1} ms  ({:.1}x the baseline)",
            ms / baseline
        );
    }
}

fn index(config: &tally_dataflow::config::Config, name: &str) -> usize {
    config.metrics.iter().position(|m| m.name == name).unwrap()
}

fn user(id: u32) -> tally_dataflow::event::Event {
    tally_dataflow::event::Event {
        event_id: None,
        event_type: "ad_click".into(),
        timestamp: 0,
        dimensions: [("userId".to_string(), format!("usr_{id}"))].into(),
        values: Default::default(),
    }
}

fn median(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[2]
}
