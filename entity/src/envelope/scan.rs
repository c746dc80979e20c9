//! A walk over the top-level members of a JSON object's text, without decoding it: the api lifts
//! a few keys out of an event's `properties` this way, and readers of an envelope take single
//! fields of it (to route it, to store its `properties` as written).

use std::borrow::Cow;

use serde_json::{Map, Value};

/// The top-level members of a valid JSON object's text, as (key with its quotes, value) byte
/// slices. Malformed text ends the walk with `None` rather than a wrong answer.
pub struct Members<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Members<'a> {
    pub fn new(text: &'a [u8]) -> Option<Self> {
        let mut members = Members { text, pos: 0 };
        members.skip_whitespace();
        (members.byte()? == b'{').then(|| {
            members.pos += 1;
            members
        })
    }

    /// The next member; `Some(None)` after the last.
    pub fn next_member(&mut self) -> Option<Option<(&'a [u8], &'a [u8])>> {
        self.skip_whitespace();
        match self.byte()? {
            b'}' => return Some(None),
            b',' => {
                self.pos += 1;
                self.skip_whitespace();
            }
            _ => {}
        }
        if self.byte()? != b'"' {
            return None;
        }
        let key_start = self.pos;
        self.skip_string()?;
        let key = self.text.get(key_start..self.pos)?;
        self.skip_whitespace();
        if self.byte()? != b':' {
            return None;
        }
        self.pos += 1;
        self.skip_whitespace();
        let value_start = self.pos;
        self.skip_value()?;
        Some(Some((key, self.text.get(value_start..self.pos)?)))
    }

    fn byte(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while self.byte().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// From an opening quote to just past its closing one.
    fn skip_string(&mut self) -> Option<()> {
        self.pos += 1;
        loop {
            let rest = self.text.get(self.pos..)?;
            let at = memchr::memchr2(b'"', b'\\', rest)?;
            self.pos += at + 1;
            if rest[at] == b'"' {
                return Some(());
            }
            self.pos += 1; // the escaped character
        }
    }

    fn skip_value(&mut self) -> Option<()> {
        match self.byte()? {
            b'"' => self.skip_string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.byte()? {
                        b'"' => {
                            self.skip_string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.pos += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
            }
            _ => {
                while !matches!(self.byte()?, b',' | b'}' | b']')
                    && !self.byte()?.is_ascii_whitespace()
                {
                    self.pos += 1;
                }
                Some(())
            }
        }
    }
}

/// A member's key without its quotes, unescaped when written with escapes (`"tok\u0065n"`);
/// `None` if the escapes are invalid.
pub fn key(quoted: &[u8]) -> Option<Cow<'_, [u8]>> {
    let inner = quoted.get(1..quoted.len().checked_sub(1)?)?;
    if !inner.contains(&b'\\') {
        return Some(Cow::Borrowed(inner));
    }
    let unescaped: String = serde_json::from_slice(quoted).ok()?;
    Some(Cow::Owned(unescaped.into_bytes()))
}

/// The value of the first top-level member named `name` of an object's text, as written.
/// Stops there: a later member of the same name is not looked for.
pub fn first<'a>(text: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut members = Members::new(text)?;
    while let Some((quoted_key, value)) = members.next_member()? {
        if *key(quoted_key)? == *name.as_bytes() {
            return Some(value);
        }
    }
    None
}

/// The members of an object's text whose key `wanted` accepts, decoded; of a key given twice
/// the later member wins, as when the whole object is decoded. For text serde_json has decoded
/// or skipped already (valid JSON): anything but an object is an error.
pub fn decode_some(
    text: &str,
    mut wanted: impl FnMut(&str) -> bool,
) -> Result<Map<String, Value>, serde_json::Error> {
    let not_object = || <serde_json::Error as serde::de::Error>::custom("not a JSON object");
    let mut members = Members::new(text.as_bytes()).ok_or_else(not_object)?;
    let mut map = Map::new();
    while let Some((quoted_key, value)) = members.next_member().ok_or_else(not_object)? {
        let key = key(quoted_key).ok_or_else(not_object)?;
        let key = std::str::from_utf8(&key).map_err(|_| not_object())?;
        if wanted(key) {
            map.insert(key.to_owned(), serde_json::from_slice(value)?);
        }
    }
    Ok(map)
}

