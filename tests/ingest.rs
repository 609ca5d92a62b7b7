//! `POST /v1/events`: what is accepted, what is refused, and how.

use serde_json::json;

use crate::util::{error_details, Tally};

const SEED_PAYLOAD: &str = r#"{
  "eventId": "evt_uuid_00981a",
  "eventType": "ad_click",
  "timestamp": 1780821960,
  "dimensions": {
    "campaignId": "camp_5541",
    "country": "US",
    "deviceType": "MOBILE",
    "userId": "usr_9981a2"
  }
}"#;

#[test]
fn accepts_one_event_an_array_and_ndjson() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);

    let (status, answer) = tally.post("/v1/events", "application/json", SEED_PAYLOAD.as_bytes());
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["status"], "ACCEPTED");
    assert_eq!(answer["accepted"], 1);
    assert!(answer["receivedAt"].as_str().unwrap().ends_with('Z'));

    let array =
        json!([{"eventType": "ad_click"}, {"eventType": "purchase", "values": {"amount": 3}}]);
    let (status, answer) = tally.post(
        "/v1/events",
        "application/json",
        array.to_string().as_bytes(),
    );
    assert_eq!((status, answer["accepted"].as_u64()), (202, Some(2)));

    let ndjson =
        "{\"eventType\":\"a\"}\n{\"eventType\":\"b\",\"timestamp\":\"2026-06-07T10:00:00Z\"}\n";
    let (status, answer) = tally.post("/v1/events", "application/x-ndjson", ndjson.as_bytes());
    assert_eq!((status, answer["accepted"].as_u64()), (202, Some(2)));

    let (_, metrics) = tally.get("/metrics");
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("tally_events_accepted_total 5"),
        "{metrics}"
    );
}

#[test]
fn refuses_bad_input_whole_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[("TALLY__SERVER__MAX_BODY", "2KB")], &[]);

    // One bad event fails the batch, and every bad index and field is named.
    let batch = json!([
        {"eventType": "ad_click"},
        {"eventType": "ad_click", "timestamp": "last tuesday"},
        {"timestamp": 5, "dimensions": {"country": ["US"]}},
        "not an event"
    ]);
    let (status, answer) = tally.post(
        "/v1/events",
        "application/json",
        batch.to_string().as_bytes(),
    );
    assert_eq!(status, 400, "{answer}");
    let details = error_details(&answer);
    assert_eq!(
        details,
        [
            (1, "timestamp".to_string()),
            (2, "eventType".to_string()),
            (2, "dimensions.country".to_string()),
            (3, String::new())
        ]
    );

    let (status, answer) = tally.post("/v1/events", "application/json", b"{\"eventType\": ");
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed JSON"),
        "{answer}"
    );

    let big = format!("[{}]", vec![r#"{"eventType":"ad_click"}"#; 200].join(","));
    let (status, answer) = tally.post("/v1/events", "application/json", big.as_bytes());
    assert_eq!(status, 413, "{answer}");

    let (status, _) = tally.post("/v1/events", "application/json", b"[]");
    assert_eq!(status, 400);

    // Nothing of the refused requests was accepted, and the server still serves.
    let (_, metrics) = tally.get("/metrics");
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains("tally_events_accepted_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_ingest_requests_rejected_total{reason=\"invalid\"} 1"),
        "{metrics}"
    );
    let (status, _) = tally.post("/v1/events", "application/json", br#"{"eventType":"ok"}"#);
    assert_eq!(status, 202);
    let (status, _) = tally.get("/readyz");
    assert_eq!(status, 200);
}

#[test]
fn a_bad_configuration_stops_start_up_and_lists_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(crate::util::default_config())
        .env("TALLY__LIVE__INTERVAL", "soon")
        .env("TALLY__DATAFLOW__ALLOWED_LATENESS", "-3")
        .env("TALLY__LOG__FSYNC", "sometimes")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in ["live.interval", "dataflow.allowed_lateness", "log.fsync"] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
}
