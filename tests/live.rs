//! `GET /v1/live`: a WebSocket client sees partials, then the final value,
//! then a revision when a late event arrives.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use tally_dataflow::time::{now_ms, parse_rfc3339};

use crate::util::{at, base_ms, Tally};

pub type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

pub fn connect(tally: &Tally) -> Socket {
    let url = format!("{}/v1/live", tally.url.replace("http://", "ws://"));
    let (socket, _) = tungstenite::connect(url).expect("WebSocket handshake");
    if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
    socket
}

/// Reads frames until one satisfies `want`, or fails after `timeout`.
#[track_caller]
pub fn wait_for(
    socket: &mut Socket,
    timeout: Duration,
    mut want: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match socket.read() {
            Ok(Message::Text(text)) => {
                let message: Value = serde_json::from_str(&text).unwrap();
                if want(&message) {
                    return message;
                }
                seen.push(message);
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("WebSocket failed: {e}"),
        }
    }
    panic!("no wanted message within {timeout:?}; saw {seen:#?}");
}

#[test]
fn a_revision_after_a_restart_shows_the_whole_window() {
    let dir = tempfile::tempdir().unwrap();
    let lateness = [("TALLY__DATAFLOW__ALLOWED_LATENESS", "5m")];
    let tally = Tally::start(dir.path(), &lateness, &[]);
    let click = |seconds: i64, country: &str| json!({"eventType": "ad_click", "timestamp": (base_ms() / 1000 + seconds), "dimensions": {"country": country, "campaignId": "c"}});
    tally.post_events(&[click(31, "US"), click(32, "DE"), click(33, "DE")]);
    // Event time passes 50 s: the window at 30 s closes, and a checkpoint
    // holds it closed, so the restarted job does not send it again.
    tally.flush(base_ms() + 55_000);
    crate::util::eventually(Duration::from_secs(30), || {
        match tally.prometheus("tally_checkpoint_boundary_seconds") {
            Some(b) if b as i64 * 1000 >= base_ms() + 50_000 => Ok(()),
            b => Err(format!("checkpoint boundary {b:?}")),
        }
    });
    tally.stop();

    // After the restart, a late event for one group revises the window:
    // its value is the whole window's, not that group's alone.
    let tally = Tally::start(dir.path(), &lateness, &[]);
    let mut socket = connect(&tally);
    let subscribe =
        json!({"action": "subscribe", "topic": "metrics:ad_clicks", "window": "tumbling 10s"});
    socket.send(Message::text(subscribe.to_string())).unwrap();
    wait_for(&mut socket, Duration::from_secs(5), |m| {
        m["subscribed"].is_string()
    });
    tally.post_events(&[click(35, "US")]);
    let revised = wait_for(&mut socket, Duration::from_secs(15), |m| {
        m["windowStart"] == at(30_000) && m["revision"] == 1
    });
    assert_eq!(revised["value"], 4, "{revised}");
}

