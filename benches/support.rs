//! Helpers shared by the benchmarks: the default metrics, generated events,
//! and a `tally run` process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};
use tally_dataflow::config::Config;

/// The repository's default configuration.
pub fn default_config() -> Config {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster.toml"))
        .unwrap();
    Config::load(Some(&text), []).unwrap()
}

/// A clickstream event in the seed's shape, about 200 bytes.
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
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
        command
            .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .arg("--config")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start tally");
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
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `q`-quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
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

/// The wall clock in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
