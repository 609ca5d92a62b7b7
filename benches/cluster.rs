//! (g) Cluster mode against `tally run`, in the same run and on the same
//! events: HTTP ingest (POST until the brokers acknowledge, against POST
//! until fsync'd) and end to end (from the first POST until every event is
//! counted in a stored window).
//!
//! Needs the services of `scripts/services.sh`, named by `KAFKA_BROKERS`,
//! `CLICKHOUSE_URL` and `REDIS_URL`. The cluster is one worker process of two
//! threads and one gateway, the same two workers `tally run` has.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{agent, bodies, now_ms, post_bodies, post_events, tally_command, Tally};

const BATCH: usize = 1000;
const BATCHES: usize = 300;
const CONNECTIONS: usize = 4;

pub fn run() {
    let Some(services) = Services::from_env() else {
        println!("(g) cluster mode: skipped; start the services with scripts/services.sh and export their addresses");
        return;
    };
    let now = now_ms();
    let bodies = bodies(7, BATCHES, BATCH, now);
    let events = BATCH * BATCHES;
    let idle = [("TALLY__DATAFLOW__IDLE_TIMEOUT", "1s")];

    let dir = tempfile::tempdir().unwrap();
    let embedded = Tally::start(dir.path(), &idle);
    let (embedded_ingest, embedded_e2e) = measure(&embedded.url, &bodies, events, now);
    drop(embedded);

    let cluster = Cluster::start(&services, &dir.path().join("cluster"), &idle, 1);
    let gateway = &cluster.gateways[0];
    let (cluster_ingest, cluster_e2e) = measure(&gateway.url, &bodies, events, now);
    drop(cluster);

    println!("(g) cluster mode vs tally run, {events} events in batches of {BATCH}, {CONNECTIONS} connections; 2 timely workers each");
    println!(
        "    HTTP ingest, tally run (fsync always):            {embedded_ingest:>10.0} events/s"
    );
    println!(
        "    HTTP ingest, tally gateway (Kafka acks=all):      {cluster_ingest:>10.0} events/s  ({:.2}x tally run)",
        cluster_ingest / embedded_ingest
    );
    println!("    end to end, tally run:                            {embedded_e2e:>10.0} events/s");
    println!(
        "    end to end, gateway + worker + ClickHouse:        {cluster_e2e:>10.0} events/s  ({:.2}x tally run)",
        cluster_e2e / embedded_e2e
    );
}

/// The addresses of the services `scripts/services.sh` starts.
pub struct Services {
    kafka: String,
    clickhouse: String,
    redis: String,
}

impl Services {
    /// From `KAFKA_BROKERS`, `CLICKHOUSE_URL` and `REDIS_URL`, if all are set.
    pub fn from_env() -> Option<Services> {
        let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Some(Services {
            kafka: get("KAFKA_BROKERS")?,
            clickhouse: get("CLICKHOUSE_URL")?,
            redis: get("REDIS_URL")?,
        })
    }
}

/// One worker process of two threads, the two workers `tally run` has, and
/// gateways, on a topic, database and prefix of their own. Stopped on drop.
pub struct Cluster {
    pub gateways: Vec<Tally>,
    _worker: Worker,
}

impl Cluster {
    /// Starts the cluster with `gateways` gateways, its data in `dir` and
    /// `TALLY__*` overrides `env`, and waits until every gateway is ready.
    pub fn start(
        services: &Services,
        dir: &Path,
        env: &[(&str, &str)],
        gateways: usize,
    ) -> Cluster {
        let name = format!("bench{:08x}", fastrand::u32(..));
        let data_dir = format!("{dir:?}");
        let mut env = env.to_vec();
        env.extend([
            ("TALLY__KAFKA__BROKERS", services.kafka.as_str()),
            ("TALLY__KAFKA__TOPIC", name.as_str()),
            ("TALLY__CLICKHOUSE__URL", services.clickhouse.as_str()),
            ("TALLY__CLICKHOUSE__DATABASE", name.as_str()),
            ("TALLY__REDIS__URL", services.redis.as_str()),
            ("TALLY__REDIS__PREFIX", name.as_str()),
            ("TALLY__CLUSTER__THREADS", "2"),
            ("TALLY__STORAGE__DATA_DIR", data_dir.as_str()),
        ]);
        let worker = Worker(
            tally_command("worker", &env)
                .args(["--process", "0"])
                .stdout(Stdio::null())
                .spawn()
                .expect("start tally worker"),
        );
        let gateways: Vec<Tally> = (0..gateways)
            .map(|_| {
                let mut gateway = tally_command("gateway", &env);
                gateway.args(["--listen", "127.0.0.1:0"]);
                Tally::launch(gateway)
            })
            .collect();
        let client = agent();
        let deadline = Instant::now() + Duration::from_secs(60);
        for gateway in &gateways {
            while client
                .get(format!("{}/readyz", gateway.url))
                .call()
                .map_or(true, |r| r.status() != 200)
            {
                assert!(Instant::now() < deadline, "a gateway did not get ready");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Cluster {
            gateways,
            _worker: worker,
        }
    }
}

/// A worker process, killed on drop.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Posts every body over concurrent connections, then an event that closes
/// the windows; returns the ingest rate and the end-to-end rate, both from
/// the first POST.
fn measure(url: &str, bodies: &Arc<Vec<Vec<u8>>>, events: usize, now: i64) -> (f64, f64) {
    let started = Instant::now();
    post_bodies(url, bodies, CONNECTIONS);
    let ingest = events as f64 / started.elapsed().as_secs_f64();
    let client = agent();
    let flush = json!([{"eventType": "flush", "timestamp": now + 240_000}]);
    post_events(&client, url, flush.to_string().as_bytes());
    let query = format!(
        "{url}/v1/metrics?metric=events&resolution=1m&start={}&end={}",
        (now - 60_000) / 1000,
        (now + 180_000) / 1000
    );
    loop {
        let counted: f64 = client
            .get(&query)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
            .and_then(|v| {
                v["dataPoints"]
                    .as_array()
                    .map(|p| p.iter().filter_map(|d| d["value"].as_f64()).sum())
            })
            .unwrap_or(0.0);
        if counted as usize >= events {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not every event was counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (ingest, events as f64 / started.elapsed().as_secs_f64())
}
