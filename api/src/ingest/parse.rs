//! The single-pass reader of capture bodies: the shapes SDKs send all day (plain events,
//! `{"batch": [...]}` and arrays) read borrowing from the request bytes, each event's
//! `properties` copied into its envelope as JSON text ([`EnvelopeRef`]) instead of building and
//! re-serialising a JSON tree. Anything unusual (webhook bodies, `$set` at the top level, a
//! validation error, …) takes the full path in [`super::normalize`], which owns every error
//! message; [`queue`] picks the path. Both produce the same envelopes (tested below).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use entity::{
    Envelope,
    envelope::{
        scan::{self, has_lone_surrogate},
        write::EnvelopeRef,
    },
};
use serde::{Deserialize, de::IgnoredAny};
use serde_json::{Value, value::RawValue};
use uuid::Uuid;

use super::decode::parse_json;
use super::limits::walk_properties;
use super::normalize::{
    Nullable, body_key, check_distinct_id, check_session_id, corrected_timestamp,
    first_distinct_id, normalize as full_normalize, parse_time, parse_time_text, scalar_string,
    validate_event_name,
};
use crate::http::error::ApiError;

/// One event ready for the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub uuid: Uuid,
    /// The envelope's JSON, as stored in the entry's `event` field.
    pub json: String,
    /// [`infra::shards::user_hash`] of its `distinct_id`: which stream shard it goes to.
    pub user_hash: u64,
}

impl From<&Envelope> for Queued {
    fn from(env: &Envelope) -> Self {
        Self {
            uuid: env.uuid,
            json: env.to_json(),
            user_hash: infra::shards::user_hash(&env.distinct_id),
        }
    }
}

/// A request's events and the key its body carried (the fast path alone, for its tests).
#[cfg(test)]
pub struct FastBatch {
    pub body_key: Option<String>,
    pub events: Vec<Queued>,
}

/// An event, or (with `batch`) a whole `{"batch": [...], "api_key", "sent_at"}` body: one struct
/// so that a body is parsed in one pass whichever of the two it is.
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(default, borrow)]
    event: Option<Text<'a>>,
    #[serde(default, borrow)]
    #[serde(deserialize_with = "present")]
    batch: Option<Option<Vec<RawEvent<'a>>>>,
    #[serde(default, borrow)]
    distinct_id: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "$distinct_id")]
    dollar_distinct_id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    properties: Option<&'a RawValue>,
    #[serde(default, borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(default, borrow)]
    sent_at: Option<&'a RawValue>,
    #[serde(default)]
    offset: Option<Value>,
    #[serde(default, borrow)]
    uuid: Option<Text<'a>>,
    #[serde(default, borrow)]
    api_key: Option<Text<'a>>,
    #[serde(default, borrow)]
    token: Option<Text<'a>>,
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

/// A string borrowed from the body when it holds no escapes. (serde borrows only into a field
/// typed exactly `Cow<str>`; inside an `Option` it would always copy.)
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl Text<'_> {
    fn into_owned(self) -> String {
        self.0.into_owned()
    }
}

/// A field that is present, even as `null` (`Some(None)`), as opposed to absent (`None`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// The few properties the envelope lifts out, each `None` when absent.
#[derive(Default)]
struct Peek<'a> {
    distinct_id: Option<Lifted<'a>>,
    token: Option<Lifted<'a>>,
    session_id: Option<Lifted<'a>>,
    lib: Option<Lifted<'a>>,
}

/// A lifted property: a string (borrowed from the body when written without escapes, as
/// `$session_id` and `$lib` always are), or any other value.
enum Lifted<'a> {
    Str(Cow<'a, str>),
    Other(Value),
}

