//! `GET /v1/openapi.json` is true to the running server: every documented
//! route answers, right and wrong, with a documented status, and a body
//! that its documented schema accepts.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::util::{base_ms, keyed_config, request, Answer, Tally, ADMIN, READ, WRITE};

/// Checks `answer` to `method path` against the document: its status is
/// documented, a JSON body fits the status's schema, and documented
/// required headers are there.
fn conforms(doc: &Value, method: &str, path: &str, answer: &Answer) {
    let operation = &doc["paths"][path][method];
    assert!(operation.is_object(), "{method} {path} is not documented");
    let status = answer.status.to_string();
    let mut response = &operation["responses"][&status];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which is not documented: {}",
        answer.body
    );
    if let Some(reference) = response["$ref"].as_str() {
        response = resolve(doc, reference);
    }
    if let Some(headers) = response["headers"].as_object() {
        for (name, header) in headers {
            if header["required"] == true {
                assert!(
                    answer.headers.contains_key(name.as_str()),
                    "{method} {path} {status} lacks {name}"
                );
            }
        }
    }
    let Some(schema) = response["content"]["application/json"]["schema"].as_object() else {
        return;
    };
    // The schema, with the document's components beside it for its refs.
    let mut root = Value::Object(schema.clone());
    root["components"] = doc["components"].clone();
    let validator = jsonschema::draft202012::new(&root)
        .unwrap_or_else(|e| panic!("the schema of {method} {path} {status}: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(&answer.body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} does not fit its schema: {errors:?}\n{}",
        answer.body
    );
}

fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference.strip_prefix('#').expect("a local reference");
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("{reference} is not in the document"))
}

