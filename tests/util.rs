//! Helpers shared by the integration tests: a `tally run` process on port 0
//! in a temporary directory, an HTTP client, and a deterministic event set.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The repository's default configuration, which the tests run with.
pub fn default_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster.toml")
}

/// A running `tally run`.
pub struct Tally {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its data directory.
    pub dir: PathBuf,
    agent: ureq::Agent,
}

impl Tally {
    /// Starts `tally run` on port 0 in `dir`, with `TALLY__*` overrides and
    /// extra flags, and waits until it listens.
    pub fn start(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Tally {
        Tally::start_with_config(dir, &default_config(), env, args)
    }

    /// As [`Tally::start`], with the configuration file `config`.
    pub fn start_with_config(
        dir: &Path,
        config: &Path,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Tally {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
        command
            .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        Tally::launch(command, dir)
    }

    /// Starts a tally command that prints `listening on URL` first, and
    /// waits for that line.
    pub fn launch(mut command: Command, dir: &Path) -> Tally {
        let mut child = command.stdout(Stdio::piped()).spawn().expect("start tally");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read tally's first line");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Tally {
            child: Some(child),
            url,
            dir: dir.to_owned(),
            agent,
        }
    }

    /// Its resident memory, from `/proc`.
    pub fn resident_bytes(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its /proc");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// The `host:port` it listens on.
    pub fn address(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// POSTs a body; returns the status and the JSON answer.
    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let mut response = self
            .agent
            .post(format!("{}{path}", self.url))
            .header("content-type", content_type)
            .send(body)
            .expect("POST");
        let status = response.status().as_u16();
        (status, json_or_text(response.body_mut().read_to_string()))
    }

    /// POSTs events as a JSON array to the tally at `url` with a client of
    /// its own, for a request whose answer may be lost: the status, or why
    /// there was none.
    pub fn try_post_events(url: &str, events: &[Value]) -> Result<u16, String> {
        let body = serde_json::to_vec(events).expect("serialise");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .post(format!("{url}/v1/events"))
            .header("content-type", "application/json")
            .send(&body[..])
            .map(|response| response.status().as_u16())
            .map_err(|e| e.to_string())
    }

    /// POSTs events as a JSON array and insists on a 202.
    pub fn post_events(&self, events: &[Value]) {
        let body = serde_json::to_vec(events).expect("serialise");
        let (status, answer) = self.post("/v1/events", "application/json", &body);
        assert_eq!(status, 202, "POST /v1/events answered {answer}");
        assert_eq!(answer["accepted"], events.len());
    }

    /// A value from the Prometheus text at `/metrics`, if it is there.
    pub fn prometheus(&self, name: &str) -> Option<u64> {
        let (_, text) = self.get("/metrics");
        prometheus_value(text.as_str().unwrap_or_default(), name)
    }

    /// GETs a path; returns the status and the body, as JSON when it is.
    pub fn get(&self, path: &str) -> (u16, Value) {
        let mut response = self
            .agent
            .get(format!("{}{path}", self.url))
            .call()
            .expect("GET");
        let status = response.status().as_u16();
        (status, json_or_text(response.body_mut().read_to_string()))
    }

    /// Posts one event at `at_ms` to every partition, so that every
    /// partition's watermark passes everything before it.
    pub fn flush(&self, at_ms: i64) {
        for _ in 0..PARTITIONS {
            self.post_events(&[json!({"eventType": "flush", "timestamp": at_ms})]);
        }
    }

    /// The `/v1/metrics` answer for a query string, insisting on a 200.
    pub fn metrics(&self, query: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/metrics?{query}"));
        assert_eq!(status, 200, "GET /v1/metrics?{query} answered {body}");
        body
    }

    /// Kills the process with SIGKILL.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Stops the process with SIGTERM and insists on a clean exit.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let exit = wait_with_timeout(&mut child, Duration::from_secs(20));
        assert!(exit.success(), "tally exited with {exit}");
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "tally did not stop within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The dead letters stored in `dir`'s result store.
pub fn dead_letters(dir: &Path) -> usize {
    let conn = rusqlite::Connection::open(dir.join("results.db")).unwrap();
    conn.query_row("SELECT count(*) FROM dead_letters", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as usize
}

/// The (index, field) of each problem in a `400` answer's `details`.
pub fn error_details(answer: &Value) -> Vec<(u64, String)> {
    answer["details"]
        .as_array()
        .expect("details")
        .iter()
        .map(|d| {
            (
                d["index"].as_u64().expect("index"),
                d["field"].as_str().expect("field").to_owned(),
            )
        })
        .collect()
}

/// Log partitions in the default configuration.
pub const PARTITIONS: usize = 8;

/// The value of `name` in Prometheus text, if it is there.
pub fn prometheus_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Retries `check` until it passes or `timeout` runs out, then returns its
/// last failure.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(e) if Instant::now() >= deadline => panic!("not within {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Where the generated events start: the whole hour three hours before the
/// tests started, recent enough for every window's retention (a day for
/// ten-second windows) and far enough back that no event is in the future.
pub fn base_ms() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        (now - 3 * 3_600_000) / 3_600_000 * 3_600_000
    })
}

/// [`base_ms`] plus `offset_ms`, in RFC 3339, as the API writes times.
pub fn at(offset_ms: i64) -> String {
    tally_dataflow::time::format_rfc3339(base_ms() + offset_ms)
}

/// The five minutes of a [`clickstream`], as a query's `start` and `end`.
pub fn range() -> String {
    format!("start={}&end={}", at(0), at(300_000))
}

/// One generated event, kept in plain fields for the expectations.
#[derive(Clone, Debug)]
pub struct Generated {
    pub event_type: &'static str,
    pub time_ms: i64,
    pub campaign: String,
    pub country: &'static str,
    pub device: &'static str,
    pub user: String,
    pub amount: Option<f64>,
    /// An ad click's latency, for the `quantiles` metric `ad_latency`.
    pub latency_ms: Option<f64>,
    /// The creative shown, for the `topk` metric `top_creatives`.
    pub creative: String,
}

impl Generated {
    /// The event as a client sends it, in seconds with a fraction.
    pub fn json(&self) -> Value {
        let mut event = json!({
            "eventType": self.event_type,
            "timestamp": self.time_ms as f64 / 1000.0,
            "dimensions": {
                "campaignId": self.campaign, "country": self.country,
                "deviceType": self.device, "userId": self.user,
                "creativeId": self.creative,
            },
        });
        if let Some(amount) = self.amount {
            event["values"] = json!({"amount": amount});
        }
        if let Some(latency) = self.latency_ms {
            event["values"] = json!({"latency_ms": latency});
        }
        event
    }
}

/// `count` events over five minutes from [`base_ms()`], in time order with a
/// jitter well under the 2 s out-of-orderness, so none is late.
pub fn clickstream(seed: u64, count: usize) -> Vec<Generated> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut sketched = Sketched::new(seed);
    let span = 300_000;
    (0..count)
        .map(|i| {
            let purchase = rng.u32(..10) == 0;
            Generated {
                latency_ms: (!purchase).then(|| sketched.latency()),
                creative: sketched.creative(),
                event_type: if purchase { "purchase" } else { "ad_click" },
                time_ms: base_ms()
                    + ((i as i64 * span) / count as i64 + rng.i64(0..800)).min(span - 1),
                campaign: format!("camp_{}", rng.u32(..4)),
                country: ["US", "DE", "IN"][rng.usize(..3)],
                device: ["MOBILE", "DESKTOP"][rng.usize(..2)],
                user: format!("usr_{}", rng.u32(..300)),
                amount: purchase.then(|| rng.u32(100..10_000) as f64 / 100.0),
            }
        })
        .collect()
}

