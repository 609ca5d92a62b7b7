//! Cluster mode on the real services: `tally worker` processes reading Kafka
//! (tansu) and writing ClickHouse and Redis, behind `tally gateway` nodes.
//!
//! The services come from `scripts/services.sh`, which `scripts/test.sh`
//! starts; their addresses arrive as `KAFKA_BROKERS`, `CLICKHOUSE_URL` and
//! `REDIS_URL`. Without them these tests fail, saying how to start them. Each test uses its own
//! topic, database and Redis prefix.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tally_dataflow::time::{now_ms, parse_rfc3339};

use crate::crash::{
    body, differences, generate, reference, setting, Key, Sent, Value as CrashValue, SKETCHED,
    STEP_MS, WINDOWS as CRASH_WINDOWS,
};
use crate::live::{connect, current_values, wait_for};
use crate::sketches::series_within_rank_error;
use crate::util::{
    at, base_ms, clickstream, default_config, eventually, post_all, prometheus_value,
    sketch_summary, values, Generated, Tally,
};

const MINUTE: i64 = 60_000;

/// The services' addresses, and a hold on them: a test that stops a
/// service holds them alone, so that no other test sees the outage.
pub struct Services {
    kafka: String,
    clickhouse: String,
    redis: String,
    _shared: Option<RwLockReadGuard<'static, ()>>,
    _alone: Option<RwLockWriteGuard<'static, ()>>,
}

static OUTAGES: RwLock<()> = RwLock::new(());

impl Services {
    /// The services from the environment. Without them the test fails,
    /// in CI or not: a cluster test that passes without its cluster would
    /// say nothing.
    pub fn from_env() -> Services {
        let hold = OUTAGES.read().unwrap_or_else(|e| e.into_inner());
        Services::with(Some(hold), None)
    }

    /// The services, for a test that stops one of them meanwhile.
    pub fn alone() -> Services {
        let hold = OUTAGES.write().unwrap_or_else(|e| e.into_inner());
        Services::with(None, Some(hold))
    }

    fn with(
        shared: Option<RwLockReadGuard<'static, ()>>,
        alone: Option<RwLockWriteGuard<'static, ()>>,
    ) -> Services {
        let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (
            get("KAFKA_BROKERS"),
            get("CLICKHOUSE_URL"),
            get("REDIS_URL"),
        ) {
            (Some(kafka), Some(clickhouse), Some(redis)) => Services {
                kafka,
                clickhouse,
                redis,
                _shared: shared,
                _alone: alone,
            },
            _ => panic!(
                "KAFKA_BROKERS, CLICKHOUSE_URL and REDIS_URL are not all set: run the tests with \
                 scripts/test.sh, or start the services with \
                 `eval \"$(scripts/services.sh start)\"` and export them"
            ),
        }
    }

    /// Runs SQL on ClickHouse over HTTP and returns the answer's text.
    pub fn clickhouse(&self, sql: &str) -> String {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut response = agent
            .post(&self.clickhouse)
            .send(sql.as_bytes())
            .expect("ClickHouse answers");
        let text = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .unwrap_or_default();
        assert_eq!(response.status().as_u16(), 200, "{sql}: {text}");
        text.trim().to_string()
    }
}

/// A cluster of worker processes and gateways on its own topic, database
/// and Redis prefix.
pub struct Cluster {
    /// Name of the topic, database and prefix.
    pub name: String,
    /// The gateways.
    pub gateways: Vec<Tally>,
    /// Each worker process and the URL of its `/metrics`.
    workers: Vec<(Child, String)>,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    /// The configuration file the processes start with.
    config: PathBuf,
}

impl Cluster {
    /// Starts `processes` worker processes of `threads` threads and
    /// `gateways` gateways, and waits until every gateway is ready.
    pub fn start(
        services: &Services,
        processes: usize,
        threads: usize,
        gateways: usize,
    ) -> Cluster {
        Cluster::start_with(services, processes, threads, gateways, &[])
    }

    /// As [`Cluster::start`], with more `TALLY__*` settings.
    pub fn start_with(
        services: &Services,
        processes: usize,
        threads: usize,
        gateways: usize,
        settings: &[(&str, &str)],
    ) -> Cluster {
        Cluster::start_with_config(
            services,
            (processes, threads, gateways),
            &default_config(),
            settings,
        )
    }

    /// As [`Cluster::start_with`], `processes` of `threads` threads and
    /// `gateways`, from the configuration file `config`.
    pub fn start_with_config(
        services: &Services,
        (processes, threads, gateways): (usize, usize, usize),
        config: &Path,
        settings: &[(&str, &str)],
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("t{:08x}", fastrand::u32(..));
        let addresses: Vec<String> = (0..processes)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let backfill_addresses: Vec<String> = (0..processes)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let env: Vec<(String, String)> = [
            ("TALLY__KAFKA__BROKERS", services.kafka.clone()),
            ("TALLY__KAFKA__TOPIC", name.clone()),
            ("TALLY__CLICKHOUSE__URL", services.clickhouse.clone()),
            ("TALLY__CLICKHOUSE__DATABASE", name.clone()),
            ("TALLY__REDIS__URL", services.redis.clone()),
            ("TALLY__REDIS__PREFIX", name.clone()),
            ("TALLY__CLUSTER__PROCESSES", processes.to_string()),
            ("TALLY__CLUSTER__THREADS", threads.to_string()),
            ("TALLY__CLUSTER__ADDRESSES", format!("{addresses:?}")),
            (
                "TALLY__CLUSTER__BACKFILL_ADDRESSES",
                format!("{backfill_addresses:?}"),
            ),
            ("TALLY__STORAGE__DATA_DIR", format!("{:?}", dir.path())),
            ("TALLY__DATAFLOW__IDLE_TIMEOUT", "1s".into()),
            ("TALLY__LIVE__INTERVAL", "200ms".into()),
            ("RUST_LOG", "info".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
        let mut cluster = Cluster {
            name,
            gateways: Vec::new(),
            workers: Vec::new(),
            dir,
            env,
            config: config.to_path_buf(),
        };
        for process in 0..processes {
            let worker = cluster.start_worker(process);
            cluster.workers.push(worker);
        }
        for i in 0..gateways {
            let mut command = cluster.command("gateway", i);
            command.args(["--listen", "127.0.0.1:0"]);
            let gateway = Tally::launch(command, cluster.dir.path());
            cluster.gateways.push(gateway);
        }
        for gateway in &cluster.gateways {
            wait_ready(gateway);
        }
        cluster
    }

    fn command(&self, role: &str, index: usize) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
        command
            .arg(role)
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stderr(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log(role, index))
                    .unwrap(),
            );
        command
    }

