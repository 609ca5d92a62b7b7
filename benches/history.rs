//! (d) History queries: 30 days of 12 campaigns x 7 countries x 3 devices
//! (252 groups) for a count and a `uniq` metric, the last day in one-minute
//! windows, stored with the rollups the job keeps, and queried through the
//! same code as `GET /v1/metrics`: p50 and p99 of 50 queries each, on SQLite
//! and, with `CLICKHOUSE_URL` set, on ClickHouse.
//!
//! Baselines in the same run: the store summing, by itself, the rows the
//! plan reads; and DuckDB (from PyPI, in a virtualenv under `target/`)
//! answering the same day's queries by scanning its raw events, stored as
//! Parquet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use rusqlite::Connection;
use tally_connectors::store::clickhouse::ClickHouseStore;
use tally_connectors::store::sqlite::SqliteStore;
use tally_connectors::store::StoreWriter;
use tally_dataflow::aggregate::{AggState, AggregateKind, Sketch};
use tally_dataflow::config::Config;
use tally_dataflow::model::WindowUpdate;
use tally_dataflow::ports::Sink;
use tally_dataflow::query::{Fold, Pass, Query};
use tally_dataflow::rollup;
use tally_dataflow::time::now_ms;
use tally_dataflow::window::Span;

use crate::support::default_config;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
const DAYS: i64 = 30;
const RUNS: usize = 50;
const COUNTRIES: [&str; 7] = ["US", "GB", "DE", "FR", "IN", "BR", "JP"];
const DEVICES: [&str; 3] = ["MOBILE", "DESKTOP", "TABLET"];

/// The stored windows of one group, at one width: (start, group, clicks, users).
type Cells = Vec<(i64, usize, u64, Sketch)>;

pub fn run() {
    let config = default_config();
    let now = now_ms();
    // The last whole day, and 29 before it.
    let last_day = now.div_euclid(DAY) * DAY - DAY;
    let first_day = last_day - (DAYS - 1) * DAY;
    let groups = groups();
    let (minutes, hours) = cells(&groups, first_day, last_day);
    let updates = updates(&config, &groups, &minutes, &hours);
    let events: u64 = minutes.iter().map(|c| c.2).sum();
    println!(
        "(d) history queries: {DAYS} days of 252 groups, the last in 1 m windows ({} stored rows with rollups; \
         the day holds {events} events); p50 / p99 of {RUNS}",
        updates.len()
    );

    let updates_len = updates.len();
    let (dir, path, store) = sqlite(&config, updates.clone());
    let queries = queries(last_day);
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let bytes = std::fs::metadata(&path).unwrap().len();
    let sketched: i64 = conn
        .query_row(
            "SELECT count(*) FROM windows WHERE sketch IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    println!(
        "  SQLite: {:.1} MB on disk, {:.0} bytes per row ({sketched} of the rows hold a sketch)",
        bytes as f64 / 1e6,
        bytes as f64 / updates_len as f64
    );
    for (label, params) in &queries {
        let query = parse(&config, params, now);
        let times = timed(|| {
            let mut fold = Fold::new(query.clone());
            loop {
                store.scan(&mut fold).unwrap();
                match fold.finish().unwrap() {
                    Pass::Done(answer) => break answer.rows,
                    Pass::Again(again) => fold = *again,
                }
            }
        });
        let baseline = timed(|| own_sum(&conn, &query));
        report(label, &times, &baseline);
    }

    if let Ok(url) = std::env::var("CLICKHOUSE_URL") {
        clickhouse(&config, &url, updates, &queries, now);
    } else {
        println!("  ClickHouse: set CLICKHOUSE_URL (scripts/services.sh start) to measure it");
    }
    duckdb(dir.path(), &minutes, &groups, last_day);
    kinds(last_day, now);
}