impl<'a> Lifted<'a> {
    /// The value whose JSON text is `raw`; `None` when it does not parse.
    fn parse(raw: &'a [u8]) -> Option<Self> {
        if let [b'"', inner @ .., b'"'] = raw
            && !inner.contains(&b'\\')
        {
            return std::str::from_utf8(inner)
                .ok()
                .map(|s| Lifted::Str(Cow::Borrowed(s)));
        }
        Some(match serde_json::from_slice(raw).ok()? {
            Value::String(s) => Lifted::Str(Cow::Owned(s)),
            other => Lifted::Other(other),
        })
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Lifted::Str(s) => Some(s),
            Lifted::Other(_) => None,
        }
    }

    /// A string or a number, not empty, as [`scalar_string`] reads one.
    fn scalar(&self) -> Option<Cow<'_, str>> {
        match self {
            Lifted::Str(s) if !s.is_empty() => Some(Cow::Borrowed(s)),
            Lifted::Str(_) => None,
            Lifted::Other(v) => scalar_string(v).map(Cow::Owned),
        }
    }

    /// The value whose JSON text `raw` is, if any.
    fn of(raw: Option<&'a RawValue>) -> Option<Option<Self>> {
        match raw {
            None => Some(None),
            Some(raw) => Self::parse(raw.get().as_bytes()).map(Some),
        }
    }
}

impl Nullable for Lifted<'_> {
    fn is_null(&self) -> bool {
        matches!(self, Lifted::Other(Value::Null))
    }
}

impl<'a> Peek<'a> {
    /// Looks into `properties`, JSON object text serde_json has already validated, with the one
    /// scan that also checks the bounds of [`super::limits`]; only the values lifted out are
    /// parsed, not the whole object again. `None` declines: a bound passed, or one of the four
    /// given twice, is left to the full path.
    fn of(properties: &'a str) -> Option<Peek<'a>> {
        let mut peek = Peek::default();
        walk_properties(properties.as_bytes(), |quoted_key, value| {
            let slot = match &*scan::key(quoted_key)? {
                b"distinct_id" => &mut peek.distinct_id,
                b"token" => &mut peek.token,
                b"$session_id" => &mut peek.session_id,
                b"$lib" => &mut peek.lib,
                _ => return Some(()),
            };
            if slot.is_some() {
                return None;
            }
            *slot = Some(Lifted::parse(value)?);
            Some(())
        })?;
        Some(peek)
    }
}

/// Turns decoded JSON text into events for the stream: the fast path when it applies, else the
/// full path. `check_key` is given the key the body carries as soon as the body is tokenised,
/// before any event is validated or built; `source` names the parameter the JSON came from, when
/// not the body. An event whose envelope is over `max_event_bytes` is refused (413, naming it).
pub fn queue(
    json: &[u8],
    now: DateTime<Utc>,
    source: Option<&str>,
    max_event_bytes: usize,
    check_key: impl FnOnce(Option<&str>) -> Result<(), ApiError>,
) -> Result<Vec<Queued>, ApiError> {
    let mut check_key = Some(check_key);
    if let Some(body) = Body::parse(json) {
        (check_key.take().expect("checked once"))(body.key.as_deref())?;
        if let Some(events) = body.events(now, max_event_bytes) {
            return Ok(events);
        }
    }
    let json = parse_json(json).map_err(|e| match source {
        Some(attr) => e.at(attr),
        None => e,
    })?;
    if let Some(check_key) = check_key {
        check_key(body_key(&json).as_deref())?;
    }
    let shape = Shape::of(&json);
    let events: Vec<Queued> = full_normalize(json, now)?
        .iter()
        .map(Queued::from)
        .collect();
    for (i, event) in events.iter().enumerate() {
        if event.json.len() > max_event_bytes {
            let err = ApiError::event_too_large(max_event_bytes, event.json.len());
            return Err(match shape.attr(i) {
                Some(attr) => err.at(attr),
                None => err,
            });
        }
    }
    Ok(events)
}

/// Where a body's events sit, for naming one in an error.
enum Shape {
    Single,
    Array,
    Batch,
}

impl Shape {
    fn of(body: &Value) -> Self {
        match body {
            Value::Array(_) => Shape::Array,
            Value::Object(obj) if obj.contains_key("batch") => Shape::Batch,
            _ => Shape::Single,
        }
    }

    /// The path of event `i`: `batch[i]`, `[i]`, or none for a single event.
    fn attr(&self, i: usize) -> Option<String> {
        match self {
            Shape::Single => None,
            Shape::Array => Some(format!("[{i}]")),
            Shape::Batch => Some(format!("batch[{i}]")),
        }
    }
}

/// A body of one of the everyday shapes, tokenised: its events' fields found (`properties` left
/// as text), and the key it carries.
pub struct Body<'a> {
    items: Vec<RawEvent<'a>>,
    sent_at: Option<DateTime<Utc>>,
    /// The first event's lifted properties, read to find its key: not read twice.
    first_peek: Option<Peek<'a>>,
    /// The key the body carries: top-level `api_key` or `token` of a batch, else the first
    /// event's `api_key`, `token` or `properties.token` (what [`body_key`] reads).
    pub key: Option<String>,
}

