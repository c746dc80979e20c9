//! The ingest key is public, so every byte on the capture routes is hostile. Each hostile body is
//! sent with the key in the body, in the header, and with no key, on the SDK (direct) and the
//! browser (routed) path, and gets its documented answer; the api stays up; and a worker storing
//! what was accepted, boundary values included, leaves the dead-letter stream empty: nothing the
//! api accepts is something the worker cannot store. Real Redis and Postgres.

mod common;

use std::{
    io::{Read, Write},
    time::Duration,
};

use api::ingest::limits::{
    MAX_EVENT_NAME_CHARS, MAX_PROPERTIES_DEPTH, MAX_PROPERTY_KEY_CHARS, MAX_SESSION_ID_CHARS,
};
use common::{INGEST_KEY, RequestExt, SECRET, TestApp, test_config, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};

const MAX_EVENT_BYTES: usize = 64 * 1024;
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Where the key goes.
#[derive(Debug, Clone, Copy)]
enum Key {
    Body,
    Header,
    None,
}

/// A hostile body and what it is answered: (status, code, attr) with a key, and without one.
struct Case {
    name: &'static str,
    /// JSON object text without the key; the key is spliced in as the first member.
    body: String,
    with_key: (u16, &'static str, Option<&'static str>),
    without_key: (u16, &'static str),
}

fn case(
    name: &'static str,
    body: impl Into<String>,
    with_key: (u16, &'static str, Option<&'static str>),
    without_key: (u16, &'static str),
) -> Case {
    Case {
        name,
        body: body.into(),
        with_key,
        without_key,
    }
}

fn nested(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

fn cases() -> Vec<Case> {
    let ev = |extra: &str| format!(r#"{{"event": "x", "distinct_id": "u"{extra}}}"#);
    let long = |n: usize| "x".repeat(n);
    let bad_time = (400, "invalid_timestamp");
    let no_key = (401, "not_authenticated");
    vec![
        case(
            "offset that overflowed the clock (used to panic)",
            ev(r#", "offset": 9000000000000000"#),
            (400, "invalid_timestamp", Some("offset")),
            no_key,
        ),
        case(
            "time before 1970",
            ev(r#", "timestamp": "1900-01-01T00:00:00Z""#),
            (bad_time.0, bad_time.1, Some("timestamp")),
            no_key,
        ),
        case(
            "skew correction out of range, second event of a batch",
            format!(
                r#"{{"batch": [{}, {}]}}"#,
                ev(""),
                ev(r#", "timestamp": "0001-01-01T00:00:00Z", "sent_at": "9999-12-31T00:00:00Z""#)
            ),
            (bad_time.0, bad_time.1, Some("batch[1].timestamp")),
            no_key,
        ),
        case(
            "one event over MAX_EVENT_BYTES",
            ev(&format!(
                r#", "properties": {{"blob": "{}"}}"#,
                long(MAX_EVENT_BYTES)
            )),
            (413, "event_too_large", None),
            no_key,
        ),
        case(
            "third event of a batch over MAX_EVENT_BYTES",
            format!(
                r#"{{"batch": [{}, {}, {}]}}"#,
                ev(""),
                ev(""),
                ev(&format!(
                    r#", "properties": {{"blob": "{}"}}"#,
                    long(MAX_EVENT_BYTES)
                ))
            ),
            (413, "event_too_large", Some("batch[2]")),
            no_key,
        ),
        case(
            "event name too long",
            format!(
                r#"{{"event": "{}", "distinct_id": "u"}}"#,
                long(MAX_EVENT_NAME_CHARS + 1)
            ),
            (400, "too_long", Some("event")),
            no_key,
        ),
        case(
            "session id too long",
            ev(&format!(
                r#", "properties": {{"$session_id": "{}"}}"#,
                long(MAX_SESSION_ID_CHARS + 1)
            )),
            (400, "too_long", Some("properties.$session_id")),
            no_key,
        ),
        case(
            "property key too long",
            ev(&format!(
                r#", "properties": {{"a": {{"{}": 1}}}}"#,
                long(MAX_PROPERTY_KEY_CHARS + 1)
            )),
            (400, "too_long", Some("properties")),
            no_key,
        ),
        case(
            "properties one level too deep",
            ev(&format!(
                r#", "properties": {{"d": {}}}"#,
                nested(MAX_PROPERTIES_DEPTH)
            )),
            (400, "too_deep", Some("properties")),
            no_key,
        ),
        case(
            "properties 100,000 levels deep",
            ev(&format!(r#", "properties": {{"d": {}}}"#, nested(100_000))),
            (400, "too_deep", None),
            // Too deep for the JSON reader to find a key in: refused as unreadable, as cheaply.
            (400, "too_deep"),
        ),
        case(
            "a number beyond a double",
            ev(r#", "properties": {"n": 1e400}"#),
            (400, "invalid_json", None),
            (400, "invalid_json"),
        ),
        case(
            "a lone UTF-16 surrogate",
            ev(r#", "properties": {"s": "\ud800"}"#),
            (400, "invalid_json", None),
            (400, "invalid_json"),
        ),
        case(
            "distinct_id too long",
            format!(r#"{{"event": "x", "distinct_id": "{}"}}"#, long(201)),
            (400, "too_long", Some("distinct_id")),
            no_key,
        ),
    ]
}

/// `body` (a JSON object's text) with `"api_key": key` as its first member.
fn with_body_key(body: &str, key: &str) -> String {
    format!(r#"{{"api_key": "{key}", {}"#, &body[1..])
}

fn hostile_config() -> api::Config {
    let mut config = test_config();
    config.max_event_bytes = MAX_EVENT_BYTES;
    config.max_body_bytes = MAX_BODY_BYTES;
    config
}

async fn send(app: &TestApp, path: &str, body: String, key: Key, browser: bool) -> (u16, Value) {
    let body = match key {
        Key::Body => with_body_key(&body, INGEST_KEY),
        Key::Header | Key::None => body,
    };
    let mut req = app.post(path).body(body);
    if let Key::Header = key {
        req = req.key(INGEST_KEY);
    }
    if browser {
        req = req.header("Origin", "https://shop.example.com");
    }
    let resp = req.answer().await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn hostile_bodies_get_their_documented_answer_and_nothing_accepted_is_dead_lettered() {
    let (app, db) = TestApp::spawn_with_db(hostile_config()).await;
    let worker = app.start_worker(&db, "hostile");

    let paths = ["/capture", "/batch/", "/e", "/i/v0/e"];
    for (i, case) in cases().iter().enumerate() {
        for key in [Key::Body, Key::Header, Key::None] {
            let browser = i % 2 == 1;
            let path = paths[i % paths.len()];
            let (status, body) = send(&app, path, case.body.clone(), key, browser).await;
            let what = format!(
                "{} ({key:?} key, {path}, browser: {browser}): {body}",
                case.name
            );
            match key {
                Key::Body | Key::Header => {
                    let (want, code, attr) = case.with_key;
                    assert_eq!(status, want, "{what}");
                    assert_eq!(body["code"], code, "{what}");
                    assert_eq!(body["attr"].as_str(), attr, "{what}");
                }
                Key::None => {
                    let (want, code) = case.without_key;
                    assert_eq!(status, want, "{what}");
                    assert_eq!(body["code"], code, "{what}");
                }
            }
            assert!(body["type"].as_str().is_some(), "{what}");
            assert!(
                body["detail"].as_str().is_some_and(|d| !d.is_empty()),
                "{what}"
            );
        }
    }
    assert_eq!(app.stream_len().await, 0, "nothing hostile was queued");

    // The secret key belongs in the header only.
    let (status, body) = send(
        &app,
        "/capture",
        with_body_key(r#"{"event": "x", "distinct_id": "u"}"#, SECRET),
        Key::None,
        false,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("permission_denied"))
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("X-API-Key header")
    );
    let data = base64_of(&with_body_key(
        r#"{"event": "x", "distinct_id": "u"}"#,
        SECRET,
    ));
    let resp = app.get(&format!("/e/?data={data}")).answer().await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // Values at every bound are accepted, and stored without a dead letter.
    let mut deep = json!("bottom");
    for _ in 0..MAX_PROPERTIES_DEPTH - 1 {
        deep = json!([deep]);
    }
    let long = |n: usize| "y".repeat(n);
    let at_bounds = json!({"api_key": INGEST_KEY, "batch": [
        {"event": long(MAX_EVENT_NAME_CHARS), "distinct_id": "edge_user", "timestamp": "1970-01-01T00:00:00Z",
         "properties": {"$session_id": long(MAX_SESSION_ID_CHARS), long(MAX_PROPERTY_KEY_CHARS): 1,
                        "big": 1e308, "tiny": -1e-300, "nul\u{0}key": "nul\u{0}value"}},
        {"event": "deep", "distinct_id": "edge_user", "properties": {"d": deep}},
        {"event": "far future", "distinct_id": "edge_user", "offset": -1_000_000_000_000i64},
        {"event": "big", "distinct_id": "edge_user", "properties": {"blob": long(MAX_EVENT_BYTES - 400)}},
    ]});
    let (status, body) = send(&app, "/batch", at_bounds.to_string(), Key::None, false).await;
    assert_eq!(status, 200, "{body}");

    // Every accepted event stored, none dead-lettered.
    wait_until(
        Duration::from_secs(30),
        "the events at the bounds stored",
        || async {
            let (status, body) = app.context("edge_user").await;
            status == StatusCode::OK && body["stats"]["event_count"] == 4
        },
    )
    .await;
    assert_eq!(app.dlq_len().await, 0, "nothing accepted was dead-lettered");
    let resp = app.get("/health").answer().await;
    assert_eq!(resp.status(), StatusCode::OK, "the api is alive");
    worker.stop().await;
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE.encode(text)
}

/// A client that writes its whole body before reading (Python's `requests` and `urllib` do)
/// reads the 413, not a reset connection; one that waits for `100 Continue` is answered at once.
#[tokio::test]
async fn a_client_still_writing_an_oversized_body_reads_the_413() {
    let app = TestApp::spawn_with(hostile_config()).await;
    let addr = app.addr;
    let size = 25 * MAX_BODY_BYTES;
    let key = format!("X-API-Key: {INGEST_KEY}");
    for framing in [
        format!("Content-Length: {size}\r\n\r\n"),
        format!("Transfer-Encoding: chunked\r\n\r\n{size:x}\r\n"),
    ] {
        let head = format!("POST /capture HTTP/1.1\r\nHost: x\r\n{key}\r\n{framing}");
        let chunked = framing.starts_with("Transfer");
        let answer = exchange(addr, head, move |conn| {
            conn.write_all(&vec![b'x'; size])
                .expect("the whole body is written, not refused midway");
            if chunked {
                conn.write_all(b"\r\n0\r\n\r\n").unwrap();
            }
        })
        .await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("payload_too_large"), "{answer}");
    }
    // Waiting for 100 Continue: answered without sending anything.
    let head = format!(
        "POST /capture HTTP/1.1\r\nHost: x\r\n{key}\r\nExpect: 100-continue\r\nContent-Length: {size}\r\n\r\n"
    );
    let answer = exchange(addr, head, |_| {}).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

/// Over a plain blocking socket, as a simple client does: writes `head`, then what `write`
/// writes, then reads the beginning of the answer.
async fn exchange(
    addr: std::net::SocketAddr,
    head: String,
    write: impl FnOnce(&mut std::net::TcpStream) + Send + 'static,
) -> String {
    tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        conn.write_all(head.as_bytes()).unwrap();
        write(&mut conn);
        let mut answer = vec![0; 4096];
        let n = conn.read(&mut answer).unwrap();
        String::from_utf8_lossy(&answer[..n]).to_string()
    })
    .await
    .unwrap()
}

/// Past INGEST_MAX_INFLIGHT_BYTES ingest answers 503 with Retry-After, and takes requests again
/// once the bytes are given back.
#[tokio::test]
async fn bytes_in_flight_are_bounded() {
    let mut config = test_config();
    config.max_body_bytes = 40_000;
    config.ingest_max_inflight_bytes = 40_000;
    let app = TestApp::spawn_with(config).await;
    // 30 KB of events: their envelopes (with uuids and times) pass the 40,000 bytes with the body.
    let events: Vec<Value> = (0..100)
        .map(|i| json!({"event": "e", "distinct_id": format!("u{i}"), "properties": {"p": "z".repeat(250)}}))
        .collect();
    let body = json!({"api_key": INGEST_KEY, "batch": events}).to_string();
    assert!(body.len() < 40_000 && body.len() > 25_000);
    for browser in [false, true] {
        let (status, answer) = send(&app, "/batch", body.clone(), Key::None, browser).await;
        assert_eq!(status, 503, "{answer}");
        assert_eq!(answer["code"], "ingest_busy");
    }
    let resp = app.post("/batch").body(body.clone()).answer().await;
    assert_eq!(resp.headers()["retry-after"], "1");
    // A smaller request fits: the refused ones gave their bytes back.
    let small = json!({"api_key": INGEST_KEY, "event": "e", "distinct_id": "u"}).to_string();
    let (status, _) = send(&app, "/capture", small, Key::None, false).await;
    assert_eq!(status, 200);
    assert_eq!(app.stream_len().await, 1);
}

/// Unknown methods share one metrics label (a client may send any token as a method).
#[tokio::test]
async fn unknown_methods_do_not_grow_the_metric_series() {
    let app = TestApp::spawn().await;
    for method in ["BREW", "PROPFIND", "X-ANYTHING"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = app.http.request(method, app.url("/capture")).answer().await;
        assert!(resp.status().is_client_error());
    }
    let metrics = app.metrics().await;
    assert!(metrics.contains(r#"method="other""#), "{metrics}");
    for method in ["BREW", "PROPFIND", "X-ANYTHING"] {
        assert!(!metrics.contains(method), "{method} is a label: {metrics}");
    }
}
