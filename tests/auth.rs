//! Keys, scopes, rate limits and origins, as a client meets them.

use std::process::{Command, Stdio};

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::Message;

use crate::util::{default_config, keyed_config, request, Tally, ADMIN, APP, READ, WRITE};

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

fn clicks(n: usize) -> Value {
    json!((0..n)
        .map(|_| json!({"eventType": "ad_click", "dimensions": {"campaignId": "c1"}}))
        .collect::<Vec<_>>())
}

#[test]
fn keys_scopes_and_rate_limits_guard_every_route_but_health_and_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let config = keyed_config(dir.path());
    let tally = Tally::start_with_config(
        dir.path(),
        &config,
        &[
            ("TALLY_TEST_READ_SECRET", READ),
            ("TALLY__SERVER__ALLOWED_ORIGINS", &format!("[\"{APP}\"]")),
        ],
        &[],
    );
    let url = |path: &str| format!("{}{path}", tally.url);
    let events = url("/v1/events");

    // No key, an unknown one, and one without the scope.
    let none = request("POST", &events, &[], Some(&clicks(1)));
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(none.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    assert!(none.body["error"]
        .as_str()
        .unwrap()
        .contains("Authorization"));
    let unknown = request(
        "POST",
        &events,
        &[("authorization", &bearer("nope_0123456789abcdef"))],
        Some(&clicks(1)),
    );
    assert_eq!(unknown.status, 401);
    let read = request(
        "POST",
        &events,
        &[("authorization", &bearer(READ))],
        Some(&clicks(1)),
    );
    assert_eq!(read.status, 403, "{}", read.body);

    // The writer's bucket: 8 of its 10 go in, 8 more are refused whole,
    // and more than the bucket holds is refused as too large.
    let write = [("authorization", bearer(WRITE))];
    let write = [(write[0].0, write[0].1.as_str())];
    let first = request("POST", &events, &write, Some(&clicks(8)));
    assert_eq!(first.status, 202, "{}", first.body);
    let over = request("POST", &events, &write, Some(&clicks(8)));
    assert_eq!(over.status, 429, "{}", over.body);
    let retry: u64 = over.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    let huge = request("POST", &events, &write, Some(&clicks(11)));
    assert_eq!(huge.status, 413, "{}", huge.body);

    // Reading: the header, or the query for a browser; the token is not
    // taken for a dimension.
    let history = "/v1/metrics?metric=ad_clicks&campaignId=c1";
    let by_query = request(
        "GET",
        &url(&format!("{history}&access_token={READ}")),
        &[],
        None,
    );
    assert_eq!(by_query.status, 200, "{}", by_query.body);
    let by_writer = request("GET", &url(history), &write, None);
    assert_eq!(by_writer.status, 403);
    let catalog = request("GET", &url("/v1/catalog"), &[], None);
    assert_eq!(catalog.status, 401);

    // Dead letters and /metrics are the admin's.
    let read = [("authorization", bearer(READ))];
    let read = [(read[0].0, read[0].1.as_str())];
    assert_eq!(
        request("GET", &url("/v1/deadletters"), &read, None).status,
        403
    );
    let admin = [("authorization", bearer(ADMIN))];
    let admin = [(admin[0].0, admin[0].1.as_str())];
    assert_eq!(
        request("GET", &url("/v1/deadletters"), &admin, None).status,
        200
    );
    assert_eq!(request("GET", &url("/metrics"), &[], None).status, 401);
    let metrics = request("GET", &url("/metrics"), &admin, None);
    assert_eq!(metrics.status, 200);
    let text = metrics.body.as_str().unwrap().to_owned();
    // Only the first 8 events were accepted.
    assert!(text.contains("tally_events_accepted_total 8"), "{text}");
    for refused in [
        r#"tally_auth_refused_total{key="",reason="missing"} 3"#,
        r#"tally_auth_refused_total{key="",reason="unknown"} 1"#,
        r#"tally_auth_refused_total{key="dashboard",reason="scope"} 2"#,
        r#"tally_auth_refused_total{key="web-sdk",reason="rate"} 1"#,
        r#"tally_auth_refused_total{key="web-sdk",reason="burst"} 1"#,
    ] {
        assert!(text.contains(refused), "{refused} not in {text}");
    }

    // Open: health and the page, which says what it may load.
    assert_eq!(request("GET", &url("/healthz"), &[], None).status, 200);
    let page = request("GET", &url("/"), &[], None);
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    assert!(page.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));

    // A page of the listed origin may call the API; another may not.
    let preflight = |origin: &str| {
        request(
            "OPTIONS",
            &events,
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
            ],
            None,
        )
    };
    let allowed = preflight(APP);
    assert_eq!(allowed.status, 204);
    assert_eq!(allowed.headers["access-control-allow-origin"], APP);
    assert_eq!(preflight("https://evil.example").status, 403);
    let from_app = request("GET", &url(history), &[read[0], ("origin", APP)], None);
    assert_eq!(from_app.headers["access-control-allow-origin"], APP);

    // The WebSocket: a key in the query, and a page of an allowed origin.
    let live = |query: &str, origin: Option<&str>| {
        let ws = tally.url.replace("http://", "ws://");
        let mut request = format!("{ws}/v1/live{query}")
            .into_client_request()
            .unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", HeaderValue::from_str(origin).unwrap());
        }
        tungstenite::connect(request)
    };
    match live("", None) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("a WebSocket without a key: {:?}", other.map(|_| ())),
    }
    match live(
        &format!("?access_token={READ}"),
        Some("https://evil.example"),
    ) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("a WebSocket from another origin: {:?}", other.map(|_| ())),
    }
    let own = format!("http://{}", tally.address());
    for origin in [Some(APP), Some(own.as_str()), None] {
        let (mut socket, _) = live(&format!("?access_token={READ}"), origin).unwrap();
        let subscribe = json!({"action": "subscribe", "topic": "metrics:ad_clicks"});
        socket.send(Message::text(subscribe.to_string())).unwrap();
        // The server may ping first.
        let ack: Value = loop {
            match socket.read().unwrap() {
                Message::Text(text) => break serde_json::from_str(&text).unwrap(),
                Message::Ping(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(ack["subscribed"], "metrics:ad_clicks", "{ack}");
    }
}

#[test]
fn without_keys_tally_serves_only_on_loopback_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["run", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(default_config())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("not a loopback address") && error.contains("[[auth.keys]]"),
        "{error}"
    );

    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(["run", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(default_config())
        .env("TALLY__AUTH__ALLOW_ANONYMOUS", "true");
    let tally = Tally::launch(command, dir.path());
    let port = tally.address().rsplit(':').next().unwrap().to_owned();
    let health = request(
        "GET",
        &format!("http://127.0.0.1:{port}/healthz"),
        &[],
        None,
    );
    assert_eq!(health.status, 200);
    tally.stop();
}