    fn start_worker(&self, process: usize) -> (Child, String) {
        let mut command = self.command("worker", process);
        command
            .args(["--process", &process.to_string()])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped());
        let mut child = command.spawn().expect("start tally worker");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("the worker's first line");
        let url = line
            .trim()
            .strip_prefix("metrics on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        // Timely reports its connections on stdout too.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        (child, url)
    }

    /// Records the workers have read from the topic since they started, from
    /// their `/metrics`.
    pub fn events_read(&self) -> u64 {
        self.workers_sum("tally_events_read_total")
    }

    /// The sum of one counter over the workers' `/metrics`.
    pub fn workers_sum(&self, name: &str) -> u64 {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        self.workers
            .iter()
            .map(|(_, url)| {
                let text = agent
                    .get(format!("{url}/metrics"))
                    .call()
                    .expect("worker /metrics")
                    .body_mut()
                    .read_to_string()
                    .unwrap();
                prometheus_value(&text, name).unwrap_or_else(|| panic!("no {name}"))
            })
            .sum()
    }

    /// Kills every worker process with SIGKILL, then starts them again.
    pub fn kill_and_restart_workers(&mut self) {
        for (worker, _) in &mut self.workers {
            worker.kill().expect("SIGKILL");
            worker.wait().expect("reap");
        }
        self.workers = (0..self.workers.len())
            .map(|process| self.start_worker(process))
            .collect();
    }

