//! Span export to a receiver that is down never fails ingest, and entries still carry their
//! `traceparent`. Its own test binary: the tracing subscriber is global to the process.

mod common;

use common::{INGEST_KEY, RequestExt, TestApp, closed_addr, redis};
use entity::envelope::FIELD_TRACEPARENT;
use infra::telemetry::{self, TelemetryConfig};
use redis::streams::StreamRangeReply;
use reqwest::StatusCode;
use serde_json::json;

const REQUESTS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_answers_while_the_otlp_receiver_is_down() {
    let endpoint = format!("http://{}", closed_addr());
    let telemetry = telemetry::init(&TelemetryConfig {
        otlp_endpoint: Some(endpoint),
        ..TelemetryConfig::local("api")
    })
    .expect("telemetry starts although the receiver is down");

    let app = TestApp::spawn().await;
    for i in 0..REQUESTS {
        let resp = app.post("/capture")
            .json(&json!({"api_key": INGEST_KEY, "event": "$pageview", "distinct_id": format!("user_{i}")}))
            .answer().await;
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
    }

    let entries: StreamRangeReply = redis::cmd("XRANGE")
        .arg(&app.keys.stream)
        .arg("-")
        .arg("+")
        .query_async(&mut redis().await)
        .await
        .unwrap();
    assert_eq!(entries.ids.len(), REQUESTS);
    for entry in &entries.ids {
        let Some(redis::Value::BulkString(traceparent)) = entry.map.get(FIELD_TRACEPARENT) else {
            panic!("entry {} has no traceparent: {:?}", entry.id, entry.map);
        };
        let traceparent = String::from_utf8_lossy(traceparent);
        assert!(
            traceparent.starts_with("00-") && traceparent.ends_with("-01"),
            "{traceparent}"
        );
    }

    assert!(
        !tokio::task::spawn_blocking(move || telemetry.force_flush())
            .await
            .unwrap(),
        "nothing can be exported to a closed port"
    );
}
