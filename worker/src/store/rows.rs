//! The row of one event: decoding a stream entry for it, and building it from the enriched
//! envelope (NUL characters removed, person updates gathered).

use chrono::{DateTime, Utc};
use entity::{
    Envelope, EnvelopeError,
    envelope::scan::{decode_some, has_lone_surrogate},
};
use serde_json::{Map, Value as Json, value::RawValue};
use uuid::Uuid;

use rules_engine::enrich::{Describer, Enrichment, IntentHit, absolute_url_path};

use crate::{identity::Merge, profile::PersonUpdate, sanitize};

/// The properties a row is built from (beside those the rules read): page URL and path, session,
/// elements chain, the person properties an event sets or unsets, and the ids identity calls name.
pub const STORED_PROPERTIES: [&str; 9] = [
    "$current_url",
    "$pathname",
    "$session_id",
    "elements_chain",
    "$set",
    "$set_once",
    "$unset",
    "$anon_distinct_id",
    "alias",
];

/// Decodes a stream entry (its fields by name) for [`StoredEvent::new`]: the envelope with only
/// the properties `describer` reads and the row is built from ([`STORED_PROPERTIES`]) decoded, and
/// all of them as the entry carries them (stored as they are): decoding every property only to
/// encode it again is costly. Text with an escaped NUL has all of them decoded, to be cleaned.
///
/// Undecodable: not UTF-8, not JSON, a field of the wrong type, properties that are not an object
/// or hold a lone UTF-16 surrogate (not Unicode: Postgres would refuse the whole batch).
/// `"properties": null` is no properties, and a property no rule reads may hold a number beyond a
/// double (`1e400`): Postgres stores it.
pub fn decode<'e>(
    field: impl FnMut(&str) -> Option<&'e [u8]>,
    describer: &dyn Describer,
) -> Result<(Envelope, Option<&'e str>), EnvelopeError> {
    let envelope: Envelope<Option<&RawValue>> = Envelope::from_fields(field)?;
    let Some(written) = envelope.properties.map(RawValue::get) else {
        return Ok((envelope.with_properties(Map::new()), None));
    };
    if has_lone_surrogate(written.as_bytes()) {
        return Err(EnvelopeError::Json(serde::de::Error::custom(
            "`properties` hold a lone UTF-16 surrogate escape (not Unicode)",
        )));
    }
    let all = sanitize::may_hold_nul(written);
    let properties = decode_some(written, |key| {
        all || STORED_PROPERTIES.contains(&key) || describer.reads_property(key)
    })?;
    Ok((envelope.with_properties(properties), Some(written)))
}

/// An event ready to be written: enriched, with NUL characters removed.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub uuid: Uuid,
    pub distinct_id: String,
    pub event: String,
    /// `None`: a rule ignores the event (stored, but out of the context and the profile).
    pub description: Option<String>,
    pub rule_id: Option<String>,
    pub intents: Vec<IntentHit>,
    /// The `properties` column: JSON text without NUL characters.
    pub properties: String,
    pub url: Option<String>,
    pub path: Option<String>,
    pub session_id: Option<String>,
    pub elements_chain: Option<String>,
    pub timestamp: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub person: Option<PersonUpdate>,
    /// The identity call this event makes (`$identify`, `$create_alias`, `$merge_dangerously`).
    pub merge: Option<Merge>,
}

