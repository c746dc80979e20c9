//! Writes an envelope's `event` field straight from borrowed parts, without building an
//! [`Envelope`](super::Envelope): the api's fast ingest path copies `properties` as the JSON text
//! the request carried.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde_json::value::RawValue;
use uuid::Uuid;

/// An envelope's fields, borrowed, with `properties` as JSON text; written as the same text
/// [`Envelope::to_json`](super::Envelope::to_json) writes for the envelope they describe.
pub struct EnvelopeRef<'a> {
    pub uuid: Uuid,
    pub distinct_id: &'a str,
    pub event: &'a str,
    pub properties: &'a RawValue,
    pub timestamp: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub session_id: Option<&'a str>,
    pub lib: Option<&'a str>,
}

impl EnvelopeRef<'_> {
    /// The envelope's JSON, written directly: serde's per-character escaping and its `fmt`
    /// machinery for the uuid and the times are the costly part of the ingest path's writing.
    pub fn to_json(&self) -> String {
        let properties = self.properties.get();
        let mut out = String::with_capacity(properties.len() + 256);
        out.push_str("{\"uuid\":\"");
        out.push_str(
            self.uuid
                .hyphenated()
                .encode_lower(&mut Uuid::encode_buffer()),
        );
        out.push_str("\",\"distinct_id\":");
        push_json_str(&mut out, self.distinct_id);
        out.push_str(",\"event\":");
        push_json_str(&mut out, self.event);
        out.push_str(",\"properties\":");
        out.push_str(properties);
        out.push_str(",\"timestamp\":");
        push_json_time(&mut out, self.timestamp);
        out.push_str(",\"received_at\":");
        push_json_time(&mut out, self.received_at);
        if let Some(sent_at) = self.sent_at {
            out.push_str(",\"sent_at\":");
            push_json_time(&mut out, sent_at);
        }
        if let Some(session_id) = self.session_id {
            out.push_str(",\"session_id\":");
            push_json_str(&mut out, session_id);
        }
        if let Some(lib) = self.lib {
            out.push_str(",\"lib\":");
            push_json_str(&mut out, lib);
        }
        out.push('}');
        out
    }
}

/// Appends `s` as a JSON string: as is when nothing in it needs escaping (the usual case), else
/// escaped by serde_json.
fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("a string serialises"));
    }
}

/// Appends `t` as chrono serialises it: RFC 3339 in UTC with `Z`, and 0, 3, 6 or 9 fraction
/// digits, the fewest that hold its nanoseconds. Years outside 0..=9999 and leap seconds are
/// left to chrono itself.
fn push_json_time(out: &mut String, t: DateTime<Utc>) {
    let (date, time) = (t.date_naive(), t.time());
    let (year, nanos) = (date.year(), time.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        out.push_str(&serde_json::to_string(&t).expect("a time serialises"));
        return;
    }
    fn put(digits: &mut [u8], mut value: u32) {
        for d in digits.iter_mut().rev() {
            *d = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    let mut text = *b"\"0000-00-00T00:00:00.000000000";
    put(&mut text[1..5], year as u32);
    put(&mut text[6..8], date.month());
    put(&mut text[9..11], date.day());
    put(&mut text[12..14], time.hour());
    put(&mut text[15..17], time.minute());
    put(&mut text[18..20], time.second());
    let end = if nanos == 0 {
        20
    } else if nanos % 1_000_000 == 0 {
        put(&mut text[21..24], nanos / 1_000_000);
        24
    } else if nanos % 1_000 == 0 {
        put(&mut text[21..27], nanos / 1_000);
        27
    } else {
        put(&mut text[21..30], nanos);
        30
    };
    out.push_str(std::str::from_utf8(&text[..end]).expect("ASCII digits"));
    out.push_str("Z\"");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Envelope;

    #[test]
    fn the_text_is_what_serde_writes_for_the_envelope() {
        let times = [
            "2026-11-28T10:00:00Z",
            "2026-11-28T10:00:00.5Z",
            "2026-11-28T10:00:00.123Z",
            "2026-11-28T10:00:00.000123Z",
            "2026-11-28T10:00:00.120000Z",
            "2026-11-28T10:00:00.123456789Z",
            "2026-11-28T10:00:00.000000001Z",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "2016-12-31T23:59:60.5Z",
        ];
        let times: Vec<DateTime<Utc>> = times
            .iter()
            .map(|t| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc))
            .chain([
                DateTime::from_timestamp(-70_000_000_000, 7).unwrap(),
                DateTime::from_timestamp(300_000_000_000, 0).unwrap(),
            ])
            .collect();
        let texts = ["u", "é ✓ \u{7f}", "q\"b\\s/", "tab\tnl\ncr\r\u{1}\u{0}", ""];
        let properties =
            RawValue::from_string(r#"{"a":[1,{"b":null}],"s":"x\"y"}"#.into()).unwrap();
        for (i, &time) in times.iter().enumerate() {
            for (j, text) in texts.iter().enumerate() {
                let out = EnvelopeRef {
                    uuid: Uuid::now_v7(),
                    distinct_id: text,
                    event: texts[(j + 1) % texts.len()],
                    properties: &properties,
                    timestamp: time,
                    received_at: times[(i + 1) % times.len()],
                    sent_at: (j % 2 == 0).then_some(time),
                    session_id: (j % 3 != 0).then_some(*text),
                    lib: (i % 2 == 0).then_some(*text),
                };
                let envelope = Envelope {
                    uuid: out.uuid,
                    distinct_id: out.distinct_id.to_string(),
                    event: out.event.to_string(),
                    properties: out.properties,
                    timestamp: out.timestamp,
                    received_at: out.received_at,
                    sent_at: out.sent_at,
                    session_id: out.session_id.map(str::to_string),
                    lib: out.lib.map(str::to_string),
                    elements_chain: None,
                    person: None,
                };
                assert_eq!(out.to_json(), serde_json::to_string(&envelope).unwrap());
            }
        }
    }
}
