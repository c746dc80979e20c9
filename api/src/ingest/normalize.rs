//! Validates decoded JSON and normalises it into [`Envelope`]s.
//!
//! Accepted shapes: one event; `{"api_key"|"token", "batch": [...], "sent_at"}`; a bare array of
//! events; and PostHog's HTTP Webhook destination body `{"event": {...}, "person": {...}}`
//! (alone or in an array). A batch with one bad event is rejected whole.

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Utc};
use entity::{Envelope, Person};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::limits::{
    MAX_DISTINCT_ID_CHARS, MAX_EVENT_NAME_CHARS, MAX_SESSION_ID_CHARS, MIN_TIMESTAMP,
    check_properties, within_chars,
};
use crate::http::error::ApiError;

/// Events more than this far in the future are moved to the time they were received.
const MAX_FUTURE: Duration = Duration::hours(23);

/// The key a body carries (PostHog SDKs put the project key there): top-level `api_key` or
/// `token`, else the first event's `api_key`, `token` or `properties.token`.
pub fn body_key(body: &Value) -> Option<String> {
    match body {
        Value::Array(items) => items.first().and_then(event_key),
        Value::Object(obj) => string_field(obj, "api_key")
            .or_else(|| string_field(obj, "token"))
            .or_else(|| match obj.get("batch") {
                Some(Value::Array(items)) => items.first().and_then(event_key),
                _ => event_key(body),
            }),
        _ => None,
    }
}

/// Normalises a decoded request body received at `now`.
pub fn normalize(body: Value, now: DateTime<Utc>) -> Result<Vec<Envelope>, ApiError> {
    match body {
        Value::Array(items) => normalize_items(items, None, now, ""),
        Value::Object(mut obj) if obj.contains_key("batch") => {
            let sent_at = match obj.get("sent_at") {
                None | Some(Value::Null) => None,
                Some(v) => Some(parse_time(v).map_err(|e| e.at("sent_at"))?),
            };
            let Some(Value::Array(items)) = obj.remove("batch") else {
                return Err(ApiError::invalid(
                    "invalid_value",
                    "`batch` must be an array of events",
                )
                .at("batch"));
            };
            normalize_items(items, sent_at, now, "batch")
        }
        Value::Object(obj) => Ok(vec![normalize_event(obj, None, now)?]),
        _ => Err(ApiError::invalid(
            "invalid_payload",
            "expected an event object, an array of events or {\"batch\": [...]}",
        )),
    }
}

fn normalize_items(
    items: Vec<Value>,
    sent_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    prefix: &str,
) -> Result<Vec<Envelope>, ApiError> {
    if items.is_empty() {
        let err = ApiError::invalid("empty_batch", "the batch holds no events");
        return Err(if prefix.is_empty() {
            err
        } else {
            err.at(prefix)
        });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{prefix}[{i}]");
            match item {
                Value::Object(obj) => normalize_event(obj, sent_at, now).map_err(|e| e.within(&at)),
                _ => Err(
                    ApiError::invalid("invalid_value", "each event must be a JSON object").at(at),
                ),
            }
        })
        .collect()
}

/// The key a single event carries (`api_key`, `token` or `properties.token`).
fn event_key(event: &Value) -> Option<String> {
    let obj = event.as_object()?;
    string_field(obj, "api_key")
        .or_else(|| string_field(obj, "token"))
        .or_else(|| {
            obj.get("properties")?
                .as_object()
                .and_then(|p| string_field(p, "token"))
        })
}

fn string_field(obj: &Map<String, Value>, name: &str) -> Option<String> {
    obj.get(name).and_then(Value::as_str).map(str::to_string)
}

