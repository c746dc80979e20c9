//! Ingest over HTTP against the real Redis: every body shape and encoding PostHog SDKs send,
//! every error path, and what each 200 left in the stream.

mod common;

use std::io::Write;

use base64::{Engine, engine::general_purpose::STANDARD};
use common::{
    INGEST_KEY, Proxy, RequestExt, SECRET, TestApp, TestDb, WAIT, test_config, wait_until,
};
use flate2::{Compression, write::GzEncoder};
use reqwest::{StatusCode, header::CONTENT_TYPE};
use serde_json::{Value, json};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("x", s)]).unwrap()[2..].to_string()
}

/// A posthog-python style batch of two events with client uuids.
fn sample_batch() -> Value {
    json!({
        "api_key": INGEST_KEY,
        "sent_at": "2026-11-28T10:00:10Z",
        "batch": [
            {"event": "$pageview", "distinct_id": "user_1", "uuid": "0190b5d6-0000-7000-8000-000000000001",
             "timestamp": "2026-11-28T10:00:00Z",
             "properties": {"$current_url": "https://shop.test/pricing", "$pathname": "/pricing", "$session_id": "s1", "$lib": "posthog-python"}},
            {"event": "$autocapture", "distinct_id": "user_1", "uuid": "0190b5d6-0000-7000-8000-000000000002",
             "timestamp": "2026-11-28T10:00:05Z",
             "properties": {"$event_type": "click", "$elements_chain": "button.btn-primary:text=\"Upgrade Plan\""}}
        ]
    })
}

async fn assert_ok(resp: reqwest::Response) {
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, r#"{"status":1}"#);
}

async fn error_of(resp: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(resp.status(), status);
    let body: Value = resp.json().await.unwrap();
    // `attr` is there only when one field is at fault (tests below compare it)
    for field in ["type", "code", "detail"] {
        assert!(
            body.get(field).is_some(),
            "error body lacks {field}: {body}"
        );
    }
    body
}

#[tokio::test]
async fn every_posthog_encoding_lands_the_same_envelopes() {
    let app = TestApp::spawn().await;
    let raw = sample_batch().to_string();
    let gz = gzip(raw.as_bytes());
    let b64 = STANDARD.encode(&raw);
    let gz_b64 = STANDARD.encode(&gz);

    let requests: Vec<(&str, &str, Option<&str>, Vec<u8>)> = vec![
        (
            "json",
            "/batch",
            Some("application/json"),
            raw.clone().into_bytes(),
        ),
        (
            "gzip as text/plain (posthog-js)",
            "/e/?compression=gzip-js&ver=1.200",
            Some("text/plain"),
            gz.clone(),
        ),
        (
            "gzip without any content type",
            "/i/v0/e/",
            None,
            gz.clone(),
        ),
        (
            "base64",
            "/capture",
            Some("text/plain"),
            b64.clone().into_bytes(),
        ),
        (
            "form data= base64",
            "/track/",
            Some("application/x-www-form-urlencoded"),
            format!("data={}", urlencode(&b64)).into_bytes(),
        ),
        (
            "form data= gzip-js",
            "/batch/",
            Some("application/x-www-form-urlencoded"),
            format!("data={}&compression=gzip-js", urlencode(&gz_b64)).into_bytes(),
        ),
    ];
    let mut expected = 0;
    for (name, path, ct, body) in requests {
        let mut req = app.post(path).body(body);
        if let Some(ct) = ct {
            req = req.header(CONTENT_TYPE, ct);
        }
        let resp = req.answer().await;
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "{name}: {}",
            resp.text().await.unwrap()
        );
        expected += 2;
        assert_eq!(app.stream_envelopes().await.len(), expected, "{name}");
    }
    // GET ?data= (legacy beacon)
    let resp = app
        .get(&format!("/e/?data={}", urlencode(&b64)))
        .answer()
        .await;
    assert_ok(resp).await;
    expected += 2;

    let envelopes = app.stream_envelopes().await;
    assert_eq!(envelopes.len(), expected);
    // Every encoding produced the same two events (uuids from the client).
    for pair in envelopes.chunks(2) {
        assert_eq!(
            pair[0].uuid.to_string(),
            "0190b5d6-0000-7000-8000-000000000001"
        );
        assert_eq!(pair[0].event, "$pageview");
        assert_eq!(pair[0].distinct_id, "user_1");
        assert_eq!(pair[0].session_id.as_deref(), Some("s1"));
        assert_eq!(pair[0].lib.as_deref(), Some("posthog-python"));
        assert_eq!(pair[0].properties["$pathname"], "/pricing");
        assert_eq!(
            pair[1].uuid.to_string(),
            "0190b5d6-0000-7000-8000-000000000002"
        );
        // clock skew: event 5 s after the first one, both before sent_at
        assert_eq!((pair[1].timestamp - pair[0].timestamp).num_seconds(), 5);
        assert!(pair[0].timestamp <= pair[0].received_at);
        assert_eq!(
            pair[0].sent_at.unwrap().to_rfc3339(),
            "2026-11-28T10:00:10+00:00"
        );
    }
}