/// The aggregates, as [`kinds`] compares them: a name and the field read.
const KINDS: [(&str, &str); 4] = [
    ("count", ""),
    ("uniq", "dimensions.userId"),
    ("quantiles", "values.latency_ms"),
    ("topk", "dimensions.creativeId"),
];
/// Ad clicks per minute in [`kinds`].
const CLICKS_PER_MINUTE: usize = 2_000;

/// A click as the sketches read it.
struct Click {
    user: String,
    creative: String,
    latency: f64,
}

impl tally_dataflow::event::Fields for Click {
    fn dimension(&self, name: &str) -> Option<&str> {
        match name {
            "userId" => Some(&self.user),
            "creativeId" => Some(&self.creative),
            _ => None,
        }
    }
    fn value(&self, name: &str) -> Option<f64> {
        (name == "latency_ms").then_some(self.latency)
    }
}

/// A day of one-minute windows of a metric of each kind, every minute from
/// the same ad clicks, in SQLite: the day at 1 m (1,440 values, each a
/// sketch read and answered) and the day as one bucket (1,440 sketches
/// merged), beside `count`'s same queries.
fn kinds(last_day: i64, now: i64) {
    let text: String = KINDS
        .iter()
        .map(|(kind, field)| {
            let field = if field.is_empty() { String::new() } else { format!("field = \"{field}\"\n") };
            format!(
                "[[metric]]\nname = \"{kind}\"\naggregate = \"{kind}\"\n{field}windows = [\"tumbling 1m\"]\nrollups = []\nprojections = []\n"
            )
        })
        .collect();
    let config = Config::load(Some(&text), []).unwrap();
    let mut rng = fastrand::Rng::with_seed(9);
    let mut updates = Vec::new();
    for minute in 0..DAY / MINUTE {
        let mut states = vec![AggState::default(); KINDS.len()];
        for _ in 0..CLICKS_PER_MINUTE {
            let click = Click {
                user: format!("usr_{}", rng.u32(..100_000)),
                creative: format!("cr_{}", (1001f64.powf(rng.f64()) as u32).saturating_sub(1)),
                latency: -60.0 * (1.0 - rng.f64()).ln(),
            };
            for (state, metric) in states.iter_mut().zip(&config.metrics) {
                state.observe(metric.aggregate, metric.field.as_ref(), &click);
            }
        }
        let start = last_day + minute * MINUTE;
        for (m, state) in states.into_iter().enumerate() {
            updates.push(Arc::new(WindowUpdate {
                metric: m as u16,
                window: 0,
                span: Span {
                    start,
                    end: start + MINUTE,
                },
                group: Vec::new().into(),
                state,
                revision: 0,
                is_final: true,
                appended_at: None,
            }));
        }
    }
    let (_dir, path, store) = sqlite(&config, updates);
    let conn = Connection::open(&path).unwrap();
    println!(
        "  each aggregate, a day of 1 m windows of one group ({CLICKS_PER_MINUTE} ad clicks a minute), SQLite; p50 of {RUNS}:"
    );
    let day = format!("start={}&end={}", last_day / 1000, (last_day + DAY) / 1000);
    let mut count = (0.0, 0.0);
    for (kind, _) in KINDS {
        let bytes: f64 = conn
            .query_row(
                "SELECT avg(length(sketch)) FROM windows WHERE metric = ?1",
                [kind],
                |r| r.get::<_, Option<f64>>(0),
            )
            .unwrap()
            .unwrap_or(0.0);
        let time = |resolution: &str| {
            let query = parse(
                &config,
                &format!("metric={kind}&resolution={resolution}&{day}"),
                now,
            );
            let (times, _) = timed(|| {
                let mut fold = Fold::new(query.clone());
                store.scan(&mut fold).unwrap();
                match fold.finish().unwrap() {
                    Pass::Done(answer) => answer.rows,
                    Pass::Again(_) => unreachable!("an ungrouped query is one pass"),
                }
            });
            percentile(&times, 0.5)
        };
        let (minutes, merged) = (time("1m"), time("1d"));
        if kind == "count" {
            count = (minutes, merged);
        }
        println!(
            "    {kind:<10} at 1 m p50 {minutes:>6.1} ms ({:>5.1}x count)   merged into the day p50 {merged:>6.1} ms ({:>5.1}x count)   {bytes:>6.0} sketch bytes a row",
            minutes / count.0,
            merged / count.1,
        );
    }
}

