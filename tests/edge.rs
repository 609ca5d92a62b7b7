//! Trust at the edges: what one careless or hostile client may do, and that
//! it never breaks tally for everyone else. Each test probes `tally run` as
//! such a client would, over raw sockets where an HTTP library would hide
//! the behaviour, and checks the refusal, its count in `/metrics`, and that
//! the server still serves. The last tests are of one mistake: a fast clock,
//! a port in use, a directory without `cluster.toml`.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message;

use crate::live::{connect, wait_for};
use crate::util::{dead_letters, error_details, eventually, Tally};

/// Reads until the server closes the connection, or `limit` passes, and
/// returns what arrived and whether the server closed it. A reset after
/// data counts as closed: the server may reset a connection whose client is
/// still sending once it has answered.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0; 8192];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break false
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("reading from tally failed: {e}"),
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// Sends `request` on a new connection and returns the whole answer, which
/// must end with the server closing the connection.
fn exchange(tally: &Tally, request: &str) -> String {
    let mut stream = TcpStream::connect(tally.address()).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(10));
    assert!(closed, "the connection stayed open after {answer:?}");
    answer
}

/// The JSON body of an HTTP answer.
fn body(answer: &str) -> Value {
    let (_, body) = answer.split_once("\r\n\r\n").expect("a complete answer");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

fn counted(tally: &Tally, name: &str) -> u64 {
    tally.prometheus(name).unwrap_or(0)
}

#[test]
fn silent_connections_are_closed_and_health_answers_at_the_connection_cap() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(
        dir.path(),
        &[
            ("TALLY__SERVER__MAX_CONNECTIONS", "8"),
            ("TALLY__SERVER__HEADER_TIMEOUT", "2s"),
        ],
        &[],
    );
    // Eight connections that never send a byte take every place.
    let mut silent: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(tally.address()).unwrap())
        .collect();
    // The kernel hands connections over in order, so these are taken after
    // the eight: health still answers, anything else is refused, and each
    // such connection is closed after its answer.
    let health = exchange(&tally, "GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = exchange(&tally, "GET /readyz HTTP/1.1\r\nHost: tally\r\n\r\n");
    assert!(!ready.starts_with("HTTP/1.1 503 "), "{ready}");
    let refused = exchange(&tally, "GET /v1/catalog HTTP/1.1\r\nHost: tally\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.to_lowercase().contains("connection: close"),
        "{refused}"
    );
    assert!(
        body(&refused)["error"]
            .as_str()
            .unwrap()
            .contains("connections"),
        "{refused}"
    );

    // The silent ones are closed once the header timeout has passed.
    for stream in &mut silent {
        let (got, closed) = read_until_closed(stream, Duration::from_secs(15));
        assert!(closed, "a silent connection stayed open");
        assert_eq!(got, "", "a silent connection was sent something");
    }
    // So is one that went quiet after a request.
    let mut idle = TcpStream::connect(tally.address()).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n")
        .unwrap();
    let (got, closed) = read_until_closed(&mut idle, Duration::from_secs(15));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(closed, "an idle keep-alive connection stayed open");

    // Everyone else is served again, and each refusal was counted.
    let (status, _) = tally.get("/v1/catalog");
    assert_eq!(status, 200);
    let closed_silent = counted(
        &tally,
        "tally_connections_refused_total{reason=\"header_timeout\"}",
    );
    assert!(closed_silent >= 8, "{closed_silent} counted");
    assert_eq!(
        counted(
            &tally,
            "tally_connections_refused_total{reason=\"at_capacity\"}"
        ),
        1
    );
    assert_eq!(counted(&tally, "tally_connections_limit"), 8);
}

#[test]
fn a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[("TALLY__SERVER__BODY_TIMEOUT", "1s")], &[]);
    let mut stream = TcpStream::connect(tally.address()).unwrap();
    stream
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: tally\r\nContent-Type: application/json\r\n\
              Content-Length: 9000000\r\n\r\n[",
        )
        .unwrap();
    // A byte every 100 ms: never silent, never done.
    let mut trickle = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(100));
            if trickle.write_all(b" ").is_err() {
                return;
            }
        }
    });
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(closed, "the connection stayed open after the 408");
    assert!(
        body(&answer)["error"].as_str().unwrap().contains("1 s"),
        "{answer}"
    );
    drop(stream);
    sender.join().unwrap();

    assert_eq!(
        counted(
            &tally,
            "tally_ingest_requests_rejected_total{reason=\"body_timeout\"}"
        ),
        1
    );
    tally.post_events(&[json!({"eventType": "ad_click"})]);
}

