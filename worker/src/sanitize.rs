//! Postgres rejects `\u0000` in `text` and `jsonb`: remove it so one event never fails its batch.

use serde_json::{Map, Value};

/// The string without NUL characters (no copy when there is none).
pub fn text(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s
    }
}

/// [`text`] for a shared string (no copy when there is no NUL).
pub fn shared_text(s: std::sync::Arc<str>) -> std::sync::Arc<str> {
    if s.contains('\0') {
        s.replace('\0', "").into()
    } else {
        s
    }
}

/// Whether JSON text may decode to a string or key holding a NUL character. JSON can only carry
/// one as the escape `\u0000` (control characters must be escaped), so text without that
/// sequence cannot; an escaped backslash followed by `u0000` also answers yes, harmlessly.
pub fn may_hold_nul(json: &str) -> bool {
    json.contains("\\u0000")
}

/// Removes NUL characters from every string and key of a JSON value, in place.
pub fn json(value: &mut Value) {
    match value {
        Value::String(s) => {
            if s.contains('\0') {
                *s = s.replace('\0', "");
            }
        }
        Value::Array(items) => items.iter_mut().for_each(json),
        Value::Object(map) => object(map),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Removes NUL characters from every string and key of a JSON object, in place.
pub fn object(map: &mut Map<String, Value>) {
    if map.keys().any(|k| k.contains('\0')) {
        let old = std::mem::take(map);
        for (key, value) in old {
            map.insert(text(key), value);
        }
    }
    map.values_mut().for_each(json);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_nul_from_strings_and_keys_at_any_depth() {
        let mut value = serde_json::json!({"a\u{0}b": ["x\u{0}", {"k": "v\u{0}v"}], "n": 1});
        json(&mut value);
        assert_eq!(value, serde_json::json!({"ab": ["x", {"k": "vv"}], "n": 1}));
        assert_eq!(text("p\0q".into()), "pq");
    }
}