#[tokio::test]
async fn single_event_and_bare_array_shapes() {
    let app = TestApp::spawn().await;
    // posthog-js single event with the key in properties.token
    let single = json!({"event": "$pageview", "properties": {"distinct_id": 12345, "token": INGEST_KEY, "$pathname": "/"}});
    assert_ok(app.post("/capture/").json(&single).answer().await).await;
    // bare array, key in the header
    let array = json!([{"event": "a", "$distinct_id": "u2"}, {"event": "b", "distinct_id": "u3", "offset": 1000}]);
    assert_ok(app.post("/batch").key(SECRET).json(&array).answer().await).await;

    let envs = app.stream_envelopes().await;
    assert_eq!(
        envs.iter()
            .map(|e| e.distinct_id.as_str())
            .collect::<Vec<_>>(),
        ["12345", "u2", "u3"]
    );
    assert_eq!(
        envs[0].uuid.get_version_num(),
        7,
        "generated ids are UUIDv7"
    );
    assert!(envs[2].received_at - envs[2].timestamp >= chrono::Duration::milliseconds(999));
}

#[tokio::test]
async fn webhook_ingest_takes_plain_events_and_posthog_destination_bodies() {
    let app = TestApp::spawn().await;
    let plain = json!({"event": "signup_completed", "distinct_id": "user_9", "properties": {"plan": "pro"}});
    let resp = app.post("/ingest").key(SECRET).json(&plain).answer().await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["queued"], 1);

    let destination = json!({
        "event": {"uuid": "0190b5d6-0000-7000-8000-0000000000aa", "event": "$autocapture", "distinct_id": "user_9",
                  "properties": {"$pathname": "/pricing"}, "elements_chain": "button.btn-primary:text=\"Upgrade Plan\"",
                  "timestamp": "2026-11-28T09:00:00Z", "url": "https://eu.posthog.com/project/1/events/x"},
        "person": {"id": "p-1", "properties": {"email": "ada@example.com", "plan": "free"}, "name": "Ada"}
    });
    let resp = app
        .post("/ingest/")
        .key(INGEST_KEY)
        .json(&destination)
        .answer()
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["uuids"],
        json!(["0190b5d6-0000-7000-8000-0000000000aa"])
    );

    let envs = app.stream_envelopes().await;
    assert_eq!(envs.len(), 2);
    assert_eq!(envs[0].event, "signup_completed");
    assert_eq!(
        envs[1].elements_chain.as_deref(),
        Some("button.btn-primary:text=\"Upgrade Plan\"")
    );
    let person = envs[1].person.as_ref().unwrap();
    assert_eq!(person.id.as_deref(), Some("p-1"));
    assert_eq!(person.properties["email"], "ada@example.com");
    assert_eq!(envs[1].timestamp.to_rfc3339(), "2026-11-28T09:00:00+00:00");
}

