//! The published OpenAPI document tells the truth: real answers of every operation, for every
//! status it documents that a request can provoke (all but 500), match the schema, content type
//! and headers the document declares for that operation and status; poem's own answers (unknown
//! route, wrong method, bad parameter) have the documented error shape.

mod common;

use std::collections::BTreeSet;

use chrono::{Duration, Utc};
use common::{INGEST_KEY, RequestExt, SECRET, TestApp, TestDb, closed_addr, test_config};
use entity::{event, user_profile};
use reqwest::{Method, RequestBuilder};
use sea_orm::{ActiveModelTrait, IntoActiveModel};
use serde_json::{Value, json};
use uuid::Uuid;

/// Bodies over this many bytes answer 413 (small, so a test can send one).
const MAX_BODY: usize = 4096;

/// The document as served at `/openapi.json`.
struct Spec {
    doc: Value,
    /// `components`, with every object schema closed (`additionalProperties: false`) unless it
    /// says otherwise: an answer's undocumented field is a lie of the document too.
    components: Value,
}

/// One answer as a client sees it.
struct Answer {
    status: u16,
    content_type: String,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Spec {
    async fn fetch(app: &TestApp) -> Self {
        let resp = app.get("/openapi.json").answer().await;
        assert_eq!(resp.status(), 200);
        let doc: Value = resp.json().await.unwrap();
        assert_eq!(doc["openapi"], "3.0.0");
        let mut components = doc["components"].clone();
        for schema in components["schemas"].as_object_mut().unwrap().values_mut() {
            if schema["type"] == "object"
                && schema.get("properties").is_some()
                && schema.get("additionalProperties").is_none()
            {
                schema["additionalProperties"] = json!(false);
            }
        }
        Self { doc, components }
    }

    /// Every `(method, path)` the document has, e.g. `("GET", "/context/user/{user_id}")`.
    fn operations(&self) -> Vec<(String, String)> {
        let mut ops = Vec::new();
        for (path, item) in self.doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                ops.push((method.to_uppercase(), path.clone()));
            }
        }
        ops
    }

    fn responses(&self, method: &str, path: &str) -> &serde_json::Map<String, Value> {
        self.doc["paths"][path][method.to_lowercase()]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} is not in the document"))
    }

    /// Validates `instance` against `schema` (which may `$ref` into `#/components/schemas`).
    fn validate(&self, schema: &Value, instance: &Value) -> Result<(), String> {
        // OpenAPI 3.0 schemas are a JSON Schema draft 4 dialect (`$ref` siblings ignored,
        // unknown keywords such as `example` too).
        let root = json!({"allOf": [schema], "components": self.components});
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .should_validate_formats(true)
            .build(&root)
            .map_err(|e| format!("schema does not compile: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Checks `answer` against what the document declares for `method path` and its status.
    fn check(&self, method: &str, path: &str, answer: &Answer) -> Result<(), String> {
        let response = self
            .responses(method, path)
            .get(&answer.status.to_string())
            .ok_or_else(|| format!("status {} is not documented", answer.status))?;
        let content = response["content"]
            .as_object()
            .ok_or("the documented response has no content")?;
        let essence = |ct: &str| {
            ct.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_lowercase()
        };
        let (_, media) = content
            .iter()
            .find(|(ct, _)| essence(ct) == essence(&answer.content_type))
            .ok_or_else(|| {
                format!(
                    "content type {:?} is not documented (documented: {:?})",
                    answer.content_type,
                    content.keys().collect::<Vec<_>>()
                )
            })?;
        if let Some(headers) = response.get("headers").and_then(Value::as_object) {
            for (name, header) in headers {
                let value = answer
                    .headers
                    .get(name.as_str())
                    .ok_or_else(|| format!("documented header {name} is missing"))?;
                let value: Value = serde_json::from_str(value.to_str().unwrap_or_default())
                    .unwrap_or_else(|_| Value::String(value.to_str().unwrap_or_default().into()));
                self.validate(&header["schema"], &value)
                    .map_err(|e| format!("header {name}: {e}"))?;
            }
        }
        let body = if essence(&answer.content_type) == "application/json" {
            serde_json::from_str(&answer.body).map_err(|e| format!("body is not JSON: {e}"))?
        } else {
            Value::String(answer.body.clone())
        };
        self.validate(&media["schema"], &body)
    }

    /// Checks an answer of no operation (poem's own) against the `ErrorBody` schema.
    fn check_error_body(&self, answer: &Answer) -> Result<(), String> {
        if !answer.content_type.starts_with("application/json") {
            return Err(format!("content type {:?}", answer.content_type));
        }
        let body: Value =
            serde_json::from_str(&answer.body).map_err(|e| format!("body is not JSON: {e}"))?;
        self.validate(&json!({"$ref": "#/components/schemas/ErrorBody"}), &body)
    }
}

async fn send(request: RequestBuilder) -> Answer {
    let resp = request.answer().await;
    let headers = resp.headers().clone();
    Answer {
        status: resp.status().as_u16(),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: resp.text().await.unwrap(),
        headers,
    }
}

fn stored_event(
    user: &str,
    minutes_ago: i64,
    page: Option<&str>,
    session: Option<&str>,
) -> event::Model {
    let at = Utc::now() - Duration::minutes(minutes_ago);
    event::Model {
        uuid: Uuid::now_v7(),
        distinct_id: user.into(),
        event: "$pageview".into(),
        description: Some(format!("Viewed page: {}", page.unwrap_or("(none)"))),
        rule_id: None,
        intents: json!({}),
        properties: json!({}),
        url: None,
        path: page.map(Into::into),
        session_id: session.map(Into::into),
        elements_chain: None,
        timestamp: at,
        received_at: at,
        rules_version: "test".into(),
    }
}

/// A user with an intent, one event with a page and session and one with neither (the optional
/// fields of a history item absent).
async fn seed(db: &sea_orm::DatabaseConnection, user: &str) {
    for e in [
        stored_event(user, 5, Some("/pricing"), Some("s1")),
        stored_event(user, 3, None, None),
    ] {
        e.into_active_model().reset_all().insert(db).await.unwrap();
    }
    let now = Utc::now();
    user_profile::Model {
        distinct_id: user.into(),
        first_seen: now - Duration::minutes(5),
        last_seen: now - Duration::minutes(3),
        event_count: 2,
        session_count: 1,
        intents: json!({"purchase": {"score": 3.0, "last_seen": now, "summary": "User showing Purchase Intent.",
                        "half_life_secs": 604800.0, "count": 1, "evidence": ["Viewed page: /pricing"]}}),
        person_properties: Some(json!({"plan": "pro", "seats": 3})),
        person_property_times: None,
        updated_at: now,
    }
    .into_active_model()
    .reset_all()
    .insert(db)
    .await
    .unwrap();
}

/// `value` as base64 of its gzip, the way posthog-js sends `data=`.
fn gzip_base64(value: &Value) -> String {
    use base64::Engine;
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(value.to_string().as_bytes()).unwrap();
    base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap())
}

#[tokio::test]
async fn every_answer_matches_the_published_schema() {
    let db = TestDb::create().await;
    for user in ["u_read", "u_erase", "u_erase_redis_down"] {
        seed(&db.conn, user).await;
    }
    let configured = |redis_up: bool, postgres_up: bool| {
        let mut config = test_config();
        config.max_body_bytes = MAX_BODY;
        config.database_url = if postgres_up {
            db.url.clone()
        } else {
            format!("postgres://postgres:secret@{}/x", closed_addr())
        };
        if !redis_up {
            config.redis_url = format!("redis://:secret@{}", closed_addr());
            config.redis_timeout = std::time::Duration::from_millis(300);
        }
        config
    };
    let app = TestApp::spawn_with(configured(true, true)).await;
    let redis_down = TestApp::spawn_with(configured(false, true)).await;
    let postgres_down = TestApp::spawn_with(configured(true, false)).await;
    let spec = Spec::fetch(&app).await;

    let event = |key: &str| json!({"api_key": key, "event": "$pageview", "distinct_id": "u1"});
    let too_large = json!({"api_key": INGEST_KEY, "event": "x", "distinct_id": "u1", "pad": "x".repeat(MAX_BODY)});

    // (expected status, method, documented path, request)
    let mut cases: Vec<(u16, String, String, RequestBuilder)> = Vec::new();
    let mut add = |status: u16,
                   method: &str,
                   path: &str,
                   target: &TestApp,
                   uri: &str,
                   build: &dyn Fn(RequestBuilder) -> RequestBuilder| {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let request = build(target.http.request(m, target.url(uri)));
        cases.push((status, method.to_string(), path.to_string(), request));
    };
    for path in ["/capture", "/batch", "/e", "/i/v0/e", "/track"] {
        let body = |v: &Value| v.to_string();
        for origin in [None, Some("https://shop.example")] {
            // SDK requests (no Origin) take the direct path, browser ones the router: both documented alike
            let o = move |r: RequestBuilder| match origin {
                Some(o) => r.header("Origin", o),
                None => r,
            };
            add(200, "POST", path, &app, path, &|r| {
                o(r).body(body(&event(INGEST_KEY)))
            });
            add(400, "POST", path, &app, path, &|r| {
                o(r).body("{\"event\": ")
            });
            add(
                400,
                "POST",
                path,
                &app,
                &format!("{path}?compression=zip"),
                &|r| o(r).body(body(&event(INGEST_KEY))),
            );
            add(401, "POST", path, &app, path, &|r| {
                o(r).body(r#"{"event": "x", "distinct_id": "u"}"#)
            });
            add(403, "POST", path, &app, path, &|r| {
                o(r).body(body(&event("phc_unknown")))
            });
            add(413, "POST", path, &app, path, &|r| {
                o(r).body(body(&too_large))
            });
            add(503, "POST", path, &redis_down, path, &|r| {
                o(r).body(body(&event(INGEST_KEY)))
            });
        }
        let data = |v: &Value| vec![("data", v.to_string())];
        add(200, "GET", path, &app, path, &|r| {
            r.query(&data(&event(INGEST_KEY)))
        });
        add(400, "GET", path, &app, path, &|r| r);
        add(401, "GET", path, &app, path, &|r| {
            r.query(&[("data", r#"{"event": "x", "distinct_id": "u"}"#)])
        });
        add(403, "GET", path, &app, path, &|r| {
            r.query(&data(&event("phc_unknown")))
        });
        // a query has no body: 413 is its decompressed form over the limit
        add(413, "GET", path, &app, path, &|r| {
            r.query(&[("data", &gzip_base64(&too_large))])
        });
        add(503, "GET", path, &redis_down, path, &|r| {
            r.query(&data(&event(INGEST_KEY)))
        });
    }

    let webhook = r#"{"event": "signup", "distinct_id": "u1"}"#;
    add(200, "POST", "/ingest", &app, "/ingest", &|r| {
        r.key(INGEST_KEY).body(webhook)
    });
    add(400, "POST", "/ingest", &app, "/ingest", &|r| {
        r.key(INGEST_KEY).body("[{\"event\": 5}]")
    });
    add(401, "POST", "/ingest", &app, "/ingest", &|r| {
        r.body(webhook)
    });
    add(403, "POST", "/ingest", &app, "/ingest", &|r| {
        r.key("nope").body(webhook)
    });
    add(413, "POST", "/ingest", &app, "/ingest", &|r| {
        r.key(INGEST_KEY).body(too_large.to_string())
    });
    add(503, "POST", "/ingest", &redis_down, "/ingest", &|r| {
        r.key(INGEST_KEY).body(webhook)
    });

    let user_path = "/context/user/{user_id}";
    let unmatched = "/rules/unmatched";
    // (expected status, method, documented path, app, URI, key): requests without a body
    #[rustfmt::skip]
    let keyed = [
        (200, "GET", user_path, &app, "/context/user/u_read", Some(SECRET)),
        (200, "GET", user_path, &app, "/context/user/u_read?format=text", Some(SECRET)),
        // Redis down: the freshness figures are absent, not null
        (200, "GET", user_path, &redis_down, "/context/user/u_read", Some(SECRET)),
        (401, "GET", user_path, &app, "/context/user/u_read", None),
        (403, "GET", user_path, &app, "/context/user/u_read", Some(INGEST_KEY)),
        (404, "GET", user_path, &app, "/context/user/nobody", Some(SECRET)),
        (503, "GET", user_path, &postgres_down, "/context/user/u_read", Some(SECRET)),
        (200, "DELETE", user_path, &app, "/context/user/u_erase", Some(SECRET)),
        // Redis down after the rows are erased: 503, erasing again finishes it
        (503, "DELETE", user_path, &redis_down, "/context/user/u_erase_redis_down", Some(SECRET)),
        (401, "DELETE", user_path, &app, "/context/user/u_erase", None),
        (403, "DELETE", user_path, &app, "/context/user/u_erase", Some(INGEST_KEY)),
        // An unknown user is erased all the same (a tombstone for events on their way): zeros
        (200, "DELETE", user_path, &app, "/context/user/nobody", Some(SECRET)),
        (503, "DELETE", user_path, &postgres_down, "/context/user/u_read", Some(SECRET)),
        (200, "GET", unmatched, &app, "/rules/unmatched", Some(SECRET)),
        (400, "GET", unmatched, &app, "/rules/unmatched?limit=0", Some(SECRET)),
        (400, "GET", unmatched, &app, "/rules/unmatched?limit=abc", Some(SECRET)),
        (401, "GET", unmatched, &app, "/rules/unmatched", None),
        (403, "GET", unmatched, &app, "/rules/unmatched", Some(INGEST_KEY)),
        (503, "GET", unmatched, &redis_down, "/rules/unmatched", Some(SECRET)),
        (200, "GET", "/health", &app, "/health", None),
        (200, "GET", "/metrics", &app, "/metrics", None),
        (200, "GET", "/ready", &app, "/ready", None),
        (503, "GET", "/ready", &redis_down, "/ready", None),
        (200, "GET", "/ready", &postgres_down, "/ready", None),
    ];
    for (status, method, path, target, uri, key) in keyed {
        add(status, method, path, target, uri, &|r| match key {
            Some(key) => r.key(key),
            None => r,
        });
    }
    add(200, "GET", user_path, &app, "/context/user/u_read", &|r| {
        r.key(SECRET).header("Accept", "text/markdown")
    });
    for query in [
        "limit=0",
        "limit=abc",
        "format=xml",
        "since=yesterday",
        "max_tokens=-1",
    ] {
        let uri = format!("/context/user/u_read?{query}");
        add(400, "GET", user_path, &app, &uri, &|r| r.key(SECRET));
    }

    let mut problems = Vec::new();
    let mut covered = BTreeSet::new();
    for (expected, method, path, request) in cases {
        let url = request
            .try_clone()
            .unwrap()
            .build()
            .unwrap()
            .url()
            .to_string();
        let label = format!("{method} {path} ({})", &url[..url.len().min(120)]);
        let answer = send(request).await;
        if answer.status != expected {
            problems.push(format!(
                "{label}: expected {expected}, got {} {}",
                answer.status, answer.body
            ));
            continue;
        }
        covered.insert((method.clone(), path.clone(), answer.status.to_string()));
        if let Err(e) = spec.check(&method, &path, &answer) {
            problems.push(format!(
                "{label} → {}: {e}\n    body: {}",
                answer.status, answer.body
            ));
        }
    }

    // poem's own answers: no operation, the one error shape
    for (expected, method, uri) in [
        (404, Method::GET, "/no/such/route"),
        (404, Method::POST, "/context/user"),
        (405, Method::DELETE, "/capture"),
        (405, Method::PUT, "/context/user/u_read"),
        (405, Method::POST, "/health"),
    ] {
        let answer = send(app.http.request(method.clone(), app.url(uri)).key(SECRET)).await;
        if answer.status != expected {
            problems.push(format!(
                "{method} {uri}: expected {expected}, got {}",
                answer.status
            ));
        } else if let Err(e) = spec.check_error_body(&answer) {
            problems.push(format!(
                "{method} {uri} → {}: {e}\n    body: {}",
                answer.status, answer.body
            ));
        }
    }

    // every documented status but 500 was provoked
    let mut missing = Vec::new();
    for (method, path) in spec.operations() {
        for status in spec.responses(&method, &path).keys() {
            if status != "500" && !covered.contains(&(method.clone(), path.clone(), status.clone()))
            {
                missing.push(format!("{method} {path} {status}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} answers disagree with the document:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        missing.is_empty(),
        "documented but not exercised: {missing:#?}"
    );
}