#[test]
fn only_json_and_ndjson_bodies_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    let event = br#"{"eventType":"ad_click"}"#;
    for refused in [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "image/png",
        "application/json; charset=utf-16",
    ] {
        let (status, answer) = tally.post("/v1/events", refused, event);
        assert_eq!(status, 415, "{refused}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("Content-Type"),
            "{answer}"
        );
    }
    // Without a Content-Type at all, as a hand-written client may send.
    let answer = exchange(
        &tally,
        &format!(
            "POST /v1/events HTTP/1.1\r\nHost: tally\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
            event.len(),
            String::from_utf8_lossy(event)
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 415"), "{answer}");
    assert!(body(&answer)["error"].is_string(), "{answer}");

    for accepted in [
        "application/json",
        "Application/JSON; charset=UTF-8",
        "application/cloudevents+json",
    ] {
        let (status, answer) = tally.post("/v1/events", accepted, event);
        assert_eq!(status, 202, "{accepted}: {answer}");
    }
    for ndjson in ["application/x-ndjson", "application/jsonlines"] {
        let (status, answer) = tally.post(
            "/v1/events",
            ndjson,
            b"{\"eventType\":\"a\"}\n{\"eventType\":\"b\"}\n",
        );
        assert_eq!(
            (status, answer["accepted"].as_u64()),
            (202, Some(2)),
            "{ndjson}"
        );
    }
    assert_eq!(
        counted(
            &tally,
            "tally_ingest_requests_rejected_total{reason=\"unsupported_media_type\"}"
        ),
        8
    );
    assert_eq!(counted(&tally, "tally_events_accepted_total"), 7);
}

#[test]
fn oversized_ids_values_and_dimension_counts_are_refused_by_index_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    let many = |n: usize, value: Value| -> Value {
        (0..n)
            .map(|i| (format!("d{i}"), value.clone()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    // At each default bound, an event is accepted.
    let at_bounds = json!({
        "eventId": "i".repeat(256),
        "eventType": "t".repeat(128),
        "dimensions": {"campaignId": "v".repeat(2048)},
        "values": many(64, json!(1)),
    });
    tally.post_events(&[
        at_bounds,
        json!({"eventType": "x", "dimensions": many(64, json!("a"))}),
    ]);

    let batch = json!([
        {"eventType": "ad_click"},
        {"eventType": "ad_click", "eventId": "i".repeat(1 << 20)},
        {"eventType": "ad_click", "dimensions": {"campaignId": "v".repeat(2049)}},
        {"eventType": "ad_click", "dimensions": many(10_000, json!("a"))},
        {"eventType": "ad_click", "values": many(65, json!(1))},
        {"eventType": "t".repeat(129)},
        {"eventType": "ad_click", "dimensions": {"n".repeat(129): "a"}},
    ]);
    let body = batch.to_string();
    let (status, answer) = tally.post("/v1/events", "application/json", body.as_bytes());
    assert_eq!(status, 400);
    let details = error_details(&answer);
    assert_eq!(
        details,
        [
            (1, "eventId".to_owned()),
            (2, "dimensions.campaignId".to_owned()),
            (3, "dimensions".to_owned()),
            (4, "values".to_owned()),
            (5, "eventType".to_owned()),
            (6, "dimensions".to_owned()),
        ],
        "{answer}"
    );
    // Each problem says the bound, and the answer does not echo the value.
    assert!(
        answer.to_string().len() < 4096,
        "{} bytes",
        answer.to_string().len()
    );
    let problem = answer["details"][1]["problem"].as_str().unwrap();
    assert!(problem.contains("2048"), "{problem}");
    // A 9 MiB value fits the body limit, but not the value's.
    let huge = json!({"eventType": "ad_click", "dimensions": {"campaignId": "v".repeat(9 << 20)}});
    let (status, answer) = tally.post(
        "/v1/events",
        "application/json",
        huge.to_string().as_bytes(),
    );
    assert_eq!(status, 400);
    assert_eq!(answer["details"][0]["field"], "dimensions.campaignId");
    assert_eq!(counted(&tally, "tally_events_accepted_total"), 2);
    assert_eq!(
        counted(
            &tally,
            "tally_ingest_requests_rejected_total{reason=\"invalid\"}"
        ),
        2
    );
}

#[test]
fn a_request_followed_by_a_write_half_close_is_answered_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    for path in ["/v1/metrics?metric=ad_clicks", "/", "/healthz"] {
        for _ in 0..5 {
            let mut stream = TcpStream::connect(tally.address()).unwrap();
            write!(stream, "GET {path} HTTP/1.1\r\nHost: tally\r\n\r\n").unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(10));
            assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer:?}");
            assert!(closed, "{path}: the connection stayed open");
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| panic!("{path}: no content-length in {head}"))
                .parse()
                .unwrap();
            assert_eq!(body.len(), length, "{path}: a partial body");
        }
    }
}

