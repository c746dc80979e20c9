//! Span export over OTLP: one trace shows the HTTP request, the XADD, the worker's batch and its
//! database transaction. A tiny OTLP/HTTP receiver runs inside the test; the api and a worker run
//! in-process against real Redis and Postgres. Its own test binary: the tracing subscriber is
//! global to the process.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{INGEST_KEY, RequestExt, TestApp, WAIT, test_config, wait_until};
use infra::telemetry::{self, TelemetryConfig};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::{KeyValue, any_value::Value},
};
use poem::{EndpointExt, Response, Route, Server, handler, listener::TcpAcceptor, post, web::Data};
use prost::Message;
use reqwest::StatusCode;
use serde_json::json;

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ReceivedSpan>>>);

impl Received {
    fn in_trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// `POST /v1/traces` of OTLP/HTTP with protobuf bodies.
#[handler]
fn traces(received: Data<&Received>, body: Vec<u8>) -> Response {
    let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf body");
    let mut spans = received.0.0.lock().unwrap();
    for resource_spans in request.resource_spans {
        let resource = attributes(
            &resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default(),
        );
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            spans.push(ReceivedSpan {
                service: service.clone(),
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                attributes: attributes(&span.attributes),
            });
        }
    }
    Response::builder()
        .content_type("application/x-protobuf")
        .body(ExportTraceServiceResponse::default().encode_to_vec())
}

/// Starts the receiver on 127.0.0.1:0; returns its base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`).
async fn start_receiver(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Route::new().at("/v1/traces", post(traces)).data(received);
    let acceptor = TcpAcceptor::from_tokio(listener).unwrap();
    tokio::spawn(Server::new_with_acceptor(acceptor).run(app));
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_request_xadd_batch_and_transaction() {
    let received = Received::default();
    let endpoint = start_receiver(received.clone()).await;
    let telemetry = Arc::new(
        telemetry::init(&TelemetryConfig {
            otlp_endpoint: Some(endpoint),
            ..TelemetryConfig::local("clickstream-test")
        })
        .expect("telemetry starts"),
    );
    assert!(telemetry::is_exporting());

    let (app, db) = TestApp::spawn_with_db(test_config()).await;
    let worker = app.start_worker(&db, "tracing");

    // The client's own trace: the request continues it.
    let client_trace = format!("{:032x}", rand::random::<u128>() | 1);
    let client_span = format!("{:016x}", rand::random::<u64>() | 1);
    let uuid = uuid::Uuid::now_v7();
    let resp = app
        .post("/capture")
        .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
        .json(
            &json!({"api_key": INGEST_KEY, "event": "$pageview", "distinct_id": "traced_user",
            "uuid": uuid, "properties": {"$current_url": "https://shop.example.com/pricing"}}),
        )
        .answer()
        .await;
    assert_eq!(resp.status(), StatusCode::OK);

    // The event is stored…
    let deadline = tokio::time::Instant::now() + WAIT;
    let stored = format!("SELECT count(*) FROM events WHERE uuid = '{uuid}'");
    wait_until(WAIT, "the event stored", || async {
        db.count(&stored).await == 1
    })
    .await;

    // …and its trace reaches the receiver, the worker's spans ending just after the commit.
    let names = [
        "POST /capture",
        "redis.xadd",
        "worker.batch",
        "db.transaction",
    ];
    let spans = loop {
        let flusher = telemetry.clone();
        let flushed = tokio::task::spawn_blocking(move || flusher.force_flush())
            .await
            .unwrap();
        let spans = received.in_trace(&client_trace);
        if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans of the trace did not all arrive (last flush ok: {flushed}): {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let span = |name: &str| {
        let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span expected: {spans:#?}");
        found[0].clone()
    };
    let request = span("POST /capture");
    let xadd = span("redis.xadd");
    let batch = span("worker.batch");
    let transaction = span("db.transaction");

    // The parent chain: client → request → XADD → (through the stream entry) batch → transaction.
    assert_eq!(request.parent_span_id, client_span);
    assert_eq!(xadd.parent_span_id, request.span_id);
    assert_eq!(batch.parent_span_id, xadd.span_id);
    assert_eq!(transaction.parent_span_id, batch.span_id);
    for s in [&request, &xadd, &batch, &transaction] {
        assert_eq!(s.service, "clickstream-test", "{s:?}");
    }
    assert_eq!(request.attributes["http.request.method"], "POST");
    assert_eq!(request.attributes["http.response.status_code"], "200");
    assert_eq!(request.attributes["http.route"], "/capture", "{request:?}");
    assert_eq!(xadd.attributes["stream"], app.config.queue_name);
    assert_eq!(batch.attributes["entries"], "1");

    worker.stop().await;
    app.stop().await.unwrap();
}