/// (campaign, country, device) of every group.
fn groups() -> Vec<[String; 3]> {
    let mut groups = Vec::new();
    for campaign in 0..12 {
        for country in COUNTRIES {
            for device in DEVICES {
                groups.push([
                    format!("camp_{}", 1000 + campaign),
                    country.to_string(),
                    device.to_string(),
                ]);
            }
        }
    }
    groups
}

/// Each group's minutes of the last day, and its hours of the days before.
fn cells(groups: &[[String; 3]], first_day: i64, last_day: i64) -> (Cells, Cells) {
    let mut rng = fastrand::Rng::with_seed(4);
    let users = |n: u64, rng: &mut fastrand::Rng| {
        let mut state = AggState::default();
        let field = tally_dataflow::aggregate::Field::parse("dimensions.userId").unwrap();
        for _ in 0..n {
            state.observe(AggregateKind::Uniq, Some(&field), &user(rng.u32(..5000)));
        }
        state.sketch.unwrap_or_default()
    };
    let mut minutes = Vec::new();
    for minute in 0..DAY / MINUTE {
        for g in 0..groups.len() {
            let count = rng.u64(1..50);
            let sketch = users(count, &mut rng);
            minutes.push((last_day + minute * MINUTE, g, count, sketch));
        }
    }
    let mut hours = Vec::new();
    for hour in 0..(last_day - first_day) / HOUR {
        for g in 0..groups.len() {
            let sketch = users(50, &mut rng);
            hours.push((first_day + hour * HOUR, g, rng.u64(60..3000), sketch));
        }
    }
    (minutes, hours)
}

/// The final windows the job would store for the cells: `ad_clicks` and
/// `unique_users`, and every table of theirs at 1 m, 1 h and 1 d.
fn updates(
    config: &Config,
    groups: &[[String; 3]],
    minutes: &Cells,
    hours: &Cells,
) -> Vec<Arc<WindowUpdate>> {
    let tables = rollup::expand(&config.metrics);
    let metric = |name: &str| config.metrics.iter().position(|m| m.name == name).unwrap();
    let (clicks, users) = (metric("ad_clicks"), metric("unique_users"));
    let mut out = Vec::new();
    for (t, table) in tables.iter().enumerate() {
        let of = table.rollup_of.map_or(t, usize::from);
        if of != clicks && of != users {
            continue;
        }
        let places: Vec<usize> = table
            .dimensions
            .iter()
            .map(|d| tables[of].dimensions.iter().position(|p| p == d).unwrap())
            .collect();
        for (w, window) in table.windows.iter().enumerate() {
            let size = window.size();
            if !window.is_tumbling() || ![MINUTE, HOUR, DAY].contains(&size) {
                continue;
            }
            let sources = minutes.iter().chain(hours.iter().filter(|_| size > MINUTE));
            let mut folded: HashMap<(i64, Vec<String>), AggState> = HashMap::new();
            for (start, g, count, sketch) in sources {
                let group = places.iter().map(|&p| groups[*g][p].clone()).collect();
                let state = folded
                    .entry((start.div_euclid(size) * size, group))
                    .or_default();
                state.count += count;
                if of == users {
                    match &mut state.sketch {
                        Some(s) => s.merge(sketch),
                        None => state.sketch = Some(sketch.clone()),
                    }
                }
            }
            out.extend(folded.into_iter().map(|((start, group), state)| {
                Arc::new(WindowUpdate {
                    metric: t as u16,
                    window: w as u8,
                    span: Span {
                        start,
                        end: start + size,
                    },
                    group: group.into(),
                    state,
                    revision: 0,
                    is_final: true,
                    appended_at: None,
                })
            }));
        }
    }
    out
}