/// Validates one event object and turns it into an envelope.
fn normalize_event(
    mut obj: Map<String, Value>,
    batch_sent_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<Envelope, ApiError> {
    // PostHog HTTP Webhook destination: {"event": {...}, "person": {...}}
    if let Some(Value::Object(_)) = obj.get("event") {
        let Some(Value::Object(inner)) = obj.remove("event") else {
            unreachable!()
        };
        let person = match obj.remove("person") {
            None | Some(Value::Null) => None,
            Some(Value::Object(p)) => Some(person_from(p)?),
            Some(_) => {
                return Err(
                    ApiError::invalid("invalid_value", "`person` must be an object").at("person"),
                );
            }
        };
        let mut env = normalize_event(inner, batch_sent_at, now).map_err(|e| e.within("event"))?;
        env.person = person;
        return Ok(env);
    }

    let event = match obj.remove("event") {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("required", "event name is required").at("event"));
        }
        Some(_) => {
            return Err(
                ApiError::invalid("invalid_value", "event name must be a string").at("event"),
            );
        }
    };
    validate_event_name(&event)?;

    let mut properties = match obj.remove("properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Err(
                ApiError::invalid("invalid_value", "properties must be a JSON object")
                    .at("properties"),
            );
        }
    };

    let distinct_id = distinct_id(&mut obj, &properties)?;

    for key in ["$set", "$set_once"] {
        if let Some(v) = obj.remove(key) {
            properties.entry(key).or_insert(v);
        }
    }

    let uuid = match obj.remove("uuid") {
        None | Some(Value::Null) => Uuid::now_v7(),
        Some(Value::String(s)) => Uuid::parse_str(s.trim()).map_err(|_| {
            ApiError::invalid("invalid_value", format!("uuid {s:?} is not a UUID")).at("uuid")
        })?,
        Some(_) => {
            return Err(ApiError::invalid("invalid_value", "uuid must be a string").at("uuid"));
        }
    };

    let timestamp = optional_time(&obj, "timestamp")?;
    let sent_at = optional_time(&obj, "sent_at")?.or(batch_sent_at);
    let offset_ms = match obj.get("offset") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            ApiError::invalid(
                "invalid_value",
                "offset must be a whole number of milliseconds",
            )
            .at("offset")
        })?),
    };
    let timestamp = corrected_timestamp(timestamp, sent_at, offset_ms, now)
        .map_err(|attr| time_out_of_range().at(attr))?;

    let (session_attr, session_id) = [
        ("properties.$session_id", properties.get("$session_id")),
        ("$session_id", obj.get("$session_id")),
        ("session_id", obj.get("session_id")),
    ]
    .into_iter()
    .find_map(|(attr, v)| v.map(|v| (attr, v)))
    .unzip();
    let session_id = session_id.and_then(scalar_string);
    if let (Some(attr), Some(id)) = (session_attr, &session_id) {
        check_session_id(attr, id)?;
    }
    check_properties(&properties, "properties")?;
    let lib = properties
        .get("$lib")
        .and_then(Value::as_str)
        .map(str::to_string);
    let elements_chain = match obj.remove("elements_chain") {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        _ => None,
    };

    Ok(Envelope {
        uuid,
        distinct_id,
        event,
        properties,
        timestamp,
        received_at: now,
        sent_at,
        session_id,
        lib,
        elements_chain,
        person: None,
    })
}

fn person_from(mut p: Map<String, Value>) -> Result<Person, ApiError> {
    let properties = match p.remove("properties") {
        Some(Value::Object(props)) => props,
        _ => Map::new(),
    };
    check_properties(&properties, "person.properties")?;
    Ok(Person {
        id: p.remove("id").as_ref().and_then(scalar_string),
        properties,
    })
}

/// `distinct_id`, `$distinct_id` or `properties.distinct_id`; numbers become strings.
fn distinct_id(
    obj: &mut Map<String, Value>,
    properties: &Map<String, Value>,
) -> Result<String, ApiError> {
    let (attr, value) = first_distinct_id([
        ("distinct_id", obj.get("distinct_id")),
        ("$distinct_id", obj.get("$distinct_id")),
        ("properties.distinct_id", properties.get("distinct_id")),
    ])?;
    validate_distinct_id(attr, value)
}

