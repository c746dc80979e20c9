//! Fast path for the shapes SDKs send all day: plain events, `{"batch": [...]}` and arrays.
//!
//! Parses borrowing from the request bytes and copies each event's `properties` into the envelope
//! as raw JSON text, instead of building and re-serialising a JSON tree. Anything unusual (webhook
//! bodies, `$set` at the top level, a validation error, …) returns `None` and the request takes
//! the full path in [`crate::normalize`], which owns every error message. Both paths produce the
//! same envelopes (tested below).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use entity::Envelope;
use serde::{Deserialize, Serialize, de::IgnoredAny};
use serde_json::{Value, value::RawValue};
use uuid::Uuid;

use crate::decode::parse_json;
use crate::error::ApiError;
use crate::normalize::{
    body_key, corrected_timestamp, first_distinct_id, normalize as full_normalize, parse_time,
    scalar_string, validate_distinct_id, validate_event_name,
};

/// One event ready for the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub uuid: Uuid,
    /// The envelope's JSON, as stored in the entry's `event` field.
    pub json: String,
}

impl From<&Envelope> for Queued {
    fn from(env: &Envelope) -> Self {
        Self {
            uuid: env.uuid,
            json: env.to_json(),
        }
    }
}

/// A request's events and the key its body carried.
pub struct FastBatch {
    pub body_key: Option<String>,
    pub events: Vec<Queued>,
}

#[derive(Deserialize)]
struct RawBatch<'a> {
    /// Parsed in the same pass as the envelope (no separate split into raw items).
    #[serde(borrow)]
    batch: Vec<RawEvent<'a>>,
    #[serde(default, borrow)]
    api_key: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(default)]
    sent_at: Option<Value>,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(default)]
    distinct_id: Option<Value>,
    #[serde(default, rename = "$distinct_id")]
    dollar_distinct_id: Option<Value>,
    #[serde(default, borrow)]
    properties: Option<&'a RawValue>,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(default)]
    sent_at: Option<Value>,
    #[serde(default)]
    offset: Option<Value>,
    #[serde(default, borrow)]
    uuid: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    api_key: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    token: Option<Cow<'a, str>>,
    // Present: the full path handles the event.
    #[serde(default, rename = "$set")]
    set: Option<IgnoredAny>,
    #[serde(default, rename = "$set_once")]
    set_once: Option<IgnoredAny>,
    #[serde(default, rename = "$session_id")]
    dollar_session_id: Option<IgnoredAny>,
    #[serde(default)]
    session_id: Option<IgnoredAny>,
    #[serde(default)]
    elements_chain: Option<IgnoredAny>,
    #[serde(default)]
    person: Option<IgnoredAny>,
}

/// The few properties the envelope lifts out.
#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    distinct_id: Option<Value>,
    #[serde(default)]
    token: Option<Value>,
    #[serde(default, rename = "$session_id")]
    session_id: Option<Value>,
    #[serde(default, rename = "$lib")]
    lib: Option<Value>,
}

/// Serialises exactly like [`Envelope`], with `properties` as raw text.
#[derive(Serialize)]
struct EnvelopeOut<'a> {
    uuid: Uuid,
    distinct_id: &'a str,
    event: &'a str,
    properties: &'a RawValue,
    timestamp: DateTime<Utc>,
    received_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sent_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lib: Option<&'a str>,
}

/// Turns decoded JSON text into events for the stream: the fast path when it applies, else the
/// full path. `check_key` is given the key the body carries before any validation error is
/// reported; `source` names the parameter the JSON came from, when not the body.
pub fn queue(
    json: &[u8],
    now: DateTime<Utc>,
    source: Option<&str>,
    check_key: impl FnOnce(Option<&str>) -> Result<(), ApiError>,
) -> Result<Vec<Queued>, ApiError> {
    if let Some(batch) = normalize(json, now) {
        check_key(batch.body_key.as_deref())?;
        return Ok(batch.events);
    }
    let json = parse_json(json).map_err(|e| match source {
        Some(attr) => e.at(attr),
        None => e,
    })?;
    check_key(body_key(&json).as_deref())?;
    Ok(full_normalize(json, now)?
        .iter()
        .map(Queued::from)
        .collect())
}

/// Normalises `json` (decoded body text) when it is one of the everyday shapes and valid.
pub fn normalize(json: &[u8], now: DateTime<Utc>) -> Option<FastBatch> {
    let first = *json.iter().find(|b| !b.is_ascii_whitespace())?;
    match first {
        b'[' => {
            let items: Vec<RawEvent> = serde_json::from_slice(json).ok()?;
            let (events, first_key) = events(items, None, now)?;
            Some(FastBatch {
                body_key: first_key,
                events,
            })
        }
        b'{' => {
            if let Ok(batch) = serde_json::from_slice::<RawBatch>(json) {
                let sent_at = match &batch.sent_at {
                    None => None,
                    Some(v) => Some(parse_time(v).ok()?),
                };
                let (events, first_key) = events(batch.batch, sent_at, now)?;
                let body_key = batch
                    .api_key
                    .or(batch.token)
                    .map(Cow::into_owned)
                    .or(first_key);
                return Some(FastBatch { body_key, events });
            }
            let single: RawEvent = serde_json::from_slice(json).ok()?;
            let (events, key) = events(vec![single], None, now)?;
            Some(FastBatch {
                body_key: key,
                events,
            })
        }
        _ => None,
    }
}

/// The events of `items`, plus the key the first one carries.
fn events(
    items: Vec<RawEvent>,
    sent_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<(Vec<Queued>, Option<String>)> {
    if items.is_empty() {
        return None;
    }
    let mut first_key = None;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let (queued, key) = event(item, sent_at, now)?;
        if i == 0 {
            first_key = key;
        }
        out.push(queued);
    }
    Some((out, first_key))
}