/// A SQLite store in a new temporary directory, which lives as long as the
/// directory returned, holding `updates`; and the store's path.
fn sqlite(
    config: &Config,
    updates: Vec<Arc<WindowUpdate>>,
) -> (tempfile::TempDir, PathBuf, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.db");
    let (store, writer) = SqliteStore::open(
        &path,
        config.metrics.clone(),
        config.backfill.keep_old,
        config.dataflow.store_queue,
    )
    .unwrap();
    write(config, writer, updates);
    (dir, path, store)
}

fn write(config: &Config, writer: StoreWriter, updates: Vec<Arc<WindowUpdate>>) {
    let mut sink = writer.sinks(&config.metrics, 1, false).windows.remove(0);
    for chunk in updates.chunks(10_000) {
        let mut batch = chunk.to_vec();
        while !batch.is_empty() {
            sink.offer(&mut batch);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    drop(sink);
    writer.close();
    // The kernel writes the store's dirty pages back in the background some
    // seconds later; flushed now, that does not land among the timed
    // queries.
    Command::new("sync").status().unwrap();
}

/// What a dashboard asks: the day by minute, a week by hour, 30 days by day.
fn queries(last_day: i64) -> Vec<(&'static str, String)> {
    let range = |start: i64, end: i64| format!("start={}&end={}", start / 1000, end / 1000);
    let day = range(last_day, last_day + DAY);
    let week = range(last_day + DAY - 7 * DAY, last_day + DAY);
    let month = range(last_day + DAY - DAYS * DAY, last_day + DAY);
    [
        (
            "a day at 1 m, all groups",
            format!("metric=ad_clicks&resolution=1m&{day}"),
        ),
        (
            "a day at 1 m, campaignId filter",
            format!("metric=ad_clicks&resolution=1m&campaignId=camp_1003&{day}"),
        ),
        (
            "a day at 1 m, groupBy country",
            format!("metric=ad_clicks&resolution=1m&groupBy=country&{day}"),
        ),
        (
            "a day at 1 m, uniq",
            format!("metric=unique_users&resolution=1m&{day}"),
        ),
        (
            "a day at 1 m, uniq by country",
            format!("metric=unique_users&resolution=1m&groupBy=country&{day}"),
        ),
        (
            "a week at 1 h, all groups",
            format!("metric=ad_clicks&resolution=1h&{week}"),
        ),
        (
            "a week at 1 h, groupBy country",
            format!("metric=ad_clicks&resolution=1h&groupBy=country&{week}"),
        ),
        (
            "a week at 1 h, uniq by country",
            format!("metric=unique_users&resolution=1h&groupBy=country&{week}"),
        ),
        (
            "30 days at 1 d, all groups",
            format!("metric=ad_clicks&resolution=1d&{month}"),
        ),
        (
            "30 days at 1 d, uniq",
            format!("metric=unique_users&resolution=1d&{month}"),
        ),
    ]
    .into_iter()
    .collect()
}

fn parse(config: &Config, params: &str, now: i64) -> Query {
    let params: Vec<(String, String)> = serde_urlencoded::from_str(params).unwrap();
    Query::parse(&params, &config.metrics, &config.history, now).unwrap()
}

/// SQLite summing the rows of the plan's first read by itself.
fn own_sum(conn: &Connection, query: &Query) -> u64 {
    let read = &query.reads[0];
    let (rows, _): (i64, Option<i64>) = conn
        .prepare_cached(
            "SELECT count(*), sum(count) FROM windows
             WHERE metric = ?1 AND version = ?2 AND window = ?3 AND start >= ?4 AND start < ?5",
        )
        .unwrap()
        .query_row(
            rusqlite::params![
                query.metric,
                read.version,
                read.window.to_string(),
                query.start,
                query.end
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    rows as u64
}

fn clickhouse(
    config: &Config,
    url: &str,
    updates: Vec<Arc<WindowUpdate>>,
    queries: &[(&str, String)],
    now: i64,
) {
    let mut settings = config.clickhouse.clone();
    settings.url = url.to_string();
    settings.database = format!("bench_history_{:08x}", fastrand::u32(..));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = ClickHouseStore::new(&settings);
    runtime.block_on(store.prepare(&config.metrics, config.backfill.keep_old));
    let writer = store
        .writer(
            config.metrics.clone(),
            config.backfill.keep_old,
            config.dataflow.store_queue,
        )
        .unwrap();
    write(config, writer, updates);
    println!("  ClickHouse ({url}, database {})", settings.database);
    let db = settings.database.clone();
    ch(url, &format!("OPTIMIZE TABLE {db}.windows FINAL"));
    Command::new("sync").status().unwrap();
    for (label, params) in queries {
        let query = parse(config, params, now);
        let times = timed(|| {
            runtime.block_on(async {
                let mut fold = Fold::new(query.clone());
                loop {
                    fold = store.scan(fold).await.unwrap();
                    match fold.finish().unwrap() {
                        Pass::Done(answer) => break answer.rows,
                        Pass::Again(again) => fold = *again,
                    }
                }
            })
        });
        let read = &query.reads[0];
        let sum = format!(
            "SELECT count(), sum(count) FROM {db}.windows FINAL WHERE metric = '{}' AND version = '{}' \
             AND window = '{}' AND start >= {} AND start < {}",
            query.metric, read.version, read.window, query.start, query.end
        );
        let baseline = timed(|| {
            ch(url, &sum);
            0
        });
        report(label, &times, &baseline);
        let only = query.only_group().map_or(String::new(), |g| {
            format!(" AND grp = '{}'", g.join("\u{1f}"))
        });
        // What the scan fetches: estimates where they answer the buckets.
        let sketch = if query.by_estimate(read) {
            "'', estimate"
        } else {
            "sketch"
        };
        let fetch = format!(
            "SELECT start, grp, count, sum, {sketch} FROM {db}.windows FINAL WHERE metric = '{}' \
             AND version = '{}' AND window = '{}' AND start >= {} AND start < {}{only} \
             ORDER BY start, grp FORMAT RowBinary",
            query.metric, read.version, read.window, query.start, query.end
        );
        let fetched = timed(|| ch(url, &fetch).len() as u64);
        println!(
            "      the same rows fetched raw: p50 {:>6.1} ms, {} bytes",
            percentile(&fetched.0, 0.5),
            fetched.1
        );
    }
    ch(url, &format!("DROP DATABASE {db}"));
}

/// DuckDB over the last day's raw events: the cells expanded into one row
/// per event, written as Parquet, then each query of the day as SQL.
fn duckdb(dir: &Path, minutes: &Cells, groups: &[[String; 3]], last_day: i64) {
    let Some(python) = duckdb_python() else {
        println!("  DuckDB: not measured (python3 -m venv and pip install duckdb failed)");
        return;
    };
    let cells = dir.join("cells.csv");
    let mut csv = String::from("start,campaign,country,device,count\n");
    for (start, g, count, _) in minutes {
        let [campaign, country, device] = &groups[*g];
        csv.push_str(&format!("{start},{campaign},{country},{device},{count}\n"));
    }
    std::fs::write(&cells, csv).unwrap();
    let script = format!(
        r#"
import duckdb, json, time
con = duckdb.connect()
con.execute("""COPY (
    SELECT make_timestamp(CAST((start + floor(random() * 60000)) * 1000 AS BIGINT)) AS ts,
           campaign, country, device, 'usr_' || CAST(floor(random() * 5000) AS INT) AS user_id
    FROM read_csv_auto('{cells}'), range(count)
    ORDER BY ts) TO '{parquet}' (FORMAT PARQUET)""")
events = con.execute("SELECT count(*) FROM '{parquet}'").fetchone()[0]
day = "ts >= make_timestamp({start} * 1000) AND ts < make_timestamp({end} * 1000)"
bucket = "time_bucket(INTERVAL 1 minute, ts)"
queries = [
    f"SELECT {{bucket}} b, count(*) FROM '{parquet}' WHERE {{day}} GROUP BY b",
    f"SELECT {{bucket}} b, count(*) FROM '{parquet}' WHERE {{day}} AND campaign = 'camp_1003' GROUP BY b",
    f"SELECT {{bucket}} b, country, count(*) FROM '{parquet}' WHERE {{day}} GROUP BY b, country",
    f"SELECT {{bucket}} b, approx_count_distinct(user_id) FROM '{parquet}' WHERE {{day}} GROUP BY b",
    f"SELECT {{bucket}} b, country, approx_count_distinct(user_id) FROM '{parquet}' WHERE {{day}} GROUP BY b, country",
]
out = []
for q in queries:
    times = []
    for _ in range({runs}):
        t = time.perf_counter()
        con.execute(q).fetchall()
        times.append((time.perf_counter() - t) * 1000)
    out.append(sorted(times))
print(json.dumps({{"events": events, "times": out}}))
"#,
        cells = cells.display(),
        parquet = dir.join("events.parquet").display(),
        start = last_day,
        end = last_day + DAY,
        runs = RUNS,
    );
    let output = Command::new(python).arg("-c").arg(script).output().unwrap();
    if !output.status.success() {
        println!(
            "  DuckDB failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return;
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(result) = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    else {
        println!("  DuckDB answered no figures: {stdout}");
        return;
    };
    println!(
        "  DuckDB {}, the day's {} raw events as Parquet (2 threads)",
        duckdb_version(),
        result["events"]
    );
    let labels = [
        "a day at 1 m, all groups",
        "a day at 1 m, campaignId filter",
        "a day at 1 m, groupBy country",
        "a day at 1 m, uniq (approx_count_distinct)",
        "a day at 1 m, uniq by country",
    ];
    for (label, times) in labels.iter().zip(result["times"].as_array().unwrap()) {
        let times: Vec<f64> = times
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect();
        println!(
            "    {label:<42} p50 {:>6.1} ms  p99 {:>6.1} ms",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
    }
}

/// A python with duckdb: `target/duckdb-venv`, made on first use.
fn duckdb_python() -> Option<std::path::PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/duckdb-venv");
    let python = venv.join("bin/python");
    let has = |python: &Path| {
        Command::new(python)
            .args(["-c", "import duckdb"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "duckdb"])
                .status()
                .is_ok_and(|s| s.success());
        if !made {
            return None;
        }
    }
    has(&python).then_some(python)
}

fn duckdb_version() -> String {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/duckdb-venv/bin/python");
    Command::new(python)
        .args(["-c", "import duckdb; print(duckdb.__version__)"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs `f` [`RUNS`] times after one warm-up; its milliseconds, sorted,
/// and what it returned (the rows read).
fn timed(mut f: impl FnMut() -> u64) -> (Vec<f64>, u64) {
    let rows = f();
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times, rows)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A query's times and rows read, beside the store's own sum of the rows of
/// its first read.
fn report(label: &str, (times, rows): &(Vec<f64>, u64), baseline: &(Vec<f64>, u64)) {
    println!(
        "    {label:<42} p50 {:>6.1} ms  p99 {:>6.1} ms  {rows:>6} rows   baseline p50 {:>6.1} ms",
        percentile(times, 0.5),
        percentile(times, 0.99),
        percentile(&baseline.0, 0.5),
    );
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

/// One statement over ClickHouse's HTTP interface; its answer's text.
fn ch(url: &str, sql: &str) -> String {
    ureq::post(url)
        .send(sql)
        .unwrap_or_else(|e| panic!("ClickHouse: {sql}: {e}"))
        .body_mut()
        .read_to_vec()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap()
}