/// The latencies and creatives of generated events, from a generator of
/// their own, so that a seed gives the other fields it always gave.
pub struct Sketched(fastrand::Rng);

impl Sketched {
    pub fn new(seed: u64) -> Sketched {
        Sketched(fastrand::Rng::with_seed(seed ^ 0x5ce7_c4ed))
    }

    /// Exponential, mean 60 ms, to a tenth of a millisecond.
    pub fn latency(&mut self) -> f64 {
        (-60.0 * (1.0 - self.0.f64()).ln() * 10.0).round() / 10.0
    }

    /// One of 40 creatives, skewed towards the first.
    pub fn creative(&mut self) -> String {
        format!("cr_{:02}", self.0.u32(..40).min(self.0.u32(..40)))
    }
}

/// What a stored sketch says that two runs must agree on: a uniq's
/// estimate; a quantiles sketch's count, minimum and maximum, which KLL
/// keeps exactly (its answers depend on its coin flips); a topk sketch's
/// items and their bounds.
pub fn sketch_summary(bytes: &[u8]) -> String {
    let sketch = tally_dataflow::aggregate::Sketch::from_bytes(bytes).expect("a stored sketch");
    if let Some(estimate) = sketch.estimate() {
        format!("~{estimate}")
    } else if let Some((n, min, max)) = sketch.extremes() {
        format!("n={n} min={min} max={max}")
    } else {
        format!("{:?}", sketch.items().expect("a sketch of some family"))
    }
}