impl StoredEvent {
    /// Builds the row for an enriched envelope. `written` is the envelope's `properties` as the
    /// stream entry carries them ([`decode`]), when the caller has them:
    /// - that text is stored as it is (not encoded again), unless it holds an escaped NUL
    ///   character, and `envelope.properties` need only hold [`STORED_PROPERTIES`];
    /// - with a NUL, `envelope.properties` must hold them all: they are cleaned and encoded, as
    ///   they are without `written`.
    pub fn new(envelope: Envelope, enrichment: Enrichment, written: Option<&str>) -> Self {
        let written = written.filter(|text| !sanitize::may_hold_nul(text));
        let mut properties = envelope.properties;
        if written.is_none() {
            sanitize::object(&mut properties);
        }
        let prop_str = |key: &str| {
            properties
                .get(key)
                .and_then(Json::as_str)
                .filter(|s| !s.is_empty())
        };
        let url = prop_str("$current_url").map(str::to_string);
        let path = prop_str("$pathname").map(str::to_string).or_else(|| {
            url.as_deref()
                .and_then(absolute_url_path)
                .map(str::to_string)
        });
        let session_id = envelope
            .session_id
            .or_else(|| prop_str("$session_id").map(str::to_string));
        let elements_chain = envelope
            .elements_chain
            .or_else(|| prop_str("elements_chain").map(str::to_string));

        let mut person = PersonUpdate::default();
        if let Some(p) = envelope.person {
            person.set.extend(p.properties);
        }
        if let Some(Json::Object(set)) = properties.get("$set") {
            person
                .set
                .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(Json::Object(once)) = properties.get("$set_once") {
            person
                .set_once
                .extend(once.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        match properties.get("$unset") {
            Some(Json::Array(keys)) => person
                .unset
                .extend(keys.iter().filter_map(Json::as_str).map(sanitize_key)),
            Some(Json::Object(keys)) => person.unset.extend(keys.keys().map(|k| sanitize_key(k))),
            _ => {}
        }
        sanitize::object(&mut person.set);
        sanitize::object(&mut person.set_once);
        let distinct_id = sanitize::text(envelope.distinct_id);
        let merge = Merge::of(&envelope.event, &properties, &distinct_id);

        let intents = enrichment
            .intents
            .into_iter()
            .map(|mut hit| {
                hit.name = sanitize::shared_text(hit.name);
                hit.summary = sanitize::shared_text(hit.summary);
                hit
            })
            .collect();
        let properties = match written {
            Some(text) => text.to_string(),
            None => serde_json::to_string(&properties).unwrap_or_else(|_| "{}".into()),
        };
        Self {
            uuid: envelope.uuid,
            distinct_id,
            event: sanitize::text(envelope.event),
            description: (!enrichment.ignored).then(|| sanitize::text(enrichment.description)),
            rule_id: enrichment.rule_id.map(|r| sanitize::text(r.to_string())),
            intents,
            properties,
            url: url.map(sanitize::text),
            path: path.map(sanitize::text),
            session_id: session_id.map(sanitize::text),
            elements_chain: elements_chain.map(sanitize::text),
            timestamp: envelope.timestamp,
            received_at: envelope.received_at,
            person: (!person.is_empty()).then_some(person),
            merge,
        }
    }

    /// The ids this event names beside its own: the one its identity call joins.
    pub fn named_ids(&self) -> impl Iterator<Item = &str> {
        self.merge.iter().map(|m| m.other.as_str())
    }

    /// The `intents` column: weight per intent name.
    pub fn intents_json(&self) -> Json {
        let mut map = Map::new();
        for hit in &self.intents {
            let total = map.get(&*hit.name).and_then(Json::as_f64).unwrap_or(0.0) + hit.weight;
            map.insert(hit.name.to_string(), Json::from(total));
        }
        Json::Object(map)
    }
}

/// A person property key as stored: without NUL characters.
fn sanitize_key(key: &str) -> String {
    sanitize::text(key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules_engine::enrich::{NoRules, without_rules};

    #[test]
    fn row_fields_come_from_the_envelope_and_are_sanitised() {
        let envelope: Envelope = serde_json::from_value(serde_json::json!({
            "uuid": Uuid::now_v7(),
            "distinct_id": "u\u{0}1",
            "event": "$pageview",
            "properties": {
                "$current_url": "https://x.test/pricing?x=1",
                "$session_id": "s1",
                "$set": {"email": "a@x.test"},
                "bad\u{0}key": "v\u{0}"
            },
            "timestamp": "2026-11-28T10:00:00Z",
            "received_at": "2026-11-28T10:00:01Z",
            "person": {"properties": {"plan": "pro"}}
        }))
        .unwrap();
        let enrichment = without_rules(&envelope);
        let row = StoredEvent::new(envelope, enrichment, None);
        assert_eq!(row.distinct_id, "u1");
        assert_eq!(row.path.as_deref(), Some("/pricing"));
        assert_eq!(row.url.as_deref(), Some("https://x.test/pricing?x=1"));
        assert_eq!(row.session_id.as_deref(), Some("s1"));
        assert_eq!(row.description.as_deref(), Some("Viewed page: /pricing"));
        let properties: Json = serde_json::from_str(&row.properties).unwrap();
        assert_eq!(properties["badkey"], "v");
        let person = row.person.unwrap();
        assert_eq!(person.set["plan"], "pro");
        assert_eq!(person.set["email"], "a@x.test");
    }

    /// Person updates of the wrong type (`$set` a string, `$set_once` an array, `$unset` a
    /// number, ids in `$unset` that are not strings) change no person property, and the event is
    /// still stored with its properties as sent.
    #[test]
    fn person_updates_of_the_wrong_type_are_ignored_and_the_event_kept() {
        let envelope: Envelope = serde_json::from_value(serde_json::json!({
            "uuid": Uuid::now_v7(),
            "distinct_id": "u1",
            "event": "$pageview",
            "properties": {"$set": "plan", "$set_once": [1, 2], "$unset": 5},
            "timestamp": "2026-11-28T10:00:00Z",
            "received_at": "2026-11-28T10:00:01Z"
        }))
        .unwrap();
        let enrichment = without_rules(&envelope);
        let row = StoredEvent::new(envelope, enrichment, None);
        assert!(row.person.is_none(), "{:?}", row.person);
        let properties: Json = serde_json::from_str(&row.properties).unwrap();
        assert_eq!(properties["$set"], "plan");

        let envelope: Envelope = serde_json::from_value(serde_json::json!({
            "uuid": Uuid::now_v7(),
            "distinct_id": "u1",
            "event": "$pageview",
            "properties": {"$unset": [7, null, "plan"]},
            "timestamp": "2026-11-28T10:00:00Z",
            "received_at": "2026-11-28T10:00:01Z"
        }))
        .unwrap();
        let enrichment = without_rules(&envelope);
        let row = StoredEvent::new(envelope, enrichment, None);
        assert_eq!(row.person.unwrap().unset, ["plan"]);
    }

    /// Decoding skips the properties neither the rules nor the row read, and refuses entries that
    /// are not Unicode JSON, whether or not the rules read the offending property.
    #[test]
    fn decoding_skips_unread_properties_and_refuses_what_is_not_unicode_json() {
        struct Reads(&'static str);
        impl Describer for Reads {
            fn version(&self) -> &str {
                "test"
            }
            fn enrich(
                &self,
                event: &Envelope,
            ) -> Result<Enrichment, rules_engine::enrich::EnrichError> {
                Ok(without_rules(event))
            }
            fn reads_property(&self, key: &str) -> bool {
                key == self.0
            }
        }
        let decode_with = |properties: &[u8]| {
            let mut entry = format!(
                r#"{{"uuid":"{}","distinct_id":"u","event":"e","timestamp":"2026-11-28T10:00:00Z","received_at":"2026-11-28T10:00:01Z","properties":"#,
                Uuid::now_v7()
            )
            .into_bytes();
            entry.extend_from_slice(properties);
            entry.push(b'}');
            let fields = |name: &str| match name {
                "v" => Some(&b"1"[..]),
                _ => Some(&entry[..]),
            };
            decode(fields, &Reads("plan"))
                .map(|(envelope, written)| (envelope.properties, written.map(str::to_owned)))
        };
        let text =
            r#"{"plan": "pro", "big": 1e400, "$pathname": "/p", "other": [{"x": "\ud83d\ude00"}]}"#;
        let (properties, written) = decode_with(text.as_bytes()).unwrap();
        assert_eq!(
            Json::Object(properties),
            serde_json::json!({"plan": "pro", "$pathname": "/p"})
        );
        assert_eq!(written.as_deref(), Some(text));
        assert_eq!(decode_with(b"{}").unwrap().0, Map::new());
        // `null` is no properties, as a missing `properties` is.
        assert_eq!(decode_with(b"null").unwrap(), (Map::new(), None));
        let refused: [&[u8]; 5] = [
            br#"{"other": "\ud800"}"#,
            b"{\"other\": \"\xff\"}",
            b"[1]",
            br#"{"plan": 1e400}"#,
            br#"{"other": "x"#,
        ];
        for bad in refused {
            assert!(decode_with(bad).is_err(), "{}", bad.escape_ascii());
        }
    }

    /// The properties text an entry carries is stored as written (numbers beyond f64, escapes,
    /// spacing), unless it holds an escaped NUL: then the decoded properties are cleaned and
    /// encoded, as without it.
    #[test]
    fn properties_are_stored_as_written_unless_they_hold_a_nul() {
        let row = |text: &str| {
            let entry = format!(
                r#"{{"uuid":"{}","distinct_id":"u","event":"e","properties":{text},"timestamp":"2026-11-28T10:00:00Z","received_at":"2026-11-28T10:00:01Z"}}"#,
                Uuid::now_v7()
            );
            let fields = |name: &str| match name {
                "v" => Some(&b"1"[..]),
                _ => Some(entry.as_bytes()),
            };
            let (envelope, written) = decode(fields, &NoRules).unwrap();
            assert_eq!(written, Some(text));
            let enrichment = without_rules(&envelope);
            StoredEvent::new(envelope, enrichment, written)
        };
        let text =
            r#"{ "n": 12345678901234567890, "s": "\u00e9\ud83d\ude00", "$session_id": "s1" }"#;
        let stored = row(text);
        assert_eq!(stored.properties, text);
        assert_eq!(stored.session_id.as_deref(), Some("s1"));

        let stored = row(r#"{"a\u0000": "b\u0000c", "k": 1}"#);
        assert_eq!(stored.properties, r#"{"a":"bc","k":1}"#);
        // An escaped backslash before `u0000` is no NUL, but is taken the careful way: same text.
        let stored = row(r#"{"a": "\\u0000"}"#);
        assert_eq!(stored.properties, r#"{"a":"\\u0000"}"#);
    }
}
