//! The whole pipeline, end to end: PostHog events into the api, a worker (with the shipped
//! rules) storing them in Postgres, and the user's context read back — real Redis and Postgres.

mod common;

use std::time::Duration;

use common::{INGEST_KEY, SECRET, TestApp, TestDb, test_config, worker_config};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// posthog-js shaped events of the prototype's journey: home, pricing three times, the upgrade button.
fn journey(user: &str) -> Value {
    let page = |path: &str| {
        json!({"event": "$pageview", "distinct_id": user, "properties": {
            "$current_url": format!("https://shop.example.com{path}"), "$pathname": path, "$session_id": "s-1", "$lib": "web"}})
    };
    json!({"api_key": INGEST_KEY, "batch": [
        page("/"), page("/pricing"), page("/pricing"), page("/pricing"),
        {"event": "$autocapture", "distinct_id": user, "properties": {
            "$event_type": "click", "$current_url": "https://shop.example.com/pricing", "$pathname": "/pricing",
            "$session_id": "s-1", "$el_text": "Upgrade Plan",
            "$elements_chain": "button.btn.btn-primary:text=\"Upgrade Plan\"attr__class=\"btn btn-primary\"nth-child=\"1\";div.pricing:nth-child=\"2\""}}
    ]})
}

#[tokio::test]
async fn events_flow_from_capture_to_context() {
    let db = TestDb::create().await;
    let mut api_config = test_config();
    api_config.database_url = db.url.clone();
    let app = TestApp::spawn_with(api_config.clone()).await;

    let worker_config = worker_config(&api_config, &db.url, "e2e");
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(worker::run(worker_config, shutdown.clone()));

    let resp = app
        .http
        .post(app.url("/batch/"))
        .json(&journey("user_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Wait (bounded) until all five events are stored and counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let context = loop {
        let resp = app
            .http
            .get(app.url("/context/user/user_1"))
            .header("X-API-Key", SECRET)
            .send()
            .await
            .unwrap();
        if resp.status() == StatusCode::OK {
            let body: Value = resp.json().await.unwrap();
            if body["stats"]["event_count"] == 5 && body["freshness"]["pending_events"] == 0 {
                break body;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events were not stored in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let history: Vec<&str> = context["recent_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["description"].as_str().unwrap())
        .collect();
    assert_eq!(history[0], "Clicked 'Upgrade Plan' Button", "{context}");
    assert_eq!(
        history
            .iter()
            .filter(|d| **d == "Viewed page: /pricing")
            .count(),
        3,
        "{context}"
    );
    assert_eq!(context["intents"][0]["name"], "purchase", "{context}");
    let summary = context["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("User showing Purchase Intent."),
        "{summary}"
    );
    assert!(
        summary.contains("Viewed page: /pricing (3 times)"),
        "{summary}"
    );
    assert_eq!(context["stats"]["session_count"], 1);

    // The prompt text form of the same context.
    let text = app
        .http
        .get(app.url("/context/user/user_1?format=text"))
        .header("X-API-Key", SECRET)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("Summary: User showing Purchase Intent."),
        "{text}"
    );
    assert!(
        text.contains("- just now: \"Clicked 'Upgrade Plan' Button\" on \"/pricing\""),
        "{text}"
    );

    shutdown.cancel();
    worker.await.unwrap().expect("worker stops cleanly");
}
