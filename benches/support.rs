//! Helpers shared by the benchmarks: the default metrics, generated events,
//! and a `tally run` process.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tally_dataflow::config::Config;
use tally_dataflow::dedupe::IdKey;
pub use tally_dataflow::time::now_ms;

/// The repository's default configuration.
pub fn default_config() -> Config {
    let text = std::fs::read_to_string(repository_config()).unwrap();
    Config::load(Some(&text), []).unwrap()
}

/// A clickstream event in the seed's shape, about 230 bytes.
pub fn event(rng: &mut fastrand::Rng, timestamp_ms: i64) -> Value {
    let purchase = rng.u32(..20) == 0;
    let country = ["US", "GB", "DE", "FR", "IN", "BR", "JP", "CA"][rng.usize(..8)];
    let device = ["MOBILE", "DESKTOP", "TABLET"][rng.usize(..3)];
    let mut event = json!({
        "eventId": format!("evt_{:016x}", rng.u64(..)),
        "eventType": if purchase { "purchase" } else { "ad_click" },
        "timestamp": timestamp_ms,
        "dimensions": {
            "campaignId": format!("camp_{}", 1000 + rng.u32(..50)),
            "country": country,
            "deviceType": device,
            "userId": format!("usr_{:06}", rng.u32(..100_000)),
        },
    });
    if purchase {
        event["values"] = json!({"amount": rng.u32(100..20_000) as f64 / 100.0});
    } else {
        // For the default metrics ad_latency and top_creatives: an
        // exponential latency, and a creative of a Zipf law over 1000.
        let latency = (-60.0 * (1.0 - rng.f64()).ln() * 10.0).round() / 10.0;
        event["values"] = json!({"latency_ms": latency});
        let creative = (1001f64.powf(rng.f64()) as u32).saturating_sub(1);
        event["dimensions"]["creativeId"] = json!(format!("cr_{creative:03}"));
    }
    event
}

/// A running `tally run`, killed on drop.
pub struct Tally {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Tally {
    /// Starts the release binary on port 0 in `dir` with `TALLY__*` overrides.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Tally {
        Tally::start_with_config(dir, &repository_config(), env)
    }

    /// As [`Tally::start`], from the configuration file `config`.
    pub fn start_with_config(dir: &Path, config: &Path, env: &[(&str, &str)]) -> Tally {
        let mut command = tally_command_with(config, "run", env);
        command
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir);
        Tally::launch(command)
    }

    /// Starts `command`, which prints `listening on URL` first.
    pub fn launch(mut command: Command) -> Tally {
        let mut child = command.stdout(Stdio::piped()).spawn().expect("start tally");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .expect("listening line")
            .to_string();
        Tally { child, url }
    }
}

