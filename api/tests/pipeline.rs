//! The whole pipeline, end to end: PostHog events into the api, a worker (with the shipped
//! rules) storing them in Postgres, and the user's context read back — real Redis and Postgres.

mod common;

use common::{INGEST_KEY, RequestExt, SECRET, TestApp, WAIT, test_config, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};

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
    let (app, db) = TestApp::spawn_with_db(test_config()).await;
    let worker = app.start_worker(&db, "e2e");

    let resp = app.post("/batch/").json(&journey("user_1")).answer().await;
    assert_eq!(resp.status(), StatusCode::OK);

    wait_until(WAIT, "all five events stored and counted", || async {
        let (status, body) = app.context("user_1").await;
        status == StatusCode::OK
            && body["stats"]["event_count"] == 5
            && body["freshness"]["pending_events"] == 0
    })
    .await;
    let (_, context) = app.context("user_1").await;

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
        .get("/context/user/user_1?format=text")
        .key(SECRET)
        .answer()
        .await
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

    worker.stop().await;
}
