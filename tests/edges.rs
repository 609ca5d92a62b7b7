//! What one careless client or one mistake must not do to everyone else:
//! a fast clock, a port in use, a directory without `cluster.toml`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::{dead_letters, eventually, Tally};

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn an_event_from_a_fast_clock_does_not_dead_letter_everyone_elses() {
    let dir = tempfile::tempdir().unwrap();
    // Partitions go idle quickly, so the watermark moves as far as the
    // early event would drag it.
    let tally = Tally::start(
        dir.path(),
        &[("TALLY__DATAFLOW__IDLE_TIMEOUT", "300ms")],
        &[],
    );
    let read = || tally.prometheus("tally_events_read_total").unwrap_or(0);
    // 290 s ahead of the server: within `max_future`, so it is accepted.
    tally.post_events(&[json!({
        "eventType": "ad_click",
        "timestamp": now_s() + 290.0,
        "dimensions": {"campaignId": "fast_clock"},
    })]);
    eventually(Duration::from_secs(10), || {
        (read() >= 1)
            .then_some(())
            .ok_or("the early event was not read".to_string())
    });
    std::thread::sleep(Duration::from_secs(1));
    // Everyone else's events, on time, one request each so they reach
    // every partition.
    for _ in 0..20 {
        tally.post_events(&[
            json!({"eventType": "ad_click", "dimensions": {"campaignId": "on_time"}}),
        ]);
    }
    eventually(Duration::from_secs(10), || {
        (read() >= 21)
            .then_some(())
            .ok_or(format!("{} events read", read()))
    });
    assert_eq!(tally.prometheus("tally_dead_letters_total"), Some(0));
    assert_eq!(dead_letters(dir.path()), 0);
    let (_, listed) = tally.get("/v1/deadletters");
    assert_eq!(listed["deadLetters"], json!([]), "{listed}");
}

#[test]
fn a_second_tally_on_a_port_in_use_stops_at_once_and_names_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let first = Tally::start(dir.path(), &[], &[]);
    let address = first.url.trim_start_matches("http://").to_owned();
    let other = tempfile::tempdir().unwrap();
    let mut second = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["run", "--listen", &address, "--data-dir"])
        .arg(other.path())
        .arg("--config")
        .arg(crate::util::default_config())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            second.kill().unwrap();
            panic!("a second tally on {address} was still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "it exited with {status}");
    assert!(stderr.contains(&format!("binding {address}")), "{stderr}");
    // The first one is untouched.
    assert_eq!(first.get("/healthz").0, 200);
}

#[test]
fn tally_run_from_a_directory_without_cluster_toml_runs_the_default_metrics() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("data");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .current_dir(cwd.path())
        .args(["run", "--demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    let tally = Tally::launch(command, &data);
    let (status, catalog) = tally.get("/v1/catalog");
    assert_eq!(status, 200);
    let names: Vec<&str> = catalog["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert!(names.contains(&"ad_clicks"), "{catalog}");
    // The demo feed is flowing into them.
    eventually(Duration::from_secs(20), || {
        let read = tally.prometheus("tally_events_read_total").unwrap_or(0);
        (read > 0)
            .then_some(())
            .ok_or("no demo events read".to_string())
    });
}