const EMPTY_OBJECT: &str = "{}";

fn event(
    ev: RawEvent,
    batch_sent_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<(Queued, Option<String>)> {
    if ev.set.is_some()
        || ev.set_once.is_some()
        || ev.dollar_session_id.is_some()
        || ev.session_id.is_some()
        || ev.elements_chain.is_some()
        || ev.person.is_some()
    {
        return None;
    }
    validate_event_name(&ev.event).ok()?;
    let empty: Box<RawValue>;
    let properties = match ev.properties {
        Some(p) if p.get().starts_with('{') => p,
        Some(_) => return None,
        None => {
            empty = RawValue::from_string(EMPTY_OBJECT.to_string()).ok()?;
            &empty
        }
    };
    let peek: Peek = serde_json::from_str(properties.get()).ok()?;
    let (attr, id) = first_distinct_id([
        ("distinct_id", ev.distinct_id.as_ref()),
        ("$distinct_id", ev.dollar_distinct_id.as_ref()),
        ("properties.distinct_id", peek.distinct_id.as_ref()),
    ])
    .ok()?;
    let distinct_id = validate_distinct_id(attr, id).ok()?;
    let uuid = match ev.uuid {
        None => Uuid::now_v7(),
        Some(s) => Uuid::parse_str(s.trim()).ok()?,
    };
    let time = |v: &Option<Value>| match v {
        None => Some(None),
        Some(v) => parse_time(v).ok().map(Some),
    };
    let timestamp = time(&ev.timestamp)?;
    let sent_at = time(&ev.sent_at)?.or(batch_sent_at);
    let offset = match &ev.offset {
        None => None,
        Some(v) => Some(v.as_i64()?),
    };
    let out = EnvelopeOut {
        uuid,
        distinct_id: &distinct_id,
        event: &ev.event,
        properties,
        timestamp: corrected_timestamp(timestamp, sent_at, offset, now),
        received_at: now,
        sent_at,
        session_id: peek.session_id.as_ref().and_then(scalar_string),
        lib: peek.lib.as_ref().and_then(Value::as_str),
    };
    let properties_token = match peek.token {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let key = ev
        .api_key
        .or(ev.token)
        .map(Cow::into_owned)
        .or(properties_token);
    Some((
        Queued {
            uuid,
            json: serde_json::to_string(&out).ok()?,
        },
        key,
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::normalize::{body_key, normalize as full};

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-28T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn decode(q: &Queued) -> Envelope {
        serde_json::from_str(&q.json).unwrap()
    }

    /// Same envelopes and key as the full path (uuids aside when generated).
    fn agrees(body: Value) {
        let bytes = serde_json::to_vec(&body).unwrap();
        let fast = normalize(&bytes, now()).unwrap_or_else(|| panic!("fast path declined {body}"));
        let slow = full(body.clone(), now()).unwrap();
        assert_eq!(fast.body_key, body_key(&body), "{body}");
        assert_eq!(fast.events.len(), slow.len());
        for (f, s) in fast.events.iter().zip(&slow) {
            let mut f = decode(f);
            if f.uuid.get_version_num() == 7 && s.uuid.get_version_num() == 7 {
                f.uuid = s.uuid;
            }
            assert_eq!(&f, s, "{body}");
        }
    }

    #[test]
    fn agrees_with_the_full_path() {
        agrees(
            json!({"event": "$pageview", "distinct_id": "u", "properties": {"$session_id": "s", "$lib": "web", "token": "k", "a": [1, {"b": null}], "nul": "x\u{0}y"}}),
        );
        agrees(
            json!({"api_key": "k", "sent_at": "2026-11-28T13:00:00Z", "batch": [
                {"event": "a", "distinct_id": 42, "timestamp": "2026-11-28T12:59:50Z", "uuid": "0190b5d6-0000-7000-8000-000000000001"},
                {"event": "b", "$distinct_id": "x", "offset": 1500, "properties": {"$session_id": 7}},
                {"event": "c", "properties": {"distinct_id": "p"}, "timestamp": "2026-11-28T10:00:00"}
            ]}),
        );
        agrees(
            json!([{"event": "a", "distinct_id": "u", "token": "t", "type": "capture", "library": "posthog-python"}]),
        );
        agrees(
            json!({"event": "a", "distinct_id": "u", "timestamp": 1764331200000i64, "properties": {}}),
        );
        agrees(
            json!({"event": "é ✓", "distinct_id": "ü\"quoted\"", "properties": {"text": "line\nbreak \\ \"q\""}}),
        );
    }

    #[test]
    fn declines_what_the_full_path_must_handle() {
        let declines =
            |body: Value| normalize(&serde_json::to_vec(&body).unwrap(), now()).is_none();
        assert!(
            declines(json!({"event": {"event": "a", "distinct_id": "u"}, "person": {}})),
            "webhook"
        );
        assert!(declines(
            json!({"event": "a", "distinct_id": "u", "$set": {"plan": "pro"}})
        ));
        assert!(declines(json!({"event": "a"})), "missing distinct_id");
        assert!(declines(
            json!({"batch": [{"event": "a", "distinct_id": "u"}, {"event": ""}]})
        ));
        assert!(declines(
            json!({"event": "a", "distinct_id": "u", "properties": []})
        ));
        assert!(declines(
            json!({"event": "a", "distinct_id": "u", "uuid": "nope"})
        ));
        assert!(declines(json!({"batch": []})));
        assert!(declines(json!([])));
        assert!(
            normalize(
                br#"{"event": "a", "distinct_id": "u", "event": "b"}"#,
                now()
            )
            .is_none(),
            "duplicate key"
        );
    }
}