/// A value that may be JSON `null`.
pub(crate) trait Nullable {
    fn is_null(&self) -> bool;
}

impl Nullable for &Value {
    fn is_null(&self) -> bool {
        Value::is_null(self)
    }
}

/// The first non-null candidate, with the field it came from.
pub(crate) fn first_distinct_id<V: Nullable>(
    candidates: [(&'static str, Option<V>); 3],
) -> Result<(&'static str, V), ApiError> {
    candidates
        .into_iter()
        .find_map(|(attr, v)| v.filter(|v| !v.is_null()).map(|v| (attr, v)))
        .ok_or_else(|| ApiError::invalid("required", "distinct_id is required").at("distinct_id"))
}

/// A string or number, not blank, no NUL, at most [`MAX_DISTINCT_ID_CHARS`] characters.
pub(crate) fn validate_distinct_id(attr: &str, value: &Value) -> Result<String, ApiError> {
    let id = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(ApiError::invalid(
                "invalid_value",
                "distinct_id must be a string or a number",
            )
            .at(attr));
        }
    };
    check_distinct_id(attr, &id)?;
    Ok(id)
}

/// A distinct_id's text: not blank, no NUL, at most [`MAX_DISTINCT_ID_CHARS`] characters.
pub(crate) fn check_distinct_id(attr: &str, id: &str) -> Result<(), ApiError> {
    if id.trim().is_empty() {
        return Err(ApiError::invalid("blank", "distinct_id must not be empty").at(attr));
    }
    if id.contains('\0') {
        return Err(ApiError::invalid(
            "invalid_value",
            "distinct_id must not contain NUL characters",
        )
        .at(attr));
    }
    if !within_chars(id, MAX_DISTINCT_ID_CHARS) {
        return Err(ApiError::invalid(
            "too_long",
            format!("distinct_id is longer than {MAX_DISTINCT_ID_CHARS} characters"),
        )
        .at(attr));
    }
    Ok(())
}

/// A session id's text: at most [`MAX_SESSION_ID_CHARS`] characters.
pub(crate) fn check_session_id(attr: &str, id: &str) -> Result<(), ApiError> {
    if within_chars(id, MAX_SESSION_ID_CHARS) {
        return Ok(());
    }
    Err(ApiError::invalid(
        "too_long",
        format!("session id is longer than {MAX_SESSION_ID_CHARS} characters"),
    )
    .at(attr))
}

/// An event name: not blank, no NUL, at most [`MAX_EVENT_NAME_CHARS`] characters.
pub(crate) fn validate_event_name(name: &str) -> Result<(), ApiError> {
    if !within_chars(name, MAX_EVENT_NAME_CHARS) {
        return Err(ApiError::invalid(
            "too_long",
            format!("event name is longer than {MAX_EVENT_NAME_CHARS} characters"),
        )
        .at("event"));
    }
    if name.trim().is_empty() {
        return Err(ApiError::invalid("blank", "event name must not be empty").at("event"));
    }
    if name.contains('\0') {
        return Err(ApiError::invalid(
            "invalid_value",
            "event name must not contain NUL characters",
        )
        .at("event"));
    }
    Ok(())
}

pub(crate) fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn optional_time(obj: &Map<String, Value>, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_time(v).map(Some).map_err(|e| e.at(name)),
    }
}

/// RFC 3339; a timestamp without zone is taken as UTC; a number is epoch milliseconds.
pub(crate) fn parse_time(v: &Value) -> Result<DateTime<Utc>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "invalid_timestamp",
            format!("{v} is not an RFC 3339 timestamp"),
        )
    };
    match v {
        Value::String(s) => parse_time_text(s).ok_or_else(bad),
        Value::Number(n) => n
            .as_i64()
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// A timestamp's text: RFC 3339, or the same without an offset (taken as UTC).
pub(crate) fn parse_time_text(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|fmt| NaiveDateTime::parse_from_str(s, fmt).ok())
        .map(|t| Utc.from_utc_datetime(&t))
}