    /// Kills worker process `process` with SIGKILL, as a crash would, and
    /// restarts the workers as a user would: the others, which cannot go on
    /// without it, are given 10 s to exit by themselves and killed if they
    /// have not, then every process starts again. Returns how many of the
    /// others exited by themselves.
    pub fn kill_worker(&mut self, process: usize) -> usize {
        let (worker, _) = &mut self.workers[process];
        worker.kill().expect("SIGKILL");
        worker.wait().expect("reap");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = 0;
        for (i, (worker, _)) in self.workers.iter_mut().enumerate() {
            if i == process {
                continue;
            }
            loop {
                if worker.try_wait().expect("wait").is_some() {
                    exited += 1;
                    break;
                }
                if Instant::now() >= deadline {
                    worker.kill().expect("SIGKILL");
                    worker.wait().expect("reap");
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.workers = (0..self.workers.len())
            .map(|process| self.start_worker(process))
            .collect();
        exited
    }

    /// Kills gateway `index` with SIGKILL and starts another in its place,
    /// on a new port.
    pub fn kill_gateway(&mut self, index: usize) {
        let mut command = self.command("gateway", index);
        command.args(["--listen", "127.0.0.1:0"]);
        let fresh = Tally::launch(command, self.dir.path());
        std::mem::replace(&mut self.gateways[index], fresh).kill9();
        wait_ready(&self.gateways[index]);
    }

    /// Stops every worker process with SIGTERM, then starts them again
    /// with the configuration file `config`. The gateways go on.
    pub fn restart_workers_with(&mut self, config: &Path) {
        for (worker, _) in &mut self.workers {
            let pid = worker.id().to_string();
            let stopped = Command::new("kill").args(["-TERM", &pid]).status();
            assert!(stopped.expect("kill").success());
        }
        for (worker, _) in &mut self.workers {
            let status = worker.wait().expect("reap");
            assert!(status.success(), "a worker stopped with {status}");
        }
        self.config = config.to_path_buf();
        self.workers = (0..self.workers.len())
            .map(|process| self.start_worker(process))
            .collect();
    }

    /// The log file of a process.
    pub fn log(&self, role: &str, index: usize) -> PathBuf {
        self.dir.path().join(format!("{role}-{index}.log"))
    }

    /// Everything a process has logged.
    pub fn read_log(&self, role: &str, index: usize) -> String {
        std::fs::read_to_string(self.log(role, index)).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (worker, _) in &mut self.workers {
            let _ = worker.kill();
            let _ = worker.wait();
        }
        if std::thread::panicking() {
            for (role, count) in [
                ("worker", self.workers.len()),
                ("gateway", self.gateways.len()),
            ] {
                for i in 0..count {
                    let log = self.read_log(role, i);
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!("--- {role} {i}, last lines ---");
                    for line in tail.iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
    }
}

/// Waits until `gateway` says it is ready.
fn wait_ready(gateway: &Tally) {
    eventually(Duration::from_secs(60), || match gateway.get("/readyz").0 {
        200 => Ok(()),
        status => Err(format!("gateway {} /readyz answered {status}", gateway.url)),
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The history queries compared between deployments.
fn queries() -> Vec<String> {
    let range = format!(
        "start={}&end={}",
        base_ms() / 1000,
        (base_ms() + 6 * MINUTE) / 1000
    );
    [
        "metric=ad_clicks&resolution=1m",
        "metric=ad_clicks&resolution=1m&groupBy=country",
        "metric=ad_clicks&resolution=10s&campaignId=camp_1",
        "metric=unique_users&resolution=1m&groupBy=campaignId",
        "metric=events&resolution=5m",
        "metric=revenue&resolution=1m&groupBy=deviceType",
        "metric=avg_order_value&resolution=1m&country=DE",
        "metric=top_creatives&resolution=1m&groupBy=country",
        "metric=top_creatives&resolution=5m&k=3",
    ]
    .iter()
    .map(|q| format!("{q}&{range}"))
    // Ranked by the hour rollup (still open, so by its minutes), then
    // answered from each minute's estimate.
    .chain([format!(
        "metric=unique_users&resolution=1m&groupBy=country&start={}&end={}",
        base_ms() / 1000,
        (base_ms() + 60 * MINUTE) / 1000
    )])
    .collect()
}

/// Every query's answer, once every event is counted in a closed window
/// (the closing event's own window stays open).
fn answers(gateway: &Tally, events: &[Generated]) -> BTreeMap<String, Value> {
    let total = events.len() as u64;
    let range = format!(
        "start={}&end={}",
        base_ms() / 1000,
        (base_ms() + 60 * MINUTE) / 1000
    );
    eventually(Duration::from_secs(90), || {
        let answer = gateway.metrics(&format!("metric=events&resolution=1h&{range}"));
        let counted = answer["dataPoints"][0]["value"].as_u64().unwrap_or(0);
        if counted == total {
            Ok(())
        } else {
            Err(format!(
                "{counted} of {total} events counted on {}",
                gateway.url
            ))
        }
    });
    // The total is one group's; the groups of the other workers may store
    // their last windows a moment later. The answers are complete once
    // they stop changing.
    let read = || -> BTreeMap<String, Value> {
        queries()
            .into_iter()
            .map(|q| {
                let answer = gateway.metrics(&q);
                (q, answer)
            })
            .collect()
    };
    let mut last = read();
    eventually(Duration::from_secs(90), || {
        std::thread::sleep(Duration::from_secs(2));
        let now = read();
        if now == last {
            Ok(now)
        } else {
            last = now;
            Err("the answers are still changing".to_string())
        }
    })
}

/// Posts the events in requests of 50, alternating between `gateways`,
/// then one event 10 minutes later that closes every window before it, and
/// one an hour too late to count.
fn post_through(gateways: &[&Tally], events: &[Generated]) {
    for (i, chunk) in events.chunks(50).enumerate() {
        post_all(gateways[i % gateways.len()], chunk, 50);
    }
    close_windows(gateways[0]);
    gateways[0].post_events(&[json!({
        "eventType": "ad_click",
        "timestamp": (base_ms() - 60 * MINUTE) as f64 / 1000.0,
        "dimensions": {"campaignId": "camp_late"},
    })]);
}

/// Posts an event 10 minutes after the generated ones, which closes every
/// window before it once the other partitions have gone idle.
fn close_windows(gateway: &Tally) {
    gateway.post_events(&[json!({
        "eventType": "flush",
        "timestamp": (base_ms() + 10 * MINUTE) as f64 / 1000.0,
    })]);
}

/// Waits until the stored `ad_clicks` per minute equal a count of `events`.
fn assert_clicks_per_minute(gateway: &Tally, events: &[Generated]) {
    let mut expected = vec![0u64; 6];
    for e in events.iter().filter(|e| e.event_type == "ad_click") {
        expected[((e.time_ms - base_ms()) / MINUTE) as usize] += 1;
    }
    let range = format!(
        "start={}&end={}",
        base_ms() / 1000,
        (base_ms() + 6 * MINUTE) / 1000
    );
    eventually(Duration::from_secs(90), || {
        let answer = gateway.metrics(&format!("metric=ad_clicks&resolution=1m&{range}"));
        let got: Vec<u64> = answer["dataPoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["value"].as_u64().unwrap_or(0))
            .collect();
        if got == expected {
            Ok(())
        } else {
            Err(format!(
                "ad_clicks per minute {got:?}, expected {expected:?}"
            ))
        }
    });
}

/// The dead letters a gateway lists, once there are `count`.
fn dead_letters(gateway: &Tally, count: usize) -> Vec<Value> {
    eventually(Duration::from_secs(30), || {
        let (status, body) = gateway.get("/v1/deadletters");
        let letters = body["deadLetters"].as_array().cloned().unwrap_or_default();
        if status == 200 && letters.len() == count {
            Ok(letters)
        } else {
            Err(format!("{status}: {body}"))
        }
    })
}

#[test]
fn a_cluster_answers_as_tally_run_does() {
    let services = Services::from_env();
    let events = clickstream(23, 4000);

    // The embedded reference, with the same idleness.
    let dir = tempfile::tempdir().unwrap();
    let embedded = Tally::start(dir.path(), &[("TALLY__DATAFLOW__IDLE_TIMEOUT", "1s")], &[]);
    post_through(&[&embedded], &events);
    let expected = answers(&embedded, &events);
    let expected_dead = dead_letters(&embedded, 1);
    embedded.stop();

    // Two processes of two workers, two gateways; a live client on the
    // second gateway while events go in through both.
    let cluster = Cluster::start(&services, 2, 2, 2);
    let mut socket = connect(&cluster.gateways[1]);
    socket
        .send(tungstenite::Message::Text(
            json!({"action": "subscribe", "topic": "metrics:ad_clicks:campaignId:camp_1", "window": "tumbling 1m"})
                .to_string()
                .into(),
        ))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let posted = now_ms();
    cluster.gateways[0].post_events(&events[..50].iter().map(Generated::json).collect::<Vec<_>>());
    let live = wait_for(&mut socket, Duration::from_secs(20), |m| {
        m["topic"] == "metrics:ad_clicks:campaignId:camp_1" && m["value"].as_f64() > Some(0.0)
    });
    assert_eq!(live["windowStart"], at(0).as_str(), "{live}");
    // Its freshness comes through Kafka and Redis: when the broker took the
    // batch.
    let ingested = live["ingestedAt"].as_str().and_then(parse_rfc3339);
    assert!(
        ingested.is_some_and(|at| posted <= at && at <= now_ms()),
        "posted at {posted}: {live}"
    );

    let gateways: Vec<&Tally> = cluster.gateways.iter().collect();
    post_through(&gateways, &events[50..]);
    let got = answers(&cluster.gateways[0], &events);
    for (query, answer) in &expected {
        assert_eq!(&got[query], answer, "cluster 2x2 vs tally run: {query}");
    }
    // Either gateway answers from the same store.
    assert_eq!(answers(&cluster.gateways[1], &events), got);
    // Quantiles merged from KLL sketches stored in ClickHouse: within the
    // rank error of the events' own (KLL's coin flips differ from tally
    // run's, so its answers are compared with the events, not with it).
    let by_device = cluster.gateways[0].metrics(&format!(
        "metric=ad_latency&resolution=5m&groupBy=deviceType&start={}&end={}",
        at(0),
        at(5 * MINUTE)
    ));
    assert_eq!(
        by_device["series"].as_array().unwrap().len(),
        2,
        "{by_device}"
    );
    series_within_rank_error(&by_device, &events, |e| e.device, &["0.5", "0.9", "0.99"]);
    // A subscriber resuming from the first minute gets every minute's final
    // value, from ClickHouse where the gateway's hub forgot the window.
    let mut resumed = connect(&cluster.gateways[1]);
    resumed
        .send(tungstenite::Message::Text(
            json!({"action": "subscribe", "topic": "metrics:ad_clicks", "window": "tumbling 1m", "since": at(0)})
                .to_string()
                .into(),
        ))
        .unwrap();
    let ack = wait_for(&mut resumed, Duration::from_secs(10), |m| {
        m["subscribed"].is_string()
    });
    assert_eq!(ack["since"], at(0).as_str(), "{ack}");
    let mut per_minute = BTreeMap::new();
    for e in events.iter().filter(|e| e.event_type == "ad_click") {
        *per_minute
            .entry(at((e.time_ms - base_ms()) / MINUTE * MINUTE))
            .or_insert(0u64) += 1;
    }
    let mut replayed = BTreeMap::new();
    while replayed.len() < per_minute.len() {
        let m = wait_for(&mut resumed, Duration::from_secs(10), |m| {
            m["final"] == true
        });
        replayed.insert(
            m["windowStart"].as_str().unwrap().to_string(),
            m["value"].as_u64().unwrap(),
        );
    }
    assert_eq!(replayed, per_minute, "the replay of a resume");
    let dead = dead_letters(&cluster.gateways[1], 1);
    assert_eq!(dead[0]["event"], expected_dead[0]["event"]);
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap()
            .contains("past the allowed lateness"),
        "{}",
        dead[0]
    );

    // The raw events and the events topic hold every event once, the
    // dead-letter topic the late one, and a standard Kafka client reads them.
    let stored = services.clickhouse(&format!(
        "SELECT count() FROM {}.raw_events FINAL",
        cluster.name
    ));
    assert_eq!(
        stored,
        (events.len() + 2).to_string(),
        "raw events archived"
    );
    let mut read: Vec<(String, i64)> = read_topic(&services, &cluster.name)
        .iter()
        .map(|e| {
            let time = e["timestamp"].as_i64().unwrap();
            (e["eventType"].as_str().unwrap().to_owned(), time)
        })
        .collect();
    assert_eq!(
        read.len(),
        events.len() + 2,
        "events read back with confluent-kafka"
    );
    read.sort();
    for e in &events {
        assert!(
            read.binary_search(&(e.event_type.to_owned(), e.time_ms))
                .is_ok(),
            "{} at {} is not in the topic",
            e.event_type,
            e.time_ms
        );
    }
    let dead_topic = format!("{}-dlq", cluster.name);
    assert_eq!(
        read_topic(&services, &dead_topic).len(),
        1,
        "the dead-letter topic"
    );

    // One process of one worker computes the same.
    let single = Cluster::start(&services, 1, 1, 1);
    post_through(&[&single.gateways[0]], &events);
    assert_eq!(
        answers(&single.gateways[0], &events),
        got,
        "cluster 1x1 vs 2x2"
    );
}

/// Reads a topic from the beginning with Python's confluent-kafka: the
/// events topic with a decoder of the record format written from the
/// README alone, which returns each event (watermark marks are skipped, as
/// the README tells other consumers to); the dead-letter topic's messages,
/// which are JSON.
fn read_topic(services: &Services, topic: &str) -> Vec<Value> {
    let script = r#"
import json, struct, sys
from confluent_kafka import Consumer, TopicPartition

def varint(b, at):
    n, shift = 0, 0
    while True:
        byte = b[at]; at += 1
        n |= (byte & 0x7f) << shift; shift += 7
        if byte < 0x80:
            return n, at

def records(payload):
    assert payload[:3] == b"\xc1\x01\x02", payload[:3]
    at = 3
    while at < len(payload):
        n, at = varint(payload, at)
        yield payload[at:at + n]
        at += n

def event(r):
    assert r[:2] == b"\xc1\x01", r[:2]
    if r[2] == 1:
        return None
    assert r[2] == 0
    (timestamp,) = struct.unpack_from("<q", r, 3)
    d, at = varint(r, 11)
    v, at = varint(r, at)
    lengths = []
    for _ in range(2 + 2 * d + v):
        n, at = varint(r, at)
        lengths.append(n)
    values = struct.unpack_from("<%dd" % v, r, at)
    at += 8 * v
    strings = []
    for n in lengths:
        strings.append(r[at:at + n].decode("utf-8")); at += n
    assert at == len(r)
    dims = dict(zip(strings[2:2 + 2 * d:2], strings[3:2 + 2 * d:2]))
    return {"eventType": strings[1], "timestamp": timestamp, "dimensions": dims,
            "values": dict(zip(strings[2 + 2 * d:], values))}

brokers, topic = sys.argv[1], sys.argv[2]
consumer = Consumer({"bootstrap.servers": brokers, "group.id": "inspect", "enable.auto.commit": False})
partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
ends = {}
for p in partitions:
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
    if high > low:
        ends[p] = high
consumer.assign([TopicPartition(topic, p, 0) for p in ends])
done = set()
while len(done) < len(ends):
    message = consumer.poll(10)
    if message is None:
        sys.exit("timed out reading the topic")
    if message.error():
        sys.exit(str(message.error()))
    if topic.endswith("-dlq"):
        print(json.dumps(json.loads(message.value())))
    else:
        for r in records(message.value()):
            e = event(r)
            if e is not None:
                print(json.dumps(e))
    if message.offset() + 1 >= ends[message.partition()]:
        done.add(message.partition())
"#;
    let output = Command::new("python3")
        .args(["-c", script, &services.kafka, topic])
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "confluent-kafka failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .collect()
}

#[test]
fn a_clickhouse_outage_stalls_the_job_and_loses_nothing() {
    clickhouse_away(ClickHouseAway::Stopped);
}

/// ClickHouse paused with SIGSTOP, as a server too slow to answer at all:
/// its port still takes connections, and nothing comes back.
#[test]
fn a_paused_clickhouse_stalls_the_job_and_loses_nothing() {
    clickhouse_away(ClickHouseAway::Paused);
}

/// How [`clickhouse_away`] takes ClickHouse away.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ClickHouseAway {
    Stopped,
    Paused,
}

/// How long ClickHouse is away in [`clickhouse_away`].
const CLICKHOUSE_AWAY: Duration = Duration::from_secs(60);

/// ClickHouse away for a minute while a load is posted: ingest keeps
/// answering `202`, the workers stop reading once their writers cannot
/// write, so the backlog waits in Kafka, not in memory; once ClickHouse is
/// back they catch up, and every window is exact.
fn clickhouse_away(how: ClickHouseAway) {
    let services = Services::alone();
    // Two processes: the one whose sinks fall behind first tells the other.
    let cluster = Cluster::start(&services, 2, 1, 1);
    let gateway = &cluster.gateways[0];
    let events = clickstream(29, 40_000);
    let (before, rest) = events.split_at(2000);
    post_all(gateway, before, 50);

    let away = match how {
        ClickHouseAway::Stopped => (Some(Stopped::service("clickhouse")), None),
        ClickHouseAway::Paused => (None, Some(Paused::service("clickhouse"))),
    };
    let stopped = Instant::now();
    let mut read_while_down = Vec::new();
    // Reads stop within `clickhouse.insert_timeout` (10 s) of the first
    // insert that finds ClickHouse away.
    for (i, chunk) in rest.chunks(500).enumerate() {
        post_all(gateway, chunk, 500);
        std::thread::sleep(Duration::from_millis(400));
        if i % 4 == 0 && stopped.elapsed() > Duration::from_secs(15) {
            read_while_down.push(cluster.events_read());
        }
    }
    let posted_within = stopped.elapsed();
    let (first, last) = (read_while_down[0], *read_while_down.last().unwrap());
    assert!(
        read_while_down.len() >= 3 && last == first,
        "the workers went on reading while ClickHouse was away: {read_while_down:?}"
    );
    std::thread::sleep(CLICKHOUSE_AWAY.saturating_sub(stopped.elapsed()));
    if how == ClickHouseAway::Stopped {
        for process in 0..2 {
            assert!(
                cluster
                    .read_log("worker", process)
                    .contains("cannot insert results into ClickHouse"),
                "worker {process} says it is retrying"
            );
        }
    }
    // The stalls are counted, by why: the writers' inserts failed.
    assert!(cluster.workers_sum("tally_store_stalls_total{reason=\"failing\"}") >= 1);
    assert_eq!(
        cluster.workers_sum("tally_store_stalls_total{reason=\"full\"}"),
        0
    );
    let backlog = events.len() as u64 - cluster.events_read();
    drop(away);
    let back = Instant::now();
    eventually(Duration::from_secs(120), || {
        let read = cluster.events_read();
        if read >= events.len() as u64 {
            Ok(())
        } else {
            Err(format!("{read} of {} events read", events.len()))
        }
    });
    let caught_up = back.elapsed();

    close_windows(gateway);
    // Every window is complete and exact.
    assert_clicks_per_minute(gateway, &events);
    eprintln!(
        "clickhouse {how:?} for {CLICKHOUSE_AWAY:?}: {} events posted and accepted ({} within {:.1} s of the outage), backlog {backlog} events in Kafka; read again in {:.1} s once it was back ({:.0} events/s), every window exact {:.1} s after it was back",
        events.len(),
        rest.len(),
        posted_within.as_secs_f64(),
        caught_up.as_secs_f64(),
        backlog as f64 / caught_up.as_secs_f64(),
        back.elapsed().as_secs_f64()
    );
}

/// A service paused with SIGSTOP, continued when the test ends, even by
/// failing.
struct Paused(u32);

impl Paused {
    fn service(name: &str) -> Paused {
        let pid = std::fs::read_to_string(format!("{}/{name}.pid", services_dir()))
            .unwrap_or_else(|e| panic!("the pid of {name}: {e}"));
        let pid = pid.trim().parse().expect("a pid");
        signal(pid, "-STOP");
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// Redis down for a minute: ingest keeps answering `202`, history keeps
/// storing and answering, and a live client connected before the outage
/// gets updates again, without reconnecting, soon after Redis is back.
#[test]
fn a_redis_outage_leaves_ingest_and_history_alone_and_live_values_return() {
    let services = Services::alone();
    let cluster = Cluster::start(&services, 2, 1, 1);
    let gateway = &cluster.gateways[0];
    let mut socket = connect(gateway);
    let subscribe =
        json!({"action": "subscribe", "topic": "metrics:events", "window": "tumbling 10s"});
    socket
        .send(tungstenite::Message::Text(subscribe.to_string().into()))
        .unwrap();
    // Live values flow before the outage.
    let events = clickstream(37, 3000);
    let (before, during) = events.split_at(500);
    post_all(gateway, before, 50);
    wait_for(&mut socket, Duration::from_secs(30), |m| {
        m["topic"] == "metrics:events" && m["value"].as_u64() > Some(0)
    });

    let redis = Stopped::service("redis");
    let stopped = Instant::now();
    // Ingest and history while Redis is down: every request is accepted,
    // and every window is stored and answered.
    post_all(gateway, during, 50);
    close_windows(gateway);
    assert_clicks_per_minute(gateway, &events);
    let stored_within = stopped.elapsed();
    // The client keeps reading, as a browser does, so it answers the
    // server's pings.
    while stopped.elapsed() < Duration::from_secs(60) {
        match socket.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("the live connection failed during the outage: {e}"),
        }
    }
    redis.start();
    let back = Instant::now();
    // Live values come back on the same connection: an event of now,
    // posted after Redis returned, reaches the client.
    let posted = now_ms();
    let poster = {
        let url = gateway.url.clone();
        std::thread::spawn(move || {
            for _ in 0..40 {
                let event = json!({"eventType": "ping", "timestamp": now_ms() as f64 / 1000.0});
                let _ = Tally::try_post_events(&url, &[event]);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    wait_for(&mut socket, Duration::from_secs(30), |m| {
        m["topic"] == "metrics:events"
            && m["ingestedAt"]
                .as_str()
                .and_then(parse_rfc3339)
                .is_some_and(|at| at >= posted)
    });
    let live_again = back.elapsed();
    poster.join().unwrap();
    eprintln!(
        "redis outage: every window stored and answered {:.1} s into the outage; live updates again {:.1} s after Redis returned",
        stored_within.as_secs_f64(),
        live_again.as_secs_f64()
    );
    assert!(
        stored_within < Duration::from_secs(60),
        "history waited for Redis: {stored_within:?}"
    );
    assert!(
        live_again <= Duration::from_secs(10),
        "live updates came back {live_again:?} after Redis did"
    );
}

/// The broker stopped for 20 s and started again: every request meanwhile
/// gets a `503` with `Retry-After` at once, never a `202`, while the gateway
/// stays ready for history and live values; once the broker is back, the
/// requests a client retries are accepted, the workers read on by themselves, and every
/// window is exact.
#[test]
fn a_broker_restart_gets_503s_with_retry_after_and_loses_nothing() {
    let services = Services::alone();
    let cluster = Cluster::start(&services, 2, 1, 1);
    let gateway = &cluster.gateways[0];
    let generated = clickstream(43, 4000);
    // With ids, so that a request whose answer was lost as the broker went
    // away is counted once when it is sent again.
    let events: Vec<Value> = generated
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut event = e.json();
            event["eventId"] = json!(format!("restart-{i}"));
            event
        })
        .collect();
    let (before, rest) = events.split_at(1000);
    for chunk in before.chunks(50) {
        gateway.post_events(chunk);
    }

    let tansu = Stopped::service("tansu");
    let stopped = Instant::now();
    let mut chunks = rest.chunks(50);
    let mut refused = Vec::new();
    let mut slowest = Duration::ZERO;
    while stopped.elapsed() < BROKER_AWAY {
        let chunk = chunks.next().expect("enough events for the outage");
        let answer = post_answer(&gateway.url, chunk);
        assert_eq!(
            answer.status, 503,
            "a request was answered {} while the broker was away",
            answer.status
        );
        assert_eq!(
            answer.retry_after.as_deref(),
            Some("1"),
            "a 503 without Retry-After"
        );
        slowest = slowest.max(answer.took);
        refused.push(chunk);
        std::thread::sleep(Duration::from_millis(500));
    }
    // Still ready: every gateway shares the brokers, and one that a load
    // balancer took out could answer neither the 503 nor history nor live
    // values.
    let (ready, _) = gateway.get("/readyz");
    assert_eq!(ready, 200, "the gateway said it was not ready");
    assert!(
        slowest < Duration::from_secs(5),
        "a request waited {slowest:?} for a broker that was away"
    );
    tansu.start();
    let back = Instant::now();

    // A client sends again what was refused, as Retry-After says, then the rest.
    let mut accepted_again = None;
    let refused_events: usize = refused.iter().map(|c| c.len()).sum();
    for chunk in refused.into_iter().chain(chunks) {
        loop {
            let answer = post_answer(&gateway.url, chunk);
            if answer.status == 202 {
                accepted_again.get_or_insert_with(|| back.elapsed());
                break;
            }
            assert_eq!(answer.status, 503, "a retry was answered {}", answer.status);
            assert!(
                back.elapsed() < Duration::from_secs(60),
                "no request was accepted in the minute after the broker returned; the broker's \
                 log ends:\n{}",
                services_log("tansu")
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    close_windows(gateway);
    assert_clicks_per_minute(gateway, &generated);
    eprintln!(
        "broker restart: {BROKER_AWAY:?} away, {} events posted, {refused_events} refused with 503 and sent again, every request answered within {slowest:?}; accepted again {:.1} s after it returned",
        events.len(),
        accepted_again.expect("requests after the outage").as_secs_f64()
    );
}

/// The kill harness of [`crate::crash`] on the cluster: 2 worker processes
/// of 2 threads and 2 gateways. A random worker process is killed with
/// SIGKILL at random moments while a seeded stream (with late and too-late
/// events, each with an id) is posted through both gateways, and the
/// workers are restarted; one gateway is killed with a request in flight,
/// which the client sends again to the other. Some answered requests are
/// sent twice. Every window stored in ClickHouse must equal a batch
/// aggregation of the events, each once; the dead letters must be the
/// too-late events; the sketches must equal those of a run without
/// failures. `TALLY_HARNESS_SEED`, `TALLY_CLUSTER_HARNESS_EVENTS` and
/// `TALLY_CLUSTER_HARNESS_KILLS` change the trial.
#[test]
fn killed_worker_processes_and_a_killed_gateway_store_exactly_the_batch_results() {
    let services = Services::from_env();
    let seed = setting("TALLY_HARNESS_SEED", 1);
    let count = setting("TALLY_CLUSTER_HARNESS_EVENTS", 20_000) as usize;
    let kills = setting("TALLY_CLUSTER_HARNESS_KILLS", 5) as usize;
    let requests = generate(seed, count);
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xc105);
    let mut kill_during: Vec<usize> = (0..kills).map(|_| rng.usize(1..requests.len())).collect();
    kill_during.sort_unstable();
    let gateway_killed_during = rng.usize(1..requests.len());
    // Two partitions, as the embedded harness has, so that its event times
    // stay within the allowed lateness of the watermark they meet.
    let settings = [
        ("TALLY__CHECKPOINT__INTERVAL", "2s"),
        ("TALLY__KAFKA__PARTITIONS", "2"),
    ];
    let end_ms = base_ms() + count as i64 * STEP_MS + 600_000;
    let closed_before = end_ms - 2_000;

    let mut cluster = Cluster::start_with(&services, 2, 2, 2, &settings);
    let started = Instant::now();
    let mut sent = Sent::default();
    let (mut killed, mut exited_alone) = (0, 0);
    for (i, request) in requests.iter().enumerate() {
        let events = body(seed, i, request);
        while kill_during.first() == Some(&i) {
            kill_during.remove(0);
            std::thread::sleep(Duration::from_millis(rng.u64(0..1500)));
            exited_alone += cluster.kill_worker(rng.usize(..2));
            killed += 1;
        }
        let gateway = i % 2;
        if i == gateway_killed_during {
            // Its answer is lost with the gateway: the client sends it to
            // the other one.
            let (url, sent) = (cluster.gateways[gateway].url.clone(), events.clone());
            let in_flight = std::thread::spawn(move || Tally::try_post_events(&url, &sent));
            std::thread::sleep(Duration::from_micros(rng.u64(0..5_000)));
            cluster.kill_gateway(gateway);
            let _lost = in_flight.join().expect("the request thread");
            cluster.gateways[1 - gateway].post_events(&events);
        } else {
            cluster.gateways[gateway].post_events(&events);
        }
        if sent.accepted(request, &mut rng) {
            // Answered, but the client did not hear it: sent again, to
            // the other gateway.
            cluster.gateways[1 - gateway].post_events(&events);
        }
    }
    let Sent {
        posted,
        too_late,
        retried,
    } = sent;
    cluster.gateways[0].flush(end_ms);
    // Once more while the backlog drains.
    std::thread::sleep(Duration::from_millis(rng.u64(0..1500)));
    exited_alone += cluster.kill_worker(rng.usize(..2));
    killed += 1;
    let expected = reference(&posted, closed_before);
    assert!(expected.len() > 1000, "{} windows", expected.len());
    let with_failures = settle_stored(&services, &cluster.name, &expected, closed_before);
    let stored_after = started.elapsed();
    eventually(Duration::from_secs(60), || {
        let dead: usize = services
            .clickhouse(&format!(
                "SELECT count() FROM {}.dead_letters FINAL",
                cluster.name
            ))
            .parse()
            .unwrap();
        if dead == too_late {
            Ok(())
        } else {
            Err(format!("{dead} dead letters, {too_late} events too late"))
        }
    });
    drop(cluster);

    // The same events, posted the same way, without failures.
    let clean = Cluster::start_with(&services, 2, 2, 2, &settings);
    for (i, request) in requests.iter().enumerate() {
        clean.gateways[i % 2].post_events(&body(seed, i, request));
    }
    clean.gateways[0].flush(end_ms);
    let without = settle_stored(&services, &clean.name, &expected, closed_before);
    let sketches = |rows: &BTreeMap<Key, (CrashValue, String)>| -> Vec<(Key, String)> {
        rows.iter()
            .filter(|(k, _)| SKETCHED.contains(&k.0.as_str()))
            .map(|(k, v)| (k.clone(), v.1.clone()))
            .collect()
    };
    let (a, b) = (sketches(&with_failures), sketches(&without));
    for metric in SKETCHED {
        assert!(a.iter().any(|(k, _)| k.0 == metric), "no {metric} windows");
    }
    let differing: Vec<_> = a.iter().zip(&b).filter(|(x, y)| x != y).take(5).collect();
    assert!(
        differing.is_empty(),
        "sketches differ from the failure-free run: {differing:#?}"
    );
    eprintln!(
        "cluster kill harness: seed {seed}, {count} events, {killed} worker kills ({exited_alone} of the other processes exited by themselves), 1 gateway killed with a request in flight, {retried} requests sent twice, {} windows exact {:.0} s after the first event, {too_late} dead letters",
        expected.len(),
        stored_after.as_secs_f64()
    );
}

/// Waits until the windows stored in ClickHouse database `database` that end
/// before `closed_before` equal `expected`, or fails with what differs;
/// returns them, each with its sketch's summary.
fn settle_stored(
    services: &Services,
    database: &str,
    expected: &BTreeMap<Key, CrashValue>,
    closed_before: i64,
) -> BTreeMap<Key, (CrashValue, String)> {
    let length = |window: &str| {
        CRASH_WINDOWS
            .iter()
            .find(|(name, _)| *name == window)
            .map_or(0, |w| w.1)
    };
    let sql = format!(
        "SELECT metric, window, start, grp, count, sum, hex(sketch) FROM {database}.windows FINAL \
         FORMAT TabSeparated"
    );
    let mut last = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        let text = services.clickhouse(&sql);
        let mut got = BTreeMap::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.split('\t').collect();
            let key: Key = (f[0].into(), f[1].into(), f[2].parse().unwrap(), f[3].into());
            if key.2 + length(&key.1) > closed_before {
                continue;
            }
            let sum: f64 = f[5].parse().unwrap();
            let value = CrashValue {
                count: f[4].parse().unwrap(),
                sum: (sum * 1e9).round() as i128,
            };
            let sketch = if f[6].is_empty() {
                String::new()
            } else {
                sketch_summary(&hex_bytes(f[6]))
            };
            got.insert(key, (value, sketch));
        }
        let with_sketches = got
            .iter()
            .map(|(k, (v, s))| (k.clone(), (*v, Some(s.clone()))))
            .collect();
        last = differences(&with_sketches, expected);
        if last.is_empty() {
            return got;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "{} stored windows differ from the reference; first: {:#?}",
        last.len(),
        &last[..last.len().min(5)]
    );
}

/// The bytes of upper-case hex text.
fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// How long the broker is away in [`a_broker_restart_gets_503s_with_retry_after_and_loses_nothing`].
const BROKER_AWAY: Duration = Duration::from_secs(20);

/// The answer to a POST of events.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    took: Duration,
}

/// POSTs `events` to the tally at `url` and notes how it answered.
fn post_answer(url: &str, events: &[Value]) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let started = Instant::now();
    let response = agent
        .post(format!("{url}/v1/events"))
        .header("content-type", "application/json")
        .send(&serde_json::to_vec(events).expect("serialise")[..])
        .expect("an answer");
    Answer {
        status: response.status().as_u16(),
        retry_after: response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        took: started.elapsed(),
    }
}

/// Where `scripts/services.sh` keeps its services' state.
fn services_dir() -> String {
    std::env::var("TALLY_SERVICES_DIR").unwrap_or_else(|_| {
        format!(
            "{}/tally-services",
            std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into())
        )
    })
}

/// The end of a service's log, as `scripts/services.sh` keeps it.
fn services_log(name: &str) -> String {
    let text =
        std::fs::read_to_string(format!("{}/{name}.log", services_dir())).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A service the test stopped, started again when the test ends, even by
/// failing, so that the tests after it have it.
struct Stopped(&'static str);

impl Stopped {
    fn service(name: &'static str) -> Stopped {
        services_script(&["stop", name]);
        Stopped(name)
    }

    /// Starts it again now.
    fn start(self) {}
}

impl Drop for Stopped {
    fn drop(&mut self) {
        services_script(&["start", self.0]);
    }
}

/// Runs `scripts/services.sh` with `args`.
fn services_script(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/services.sh");
    let status = Command::new(script)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("run scripts/services.sh");
    assert!(status.success(), "scripts/services.sh {args:?} failed");
}

#[test]
fn killed_workers_resume_from_a_checkpoint_and_count_exactly() {
    let services = Services::from_env();
    let mut cluster =
        Cluster::start_with(&services, 2, 1, 1, &[("TALLY__CHECKPOINT__INTERVAL", "5s")]);
    let gateway = &cluster.gateways[0];
    let events = clickstream(31, 6000);
    let (first, rest) = events.split_at(3000);
    post_all(gateway, first, 50);
    // Wait for a checkpoint both processes have their share of.
    let checkpoints = cluster.dir.path().join("checkpoints");
    eventually(Duration::from_secs(60), || {
        let committed = std::fs::read_dir(&checkpoints)
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .any(|d| d.path().join("manifest.json").exists());
        if committed {
            Ok(())
        } else {
            Err("no committed checkpoint yet".to_string())
        }
    });
    cluster.kill_and_restart_workers();
    let gateway = &cluster.gateways[0];
    post_all(gateway, rest, 50);
    close_windows(gateway);

    assert_clicks_per_minute(gateway, &events);
    for process in 0..2 {
        assert!(
            cluster
                .read_log("worker", process)
                .contains("restoring the last checkpoint"),
            "worker {process} resumed from a checkpoint"
        );
    }
    // The restarted workers read on from the checkpoint's offsets, not
    // from the start of the topic.
    let read = cluster.events_read();
    assert!(
        read < events.len() as u64,
        "{read} records read after the restart, of {} posted",
        events.len() + 1
    );
}

#[test]
fn the_cluster_forgets_a_window_once_every_process_has_passed_its_lateness() {
    let services = Services::from_env();
    let cluster = Cluster::start(&services, 2, 1, 1);
    let gateway = &cluster.gateways[0];
    gateway.post_events(&[json!({
        "eventType": "ad_click",
        "timestamp": base_ms() + 5_000,
        "dimensions": {"campaignId": "c"},
    })]);
    // A subscriber holds the metric on the gateway meanwhile, so that the
    // second one is answered from the gateway's hub, not from Redis.
    let mut holder = connect(gateway);
    holder
        .send(tungstenite::Message::Text(
            json!({"action": "subscribe", "topic": "metrics:ad_clicks", "window": "tumbling 10s"})
                .to_string()
                .into(),
        ))
        .unwrap();
    eventually(Duration::from_secs(30), || {
        match current_values(gateway).as_slice() {
            [current] if current["value"] == 1 => Ok(()),
            other => Err(format!("want the window's value, got {other:?}")),
        }
    });
    // Only events of another type from here: no newer ad_clicks window
    // pushes this one out; the watermark must.
    close_windows(gateway);
    eventually(Duration::from_secs(30), || {
        let current = current_values(gateway);
        current
            .is_empty()
            .then_some(())
            .ok_or(format!("the gateway's hub still holds {current:?}"))
    });
    drop(holder);
    // Without a holder the next subscriber reads Redis's latest values.
    std::thread::sleep(Duration::from_millis(500));
    let current = current_values(gateway);
    assert!(current.is_empty(), "Redis still holds {current:?}");
}

#[test]
fn results_stored_before_versions_are_read_after_an_upgrade() {
    let services = Services::from_env();
    let db = format!("legacy{:08x}", fastrand::u32(..));
    services.clickhouse(&format!("CREATE DATABASE {db}"));
    services.clickhouse(&format!(
        "CREATE TABLE {db}.windows (metric String, window String, start Int64, end Int64, \
         grp String, count UInt64, sum Float64, sketch String, revision UInt32) \
         ENGINE = ReplacingMergeTree(revision) ORDER BY (metric, window, start, grp)"
    ));
    let base = base_ms();
    services.clickhouse(&format!(
        "INSERT INTO {db}.windows VALUES \
         ('ad_clicks', 'tumbling 1m', {base}, {}, 'camp_1\\x1FUS\\x1FMOBILE', 7, 0, '', 0), \
         ('gone', 'tumbling 1m', {base}, {}, 'x', 9, 0, '', 0)",
        base_ms() + MINUTE,
        base_ms() + MINUTE
    ));
    let cluster = Cluster::start_with(&services, 1, 1, 1, &[("TALLY__CLICKHOUSE__DATABASE", &db)]);
    let range = format!(
        "start={}&end={}&resolution=1m",
        base_ms() / 1000,
        (base_ms() + MINUTE) / 1000
    );
    // They predate rollups: a query only the metric's own rows answer,
    // one by every dimension, reads them.
    let answer = cluster.gateways[0].metrics(&format!(
        "metric=ad_clicks&campaignId=camp_1&country=US&deviceType=MOBILE&{range}"
    ));
    assert_eq!(values(&answer), [json!(7)], "{answer}");
    assert_eq!(
        services.clickhouse(&format!(
            "SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'windows_unversioned'"
        )),
        "0",
        "the old table is gone once its rows moved"
    );
    drop(cluster);

    // The rows of the metric no longer configured go once unused for
    // longer than backfill.keep_old; the configured ones stay.
    std::thread::sleep(Duration::from_millis(1500));
    let count = |metric: &str| {
        services.clickhouse(&format!(
            "SELECT count() FROM {db}.windows FINAL WHERE metric = '{metric}'"
        ))
    };
    assert_eq!(count("gone"), "1", "kept until keep_old has passed");
    let cluster = Cluster::start_with(
        &services,
        1,
        1,
        1,
        &[
            ("TALLY__CLICKHOUSE__DATABASE", &db),
            ("TALLY__BACKFILL__KEEP_OLD", "1s"),
        ],
    );
    assert_eq!(count("gone"), "0", "dropped with its partition");
    assert_eq!(count("ad_clicks"), "1");
    drop(cluster);
    services.clickhouse(&format!("DROP DATABASE {db}"));
}

/// Every stored window of `version` of `metric` in the cluster's database,
/// as (window, start, group) to its value.
fn stored_windows(
    services: &Services,
    db: &str,
    metric: &str,
    version: &str,
) -> BTreeMap<(String, i64, String), f64> {
    let rows = services.clickhouse(&format!(
        "SELECT window, start, grp, count, sum FROM {db}.windows FINAL \
         WHERE metric = '{metric}' AND version = '{version}' FORMAT JSONEachRow"
    ));
    rows.lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            let number = |v: &Value| match v {
                Value::String(s) => s.parse::<f64>().unwrap(),
                v => v.as_f64().unwrap(),
            };
            let value = if metric == "revenue" {
                number(&row["sum"])
            } else {
                number(&row["count"])
            };
            let start = number(&row["start"]) as i64;
            let key = (
                row["window"].as_str().unwrap().to_string(),
                start,
                row["grp"].as_str().unwrap().to_string(),
            );
            (key, value)
        })
        .collect()
}

/// The catalog's entry for `name`.
fn catalog_entry(gateway: &Tally, name: &str) -> Option<Value> {
    let (status, catalog) = gateway.get("/v1/catalog");
    assert_eq!(status, 200, "{catalog}");
    catalog["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
}

#[test]
fn a_changed_metric_is_backfilled_on_the_cluster_and_then_replaces_the_old_one() {
    let services = Services::from_env();
    let dir = tempfile::tempdir().unwrap();
    let (before, after) = (
        dir.path().join("before.toml"),
        dir.path().join("after.toml"),
    );
    std::fs::write(&before, crate::versions::BEFORE).unwrap();
    std::fs::write(&after, crate::versions::AFTER).unwrap();
    let mut cluster = Cluster::start_with_config(
        &services,
        (2, 1, 1),
        &before,
        &[("TALLY__CHECKPOINT__INTERVAL", "1s")],
    );
    let db = cluster.name.clone();
    let events = clickstream(15, 3000);
    post_through(&[&cluster.gateways[0]], &events);
    assert_clicks_per_minute(&cluster.gateways[0], &events);
    let old = catalog_entry(&cluster.gateways[0], "ad_clicks").unwrap()["version"].clone();

    cluster.restart_workers_with(&after);
    // While the backfill runs, the old definition answers; the removed
    // metric is unknown and the new one is listed with its progress.
    let gateway = &cluster.gateways[0];
    let revenue = eventually(Duration::from_secs(60), || {
        let revenue = catalog_entry(gateway, "revenue").ok_or("revenue is not listed")?;
        // Kafka's records are messages: one per request of 50 events, and
        // every process reports its share.
        let to_read = revenue["backfill"]["eventsToRead"].as_u64().unwrap_or(0);
        (to_read >= 3000 / 50)
            .then_some(revenue.clone())
            .ok_or(format!("{revenue}"))
    });
    assert!(revenue["version"].is_null(), "{revenue}");
    assert_eq!(catalog_entry(gateway, "ad_clicks").unwrap()["version"], old);
    assert_clicks_per_minute(gateway, &events);
    let range = format!(
        "start={}&end={}",
        base_ms() / 1000,
        (base_ms() + 5 * MINUTE) / 1000
    );
    let (status, answer) = gateway.get(&format!("/v1/metrics?metric=purchases&{range}"));
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = gateway.get(&format!(
        "/v1/metrics?metric=ad_clicks&groupBy=country&{range}"
    ));
    assert_eq!(status, 400, "the old definition has no country: {answer}");

    // A kill -9 in the middle: the backfill resumes from its checkpoint.
    cluster.kill_and_restart_workers();
    let gateway = &cluster.gateways[0];

    // Event time moves on as live traffic moves it, until the two jobs meet.
    let mut at = base_ms() + 10 * MINUTE;
    let clicks = eventually(Duration::from_secs(120), || {
        std::thread::sleep(Duration::from_millis(600));
        at += 1_000;
        gateway.flush(at);
        let clicks = catalog_entry(gateway, "ad_clicks").unwrap();
        match clicks.get("backfill") {
            None if clicks["version"] != old => Ok(clicks),
            _ => Err(format!("still backfilling: {clicks}")),
        }
    });
    assert_eq!(
        clicks["coverage"]["since"],
        crate::util::at(0).as_str(),
        "{clicks}"
    );
    for name in ["ad_clicks", "revenue"] {
        let metric = catalog_entry(gateway, name).unwrap();
        let version = metric["version"].as_str().unwrap();
        crate::versions::assert_equal(
            &stored_windows(&services, &db, name, version),
            &crate::versions::batch(&events, name),
        );
    }
    // The new definition answers, by the dimension it added.
    let answer = gateway.metrics(&format!(
        "metric=ad_clicks&groupBy=country&resolution=1m&{range}"
    ));
    let countries = answer["series"].as_array().unwrap();
    assert!(countries.len() > 1, "{answer}");
    let (status, _) = gateway.get(&format!("/v1/metrics?metric=purchases&{range}"));
    assert_eq!(status, 400, "a removed metric stays unknown");
}