#[test]
fn partials_then_final_then_revision() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[("TALLY__LIVE__INTERVAL", "200ms")], &[]);
    let mut socket = connect(&tally);
    let subscribe = json!({"action": "subscribe", "topic": "metrics:ad_clicks:country:US", "window": "tumbling 10s"});
    socket.send(Message::text(subscribe.to_string())).unwrap();

    let click = |seconds: i64, country: &str| json!({"eventType": "ad_click", "timestamp": (base_ms() / 1000 + seconds), "dimensions": {"country": country, "campaignId": "c"}});
    let window_start = at(30_000);
    let posted = now_ms();
    tally.post_events(&[
        click(31, "US"),
        click(32, "US"),
        click(33, "DE"),
        click(34, "US"),
    ]);
    let partial = wait_for(&mut socket, Duration::from_secs(10), |m| {
        m["windowStart"] == window_start && m["value"] == 3
    });
    assert_eq!(partial["final"], false, "{partial}");
    // Its freshness: when tally took the batch, after the POST was sent and
    // before the partial arrived.
    let ingested = partial["ingestedAt"].as_str().and_then(parse_rfc3339);
    assert!(
        ingested.is_some_and(|at| posted <= at && at <= now_ms()),
        "posted at {posted}: {partial}"
    );
    assert!(
        tally.prometheus("tally_live_freshness_seconds_count") > Some(0),
        "the hub counts each partial's freshness"
    );
    assert_eq!(partial["topic"], "metrics:ad_clicks:country:US");
    assert_eq!(partial["windowEnd"], at(40_000).as_str());

    // Every partition's watermark passes 10:00:43: the window closes.
    tally.flush(base_ms() + 45_000);
    let fin = wait_for(&mut socket, Duration::from_secs(10), |m| {
        m["windowStart"] == window_start && m["final"] == true
    });
    assert_eq!(
        (fin["value"].as_u64(), fin["revision"].as_u64()),
        (Some(3), Some(0)),
        "{fin}"
    );

    // A late event within the allowed lateness revises it, once event time
    // moves on or, as here, every partition has been idle for 5 s.
    tally.post_events(&[click(35, "US")]);
    let revised = wait_for(&mut socket, Duration::from_secs(15), |m| {
        m["windowStart"] == window_start && m["revision"] == 1
    });
    assert_eq!(
        (revised["value"].as_u64(), revised["final"].as_bool()),
        (Some(4), Some(true)),
        "{revised}"
    );

    // A new subscriber first gets the current value.
    let mut late_comer = connect(&tally);
    let subscribe =
        json!({"action": "subscribe", "topic": "metrics:ad_clicks", "window": "tumbling 10s"});
    late_comer
        .send(Message::text(subscribe.to_string()))
        .unwrap();
    let current = wait_for(&mut late_comer, Duration::from_secs(5), |m| {
        m["topic"] == "metrics:ad_clicks"
    });
    assert!(current["value"].is_number(), "{current}");

    // A bad topic gets an error, and the connection stays usable.
    late_comer
        .send(Message::text(
            json!({"action": "subscribe", "topic": "metrics:nope"}).to_string(),
        ))
        .unwrap();
    let error = wait_for(&mut late_comer, Duration::from_secs(5), |m| {
        m.get("error").is_some()
    });
    assert!(
        error["error"].as_str().unwrap().contains("unknown metric"),
        "{error}"
    );

    let stored = tally.metrics(&format!(
        "metric=ad_clicks&country=US&resolution=10s&start={}&end={}",
        at(30_000),
        at(40_000)
    ));
    assert_eq!(stored["dataPoints"][0]["value"], 4);
}

#[test]
fn too_late_events_go_to_the_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    tally.flush(base_ms() + 120_000);
    // Every partition's watermark is at 1:58; 30 s of lateness reaches back
    // to 1:28. An event at 0:10 is far past that.
    let late =
        json!({"eventId": "late_1", "eventType": "ad_click", "timestamp": base_ms() / 1000 + 10});
    tally.post_events(&[late]);
    let letters = crate::util::eventually(Duration::from_secs(10), || {
        let (status, body) = tally.get("/v1/deadletters?limit=5");
        assert_eq!(status, 200, "{body}");
        let letters = body["deadLetters"].as_array().unwrap().clone();
        if letters.is_empty() {
            Err("no dead letters yet".to_string())
        } else {
            Ok(letters)
        }
    });
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["event"]["eventId"], "late_1");
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("allowed lateness"),
        "{}",
        letters[0]
    );
    let (_, metrics) = tally.get("/metrics");
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("tally_dead_letters_total 1"),
        "{metrics}"
    );
    let (status, body) = tally.get("/v1/deadletters?limit=0");
    assert_eq!(status, 400, "{body}");
}