impl Tally {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tally <subcommand> --config cluster.toml`, quiet, with `TALLY__*`
/// overrides.
pub fn tally_command(subcommand: &str, env: &[(&str, &str)]) -> Command {
    tally_command_with(&repository_config(), subcommand, env)
}

/// The repository's `cluster.toml`.
pub fn repository_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster.toml")
}

/// `tally <subcommand> --config <config>`, quiet, with `TALLY__*`
/// overrides.
pub fn tally_command_with(config: &Path, subcommand: &str, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .arg(subcommand)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

/// `batches` JSON bodies of `batch` generated events, timed from `now_ms`
/// at 100 events per millisecond.
pub fn bodies(seed: u64, batches: usize, batch: usize, now_ms: i64) -> Arc<Vec<Vec<u8>>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    Arc::new(
        (0..batches)
            .map(|b| {
                let events: Vec<_> = (0..batch)
                    .map(|i| event(&mut rng, now_ms + (b * batch + i) as i64 / 100))
                    .collect();
                serde_json::to_vec(&events).unwrap()
            })
            .collect(),
    )
}

/// POSTs every body once, over `connections` concurrent keep-alive
/// connections, each waiting for its `202`.
pub fn post_bodies(url: &str, bodies: &Arc<Vec<Vec<u8>>>, connections: usize) {
    post_bodies_as(url, bodies, connections, None)
}

/// As [`post_bodies`], with the secret of a key.
pub fn post_bodies_as(
    url: &str,
    bodies: &Arc<Vec<Vec<u8>>>,
    connections: usize,
    key: Option<&str>,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let (bodies, next, url) = (Arc::clone(bodies), Arc::clone(&next), url.to_string());
            let key = key.map(str::to_owned);
            std::thread::spawn(move || {
                let agent = agent();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    post_events_as(&agent, &url, body, key.as_deref());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The `q`-quantile of sorted values; NaN when there are none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// An HTTP client that returns error statuses instead of failing on them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs a JSON body of events and insists on a 202.
pub fn post_events(agent: &ureq::Agent, url: &str, body: &[u8]) {
    post_events_as(agent, url, body, None)
}

/// As [`post_events`], with the secret of a key.
pub fn post_events_as(agent: &ureq::Agent, url: &str, body: &[u8], key: Option<&str>) {
    let mut request = agent
        .post(format!("{url}/v1/events"))
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = request.send(body).unwrap();
    assert_eq!(response.status(), 202);
}

/// Request bodies of `batch` events with [`PLACEHOLDER`] times, made before
/// a clock starts so the senders spend little CPU of their own.
pub fn templates(seed: u64, batch: usize) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..50)
        .map(|_| {
            serde_json::to_vec(
                &(0..batch)
                    .map(|_| event(&mut rng, PLACEHOLDER))
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        })
        .collect()
}

/// The text of `/metrics`, or nothing if the server does not answer.
pub fn metrics_text(url: &str) -> String {
    ureq::get(format!("{url}/metrics"))
        .call()
        .map(|mut r| r.body_mut().read_to_string().unwrap_or_default())
        .unwrap_or_default()
}

/// The unlabelled samples of `/metrics`.
pub fn scrape(url: &str) -> HashMap<String, f64> {
    metrics_text(url)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            l.split_once(' ')
                .and_then(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
        })
        .collect()
}

/// The cumulative buckets `(le, count)` of the histogram `name` in
/// `/metrics`, in order; `+Inf` last.
pub fn buckets(url: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    metrics_text(url)
        .lines()
        .filter_map(|l| {
            let (le, count) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
            Some((le.parse().ok()?, count.trim().parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of what a histogram counted between two scrapes of its
/// [`buckets`], interpolated within its bucket as Prometheus does.
pub fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, n - was)
        })
        .collect();
    let Some(&(_, total)) = counts.last() else {
        return f64::NAN;
    };
    let rank = q * total;
    let mut below = (0.0, 0.0);
    for &(le, n) in &counts {
        if n >= rank {
            if le.is_infinite() {
                return below.0;
            }
            let within = if n > below.1 {
                (rank - below.1) / (n - below.1)
            } else {
                0.0
            };
            return below.0 + (le - below.0) * within;
        }
        below = (le, n);
    }
    f64::NAN
}

/// A 13-digit time that [`stamp`] replaces.
pub const PLACEHOLDER: i64 = 1_000_000_000_000;

/// The template with every placeholder time set to `now_ms`.
pub fn stamp(template: &[u8], now_ms: i64) -> Vec<u8> {
    let (from, to) = (
        PLACEHOLDER.to_string().into_bytes(),
        now_ms.to_string().into_bytes(),
    );
    assert_eq!(from.len(), to.len());
    let mut body = template.to_vec();
    let mut i = 0;
    while i + from.len() <= body.len() {
        if body[i..i + from.len()] == from[..] {
            body[i..i + from.len()].copy_from_slice(&to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    body
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The CPU time process `pid` has used, user and system, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// The CPU time each thread of process `pid` has used, in seconds, by
/// thread id, with the thread's name.
pub fn thread_cpu_seconds(pid: u32) -> HashMap<u32, (String, f64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let cpu = stat_cpu_seconds(task.path().join("stat").to_str()?);
            Some((tid, (name.trim_end().to_string(), cpu)))
        })
        .collect()
}

/// The user and system time of a `/proc` stat file, in seconds.
fn stat_cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The process on this machine listening on TCP `port` of 127.0.0.1 or of
/// every address, if it can be seen: the socket's inode from
/// `/proc/net/tcp`, then the process holding it among `/proc/*/fd`.
pub fn listener_pid(port: u16) -> Option<u32> {
    const LISTEN: &str = "0A";
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (address, local_port) = fields.get(1)?.split_once(':')?;
        let ours = matches!(address, "0100007F" | "00000000")
            && u16::from_str_radix(local_port, 16).ok()? == port
            && *fields.get(3)? == LISTEN;
        let inode = fields.get(9)?;
        ours.then(|| format!("socket:[{inode}]"))
    })?;
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|process| {
            let pid = process.file_name().to_str()?.parse::<u32>().ok()?;
            let holds = std::fs::read_dir(process.path().join("fd"))
                .ok()?
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == inode.as_str())
                });
            holds.then_some(pid)
        })
}

/// A load of [`bodies`] stamped two minutes back, so that [`until_stored`]
/// can close its windows, and the span of its 10 s windows, in Unix
/// seconds: a load of up to 10 s of event time.
pub fn past_load(seed: u64, batches: usize, batch: usize) -> (Arc<Vec<Vec<u8>>>, (i64, i64)) {
    let past = now_ms() - 120_000;
    let span = (past / 10_000 * 10, (past + 20_000) / 1000);
    (bodies(seed, batches, batch, past), span)
}

/// Posts one event now in every partition, which moves every watermark
/// past a [`past_load`]'s windows, then waits until the store holds
/// `events` in its `span`.
pub fn until_stored(url: &str, span: (i64, i64), events: usize) {
    let started = Instant::now();
    post_events(&agent(), url, &closing_body());
    while stored_events(url, span) < events as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not every event was stored"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One event at the current time for each partition of the log: its id
/// picks the partition.
fn closing_body() -> Vec<u8> {
    let partitions = default_config().log.partitions;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut missing: BTreeSet<u32> = (0..partitions).collect();
    let mut events = Vec::new();
    for i in 0.. {
        if missing.is_empty() {
            break;
        }
        let id = format!("close_{i}");
        if missing.remove(&IdKey::of(&id).partition(partitions)) {
            let mut event = event(&mut rng, now_ms());
            event["eventId"] = id.into();
            events.push(event);
        }
    }
    serde_json::to_vec(&events).unwrap()
}

/// The events the store holds in the 10 s windows of `(start, end)`, Unix
/// seconds, by the `events` metric, which counts every event.
fn stored_events(url: &str, (start, end): (i64, i64)) -> u64 {
    let answer: serde_json::Value = agent()
        .get(format!(
            "{url}/v1/metrics?metric=events&resolution=10s&start={start}&end={end}"
        ))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    answer["dataPoints"].as_array().map_or(0, |points| {
        points.iter().filter_map(|p| p["value"].as_u64()).sum()
    })
}
