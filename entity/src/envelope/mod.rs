//! The stream envelope: the wire contract between `api` (producer) and `worker` (consumer).
//!
//! Each accepted event becomes one Redis Stream entry with the fields
//! `v` = [`ENVELOPE_VERSION`], `event` = the JSON of [`Envelope`], and optionally
//! `traceparent` (W3C trace context of the request that accepted it). This module reads
//! entries; [`write`](mod@write) writes the `event` field without building an [`Envelope`],
//! and [`scan`] walks JSON object text without decoding it.

pub mod scan;
pub mod write;

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Version written in the `v` field of every stream entry.
pub const ENVELOPE_VERSION: &str = "1";
/// Stream entry field holding [`ENVELOPE_VERSION`].
pub const FIELD_VERSION: &str = "v";
/// Stream entry field holding the JSON-encoded [`Envelope`].
pub const FIELD_EVENT: &str = "event";
/// Optional stream entry field holding a W3C `traceparent`.
pub const FIELD_TRACEPARENT: &str = "traceparent";

/// One normalised event, as the api accepted it. `P` is how `properties` are held: decoded as a
/// map (the default), or as the JSON text the entry carries (`Option<&RawValue>`, for a reader
/// that decodes only some of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "P: Serialize",
    deserialize = "P: Deserialize<'de> + Default"
))]
pub struct Envelope<P = Map<String, Value>> {
    /// Idempotency key: client-sent or a UUIDv7 generated at ingest. Primary key of the stored event.
    pub uuid: Uuid,
    /// The user the event belongs to (at most 200 characters).
    pub distinct_id: String,
    /// Event name, e.g. `$pageview`, `$autocapture`, `signup_completed`.
    pub event: String,
    /// Event properties as sent (PostHog `$`-prefixed ones included).
    #[serde(default)]
    pub properties: P,
    /// When the event happened, after PostHog clock-skew correction.
    pub timestamp: DateTime<Utc>,
    /// When the api accepted it.
    pub received_at: DateTime<Utc>,
    /// The client's send time, when it reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
    /// `$session_id` of the event, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The SDK that sent it (`$lib`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lib: Option<String>,
    /// PostHog's `elements_chain` string for `$autocapture` events, when sent outside `properties`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elements_chain: Option<String>,
    /// The person PostHog attached to the event (HTTP Webhook destination bodies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<Person>,
}

/// A PostHog person as forwarded by PostHog's HTTP Webhook destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Person {
    /// PostHog's person id, when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Person properties (email, plan, …).
    #[serde(default)]
    pub properties: Map<String, Value>,
}

/// Why a stream entry could not be turned back into an [`Envelope`].
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("stream entry has no `{0}` field")]
    MissingField(&'static str),
    #[error("unsupported envelope version `{0}` (this build reads version {ENVELOPE_VERSION})")]
    UnsupportedVersion(String),
    #[error("`event` field is not a valid envelope: {0}")]
    Json(#[from] serde_json::Error),
}

impl<P> Envelope<P> {
    /// Decodes an entry from its fields, checking the envelope version. `P` may borrow from the
    /// entry (`Option<&RawValue>`: the properties as written, not decoded).
    pub fn from_fields<'a>(
        mut field: impl FnMut(&str) -> Option<&'a [u8]>,
    ) -> Result<Self, EnvelopeError>
    where
        P: Deserialize<'a> + Default,
    {
        let version = field(FIELD_VERSION).ok_or(EnvelopeError::MissingField(FIELD_VERSION))?;
        if version != ENVELOPE_VERSION.as_bytes() {
            return Err(EnvelopeError::UnsupportedVersion(
                String::from_utf8_lossy(version).into_owned(),
            ));
        }
        let event = field(FIELD_EVENT).ok_or(EnvelopeError::MissingField(FIELD_EVENT))?;
        Ok(serde_json::from_slice(event)?)
    }

    /// The same envelope holding `properties` instead.
    pub fn with_properties<Q>(self, properties: Q) -> Envelope<Q> {
        Envelope {
            uuid: self.uuid,
            distinct_id: self.distinct_id,
            event: self.event,
            properties,
            timestamp: self.timestamp,
            received_at: self.received_at,
            sent_at: self.sent_at,
            session_id: self.session_id,
            lib: self.lib,
            elements_chain: self.elements_chain,
            person: self.person,
        }
    }
}

impl Envelope {
    /// Encodes the envelope as the JSON stored in the `event` field.
    pub fn to_json(&self) -> String {
        // Serialising plain data (strings, maps of JSON values, timestamps) cannot fail.
        serde_json::to_string(self).expect("envelope serialises")
    }

    /// The `distinct_id` of an encoded envelope (the `event` field), read without building the
    /// rest: the worker routes entries by user before decoding them. Only the members before it
    /// are walked over, not decoded ([`scan::first`]); the rest of the text is not looked at.
    /// `None` if it is not a JSON object or has no string `distinct_id`.
    pub fn distinct_id_of(event: &[u8]) -> Option<Cow<'_, str>> {
        let value = scan::first(event, "distinct_id")?;
        match serde_json::from_slice::<&str>(value) {
            Ok(text) => Some(Cow::Borrowed(text)),
            Err(_) => serde_json::from_slice::<String>(value).ok().map(Cow::Owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            uuid: Uuid::now_v7(),
            distinct_id: "user_1".into(),
            event: "$pageview".into(),
            properties: serde_json::json!({"$current_url": "https://x.test/pricing"})
                .as_object()
                .unwrap()
                .clone(),
            timestamp: Utc::now(),
            received_at: Utc::now(),
            sent_at: None,
            session_id: Some("s1".into()),
            lib: None,
            elements_chain: None,
            person: None,
        }
    }

    #[test]
    fn round_trips_through_fields() {
        let env = sample();
        let json = env.to_json();
        let back = Envelope::from_fields(|f| match f {
            "v" => Some(b"1".as_slice()),
            "event" => Some(json.as_bytes()),
            _ => None,
        })
        .unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn distinct_id_is_read_alone() {
        let mut env = sample();
        assert_eq!(
            Envelope::distinct_id_of(env.to_json().as_bytes()).as_deref(),
            Some("user_1")
        );
        env.distinct_id = "a \"quoted\" \u{e9}".into();
        assert_eq!(
            Envelope::distinct_id_of(env.to_json().as_bytes()).as_deref(),
            Some(env.distinct_id.as_str())
        );
        assert_eq!(
            Envelope::distinct_id_of(
                br#"{"properties": {"distinct_id": "inner"}, "distinct_id": "outer"}"#
            )
            .as_deref(),
            Some("outer"),
            "the top-level field, not one inside properties"
        );
        assert_eq!(Envelope::distinct_id_of(b"{\"distinct_id\": 7}"), None);
        assert_eq!(Envelope::distinct_id_of(br#"{"event": "e"}"#), None);
        assert_eq!(Envelope::distinct_id_of(b"not json"), None);
    }

    #[test]
    fn rejects_unknown_version() {
        let err = <Envelope>::from_fields(|f| match f {
            "v" => Some(b"9".as_slice()),
            _ => Some(b"{}".as_slice()),
        })
        .unwrap_err();
        assert!(err.to_string().contains("version `9`"), "{err}");
    }
}