#[test]
fn what_is_not_a_websocket_is_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    let (status, body) = tally.get("/v1/live");
    assert_eq!(status, 426, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("WebSocket"),
        "{body}"
    );

    // Handshakes as other clients write them. The key and its answer are
    // RFC 6455's example.
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let accepted = handshake(
        &tally,
        &format!("Connection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\nSec-WebSocket-Version: 13\r\n{key}"),
    );
    assert!(accepted.starts_with("HTTP/1.1 101"), "{accepted}");
    assert!(
        accepted.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{accepted}"
    );
    let old_version = handshake(
        &tally,
        &format!("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\n{key}"),
    );
    assert!(old_version.starts_with("HTTP/1.1 426"), "{old_version}");
    assert!(
        old_version.contains("sec-websocket-version: 13"),
        "{old_version}"
    );
    let no_key = handshake(
        &tally,
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
    );
    assert!(no_key.starts_with("HTTP/1.1 400"), "{no_key}");

    // A message up to 64 KiB is read and answered; a larger one closes that
    // connection.
    let mut socket = connect(&tally);
    let long = json!({"action": "subscribe", "topic": "x".repeat(60_000)});
    socket.send(Message::text(long.to_string())).unwrap();
    let error = wait_for(&mut socket, Duration::from_secs(5), |m| {
        m.get("error").is_some()
    });
    assert!(
        error["error"].as_str().unwrap().contains("a topic is"),
        "{error}"
    );
    let mut greedy = connect(&tally);
    let huge = json!({"action": "subscribe", "topic": "x".repeat(100_000)});
    let _ = greedy.send(Message::text(huge.to_string()));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match greedy.read() {
            Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => break,
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                assert!(Instant::now() < deadline, "the connection stayed open");
            }
            Err(tungstenite::Error::Protocol(_) | tungstenite::Error::Io(_)) => break,
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            other => panic!("expected the connection to close, got {other:?}"),
        }
    }
    // The server let it go, and still serves the other.
    crate::util::eventually(Duration::from_secs(5), || {
        let (_, metrics) = tally.get("/metrics");
        let metrics = metrics.as_str().unwrap().to_owned();
        if metrics.contains("tally_ws_clients 1\n") {
            Ok(())
        } else {
            Err(metrics)
        }
    });
    let subscribe = json!({"action": "subscribe", "topic": "metrics:nope"});
    socket.send(Message::text(subscribe.to_string())).unwrap();
    let error = wait_for(&mut socket, Duration::from_secs(5), |m| {
        m.get("error").is_some()
    });
    assert!(
        error["error"].as_str().unwrap().contains("unknown metric"),
        "{error}"
    );
}