#[test]
fn the_openapi_document_is_true_to_the_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let config = keyed_config(dir.path());
    let tally = Tally::start_with_config(
        dir.path(),
        &config,
        &[("TALLY_TEST_READ_SECRET", READ)],
        &[],
    );
    let doc = request("GET", &format!("{}/v1/openapi.json", tally.url), &[], None).body;
    assert_eq!(doc["openapi"], "3.1.0");
    let (write, read, admin) = (
        format!("Bearer {WRITE}"),
        format!("Bearer {READ}"),
        format!("Bearer {ADMIN}"),
    );
    let auth = |key: &str| [("authorization", key.to_owned())];
    let at = base_ms();
    let event = json!({"eventType": "ad_click", "timestamp": at, "dimensions": {"campaignId": "c1", "country": "US"}});
    let clicks = |n: usize| json!((0..n).map(|_| event.clone()).collect::<Vec<_>>());
    let late = json!({"eventType": "ad_click", "timestamp": at - 3_600_000});

    // (method, path, request path, headers, body, expected status)
    type Case<'a> = (
        &'a str,
        &'a str,
        String,
        Vec<(&'a str, String)>,
        Option<Value>,
        u16,
    );
    let history = "/v1/metrics?metric=ad_clicks&resolution=1m";
    let cases: Vec<Case> = vec![
        // The writer's whole bucket, then as much again at once.
        (
            "post",
            "/v1/events",
            "/v1/events".into(),
            auth(&write).to_vec(),
            Some(clicks(10)),
            202,
        ),
        (
            "post",
            "/v1/events",
            "/v1/events".into(),
            auth(&write).to_vec(),
            Some(clicks(10)),
            429,
        ),
        (
            "post",
            "/v1/events",
            "/v1/events".into(),
            auth(&write).to_vec(),
            Some(json!([{"eventType": 5}])),
            400,
        ),
        (
            "post",
            "/v1/events",
            "/v1/events".into(),
            vec![],
            Some(json!(event)),
            401,
        ),
        (
            "post",
            "/v1/events",
            "/v1/events".into(),
            auth(&read).to_vec(),
            Some(json!(event)),
            403,
        ),
        (
            "post",
            "/v1/events",
            "/v1/events".into(),
            auth(&write).to_vec(),
            Some(clicks(11)),
            413,
        ),
        (
            "post",
            "/v1/events",
            "/v1/events".into(),
            auth(&admin).to_vec(),
            Some(json!(late)),
            202,
        ),
        (
            "get",
            "/v1/metrics",
            history.into(),
            auth(&read).to_vec(),
            None,
            200,
        ),
        (
            "get",
            "/v1/metrics",
            format!("{history}&groupBy=country&campaignId=c1"),
            auth(&read).to_vec(),
            None,
            200,
        ),
        (
            "get",
            "/v1/metrics",
            format!("{history}&access_token={READ}"),
            vec![],
            None,
            200,
        ),
        (
            "get",
            "/v1/metrics",
            "/v1/metrics?metric=nope".into(),
            auth(&read).to_vec(),
            None,
            400,
        ),
        ("get", "/v1/metrics", history.into(), vec![], None, 401),
        (
            "get",
            "/v1/metrics",
            history.into(),
            auth(&write).to_vec(),
            None,
            403,
        ),
        (
            "get",
            "/v1/catalog",
            "/v1/catalog".into(),
            auth(&read).to_vec(),
            None,
            200,
        ),
        (
            "get",
            "/v1/catalog",
            "/v1/catalog".into(),
            vec![],
            None,
            401,
        ),
        (
            "get",
            "/v1/catalog",
            "/v1/catalog".into(),
            auth(&write).to_vec(),
            None,
            403,
        ),
        (
            "get",
            "/v1/deadletters",
            "/v1/deadletters?limit=5".into(),
            auth(&admin).to_vec(),
            None,
            200,
        ),
        (
            "get",
            "/v1/deadletters",
            "/v1/deadletters?limit=0".into(),
            auth(&admin).to_vec(),
            None,
            400,
        ),
        (
            "get",
            "/v1/deadletters",
            "/v1/deadletters".into(),
            vec![],
            None,
            401,
        ),
        (
            "get",
            "/v1/deadletters",
            "/v1/deadletters".into(),
            auth(&read).to_vec(),
            None,
            403,
        ),
        (
            "get",
            "/v1/live",
            "/v1/live".into(),
            auth(&read).to_vec(),
            None,
            426,
        ),
        ("get", "/v1/live", "/v1/live".into(), vec![], None, 401),
        (
            "get",
            "/v1/live",
            "/v1/live".into(),
            auth(&write).to_vec(),
            None,
            403,
        ),
        (
            "get",
            "/v1/openapi.json",
            "/v1/openapi.json".into(),
            vec![],
            None,
            200,
        ),
        (
            "get",
            "/metrics",
            "/metrics".into(),
            auth(&admin).to_vec(),
            None,
            200,
        ),
        ("get", "/metrics", "/metrics".into(), vec![], None, 401),
        (
            "get",
            "/metrics",
            "/metrics".into(),
            auth(&read).to_vec(),
            None,
            403,
        ),
        ("get", "/healthz", "/healthz".into(), vec![], None, 200),
        ("get", "/readyz", "/readyz".into(), vec![], None, 200),
    ];
    let mut seen = BTreeSet::new();
    for (method, path, target, headers, body, expected) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let answer = request(
            &method.to_uppercase(),
            &format!("{}{target}", tally.url),
            &headers,
            body.as_ref(),
        );
        assert_eq!(
            answer.status, *expected,
            "{method} {target} answered {}",
            answer.body
        );
        conforms(&doc, method, path, &answer);
        seen.insert((method.to_string(), path.to_string()));
    }

    // Every documented operation was tried, and every route the server
    // lists at /v1 is documented.
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, operations)| {
            operations
                .as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    assert_eq!(documented, seen);
    let index = request("GET", &format!("{}/v1", tally.url), &[], None).body;
    for route in index["endpoints"].as_object().unwrap().keys() {
        let (method, path) = route.split_once(' ').unwrap();
        if path == "/" || path == "/sdk/tally.js" {
            continue;
        }
        assert!(
            documented.contains(&(method.to_lowercase(), path.to_owned())),
            "{route} is not in the document"
        );
    }
}
