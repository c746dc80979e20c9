//! Span export to a receiver that is down never fails ingest, and entries still carry their
//! `traceparent`. Its own test binary: the tracing subscriber is global to the process.

mod common;

use common::{INGEST_KEY, TestApp};
use entity::envelope::FIELD_TRACEPARENT;
use infra::telemetry::{self, TelemetryConfig};
use redis::streams::StreamRangeReply;
use reqwest::StatusCode;
use serde_json::json;

const REQUESTS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_answers_while_the_otlp_receiver_is_down() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let telemetry = telemetry::init(&TelemetryConfig {
        otlp_endpoint: Some(endpoint),
        ..TelemetryConfig::local("api")
    })
    .expect("telemetry starts although the receiver is down");

    let app = TestApp::spawn().await;
    for i in 0..REQUESTS {
        let resp = app
            .http
            .post(app.url("/capture"))
            .json(&json!({"api_key": INGEST_KEY, "event": "$pageview", "distinct_id": format!("user_{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
    }

    let client = redis::Client::open(app.config.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(&app.config.queue_name)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(reply.ids.len(), REQUESTS);
    for entry in &reply.ids {
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
