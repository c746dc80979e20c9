//! What an accepted event may hold: the bounds that make every event the api answers 2xx for
//! one the worker can decode and Postgres can store. Both ingest paths apply the same bounds:
//! the full path ([`super::normalize`]) reports a breach with the field at fault; the fast path
//! ([`super::parse`]) checks the text it copies with [`walk_properties`] and leaves anything over
//! a bound to the full path.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::http::error::ApiError;

/// Longest accepted event name, in characters.
pub const MAX_EVENT_NAME_CHARS: usize = 200;
/// Longest accepted `distinct_id`, in characters.
pub const MAX_DISTINCT_ID_CHARS: usize = 200;
/// Longest accepted session id (`$session_id`), in characters: it is part of a primary key.
pub const MAX_SESSION_ID_CHARS: usize = 200;
/// Longest accepted property key (at any depth), in characters.
pub const MAX_PROPERTY_KEY_CHARS: usize = 512;
/// Deepest accepted nesting of `properties` (the object itself is level 1): well inside what
/// the worker's JSON decoder and Postgres' `jsonb` parser take.
pub const MAX_PROPERTIES_DEPTH: usize = 64;
/// Earliest accepted event time, after clock-skew correction.
pub const MIN_TIMESTAMP: DateTime<Utc> = DateTime::UNIX_EPOCH;

/// `value` is not over `max` characters (counting only as far as needed).
pub fn within_chars(value: &str, max: usize) -> bool {
    value.len() <= max || value.chars().nth(max).is_none()
}

/// An object of properties (`attr` names it in errors): keys within [`MAX_PROPERTY_KEY_CHARS`]
/// and nesting within [`MAX_PROPERTIES_DEPTH`], at every depth.
pub fn check_properties(properties: &Map<String, Value>, attr: &str) -> Result<(), ApiError> {
    check_object(properties, attr, 1)
}

fn check_object(object: &Map<String, Value>, attr: &str, depth: usize) -> Result<(), ApiError> {
    for (key, value) in object {
        if !within_chars(key, MAX_PROPERTY_KEY_CHARS) {
            let shown: String = key.chars().take(40).collect();
            return Err(ApiError::invalid(
                "too_long",
                format!(
                    "property key {shown:?}… is longer than {MAX_PROPERTY_KEY_CHARS} characters"
                ),
            )
            .at(attr));
        }
        check_value(value, attr, depth)?;
    }
    Ok(())
}

fn check_value(value: &Value, attr: &str, depth: usize) -> Result<(), ApiError> {
    let nested = match value {
        Value::Object(_) | Value::Array(_) => depth + 1,
        _ => return Ok(()),
    };
    if nested > MAX_PROPERTIES_DEPTH {
        return Err(too_deep(attr));
    }
    match value {
        Value::Object(object) => check_object(object, attr, nested),
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| check_value(item, attr, nested)),
        _ => Ok(()),
    }
}

/// 400 for JSON nested deeper than the bounds.
fn too_deep(attr: &str) -> ApiError {
    ApiError::invalid(
        "too_deep",
        format!("{attr} are nested deeper than {MAX_PROPERTIES_DEPTH} levels"),
    )
    .at(attr)
}