/// Posts events in requests of `batch`.
pub fn post_all(tally: &Tally, events: &[Generated], batch: usize) {
    for chunk in events.chunks(batch) {
        tally.post_events(&chunk.iter().map(Generated::json).collect::<Vec<_>>());
    }
}

/// The values of a `/v1/metrics` answer's data points.
pub fn values(answer: &Value) -> Vec<Value> {
    answer["dataPoints"]
        .as_array()
        .expect("dataPoints")
        .iter()
        .map(|p| p["value"].clone())
        .collect()
}

/// The `ad_click` events of a [`clickstream`] in each of its five minutes.
pub fn per_minute_clicks(events: &[Generated]) -> Vec<u64> {
    let mut buckets = vec![0; 5];
    for e in events.iter().filter(|e| e.event_type == "ad_click") {
        buckets[((e.time_ms - base_ms()) / 60_000) as usize] += 1;
    }
    buckets
}

/// Waits up to `timeout` until `ad_clicks` per minute over the five
/// minutes of a [`clickstream`] are `expected`.
pub fn clicks_per_minute_are(tally: &Tally, expected: &[u64], timeout: Duration) {
    let query = format!("metric=ad_clicks&resolution=1m&{}", range());
    eventually(timeout, || {
        // A minute not yet stored has no value: it is not there yet.
        let got: Vec<Option<u64>> = values(&tally.metrics(&query))
            .iter()
            .map(Value::as_u64)
            .collect();
        if got.iter().copied().eq(expected.iter().copied().map(Some)) {
            Ok(())
        } else {
            Err(format!("clicks per minute {got:?}, expected {expected:?}"))
        }
    });
}

/// The secret of [`keyed_config`]'s writer.
pub const WRITE: &str = "wk_test_0123456789abcdef";
/// The secret of its reader, which it reads from `TALLY_TEST_READ_SECRET`.
pub const READ: &str = "rk_test_0123456789abcdef";
/// The secret of its admin.
pub const ADMIN: &str = "ak_test_0123456789abcdef";
/// A web origin for tests to list in `server.allowed_origins`.
pub const APP: &str = "https://app.example.com";

/// The repository's configuration with three keys: a writer limited to 5
/// events a second in bursts of 10, a reader whose secret comes from the
/// environment, and an admin.
pub fn keyed_config(dir: &Path) -> PathBuf {
    let mut text = std::fs::read_to_string(default_config()).unwrap();
    text.push_str(&format!(
        r#"
[[auth.keys]]
name = "web-sdk"
secret = "{WRITE}"
scopes = ["write"]
events_per_second = 5
burst = 10

[[auth.keys]]
name = "dashboard"
secret_env = "TALLY_TEST_READ_SECRET"
scopes = ["read"]

[[auth.keys]]
name = "ops"
secret = "{ADMIN}"
scopes = ["admin"]
"#
    ));
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A request's status, headers and JSON body (or text).
pub struct Answer {
    pub status: u16,
    pub headers: ureq::http::HeaderMap,
    pub body: Value,
}

pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&Value>) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let mut response = match body {
        Some(body) => agent
            .run(
                builder
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(body).unwrap())
                    .unwrap(),
            )
            .unwrap(),
        None => agent.run(builder.body(()).unwrap()).unwrap(),
    };
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: json_or_text(response.body_mut().read_to_string()),
    }
}

/// An answer's body: its JSON, or its text when it is not JSON.
fn json_or_text(read: Result<String, ureq::Error>) -> Value {
    let text = read.unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}
