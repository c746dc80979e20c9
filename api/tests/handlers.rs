//! Handler-level checks through `poem::test::TestClient` (no socket).

mod common;

use api::{AppState, app};
use poem::test::TestClient;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn readiness_answers_503_as_soon_as_shutdown_begins() {
    let shutdown = CancellationToken::new();
    let state = AppState::new(common::test_config(), shutdown.clone())
        .await
        .unwrap();
    let client = TestClient::new(app(state));
    client.get("/ready").send().await.assert_status_is_ok();
    shutdown.cancel();
    let resp = client.get("/ready").send().await;
    resp.assert_status(poem::http::StatusCode::SERVICE_UNAVAILABLE);
    resp.assert_json(&serde_json::json!({
        "status": "shutting_down",
        "checks": [
            {"name": "redis", "ok": true, "required": true, "affects": ["ingest", "erasure", "rules"]},
            {"name": "postgres", "ok": true, "required": false, "affects": ["context"]}
        ]
    }))
    .await;
}

#[tokio::test]
async fn poem_parse_errors_use_the_one_error_shape() {
    let state = AppState::new(common::test_config(), CancellationToken::new())
        .await
        .unwrap();
    let client = TestClient::new(app(state));
    // a wrong method on a known route
    let resp = client.delete("/capture").send().await;
    resp.assert_status(poem::http::StatusCode::METHOD_NOT_ALLOWED);
    let body = resp.json().await;
    body.value()
        .object()
        .get("type")
        .assert_string("validation_error");
    body.value()
        .object()
        .get("code")
        .assert_string("method_not_allowed");
}