#[tokio::test]
async fn auth_errors() {
    let app = TestApp::spawn().await;
    let event = json!({"event": "a", "distinct_id": "u"});
    let e = error_of(
        app.post("/capture").json(&event).answer().await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(e["type"], "authentication_error");
    let e = error_of(
        app.post("/capture")
            .key("wrong")
            .json(&event)
            .answer()
            .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(e["code"], "permission_denied");
    let with_bad_body_key = json!({"event": "a", "distinct_id": "u", "api_key": "wrong"});
    error_of(
        app.post("/e").json(&with_bad_body_key).answer().await,
        StatusCode::FORBIDDEN,
    )
    .await;
    // /ingest wants the header
    error_of(
        app.post("/ingest").json(&event).answer().await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    error_of(
        app.post("/ingest").key("wrong").json(&event).answer().await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert!(app.stream_envelopes().await.is_empty());
}

#[tokio::test]
async fn validation_errors_name_the_field_and_queue_nothing() {
    let app = TestApp::spawn().await;
    let post = |path: &'static str, body: Vec<u8>| {
        app.post(path)
            .key(SECRET)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .answer()
    };
    let cases: Vec<(&str, Vec<u8>, &str, Option<&str>)> = vec![
        (
            "one bad event in a batch",
            json!({"batch": [{"event": "a", "distinct_id": "u"}, {"event": "b", "distinct_id": "u"}, {"event": "c", "distinct_id": "u"}, {"event": "d"}]})
                .to_string()
                .into_bytes(),
            "required",
            Some("batch[3].distinct_id"),
        ),
        ("missing event", br#"{"distinct_id": "u"}"#.to_vec(), "required", Some("event")),
        ("empty event", br#"{"event": "", "distinct_id": "u"}"#.to_vec(), "blank", Some("event")),
        ("distinct_id too long", json!({"event": "a", "distinct_id": "x".repeat(201)}).to_string().into_bytes(), "too_long", Some("distinct_id")),
        ("bad timestamp", br#"{"event": "a", "distinct_id": "u", "timestamp": "last tuesday"}"#.to_vec(), "invalid_timestamp", Some("timestamp")),
        ("bad uuid", br#"{"event": "a", "distinct_id": "u", "uuid": "123"}"#.to_vec(), "invalid_value", Some("uuid")),
        ("properties not an object", br#"{"event": "a", "distinct_id": "u", "properties": 3}"#.to_vec(), "invalid_value", Some("properties")),
        ("NUL in distinct_id", b"{\"event\": \"a\", \"distinct_id\": \"u\\u0000\"}".to_vec(), "invalid_value", Some("distinct_id")),
        ("truncated JSON", br#"{"event": "a", "distinct_id": "#.to_vec(), "invalid_json", None),
        ("invalid UTF-8", b"{\"event\": \"a\xff\xfe\", \"distinct_id\": \"u\"}".to_vec(), "invalid_json", None),
        ("invalid UTF-8 in a field ingest ignores", b"{\"event\": \"a\", \"distinct_id\": \"u\", \"x\": \"\xff\"}".to_vec(), "invalid_json", None),
        ("lone surrogate in properties", br#"{"event": "a", "distinct_id": "u", "properties": {"x": "\ud800"}}"#.to_vec(), "invalid_json", None),
        ("not JSON at all", b"hello there".to_vec(), "invalid_json", None),
        ("broken gzip", vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3], "invalid_gzip", None),
        ("empty body", Vec::new(), "empty_body", None),
        ("scalar JSON", b"[1]".to_vec(), "invalid_value", Some("[0]")),
    ];
    for (name, body, code, attr) in cases {
        let e = error_of(post("/batch", body).await, StatusCode::BAD_REQUEST).await;
        assert_eq!(e["code"], code, "{name}: {e}");
        assert_eq!(e["attr"].as_str(), attr, "{name}: {e}");
        assert_eq!(e["type"], "validation_error", "{name}");
    }
    // the same rules on /ingest
    let e = error_of(
        post(
            "/ingest",
            br#"[{"event": "a", "distinct_id": "u"}, {"event": 5, "distinct_id": "u"}]"#.to_vec(),
        )
        .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["attr"], "[1].event");
    // unsupported compression names the parameter
    let e = error_of(
        app.post("/e?compression=lz64")
            .key(SECRET)
            .body("abc")
            .answer()
            .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["attr"], "compression");
    assert!(
        app.stream_envelopes().await.is_empty(),
        "nothing of a rejected request is queued"
    );
}

#[tokio::test]
async fn nul_bytes_inside_properties_are_accepted_for_the_worker_to_clean() {
    let app = TestApp::spawn().await;
    let body =
        b"{\"event\": \"a\", \"distinct_id\": \"u\", \"properties\": {\"label\": \"x\\u0000y\"}}"
            .to_vec();
    let resp = app.post("/capture").key(SECRET).body(body).answer().await;
    assert_ok(resp).await;
    assert_eq!(
        app.stream_envelopes().await[0].properties["label"],
        "x\u{0}y"
    );
}

#[tokio::test]
async fn oversized_bodies_and_gzip_bombs_get_413() {
    let mut config = test_config();
    config.max_body_bytes = 64 * 1024;
    let app = TestApp::spawn_with(config).await;
    let big =
        json!({"event": "a", "distinct_id": "u", "properties": {"blob": "x".repeat(70 * 1024)}})
            .to_string();
    let e = error_of(
        app.post("/capture")
            .key(SECRET)
            .body(big.clone())
            .answer()
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert_eq!(e["code"], "payload_too_large");
    // small on the wire, huge once inflated
    let bomb = gzip(
        format!(
            "{{\"event\": \"a\", \"distinct_id\": \"u\", \"properties\": {{\"p\": \"{}\"}}}}",
            " ".repeat(8 << 20)
        )
        .as_bytes(),
    );
    assert!(bomb.len() < 64 * 1024);
    let e = error_of(
        app.post("/e")
            .key(SECRET)
            .header(CONTENT_TYPE, "text/plain")
            .body(bomb)
            .answer()
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(
        e["detail"].as_str().unwrap().contains("decompressed"),
        "{e}"
    );
    error_of(
        app.post("/ingest").key(SECRET).body(big).answer().await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(app.stream_envelopes().await.is_empty());
}

/// Posts `body` to `path` and expects 503 `queue_unavailable` with `Retry-After`.
async fn assert_queue_unavailable(app: &TestApp, path: &str, body: &Value) {
    let resp = app.post(path).key(SECRET).json(body).answer().await;
    assert!(resp.headers().get("retry-after").is_some(), "{path}");
    let e = error_of(resp, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(e["code"], "queue_unavailable", "{path}");
}

#[tokio::test]
async fn redis_down_answers_503_with_retry_after() {
    let mut config = test_config();
    config.redis_url = "redis://127.0.0.1:1".into();
    config.redis_timeout = std::time::Duration::from_millis(300);
    let app = TestApp::spawn_with(config).await;
    let event = json!({"event": "a", "distinct_id": "u"});
    for path in ["/capture", "/ingest"] {
        assert_queue_unavailable(&app, path, &event).await;
    }
    let (status, body) = app.ready().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"][0]["name"], "redis");
    assert_eq!(body["checks"][0]["ok"], false);
}

/// Redis answering the append with an error (here: the stream key holds a string) is a 503 like
/// an outage, for one event (a lone XADD) and for several (each XADD's error inside EXEC's reply).
#[tokio::test]
async fn an_append_redis_refuses_answers_503() {
    let app = TestApp::spawn().await;
    let client = redis::Client::open(app.config.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SET")
        .arg(&app.config.queue_name)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let event = json!({"event": "a", "distinct_id": "u"});
    for (path, body) in [
        ("/capture", event.clone()),
        ("/batch", json!([event, event])),
    ] {
        assert_queue_unavailable(&app, path, &body).await;
    }
    let value: String = redis::cmd("GETDEL")
        .arg(&app.config.queue_name)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, "not a stream");
}

#[tokio::test]
async fn backlog_over_the_bound_answers_503_and_queues_nothing() {
    let mut config = test_config();
    config.stream_max_backlog = 5;
    let app = TestApp::spawn_with(config).await;
    app.fill_stream(6).await;
    let event = json!({"event": "a", "distinct_id": "u"});
    // The backlog is sampled every 100 ms: wait (bounded) for the sample to see it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let resp = loop {
        let resp = app.post("/capture").key(SECRET).json(&event).answer().await;
        if resp.status() != StatusCode::OK || tokio::time::Instant::now() > deadline {
            break resp;
        }
    };
    assert_eq!(resp.headers()["retry-after"], "5");
    let e = error_of(resp, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(e["code"], "backlog_full");
    let before = app.stream_len().await;
    let resp = app
        .post("/batch")
        .key(SECRET)
        .json(&json!([event, event]))
        .answer()
        .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        app.stream_len().await,
        before,
        "a refused request adds nothing"
    );
}

#[tokio::test]
async fn cors_is_open_on_capture_routes_only() {
    let app = TestApp::spawn().await;
    let preflight = |path: &str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url(path))
            .header("Origin", "https://shop.test")
            .header("Access-Control-Request-Method", "POST")
            .answer()
    };
    let resp = preflight("/e/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://shop.test"
    );
    let resp = preflight("/ingest").await;
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

/// A capture `POST` without an `Origin` header (an SDK, not a browser) skips the OpenAPI router;
/// with one it goes through the router and CORS. Both answer the same, and queue the same.
#[tokio::test]
async fn capture_posts_answer_the_same_with_and_without_a_browser_origin() {
    let mut config = test_config();
    config.max_body_bytes = 4096;
    let app = TestApp::spawn_with(config).await;
    let event = json!({"event": "$pageview", "distinct_id": "u1", "uuid": "0190b5d6-0000-7000-8000-0000000000a1",
        "timestamp": "2026-11-28T10:00:00Z", "properties": {"$pathname": "/pricing"}});
    let json_body = |v: &Value| v.to_string().into_bytes();
    type Case = (&'static str, Option<&'static str>, Vec<u8>);
    let cases: Vec<Case> = vec![
        ("/capture", Some(SECRET), json_body(&event)),
        ("/batch/", None, json_body(&sample_batch())),
        (
            "/e?compression=gzip-js&ver=1",
            Some(INGEST_KEY),
            gzip(&json_body(&event)),
        ),
        (
            "/i/v0/e?compression=base64",
            Some(SECRET),
            STANDARD.encode(json_body(&event)).into_bytes(),
        ),
        ("/track?compression=zstd", Some(SECRET), json_body(&event)),
        ("/capture", None, json_body(&event)),
        ("/capture", Some("wrong"), json_body(&event)),
        (
            "/batch",
            None,
            json_body(&json!({"api_key": "wrong", "batch": [event]})),
        ),
        (
            "/batch",
            Some(SECRET),
            json_body(&json!({"batch": [event, {"event": "x"}]})),
        ),
        ("/capture", Some(SECRET), b"{\"event\": ".to_vec()),
        ("/capture", Some(SECRET), vec![b' '; 5000]),
    ];
    let send = |path: &'static str, key: Option<&'static str>, body: Vec<u8>, origin: bool| {
        let mut req = app.post(path).body(body);
        if let Some(key) = key {
            req = req.key(key);
        }
        if origin {
            req = req.header("Origin", "https://shop.test");
        }
        req.answer()
    };
    // Less the times taken from the server's clock (`sent_at` skew correction moves `timestamp`).
    let without_server_times = |envelopes: Vec<entity::Envelope>| {
        envelopes
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).unwrap();
                let fields = v.as_object_mut().unwrap();
                fields.remove("received_at");
                if fields.contains_key("sent_at") {
                    fields.remove("timestamp");
                }
                v
            })
            .collect::<Vec<_>>()
    };
    for (path, key, body) in cases {
        let before = app.stream_envelopes().await.len();
        let direct = send(path, key, body.clone(), false).await;
        let (status, retry) = (
            direct.status(),
            direct.headers().get("retry-after").cloned(),
        );
        assert!(
            direct
                .headers()
                .get("access-control-allow-origin")
                .is_none()
        );
        let direct_body = direct.text().await.unwrap();
        let queued = without_server_times(app.stream_envelopes().await.split_off(before));
        let routed = send(path, key, body, true).await;
        assert_eq!(routed.status(), status, "{path} {key:?}: {direct_body}");
        assert_eq!(
            routed.headers().get("retry-after").cloned(),
            retry,
            "{path}"
        );
        assert_eq!(
            routed.headers()["access-control-allow-origin"],
            "https://shop.test",
            "{path}"
        );
        assert_eq!(routed.text().await.unwrap(), direct_body, "{path} {key:?}");
        let both = app.stream_envelopes().await.split_off(before);
        let routed_queued = without_server_times(both).split_off(queued.len());
        if status == StatusCode::OK {
            assert!(!queued.is_empty(), "{path}");
        } else {
            assert!(queued.is_empty(), "{path}: {direct_body}");
        }
        assert_eq!(routed_queued, queued, "{path}");
    }
}

#[tokio::test]
async fn health_ready_docs_and_json_errors_for_unknown_routes() {
    let app = TestApp::spawn().await;
    let health: Value = app.get("/health").answer_json().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(app.ready().await.0, StatusCode::OK);
    let docs = app.get("/docs").answer().await;
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger"));
    let spec: Value = app.get("/openapi.json").answer_json().await;
    for path in [
        "/capture", "/batch", "/e", "/i/v0/e", "/track", "/ingest", "/health", "/ready",
    ] {
        assert!(
            spec["paths"].get(path).is_some(),
            "{path} missing from the spec"
        );
    }
    let capture = &spec["paths"]["/capture"]["post"];
    for status in ["200", "400", "401", "403", "413", "503"] {
        assert!(
            capture["responses"].get(status).is_some(),
            "/capture lacks {status}"
        );
    }
    assert!(
        spec["components"]["securitySchemes"]
            .get("ApiKey")
            .is_some()
    );
    let e = error_of(
        app.get("/no/such/route").answer().await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(e["type"], "not_found");
}

/// Postgres stopping takes no api pod out of service: readiness stays 200 (its check says
/// Postgres is down, is not required and affects the context routes), ingest goes on into the
/// stream, the context routes answer 503 naming Postgres, and they answer again once it is back.
#[tokio::test]
async fn postgres_down_keeps_the_api_ready_and_ingesting() {
    let db = TestDb::create().await;
    let postgres = Proxy::postgres(true).await;
    let mut config = test_config();
    config.database_url = postgres.url(&db.url);
    let app = TestApp::spawn_with(config).await;
    let (status, body) = app.ready().await;
    assert_eq!(
        (status, &body["checks"][1]["ok"]),
        (StatusCode::OK, &json!(true)),
        "{body}"
    );
    // a context read before the outage: a connection is open and idle when Postgres goes
    assert_eq!(app.context("x").await.0, StatusCode::NOT_FOUND);

    postgres.set_up(false);
    let (status, body) = app.ready().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    let redis_check = json!({"name": "redis", "ok": true, "required": true, "affects": ["ingest", "erasure", "rules"]});
    assert_eq!(body["checks"][0], redis_check);
    let pg = &body["checks"][1];
    assert_eq!(pg["name"], "postgres");
    assert_eq!(pg["ok"], false);
    assert_eq!(pg["required"], false);
    assert_eq!(pg["affects"], json!(["context"]));
    assert!(
        pg["error"].as_str().unwrap().starts_with("postgres: "),
        "{pg}"
    );

    let resp = app
        .post("/capture")
        .key(SECRET)
        .json(&json!({"event": "during_the_outage", "distinct_id": "u"}))
        .answer()
        .await;
    assert_ok(resp).await;
    let queued = app.stream_envelopes().await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].event, "during_the_outage");

    for request in [app.get("/context/user/x"), app.delete("/context/user/x")] {
        let resp = request.key(SECRET).answer().await;
        assert!(resp.headers().get("retry-after").is_some());
        let e = error_of(resp, StatusCode::SERVICE_UNAVAILABLE).await;
        assert_eq!(e["type"], "unavailable");
        assert!(e["detail"].as_str().unwrap().contains("Postgres"), "{e}");
    }

    postgres.set_up(true);
    wait_until(WAIT, "the context route answers again", || async {
        app.context("x").await.0 == StatusCode::NOT_FOUND
    })
    .await;
    let (status, body) = app.ready().await;
    assert_eq!(
        (status, &body["checks"][1]["ok"]),
        (StatusCode::OK, &json!(true)),
        "{body}"
    );
}

/// A readiness check in flight when shutdown begins answers 503 `shutting_down` though every
/// dependency answers (load balancers stop sending at once), then `run` returns cleanly.
#[tokio::test]
async fn readiness_flips_when_shutdown_begins_and_run_returns() {
    // Redis behind a proxy that can hold the check's PING while shutdown begins.
    let redis = Proxy::redis(true).await;
    let mut config = test_config();
    config.redis_url = redis.url(&config.redis_url);
    let app = TestApp::spawn_with(config).await;
    let checks = json!([
        {"name": "redis", "ok": true, "required": true, "affects": ["ingest", "erasure", "rules"]},
        {"name": "postgres", "ok": true, "required": false, "affects": ["context"]},
    ]);
    let ready = json!({"status": "ready", "checks": checks});
    assert_eq!(app.ready().await, (StatusCode::OK, ready));

    redis.hold();
    let check = tokio::spawn(app.get("/ready").send());
    wait_until(WAIT, "the readiness check's PING held", || async {
        redis.held().windows(6).any(|w| w == b"PING\r\n")
    })
    .await;
    app.begin_shutdown();
    redis.release();
    let resp = check.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let shutting_down = json!({"status": "shutting_down", "checks": checks});
    assert_eq!(resp.json::<Value>().await.unwrap(), shutting_down);
    app.stop().await.expect("run returns cleanly");
}