/// Whether a `\u` escape in `json` is half of a UTF-16 surrogate pair without its other half:
/// text that is not Unicode, which serde_json refuses to decode and Postgres to store. Looks only
/// at backslashes.
pub fn has_lone_surrogate(json: &[u8]) -> bool {
    let unit = |at: usize| -> Option<u16> {
        let hex = json.get(at..at + 6)?.strip_prefix(b"\\u")?;
        u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let mut pos = 0;
    // `get`: a backslash ending the text (not valid JSON) leaves `pos` past its end.
    while let Some(found) = json.get(pos..).and_then(|rest| memchr::memchr(b'\\', rest)) {
        let at = pos + found;
        pos = at + 2; // the backslash and the character it escapes
        match unit(at) {
            Some(0xD800..=0xDBFF) => match unit(at + 6) {
                Some(0xDC00..=0xDFFF) => pos = at + 12,
                _ => return true,
            },
            Some(0xDC00..=0xDFFF) => return true,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn members_are_the_objects_top_level_members() {
        let texts = [
            r#"{}"#,
            r#" { } "#,
            r#"{"a":1}"#,
            "{ \"a\" :\t-1.5e3 ,\n\"b\":[ ] , \"c\" : { } }",
            r#"{"s":"q\"}],{[","n":null,"t":true,"f":false,"o":{"x":[{"y":"}"}],"z":"\\"},"e":""}"#,
            r#"{"k\"ey":"v","\\":[1,[2,[3]]],"last":"\u00e9"}"#,
        ];
        for text in texts {
            let expected: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap();
            let mut members = Members::new(text.as_bytes()).unwrap();
            let mut seen = Vec::new();
            while let Some((key, value)) = members.next_member().unwrap() {
                let key: String = serde_json::from_slice(key).unwrap();
                let value: Value = serde_json::from_slice(value).unwrap();
                seen.push((key, value));
            }
            seen.sort_by(|a, b| a.0.cmp(&b.0));
            let expected: Vec<(String, Value)> = expected.into_iter().collect();
            assert_eq!(seen, expected, "{text}");
        }
        for broken in ["", "[1]", "{\"a\"", "{\"a\":", "{\"a\":\"x", "{\"a\":[1,"] {
            let walk = Members::new(broken.as_bytes()).and_then(|mut m| {
                while m.next_member()?.is_some() {}
                Some(())
            });
            assert!(walk.is_none(), "{broken:?}");
        }
    }

    #[test]
    fn some_members_are_decoded_as_the_whole_object_would_be() {
        let text =
            r#"{"a": {"b": [1, "x"]}, "skip": "\u00e9", "k\u0065y": 1e2, "a": 2, "c": null}"#;
        let whole: Map<String, Value> = serde_json::from_str(text).unwrap();
        let some = decode_some(text, |k| k != "skip").unwrap();
        let expected: Map<String, Value> = whole.into_iter().filter(|(k, _)| k != "skip").collect();
        assert_eq!(some, expected);
        assert_eq!(some["a"], 2);
        assert!(decode_some(text, |_| false).unwrap().is_empty());
        for not_object in ["null", "[1]", "\"s\"", "7"] {
            assert!(decode_some(not_object, |_| true).is_err(), "{not_object}");
        }
        assert!(decode_some(r#"{"n": 1e400}"#, |_| true).is_err());
        assert!(decode_some(r#"{"n": 1e400}"#, |_| false).is_ok());
    }

    #[test]
    fn a_backslash_ending_the_text_is_no_surrogate() {
        assert!(!has_lone_surrogate(b"\\"));
        assert!(!has_lone_surrogate(b"\"x\\"));
        assert!(has_lone_surrogate(b"\"\\ud800\""));
    }

    #[test]
    fn keys_are_unescaped_and_first_finds_the_first_of_a_name() {
        assert_eq!(&*key(br#""token""#).unwrap(), b"token");
        assert_eq!(&*key(br#""tok\u0065n""#).unwrap(), b"token");
        assert_eq!(key(br#""bad\x""#), None);
        let text = br#"{"a": {"b": 1}, "tok\u0065n": "t", "b": [2], "b": 3}"#;
        assert_eq!(first(text, "b"), Some(&b"[2]"[..]));
        assert_eq!(first(text, "token"), Some(&br#""t""#[..]));
        assert_eq!(first(text, "missing"), None);
        assert_eq!(first(b"not json", "a"), None);
    }
}