/// PostHog's clock-skew correction: the client's clock may be wrong, but the gap between its
/// event time and its send time is right, so stored time = now + (timestamp − sent_at).
/// A time more than [`MAX_FUTURE`] ahead becomes `now`; one before [`MIN_TIMESTAMP`] (or out of
/// chrono's range on the way) is refused with the field it came from.
pub(crate) fn corrected_timestamp(
    timestamp: Option<DateTime<Utc>>,
    sent_at: Option<DateTime<Utc>>,
    offset_ms: Option<i64>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, &'static str> {
    let (ts, attr) = match (timestamp, sent_at, offset_ms) {
        (Some(ts), Some(sent), _) => (now.checked_add_signed(ts - sent), "timestamp"),
        (_, _, Some(offset)) => (
            Duration::try_milliseconds(offset).and_then(|d| now.checked_sub_signed(d)),
            "offset",
        ),
        (Some(ts), None, None) => (Some(ts), "timestamp"),
        (None, _, None) => (Some(now), "timestamp"),
    };
    match ts {
        Some(ts) if ts > now + MAX_FUTURE => Ok(now),
        Some(ts) if ts >= MIN_TIMESTAMP => Ok(ts),
        _ => Err(attr),
    }
}

/// 400 for an event time outside what is stored.
pub(crate) fn time_out_of_range() -> ApiError {
    ApiError::invalid(
        "invalid_timestamp",
        "the event time, after clock-skew correction, is out of range: it must be on or after \
         1970-01-01T00:00:00Z (a time more than 23 hours ahead is replaced by the time received)",
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn err_attr(body: Value) -> String {
        normalize(body, now())
            .unwrap_err()
            .body
            .attr
            .unwrap_or_default()
    }

    #[test]
    fn shapes() {
        let single = json!({"event": "e", "distinct_id": "u", "api_key": "k"});
        assert_eq!(body_key(&single).as_deref(), Some("k"));
        assert_eq!(normalize(single, now()).unwrap().len(), 1);
        let batch = json!({"token": "t", "batch": [{"event": "a", "distinct_id": 42}, {"event": "b", "$distinct_id": "x"}]});
        assert_eq!(body_key(&batch).as_deref(), Some("t"));
        let batch = normalize(batch, now()).unwrap();
        assert_eq!(batch[0].distinct_id, "42");
        assert_eq!(batch[1].distinct_id, "x");
        let array = json!([{"event": "a", "properties": {"distinct_id": "p", "token": "pt", "$session_id": "s"}}]);
        assert_eq!(body_key(&array).as_deref(), Some("pt"));
        let array = normalize(array, now()).unwrap();
        assert_eq!(array[0].distinct_id, "p");
        assert_eq!(array[0].session_id.as_deref(), Some("s"));
        let bad = json!({"api_key": "k", "batch": [{"event": "a"}]});
        assert_eq!(body_key(&bad).as_deref(), Some("k"));
    }

    #[test]
    fn webhook_destination_keeps_person_and_elements_chain() {
        let b = normalize(
            json!({"event": {"uuid": "0190b5d6-1d3e-7cc4-b1b8-7ab1a2c3d4e5", "event": "$autocapture", "distinct_id": "u",
                "properties": {"$pathname": "/pricing"}, "elements_chain": "button.btn:text=\"Upgrade\"",
                "timestamp": "2026-01-01T11:00:00Z", "url": "https://app.posthog.com/events/1"},
                "person": {"id": "p1", "properties": {"email": "a@b.c"}}}),
            now(),
        )
        .unwrap();
        let e = &b[0];
        assert_eq!(
            e.elements_chain.as_deref(),
            Some("button.btn:text=\"Upgrade\"")
        );
        assert_eq!(e.person.as_ref().unwrap().properties["email"], "a@b.c");
        assert_eq!(e.uuid.to_string(), "0190b5d6-1d3e-7cc4-b1b8-7ab1a2c3d4e5");
        assert_eq!(
            err_attr(json!({"event": {"event": "x"}, "person": {}})),
            "event.distinct_id"
        );
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            err_attr(json!({"batch": [{"event": "a", "distinct_id": "u"}, {"event": "b"}]})),
            "batch[1].distinct_id"
        );
        assert_eq!(
            err_attr(json!([{"event": "a", "distinct_id": "u"}, 3])),
            "[1]"
        );
        assert_eq!(err_attr(json!({"distinct_id": "u"})), "event");
        assert_eq!(err_attr(json!({"event": "", "distinct_id": "u"})), "event");
        assert_eq!(
            err_attr(json!({"event": "a", "distinct_id": "x".repeat(201)})),
            "distinct_id"
        );
        assert_eq!(
            err_attr(json!({"event": "a", "distinct_id": "u\u{0}"})),
            "distinct_id"
        );
        assert_eq!(
            err_attr(json!({"event": "a", "distinct_id": {}})),
            "distinct_id"
        );
        assert_eq!(
            err_attr(json!({"event": "a", "distinct_id": "u", "timestamp": "yesterday"})),
            "timestamp"
        );
        assert_eq!(
            err_attr(json!({"event": "a", "distinct_id": "u", "uuid": "nope"})),
            "uuid"
        );
        assert_eq!(
            err_attr(json!({"event": "a", "distinct_id": "u", "properties": []})),
            "properties"
        );
        assert_eq!(err_attr(json!({"batch": {}})), "batch");
        assert_eq!(err_attr(json!({"batch": []})), "batch");
        assert!(normalize(json!({"event": "a", "distinct_id": "x".repeat(200)}), now()).is_ok());
    }

    #[test]
    fn clock_skew_is_corrected_and_future_capped() {
        // client clock 1 h fast: event 10 s before its send
        let b = normalize(
            json!({"sent_at": "2026-01-01T13:00:00Z",
                   "batch": [{"event": "a", "distinct_id": "u", "timestamp": "2026-01-01T12:59:50Z"}]}),
            now(),
        )
        .unwrap();
        assert_eq!(b[0].timestamp, now() - Duration::seconds(10));
        let b = normalize(
            json!({"event": "a", "distinct_id": "u", "offset": 1500}),
            now(),
        )
        .unwrap();
        assert_eq!(b[0].timestamp, now() - Duration::milliseconds(1500));
        let b = normalize(
            json!({"event": "a", "distinct_id": "u", "timestamp": "2026-01-03T00:00:00Z"}),
            now(),
        )
        .unwrap();
        assert_eq!(b[0].timestamp, now());
        let b = normalize(
            json!({"event": "a", "distinct_id": "u", "timestamp": "2025-12-31T00:00:00"}),
            now(),
        )
        .unwrap();
        assert_eq!(b[0].timestamp.to_rfc3339(), "2025-12-31T00:00:00+00:00");
        let b = normalize(json!({"event": "a", "distinct_id": "u"}), now()).unwrap();
        assert_eq!((b[0].timestamp, b[0].received_at), (now(), now()));
    }

    #[test]
    fn times_out_of_range_are_refused_never_panic() {
        let code_and_attr = |body: Value| {
            let err = normalize(body, now()).unwrap_err();
            (err.body.code, err.body.attr.unwrap_or_default())
        };
        let bad_time = |attr: &str| ("invalid_timestamp".to_string(), attr.to_string());
        for offset in [
            i64::MAX,
            i64::MIN,
            9_000_000_000_000_000,
            -9_000_000_000_000_000,
        ] {
            let body = json!({"event": "x", "distinct_id": "u", "offset": offset});
            assert_eq!(code_and_attr(body), bad_time("offset"));
        }
        // Thirty years ahead: moved to the time received, as any time over 23 h ahead.
        let body = json!({"event": "x", "distinct_id": "u", "offset": -1_000_000_000_000i64});
        assert_eq!(normalize(body, now()).unwrap()[0].timestamp, now());
        // Before 1970, given or after correction.
        assert_eq!(
            code_and_attr(
                json!({"event": "x", "distinct_id": "u", "timestamp": "1969-12-31T23:59:59Z"})
            ),
            bad_time("timestamp")
        );
        assert_eq!(
            code_and_attr(json!({"event": "x", "distinct_id": "u", "timestamp": -1})),
            bad_time("timestamp")
        );
        assert_eq!(
            code_and_attr(json!({"batch": [{"event": "x", "distinct_id": "u",
                "timestamp": "0001-01-01T00:00:00Z", "sent_at": "9999-12-31T00:00:00Z"}]})),
            bad_time("batch[0].timestamp")
        );
        // The extremes chrono reads, either way round, never panic.
        for (ts, sent) in [
            ("+262142-12-31T23:59:59Z", "-262143-01-01T00:00:00Z"),
            ("-262143-01-01T00:00:00Z", "+262142-12-31T23:59:59Z"),
        ] {
            let _ = normalize(
                json!({"event": "x", "distinct_id": "u", "timestamp": ts, "sent_at": sent}),
                now(),
            );
        }
        let b = normalize(
            json!({"event": "x", "distinct_id": "u", "timestamp": "1970-01-01T00:00:00Z"}),
            now(),
        )
        .unwrap();
        assert_eq!(b[0].timestamp, MIN_TIMESTAMP);
    }

    #[test]
    fn texts_and_properties_are_bounded() {
        use crate::ingest::limits::{MAX_PROPERTIES_DEPTH, MAX_PROPERTY_KEY_CHARS};
        let long = |n: usize| "x".repeat(n);
        let code_and_attr = |body: Value| {
            let err = normalize(body, now()).unwrap_err();
            (err.body.code, err.body.attr.unwrap_or_default())
        };
        let too = |code: &str, attr: &str| (code.to_string(), attr.to_string());
        assert!(normalize(json!({"event": long(200), "distinct_id": "u"}), now()).is_ok());
        assert_eq!(
            code_and_attr(json!({"event": long(201), "distinct_id": "u"})),
            too("too_long", "event")
        );
        assert!(
            normalize(
                json!({"event": "e", "distinct_id": "u", "properties": {"$session_id": long(200)}}),
                now()
            )
            .is_ok()
        );
        assert_eq!(
            code_and_attr(
                json!({"batch": [{"event": "e", "distinct_id": "u", "properties": {"$session_id": long(201)}}]})
            ),
            too("too_long", "batch[0].properties.$session_id")
        );
        assert_eq!(
            code_and_attr(json!({"event": "e", "distinct_id": "u", "$session_id": long(201)})),
            too("too_long", "$session_id")
        );
        assert_eq!(
            code_and_attr(
                json!({"event": "e", "distinct_id": "u", "properties": {"a": {long(MAX_PROPERTY_KEY_CHARS + 1): 1}}})
            ),
            too("too_long", "properties")
        );
        assert_eq!(
            code_and_attr(
                json!({"event": "e", "distinct_id": "u", "$set": {long(MAX_PROPERTY_KEY_CHARS + 1): 1}})
            ),
            too("too_long", "properties")
        );
        let mut deep = json!(1);
        for _ in 0..MAX_PROPERTIES_DEPTH {
            deep = json!([deep]);
        }
        assert_eq!(
            code_and_attr(
                json!([{"event": "e", "distinct_id": "u", "properties": {"deep": deep}}])
            ),
            too("too_deep", "[0].properties")
        );
        assert_eq!(
            code_and_attr(
                json!({"event": {"event": "e", "distinct_id": "u"}, "person": {"properties": {"deep": deep}}})
            ),
            too("too_deep", "person.properties")
        );
    }
}