#[test]
fn every_subscription_is_answered_and_a_binary_frame_closes_with_1003() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    let mut socket = connect(&tally);
    let ask = |socket: &mut crate::live::Socket, request: Value| -> Value {
        socket.send(Message::text(request.to_string())).unwrap();
        wait_for(socket, Duration::from_secs(5), |m| {
            m.get("subscribed").is_some()
                || m.get("unsubscribed").is_some()
                || m.get("error").is_some()
        })
    };
    let ack = ask(
        &mut socket,
        json!({"action": "subscribe", "topic": "metrics:ad_clicks:country:US"}),
    );
    assert_eq!(
        ack,
        json!({"subscribed": "metrics:ad_clicks:country:US", "window": "tumbling 10s", "groupBy": null, "lateness": 32_000})
    );
    let ack = ask(
        &mut socket,
        json!({"action": "subscribe", "topic": "metrics:ad_clicks", "window": "tumbling 1m", "groupBy": "country"}),
    );
    assert_eq!(
        ack,
        json!({"subscribed": "metrics:ad_clicks", "window": "tumbling 1m", "groupBy": "country", "lateness": 32_000})
    );
    // A resume says from when its replay is complete.
    let ack = ask(
        &mut socket,
        json!({"action": "subscribe", "topic": "metrics:events", "since": "2026-11-29T10:25:00Z"}),
    );
    assert_eq!(ack["since"], "2026-11-29T10:25:00Z", "{ack}");
    // Every kind of mistake gets an error naming the topic where there is one.
    for (request, says) in [
        (
            json!({"action": "subscribe", "topic": "metrics:nope"}),
            "unknown metric",
        ),
        (
            json!({"action": "subscribe", "topic": "metrics:ad_clicks", "window": "tumbling 7m"}),
            "no window",
        ),
        (
            json!({"action": "subscribe", "topic": "metrics:ad_clicks", "groupBy": "planet"}),
            "not a dimension",
        ),
        (
            json!({"action": "subscribe", "topic": "metrics:ad_clicks", "since": "yesterday"}),
            "since: 'yesterday' is not an RFC 3339 time",
        ),
        (json!({"action": "subscribe"}), "topic"),
        (json!({"action": "subscribe", "topic": 5}), "cannot read"),
        (
            json!({"action": "watch", "topic": "metrics:ad_clicks"}),
            "unknown action",
        ),
        (json!("subscribe"), "cannot read"),
    ] {
        let answer = ask(&mut socket, request.clone());
        let error = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{request}: {answer}"));
        assert!(error.contains(says), "{request}: {answer}");
    }
    let ack = ask(
        &mut socket,
        json!({"action": "unsubscribe", "topic": "metrics:ad_clicks"}),
    );
    assert_eq!(ack, json!({"unsubscribed": "metrics:ad_clicks"}));

    // A binary frame closes the connection with 1003, unsupported data.
    socket.send(Message::binary(vec![1, 2, 3])).unwrap();
    // Read on past the close until the connection ends, as a client does:
    // that sends the answer tungstenite queued, and the server then ends
    // the connection at once rather than after its grace for a client that
    // does not answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut close = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "the connection did not end after a binary frame"
        );
        match socket.read() {
            Ok(Message::Close(frame)) => close = Some(frame),
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("expected a close frame and the end: {e}"),
        }
    }
    let close = close.expect("no close after a binary frame");
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1003));
    eventually(Duration::from_secs(5), || {
        match counted(&tally, "tally_ws_clients") {
            0 => Ok(()),
            n => Err(format!("{n} clients")),
        }
    });
    assert_eq!(
        counted(&tally, "tally_ws_refused_total{reason=\"binary\"}"),
        1
    );
    assert_eq!(
        counted(
            &tally,
            "tally_ws_refused_total{reason=\"bad_subscription\"}"
        ),
        4
    );
    assert_eq!(
        counted(&tally, "tally_ws_refused_total{reason=\"unreadable\"}"),
        4
    );
}

#[test]
fn subscriptions_per_connection_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[("TALLY__LIVE__MAX_SUBSCRIPTIONS", "3")], &[]);
    let mut socket = connect(&tally);
    let mut ask = |topic: String| -> Value {
        let request = json!({"action": "subscribe", "topic": topic});
        socket.send(Message::text(request.to_string())).unwrap();
        wait_for(&mut socket, Duration::from_secs(5), |m| {
            m.get("subscribed").is_some() || m.get("error").is_some()
        })
    };
    let topic = |i: usize| format!("metrics:ad_clicks:campaignId:c{i}");
    for i in 0..3 {
        assert_eq!(ask(topic(i))["subscribed"], topic(i));
    }
    let refused = ask(topic(3));
    assert_eq!(refused["topic"], topic(3), "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("at most 3 subscriptions"),
        "{refused}"
    );
    // Asking again for one already held takes no new place.
    assert_eq!(ask(topic(0))["subscribed"], topic(0));
    assert_eq!(
        counted(
            &tally,
            "tally_ws_refused_total{reason=\"too_many_subscriptions\"}"
        ),
        1
    );
    // Another connection has places of its own.
    let mut other = connect(&tally);
    let request = json!({"action": "subscribe", "topic": topic(3)});
    other.send(Message::text(request.to_string())).unwrap();
    let ack = wait_for(&mut other, Duration::from_secs(5), |m| {
        m.get("subscribed").is_some() || m.get("error").is_some()
    });
    assert_eq!(ack["subscribed"], topic(3), "{ack}");
}

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
    let address = first.address().to_owned();
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