/// Walks the text of a properties object (valid JSON, as serde_json has skipped it) in one pass:
/// checks at every depth the bounds [`check_properties`] applies, and that no number is beyond a
/// double (serde_json refuses to decode `1e400`, so the full path refuses the body), and hands
/// each top-level member to `member` as (key with its quotes, value text). `None` when a bound
/// is passed, the text is not an object, or `member` answers `None`.
pub fn walk_properties<'a>(
    text: &'a [u8],
    mut member: impl FnMut(&'a [u8], &'a [u8]) -> Option<()>,
) -> Option<()> {
    let mut depth = 0usize;
    // Bit `d` set: the container at depth `d + 1` is an object.
    let mut objects: u128 = 0;
    let mut expect_key = false;
    // The top-level member being read: its quoted key, and where its value starts.
    let mut key: &[u8] = &[];
    let mut value_start = None;
    let mut i = 0;
    let top_value_end = |start: usize, end: usize| text[start..end].trim_ascii_end();
    while let Some(&byte) = text.get(i) {
        match byte {
            b'"' => {
                let start = i;
                let mut end = i + 1;
                let mut escaped = false;
                loop {
                    let at = memchr::memchr2(b'"', b'\\', text.get(end..)?)?;
                    end += at;
                    if text[end] == b'"' {
                        break;
                    }
                    escaped = true;
                    end += 2;
                }
                let quoted = &text[start..=end];
                if expect_key {
                    if !key_within_limit(quoted, escaped) {
                        return None;
                    }
                    if depth == 1 {
                        key = quoted;
                    }
                    expect_key = false;
                }
                i = end + 1;
                continue;
            }
            b':' if depth == 1 => {
                let rest = &text[i + 1..];
                value_start = Some(i + 1 + (rest.len() - rest.trim_ascii_start().len()));
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_PROPERTIES_DEPTH {
                    return None;
                }
                let bit = 1u128 << (depth - 1);
                if byte == b'{' {
                    objects |= bit;
                } else {
                    objects &= !bit;
                }
                expect_key = byte == b'{';
            }
            b'}' | b']' => {
                if depth == 1
                    && let Some(start) = value_start.take()
                {
                    member(key, top_value_end(start, i))?;
                }
                depth = depth.checked_sub(1)?;
                expect_key = false;
            }
            b',' => {
                if depth == 1
                    && let Some(start) = value_start.take()
                {
                    member(key, top_value_end(start, i))?;
                }
                expect_key = depth > 0 && objects & (1u128 << (depth - 1)) != 0;
            }
            b'-' | b'0'..=b'9' => {
                let len = text[i..]
                    .iter()
                    .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .unwrap_or(text.len() - i);
                let number = &text[i..i + len];
                // Up to 15 digits without an exponent always fit a double.
                if (len > 15 || number.iter().any(|b| matches!(b, b'e' | b'E')))
                    && !std::str::from_utf8(number)
                        .ok()
                        .and_then(|n| n.parse::<f64>().ok())
                        .is_some_and(f64::is_finite)
                {
                    return None;
                }
                i += len;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    // A whole object: its top level opened with `{` and closed.
    (depth == 0 && text.trim_ascii_start().first() == Some(&b'{')).then_some(())
}

/// A key's text with its quotes: within [`MAX_PROPERTY_KEY_CHARS`] once decoded.
fn key_within_limit(quoted: &[u8], escaped: bool) -> bool {
    let inner = &quoted[1..quoted.len() - 1];
    if inner.len() <= MAX_PROPERTY_KEY_CHARS {
        return true; // escapes only ever make the text longer than what it decodes to
    }
    let decoded = if escaped {
        serde_json::from_slice::<String>(quoted).ok()
    } else {
        std::str::from_utf8(inner).ok().map(str::to_string)
    };
    decoded.is_some_and(|key| within_chars(&key, MAX_PROPERTY_KEY_CHARS))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Whether properties text is within the bounds, as the fast path finds it.
    fn properties_text_within_limits(text: &[u8]) -> bool {
        walk_properties(text, |_, _| Some(())).is_some()
    }

    fn nested(levels: usize) -> String {
        let mut text = String::from("1");
        for i in 0..levels {
            text = if i % 2 == 0 {
                format!("{{\"k\": {text}}}")
            } else {
                format!("[{text}]")
            };
        }
        text
    }

    /// The text scan and the check of the decoded value agree.
    fn agree(text: &str) -> bool {
        let scan = properties_text_within_limits(text.as_bytes());
        let value: Map<String, Value> = serde_json::from_str(text).unwrap();
        assert_eq!(
            scan,
            check_properties(&value, "properties").is_ok(),
            "{}",
            &text[..text.len().min(200)]
        );
        scan
    }

    #[test]
    fn depth_is_bounded_the_same_on_text_and_values() {
        assert!(agree(&nested(MAX_PROPERTIES_DEPTH - 1)));
        // An object at the top, as properties are.
        let at_limit = nested(MAX_PROPERTIES_DEPTH - (1 - MAX_PROPERTIES_DEPTH % 2));
        assert!(at_limit.starts_with('{'));
        let levels = |t: &str| t.bytes().filter(|b| matches!(b, b'{' | b'[')).count();
        assert!(levels(&at_limit) <= MAX_PROPERTIES_DEPTH);
        assert!(agree(&at_limit));
        let over = nested(MAX_PROPERTIES_DEPTH + 1 + MAX_PROPERTIES_DEPTH % 2);
        assert!(over.starts_with('{') && levels(&over) > MAX_PROPERTIES_DEPTH);
        assert!(!agree(&over));
        // Brackets inside strings do not count.
        let text = format!(r#"{{"s": "{}", "t": "\"[{{"}}"#, "[{".repeat(100));
        assert!(agree(&text));
        // Far too deep for serde_json: the scan alone refuses it.
        assert!(!properties_text_within_limits(
            format!("{{\"a\": {}1{}}}", "[".repeat(100_000), "]".repeat(100_000)).as_bytes()
        ));
    }

    #[test]
    fn keys_are_bounded_at_every_depth() {
        let long = "k".repeat(MAX_PROPERTY_KEY_CHARS + 1);
        let ok = "é".repeat(MAX_PROPERTY_KEY_CHARS); // 1024 bytes, 512 characters
        for text in [
            json!({ &long: 1 }),
            json!({"a": [{"b": { &long: "x" }}]}),
            json!({ "a": &long, &ok: 1, "b": {"c": [ &long ]} }),
            json!({ &ok: {"x": 1} }),
        ] {
            agree(&text.to_string());
        }
        assert!(!agree(&json!({"a": [{"b": { &long: "x" }}]}).to_string()));
        assert!(agree(&json!({ &ok: 1, "v": &long }).to_string()));
        // Written with escapes: measured decoded.
        let escaped = format!(r#"{{"{}": 1}}"#, "\\u0041".repeat(MAX_PROPERTY_KEY_CHARS));
        assert!(agree(&escaped));
        let escaped = format!(
            r#"{{"{}": 1}}"#,
            "\\u0041".repeat(MAX_PROPERTY_KEY_CHARS + 1)
        );
        assert!(!agree(&escaped));
    }

    #[test]
    fn numbers_beyond_a_double_are_refused() {
        for (text, ok) in [
            (
                r#"{"n": 1e308, "m": -1.5E-400, "i": 123456789012345678901234567890}"#,
                true,
            ),
            (r#"{"n": [1, 2.5, -0, 1e400]}"#, false),
            (r#"{"n": -1e309}"#, false),
        ] {
            assert_eq!(properties_text_within_limits(text.as_bytes()), ok, "{text}");
            assert_eq!(serde_json::from_str::<Value>(text).is_ok(), ok, "{text}");
        }
        let digits = format!(r#"{{"n": {}}}"#, "9".repeat(400));
        assert!(!properties_text_within_limits(digits.as_bytes()));
        assert!(serde_json::from_str::<Value>(&digits).is_err());
    }

    #[test]
    fn the_walk_hands_over_each_top_level_member_as_written() {
        let objects = [
            json!({}),
            json!({"n": -1.5e3, "e": [], "o": {}, "t": true, "f": false, "z": null}),
            json!({"s": "q\"}],{[", "o": {"x": [{"y": "}"}], "z": "\\"}, "a": [1, [2, [3]]]}),
            json!({"k\"ey": "v", "\\": "é", "last": 7}),
        ];
        let texts = objects.iter().flat_map(|o| {
            let pretty = serde_json::to_string_pretty(o).unwrap();
            // Whitespace before each `,` and `:` too, which neither writer puts there.
            let spaced = o
                .to_string()
                .replace(",\"", " ,\t\"")
                .replace("\":", "\" :\n");
            [o.to_string(), pretty, spaced]
        });
        for text in texts {
            let expected: Map<String, Value> = serde_json::from_str(&text).unwrap();
            let mut seen = Map::new();
            walk_properties(text.as_bytes(), |key, value| {
                let key: String = serde_json::from_slice(key).unwrap();
                seen.insert(key, serde_json::from_slice(value).unwrap());
                Some(())
            })
            .unwrap();
            assert_eq!(seen, expected, "{text}");
        }
        assert!(walk_properties(b"[1, 2]", |_, _| Some(())).is_none());
        assert!(walk_properties(br#"{"a": 1}"#, |_, _| None).is_none());
    }

    #[test]
    fn within_chars_counts_characters() {
        assert!(within_chars("ééé", 3));
        assert!(!within_chars("éééé", 3));
        assert!(within_chars("", 0));
    }
}