impl<'a> Body<'a> {
    /// `json` (decoded body text) tokenised, when it is one of the everyday shapes.
    pub fn parse(json: &'a [u8]) -> Option<Self> {
        let first = *json.iter().find(|b| !b.is_ascii_whitespace())?;
        // Checked as UTF-8 once, whole: parsed from bytes, serde_json checks every string and raw
        // value it borrows on its own, and none of those it skips.
        let json = std::str::from_utf8(json).ok()?;
        // serde_json skips the strings it copies as raw text without decoding their escapes, so a
        // lone surrogate (`"\ud800"`) would reach the stream, where no JSON parser takes it.
        if has_lone_surrogate(json.as_bytes()) {
            return None;
        }
        let (items, sent_at, top_key) = match first {
            b'[' => (
                serde_json::from_str::<Vec<RawEvent>>(json).ok()?,
                None,
                None,
            ),
            b'{' => {
                let mut body: RawEvent = serde_json::from_str(json).ok()?;
                match body.batch.take() {
                    None => (vec![body], None, None),
                    Some(batch) => {
                        // `"batch": null` is an error, which the full path reports.
                        let items = batch?;
                        if body.event.is_some() {
                            return None;
                        }
                        let sent_at = optional_time(body.sent_at)?;
                        (
                            items,
                            sent_at,
                            body.api_key.or(body.token).map(Text::into_owned),
                        )
                    }
                }
            }
            _ => return None,
        };
        let first = items.first()?;
        let first_peek = peek_of(first.properties)?;
        let key = match top_key {
            Some(key) => Some(key),
            None => first_event_key(first, first_peek.as_ref()),
        };
        Some(Body {
            items,
            sent_at,
            first_peek,
            key,
        })
    }

    /// The events, when every one is valid and within the bounds; `None` leaves the body to the
    /// full path, which reports what is wrong.
    pub fn events(self, now: DateTime<Utc>, max_event_bytes: usize) -> Option<Vec<Queued>> {
        let mut out = Vec::with_capacity(self.items.len());
        let mut first_peek = self.first_peek;
        for item in self.items {
            let peek = match first_peek.take() {
                Some(peek) => peek,
                None => peek_of(item.properties)?.unwrap_or_default(),
            };
            let queued = event(item, peek, self.sent_at, now)?;
            if queued.json.len() > max_event_bytes {
                return None;
            }
            out.push(queued);
        }
        Some(out)
    }
}

/// An event's lifted properties: `Some(None)` when `properties` is not an object (the event is
/// declined when it is built), `None` when it passes a bound or lifts a key twice.
fn peek_of<'a>(properties: Option<&'a RawValue>) -> Option<Option<Peek<'a>>> {
    match properties {
        Some(p) if p.get().starts_with('{') => Peek::of(p.get()).map(Some),
        Some(_) => Some(None),
        None => Some(Some(Peek::default())),
    }
}

/// The key an event carries: `api_key`, `token`, or a string `properties.token`.
fn first_event_key(ev: &RawEvent, peek: Option<&Peek>) -> Option<String> {
    if let Some(key) = ev.api_key.as_ref().or(ev.token.as_ref()) {
        return Some(key.0.to_string());
    }
    match peek?.token.as_ref()? {
        Lifted::Str(s) => Some(s.to_string()),
        Lifted::Other(_) => None,
    }
}

/// Normalises `json` (decoded body text) when it is one of the everyday shapes and valid, with
/// the key it carries (no limit on an event's size): the fast path alone, for its tests.
#[cfg(test)]
pub fn normalize(json: &[u8], now: DateTime<Utc>) -> Option<FastBatch> {
    let body = Body::parse(json)?;
    let body_key = body.key.clone();
    let events = body.events(now, usize::MAX)?;
    Some(FastBatch { body_key, events })
}