/// Sends a `GET /v1/live` with `headers` by hand, and returns the response's
/// head, with header names in lower case.
fn handshake(tally: &Tally, headers: &str) -> String {
    let address = tally.address();
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET /v1/live HTTP/1.1\r\nHost: {address}\r\n{headers}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    String::from_utf8(head)
        .unwrap()
        .lines()
        .map(|line| match line.split_once(':') {
            Some((name, value)) => format!("{}:{value}", name.to_lowercase()),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_client_that_stops_reading_is_dropped_for_a_full_queue_and_the_others_keep_up() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[("TALLY__LIVE__INTERVAL", "50ms")], &[]);
    let mut healthy = connect(&tally);
    let subscribe = json!({"action": "subscribe", "topic": "metrics:ad_clicks"});
    healthy.send(Message::text(subscribe.to_string())).unwrap();

    // A client with a small receive buffer that never reads, subscribed to
    // a value per campaign: 10 changes every 50 ms, one update in its queue
    // each time, so its queue of 50 fills only once the kernel stops taking
    // its messages.
    let address: std::net::SocketAddr = tally.address().parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&address.into()).unwrap();
    let (mut stalled, _) = tungstenite::client(
        format!("ws://{address}/v1/live"),
        MaybeTlsStream::Plain(TcpStream::from(socket)),
    )
    .unwrap();
    let subscribe =
        json!({"action": "subscribe", "topic": "metrics:ad_clicks", "groupBy": "campaignId"});
    stalled.send(Message::text(subscribe.to_string())).unwrap();

    let _poster = Poster::start(&tally.url, 10);
    let dropped = || {
        tally
            .prometheus("tally_ws_slow_clients_dropped_total")
            .expect("the drop counter in /metrics")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = 0;
    while dropped() == 0 && Instant::now() < deadline {
        let message = wait_for(&mut healthy, Duration::from_secs(5), |m| {
            m["value"].is_number()
        });
        last = message["value"].as_u64().unwrap();
    }
    assert_eq!(
        dropped(),
        1,
        "the stalled client was not dropped for a full queue"
    );

    // What it can still read is what the kernel held for it and its queue of
    // 50, then why it was dropped: tens of kilobytes, not the megabytes an
    // autotuned socket buffer takes over loopback.
    if let MaybeTlsStream::Plain(stream) = stalled.get_ref() {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
    }
    let mut bytes = 0;
    let close = loop {
        match stalled.read() {
            Ok(Message::Text(text)) => bytes += text.len(),
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("expected a close frame after {bytes} bytes: {e}"),
        }
    };
    assert_eq!(
        close.map(|f| u16::from(f.code)),
        Some(1008),
        "after {bytes} bytes"
    );
    assert!(
        bytes < 256 * 1024,
        "the stalled client was sent {bytes} bytes"
    );

    // The healthy client keeps getting new values.
    wait_for(&mut healthy, Duration::from_secs(5), |m| {
        m["value"].as_u64().is_some_and(|v| v > last)
    });
    assert_eq!(dropped(), 1);
}

/// Posts one event per campaign for `campaigns` campaigns, in one window,
/// every 50 ms, until dropped.
struct Poster {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poster {
    fn start(url: &str, campaigns: usize) -> Poster {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let events: Vec<Value> = (0..campaigns)
            .map(|c| json!({"eventType": "ad_click", "timestamp": base_ms() / 1000 + 31, "dimensions": {"country": "US", "campaignId": format!("c{c}")}}))
            .collect();
        let (url, stopped) = (format!("{url}/v1/events"), stop.clone());
        let thread = std::thread::spawn(move || {
            let agent = ureq::Agent::new_with_defaults();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = agent.post(&url).send_json(&events);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Poster {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Poster {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The messages a new subscriber to `metrics:ad_clicks` (tumbling 10s) gets
/// with its acknowledgement: one per window the hub still holds.
pub fn current_values(tally: &Tally) -> Vec<Value> {
    let mut socket = connect(tally);
    let subscribe =
        json!({"action": "subscribe", "topic": "metrics:ad_clicks", "window": "tumbling 10s"});
    socket.send(Message::text(subscribe.to_string())).unwrap();
    wait_for(&mut socket, Duration::from_secs(5), |m| {
        m.get("subscribed").is_some()
    });
    let mut current = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(600);
    while Instant::now() < deadline {
        if let Ok(Message::Text(text)) = socket.read() {
            current.push(serde_json::from_str(&text).unwrap());
        }
    }
    current
}

#[test]
fn a_metric_whose_events_stop_is_forgotten_once_no_event_can_revise_it() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[], &[]);
    let click = json!({"eventType": "ad_click", "timestamp": base_ms() + 5_000, "dimensions": {"campaignId": "c"}});
    tally.post_events(&[click]);
    // Events of another type only: ad_clicks gets no newer window. The
    // watermark passes 10:00:10 and then the window's lateness (32 s).
    tally.flush(base_ms() + 20_000);
    crate::util::eventually(Duration::from_secs(10), || {
        let current = current_values(&tally);
        match current.as_slice() {
            [final_value] if final_value["final"] == true => Ok(()),
            other => Err(format!("want the closed window's final, got {other:?}")),
        }
    });
    tally.flush(base_ms() + 45_000);
    crate::util::eventually(Duration::from_secs(10), || {
        let current = current_values(&tally);
        if current.is_empty() {
            Ok(())
        } else {
            Err(format!("the hub still holds {current:?}"))
        }
    });
}
