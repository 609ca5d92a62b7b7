//! (g) Cluster mode against `tally run`, in the same run and on the same
//! events: HTTP ingest (POST until the brokers acknowledge, against POST
//! until fsync'd) and end to end (from the first POST until every event is
//! counted in a stored window), with the CPU each process spends per event:
//! tally's gateway and worker against the broker, ClickHouse and Redis.
//!
//! Needs the services of `scripts/services.sh`, named by `KAFKA_BROKERS`,
//! `CLICKHOUSE_URL` and `REDIS_URL`. The cluster is one worker process of two
//! threads and one gateway, the same two workers `tally run` has.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{
    agent, cpu_seconds, listener_pid, past_load, post_bodies, tally_command, thread_cpu_seconds,
    until_stored, Tally,
};

const BATCH: usize = 1000;
const BATCHES: usize = 300;
const EVENTS: usize = BATCH * BATCHES;
const CONNECTIONS: usize = 4;

pub fn run() {
    let Some(services) = Services::from_env() else {
        println!("(g) cluster mode: skipped; start the services with scripts/services.sh and export their addresses");
        return;
    };
    let (bodies, span) = past_load(7, BATCHES, BATCH);
    let load = std::process::id();

    let dir = tempfile::tempdir().unwrap();
    let embedded = Tally::start(dir.path(), &[]);
    let embedded_run = measure(&embedded.url, &bodies, span, &[embedded.pid(), load]);
    drop(embedded);

    let cluster = Cluster::start(&services, &dir.path().join("cluster"), &[], 1);
    let gateway = &cluster.gateways[0];
    let others = [
        ("broker (tansu)", &services.kafka),
        ("ClickHouse", &services.clickhouse),
        ("Redis", &services.redis),
    ]
    .map(|(name, address)| (name, port_of(address).and_then(listener_pid)));
    let worker = cluster.worker.0.id();
    let mut pids = vec![gateway.pid(), worker, load];
    pids.extend(others.iter().filter_map(|(_, pid)| *pid));
    let threads_before = thread_cpu_seconds(worker);
    let cluster_run = measure(&gateway.url, &bodies, span, &pids);
    let worker_roles = by_role(&threads_before, &thread_cpu_seconds(worker));
    drop(cluster);

    println!("(g) cluster mode vs tally run, {EVENTS} events in batches of {BATCH}, {CONNECTIONS} connections; 2 timely workers each");
    println!(
        "    HTTP ingest, tally run (fsync always):            {:>10.0} events/s",
        embedded_run.ingest
    );
    println!(
        "    HTTP ingest, tally gateway (Kafka acks=all):      {:>10.0} events/s  ({:.2}x tally run)",
        cluster_run.ingest,
        cluster_run.ingest / embedded_run.ingest
    );
    println!(
        "    end to end, tally run:                            {:>10.0} events/s",
        embedded_run.end_to_end
    );
    println!(
        "    end to end, gateway + worker + ClickHouse:        {:>10.0} events/s  ({:.2}x tally run)",
        cluster_run.end_to_end,
        cluster_run.end_to_end / embedded_run.end_to_end
    );
    let per_event = |cpu: f64| cpu * 1e6 / EVENTS as f64;
    println!(
        "    CPU per event, from the first POST until every event is stored (user + system, µs):"
    );
    println!(
        "      tally run:                                      {:>8.2}",
        per_event(embedded_run.cpu[0])
    );
    let tally = cluster_run.cpu[0] + cluster_run.cpu[1];
    println!(
        "      cluster, tally gateway:                         {:>8.2}",
        per_event(cluster_run.cpu[0])
    );
    println!(
        "      cluster, tally worker:                          {:>8.2}",
        per_event(cluster_run.cpu[1])
    );
    for (role, cpu) in worker_roles {
        println!("        {:<46}{:>8.2}", format!("{role}:"), per_event(cpu));
    }
    let mut services_cpu = 0.0;
    let mut measured = cluster_run.cpu[3..].iter();
    for (name, pid) in others {
        match pid {
            Some(_) => {
                let cpu = *measured.next().unwrap();
                services_cpu += cpu;
                println!(
                    "      {:<48}{:>8.2}",
                    format!("cluster, {name}:"),
                    per_event(cpu)
                );
            }
            None => println!(
                "      {:<48}not on this machine",
                format!("cluster, {name}:")
            ),
        }
    }
    println!(
        "      tally's part of the cluster's server CPU:       {:>7.0}%",
        100.0 * tally / (tally + services_cpu)
    );
    println!(
        "      the load generator, tally run / cluster:        {:>8.2} / {:.2}",
        per_event(embedded_run.cpu[1]),
        per_event(cluster_run.cpu[2])
    );
}

/// The rates of one run of [`measure`], and the CPU each process spent.
struct Measured {
    ingest: f64,
    end_to_end: f64,
    /// Seconds, in the order of the process ids given.
    cpu: Vec<f64>,
}

/// What a thread of the worker process does, by its name.
fn role(thread: &str) -> &'static str {
    match thread {
        t if t.starts_with("timely:work") => "the dataflow (timely workers)",
        "redis-publisher" => "live updates to Redis",
        "archive" => "the raw-event archive to ClickHouse",
        t if t.starts_with("rdk:") => "Kafka clients (librdkafka)",
        _ => "its other threads",
    }
}

/// The CPU the threads of a process spent between two readings of
/// [`thread_cpu_seconds`], in seconds, summed by [`role`], most first.
fn by_role(
    before: &HashMap<u32, (String, f64)>,
    after: &HashMap<u32, (String, f64)>,
) -> Vec<(&'static str, f64)> {
    let mut roles: HashMap<&'static str, f64> = HashMap::new();
    for (tid, (name, cpu)) in after {
        let earlier = before.get(tid).map_or(0.0, |(_, cpu)| *cpu);
        *roles.entry(role(name)).or_default() += cpu - earlier;
    }
    let mut roles: Vec<_> = roles.into_iter().collect();
    roles.sort_by(|a, b| b.1.total_cmp(&a.1));
    roles
}

/// The port of an address such as `127.0.0.1:9092` or `http://host:8123/`;
/// the first one of a list.
fn port_of(address: &str) -> Option<u16> {
    let first = address.split(',').next()?;
    let after = first.rsplit_once(':')?.1;
    let digits = after
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after.len());
    after[..digits].parse().ok()
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
    worker: Worker,
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
        Cluster { gateways, worker }
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

/// Posts every body over concurrent connections, then one event now in
/// every partition, which moves every watermark past the bodies' windows;
/// returns the ingest rate and the end-to-end rate, both from the first POST,
/// and the CPU processes `pids` spent meanwhile.
fn measure(url: &str, bodies: &Arc<Vec<Vec<u8>>>, span: (i64, i64), pids: &[u32]) -> Measured {
    let cpu = || pids.iter().map(|&pid| cpu_seconds(pid)).collect::<Vec<_>>();
    let before = cpu();
    let started = Instant::now();
    post_bodies(url, bodies, CONNECTIONS);
    let ingest = EVENTS as f64 / started.elapsed().as_secs_f64();
    until_stored(url, span, EVENTS);
    let end_to_end = EVENTS as f64 / started.elapsed().as_secs_f64();
    let cpu = cpu()
        .iter()
        .zip(before)
        .map(|(after, before)| after - before)
        .collect();
    Measured {
        ingest,
        end_to_end,
        cpu,
    }
}