/// A time field: `Some(None)` when absent, `None` (decline) when it does not parse.
fn optional_time(raw: Option<&RawValue>) -> Option<Option<DateTime<Utc>>> {
    match Lifted::of(raw)? {
        None => Some(None),
        Some(Lifted::Str(s)) => parse_time_text(&s).map(Some),
        Some(Lifted::Other(v)) => parse_time(&v).ok().map(Some),
    }
}

const EMPTY_OBJECT: &str = "{}";

/// The event `ev`, whose lifted properties are `peek`; `None` declines.
fn event(
    ev: RawEvent,
    peek: Peek,
    batch_sent_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<Queued> {
    if ev.batch.is_some()
        || ev.set.is_some()
        || ev.set_once.is_some()
        || ev.dollar_session_id.is_some()
        || ev.session_id.is_some()
        || ev.elements_chain.is_some()
        || ev.person.is_some()
    {
        return None;
    }
    let name = ev.event?.0;
    validate_event_name(&name).ok()?;
    let empty: Box<RawValue>;
    let properties = match ev.properties {
        Some(p) if p.get().starts_with('{') => p,
        Some(_) => return None,
        None => {
            empty = RawValue::from_string(EMPTY_OBJECT.to_string()).ok()?;
            &empty
        }
    };
    let (attr, id) = first_distinct_id([
        ("distinct_id", Lifted::of(ev.distinct_id)?),
        ("$distinct_id", Lifted::of(ev.dollar_distinct_id)?),
        ("properties.distinct_id", peek.distinct_id),
    ])
    .ok()?;
    let distinct_id = id.scalar()?;
    check_distinct_id(attr, &distinct_id).ok()?;
    let uuid = match ev.uuid {
        None => Uuid::now_v7(),
        Some(s) => Uuid::parse_str(s.0.trim()).ok()?,
    };
    let timestamp = optional_time(ev.timestamp)?;
    let sent_at = optional_time(ev.sent_at)?.or(batch_sent_at);
    let offset = match &ev.offset {
        None => None,
        Some(v) => Some(v.as_i64()?),
    };
    let session_id = peek.session_id.as_ref().and_then(Lifted::scalar);
    if let Some(id) = &session_id {
        check_session_id("properties.$session_id", id).ok()?;
    }
    let out = EnvelopeRef {
        uuid,
        distinct_id: &distinct_id,
        event: &name,
        properties,
        timestamp: corrected_timestamp(timestamp, sent_at, offset, now).ok()?,
        received_at: now,
        sent_at,
        session_id: session_id.as_deref(),
        lib: peek.lib.as_ref().and_then(Lifted::as_str),
    };
    Some(Queued {
        uuid,
        json: out.to_json(),
        user_hash: infra::shards::user_hash(&distinct_id),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ingest::normalize::{body_key, normalize as full};
    use crate::test_now as now;

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

    /// [`agrees`] for a body given as text (whitespace and escapes as written); its one event.
    fn agrees_text(body: &[u8]) -> Envelope {
        let fast = normalize(body, now()).expect("fast path");
        let slow = full(serde_json::from_slice(body).unwrap(), now()).unwrap();
        let mut f = decode(&fast.events[0]);
        f.uuid = slow[0].uuid;
        assert_eq!(f, slow[0]);
        f
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
        agrees(
            json!({"event": "a", "distinct_id": "u", "properties": {"x\"}": {"n": [1, 2.5, "]}\\"]}, "distinct_id": null, "$lib": 3, "$session_id": true}}),
        );
        agrees(
            json!({"event": "a", "distinct_id": null, "$distinct_id": null, "timestamp": null, "properties": {"distinct_id": 7}}),
        );
        // Escaped text in the fields read without serde's own strings.
        let f = agrees_text(br#"{"event": "a", "distinct_id": "u\u0031", "timestamp": "2026-11-28T10:00:00\u005a", "sent_at": "2026-11-28T10:00:01Z"}"#);
        assert_eq!(f.distinct_id, "u1");
        // Whitespace in the body's properties: the envelope holds the same values.
        let f = agrees_text(br#"{ "event" : "a", "properties" : { "distinct_id" : "p" , "caf\u00e9" : [ 1 , { } ] , "$session_id": "s" } }"#);
        assert_eq!(f.distinct_id, "p");
        assert_eq!(f.session_id.as_deref(), Some("s"));
        // A lifted key written with escapes is still found.
        let body = br#"{"event": "a", "properties": {"distinct\u005fid": "p", "$l\u0069b": "web", "tok\u0065n": "k"}}"#;
        let fast = normalize(body, now()).expect("fast path");
        assert_eq!(fast.body_key.as_deref(), Some("k"));
        let f = decode(&fast.events[0]);
        assert_eq!(
            (f.distinct_id.as_str(), f.lib.as_deref()),
            ("p", Some("web"))
        );
    }

    #[test]
    fn text_the_full_path_rejects_is_declined() {
        let cases: [&[u8]; 4] = [
            b"{\"event\": \"a\", \"distinct_id\": \"u\", \"ignored\": \"\xff\"}",
            br#"{"event": "a", "distinct_id": "u", "properties": {"x": "\ud800"}}"#,
            br#"{"event": "a", "distinct_id": "u", "properties": {"x": "\udc00\ud83d"}}"#,
            br#"{"event": "a", "distinct_id": "u", "ignored": ["\uD83D x"]}"#,
        ];
        for body in cases {
            assert!(normalize(body, now()).is_none(), "{}", body.escape_ascii());
            assert!(parse_json(body).is_err(), "{}", body.escape_ascii());
        }
        // Pairs, and backslashes that only look like the start of an escape, are fine.
        let body = br#"{"event": "a", "distinct_id": "u", "properties": {"emoji": "\ud83d\ude00", "path": "C:\\udata", "end": "\\"}}"#;
        let fast = normalize(body, now()).expect("fast path");
        let props = decode(&fast.events[0]).properties;
        assert_eq!(props["emoji"], "😀");
        assert_eq!(props["path"], "C:\\udata");
        assert!(!has_lone_surrogate(br#""\ud83d\ude00\\ud800""#));
        assert!(has_lone_surrogate(br#""\ud83d""#));
    }

    #[test]
    fn a_body_is_a_batch_or_an_event_never_both() {
        let declines =
            |body: Value| normalize(&serde_json::to_vec(&body).unwrap(), now()).is_none();
        assert!(declines(
            json!({"event": "a", "distinct_id": "u", "batch": [{"event": "b", "distinct_id": "u"}]})
        ));
        assert!(declines(
            json!({"batch": [{"event": "b", "distinct_id": "u", "batch": []}]})
        ));
        // The full path answers 400 for a null batch: the fast path must not take it as an event.
        assert!(declines(
            json!({"event": "a", "distinct_id": "u", "batch": null})
        ));
        assert!(
            full(
                json!({"event": "a", "distinct_id": "u", "batch": null}),
                now()
            )
            .is_err()
        );
        let batch = normalize(
            br#"{"batch": [{"event": "b", "distinct_id": "u"}], "distinct_id": "top", "properties": {"x": 1}}"#,
            now(),
        )
        .unwrap();
        assert_eq!(batch.events.len(), 1);
        assert_eq!(decode(&batch.events[0]).distinct_id, "u");
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
        for body in [
            json!({"event": "a", "distinct_id": true}),
            json!({"event": "a", "distinct_id": "u", "timestamp": "last tuesday"}),
            json!({"event": "a", "distinct_id": "u", "sent_at": false}),
            json!({"event": "a", "distinct_id": " "}),
        ] {
            assert!(declines(body.clone()), "{body}");
            assert!(full(body.clone(), now()).is_err(), "{body}");
        }
        for key in ["distinct_id", "$session_id", "$lib", "token"] {
            let body = format!(
                r#"{{"event": "a", "distinct_id": "u", "properties": {{"{key}": "x", "{key}": "y"}}}}"#
            );
            assert!(
                normalize(body.as_bytes(), now()).is_none(),
                "{key} twice in properties"
            );
        }
        assert!(
            normalize(
                br#"{"event": "a", "distinct_id": "u", "properties": {"token": "k", "tok\u0065n": "k"}}"#,
                now()
            )
            .is_none(),
            "token twice, once written with escapes"
        );
    }

    /// Bodies over a bound: the fast path leaves each to the full path, which refuses it.
    #[test]
    fn bodies_over_a_bound_are_left_to_the_full_path() {
        use crate::ingest::limits::{MAX_PROPERTIES_DEPTH, MAX_PROPERTY_KEY_CHARS};
        let long = |n: usize| "x".repeat(n);
        let deep = format!(
            r#"{{"event": "a", "distinct_id": "u", "properties": {{"d": {}1{}}}}}"#,
            "[".repeat(MAX_PROPERTIES_DEPTH),
            "]".repeat(MAX_PROPERTIES_DEPTH)
        );
        let bodies = [
            json!({"event": "a", "distinct_id": "u", "offset": 9_000_000_000_000_000i64}).to_string(),
            json!({"event": "a", "distinct_id": "u", "timestamp": "1969-01-01T00:00:00Z"}).to_string(),
            json!({"event": long(201), "distinct_id": "u"}).to_string(),
            json!({"event": "a", "distinct_id": "u", "properties": {"$session_id": long(201)}}).to_string(),
            json!({"event": "a", "distinct_id": "u", "properties": {"o": {long(MAX_PROPERTY_KEY_CHARS + 1): 1}}}).to_string(),
            deep,
            r#"{"event": "a", "distinct_id": "u", "properties": {"n": 1e400}}"#.to_string(),
        ];
        for body in bodies {
            let shown = &body[..body.len().min(120)];
            assert!(normalize(body.as_bytes(), now()).is_none(), "{shown}");
            assert!(
                queue(body.as_bytes(), now(), None, usize::MAX, |_| Ok(())).is_err(),
                "{shown}"
            );
        }
    }

    #[test]
    fn an_event_over_max_event_bytes_is_named() {
        let event = |n: usize| json!({"event": "a", "distinct_id": "u", "properties": {"x": "y".repeat(n)}});
        let small = Queued::from(&full(event(10), now()).unwrap()[0]).json.len();
        let limit = small + 100;
        for (body, attr) in [
            (json!([event(10), event(200)]), Some("[1]")),
            (
                json!({"api_key": "k", "batch": [event(10), event(10), event(200)]}),
                Some("batch[2]"),
            ),
            (event(200), None),
        ] {
            let bytes = serde_json::to_vec(&body).unwrap();
            let err = queue(&bytes, now(), None, limit, |_| Ok(())).unwrap_err();
            assert_eq!(err.status.as_u16(), 413, "{body}");
            assert_eq!(err.body.code, "event_too_large");
            assert_eq!(err.body.attr.as_deref(), attr, "{body}");
        }
        let ok = serde_json::to_vec(&json!([event(10), event(99)])).unwrap();
        assert_eq!(queue(&ok, now(), None, limit, |_| Ok(())).unwrap().len(), 2);
    }

    #[test]
    fn the_body_key_is_checked_before_any_event_is_validated() {
        let refuse = |_: Option<&str>| Err(ApiError::unauthenticated());
        // A bad event after the first: the key's answer comes first, on either path.
        for body in [
            json!({"batch": [{"event": "a", "distinct_id": "u"}, {"event": ""}]}),
            json!([{"event": "a", "distinct_id": "u"}, {"event": "b", "distinct_id": "u", "offset": 9_000_000_000_000_000i64}]),
            json!({"event": "a"}),
        ] {
            let bytes = serde_json::to_vec(&body).unwrap();
            let err = queue(&bytes, now(), None, usize::MAX, refuse).unwrap_err();
            assert_eq!(err.status.as_u16(), 401, "{body}");
        }
        // The key the check is given is the one the body carries.
        for (body, key) in [
            (
                json!({"batch": [{"event": "a", "distinct_id": "u", "api_key": "first"}], "token": "top"}),
                Some("top"),
            ),
            (
                json!([{"event": "a", "distinct_id": "u", "properties": {"token": "p"}}]),
                Some("p"),
            ),
            (json!({"event": "a", "distinct_id": "u"}), None),
        ] {
            let bytes = serde_json::to_vec(&body).unwrap();
            let mut seen = None;
            queue(&bytes, now(), None, usize::MAX, |k| {
                seen = Some(k.map(str::to_string));
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, Some(key.map(str::to_string)), "{body}");
            assert_eq!(Body::parse(&bytes).unwrap().key.as_deref(), key);
        }
    }
}
