//! Turns a capture request body, whatever its encoding, into JSON.
//!
//! PostHog SDKs send plain JSON, gzip (posthog-js labels it `text/plain`), base64, and
//! form-urlencoded `data=` (optionally `compression=base64|gzip-js`). Gzip is recognised by its
//! magic bytes and base64 by elimination, whatever the headers claim; every size limit applies to
//! the decompressed bytes as well.

use std::{borrow::Cow, io::Read};

use base64::Engine;
use flate2::read::MultiGzDecoder;
use serde_json::Value;

use crate::http::error::ApiError;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// How the client said its body is encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// Detect from the bytes.
    #[default]
    Auto,
    Gzip,
    Base64,
}

impl Compression {
    /// Parses the `compression` query/form value PostHog SDKs send.
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        match raw.map(str::trim).unwrap_or("") {
            "" => Ok(Self::Auto),
            "gzip" | "gzip-js" => Ok(Self::Gzip),
            "base64" => Ok(Self::Base64),
            other => Err(ApiError::invalid(
                "unsupported_compression",
                format!("compression {other:?} is not supported: use gzip-js, base64 or none"),
            )
            .at("compression")),
        }
    }
}

/// Decodes a capture body down to its JSON text (left unparsed, for parsers that borrow from it).
/// `content_type` and `compression` are hints only.
pub fn decode_body_bytes<'a>(
    body: &'a [u8],
    content_type: Option<&str>,
    compression: Compression,
    limit: usize,
) -> Result<Cow<'a, [u8]>, ApiError> {
    let is_form = content_type.is_some_and(|ct| {
        ct.trim_start()
            .starts_with("application/x-www-form-urlencoded")
    }) || body.starts_with(b"data=");
    if is_form && !looks_like_json(body) && !body.starts_with(&GZIP_MAGIC) {
        let form: Vec<(String, String)> = serde_urlencoded::from_bytes(body).map_err(|e| {
            ApiError::invalid(
                "invalid_form",
                format!("form-urlencoded body could not be read: {e}"),
            )
        })?;
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let data = field("data").ok_or_else(|| {
            ApiError::invalid("required", "form body has no `data` field").at("data")
        })?;
        let compression = match field("compression") {
            Some(c) => Compression::parse(Some(c))?,
            None => compression,
        };
        return decode_data(data.as_bytes(), compression, limit)
            .map(|b| Cow::Owned(b.into_owned()));
    }
    decode_data(body, compression, limit)
}

/// Decodes the legacy `?data=` parameter (base64 or URL-encoded JSON) to JSON text.
pub fn decode_query_data(
    data: &str,
    compression: Compression,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    decode_data(data.as_bytes(), compression, limit)
        .map(Cow::into_owned)
        .map_err(|e| match e.body.attr {
            None => e.at("data"),
            Some(_) => e,
        })
}

/// Peels base64 and gzip layers until JSON text remains (at most base64 → gzip → JSON).
fn decode_data(
    bytes: &[u8],
    compression: Compression,
    limit: usize,
) -> Result<Cow<'_, [u8]>, ApiError> {
    let mut current: Cow<'_, [u8]> = Cow::Borrowed(bytes);
    for _ in 0..3 {
        if current.starts_with(&GZIP_MAGIC) {
            current = Cow::Owned(gunzip(&current, limit)?);
        } else if looks_like_json(&current) {
            return Ok(current);
        } else if current.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid(
                "empty_body",
                "request body is empty: send at least one event",
            ));
        } else {
            current = Cow::Owned(unbase64(&current).ok_or_else(|| match compression {
                Compression::Base64 => {
                    ApiError::invalid("invalid_base64", "body is not valid base64")
                }
                Compression::Gzip => ApiError::invalid(
                    "invalid_gzip",
                    "body is neither gzip nor base64-encoded gzip",
                ),
                Compression::Auto => ApiError::invalid(
                    "invalid_json",
                    "body is not JSON, gzip or base64: expected an event object, an array of events or {\"batch\": [...]}",
                ),
            })?);
        }
    }
    Err(ApiError::invalid(
        "invalid_payload",
        "body is encoded too many times over",
    ))
}

fn looks_like_json(bytes: &[u8]) -> bool {
    matches!(
        bytes.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        if e.to_string().starts_with("recursion limit exceeded") {
            return ApiError::invalid(
                "too_deep",
                format!("JSON nested too deeply to read (more than 127 levels): {e}"),
            );
        }
        let what = if e.to_string().contains("unicode") || std::str::from_utf8(bytes).is_err() {
            "body is not valid UTF-8 JSON"
        } else {
            "malformed JSON"
        };
        ApiError::invalid("invalid_json", format!("{what}: {e}"))
    })
}

fn gunzip(bytes: &[u8], limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(4).min(limit));
    MultiGzDecoder::new(bytes)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            ApiError::invalid(
                "invalid_gzip",
                format!("gzip body could not be decompressed: {e}"),
            )
        })?;
    if out.len() > limit {
        return Err(ApiError::too_large(limit, "decompressed body"));
    }
    Ok(out)
}

/// Standard or URL-safe base64, padding optional, whitespace ignored; `+` that a form
/// decoder turned into a space is restored.
fn unbase64(bytes: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::DecodePaddingMode;
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    const CFG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, CFG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, CFG);

    let cleaned: Vec<u8> = bytes
        .iter()
        .filter(|b| !matches!(b, b'\n' | b'\r' | b'\t'))
        .map(|&b| if b == b' ' { b'+' } else { b })
        .collect();
    STANDARD
        .decode(&cleaned)
        .or_else(|_| URL_SAFE.decode(&cleaned))
        .ok()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use base64::engine::general_purpose::STANDARD;
    use flate2::{Compression as Level, write::GzEncoder};
    use serde_json::json;

    use super::*;

    const LIMIT: usize = 1 << 20;

    fn decode_body(
        body: &[u8],
        content_type: Option<&str>,
        compression: Compression,
        limit: usize,
    ) -> Result<Value, ApiError> {
        parse_json(&decode_body_bytes(body, content_type, compression, limit)?)
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Level::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn every_encoding_decodes_to_the_same_json() {
        let value = json!({"event": "e", "distinct_id": "u"});
        let raw = value.to_string();
        let b64 = STANDARD.encode(&raw);
        let gz = gzip(raw.as_bytes());
        let gz_b64 = STANDARD.encode(&gz);
        let form = format!("data={}", urlencode(&b64));
        let form_gz = format!("data={}&compression=gzip-js", urlencode(&gz_b64));
        let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
            (raw.clone().into_bytes(), Some("application/json")),
            (gz.clone(), Some("text/plain")),
            (gz, None),
            (b64.clone().into_bytes(), Some("text/plain")),
            (form.into_bytes(), Some("application/x-www-form-urlencoded")),
            (
                form_gz.into_bytes(),
                Some("application/x-www-form-urlencoded"),
            ),
        ];
        for (body, ct) in cases {
            assert_eq!(
                decode_body(&body, ct, Compression::Auto, LIMIT).unwrap(),
                value,
                "{ct:?}"
            );
        }
        // form decoders turn an unencoded '+' into a space
        assert_eq!(
            parse_json(
                &decode_query_data(&b64.replace('+', " "), Compression::Auto, LIMIT).unwrap()
            )
            .unwrap(),
            value
        );
    }

    fn urlencode(s: &str) -> String {
        serde_urlencoded::to_string([("x", s)]).unwrap()[2..].to_string()
    }

    #[test]
    fn gzip_bomb_is_too_large() {
        let bomb = gzip(&vec![b' '; 4 * LIMIT]);
        assert!(bomb.len() < LIMIT);
        let err = decode_body(&bomb, None, Compression::Auto, LIMIT).unwrap_err();
        assert_eq!(err.status.as_u16(), 413);
    }

    #[test]
    fn malformed_inputs_name_their_problem() {
        let code = |body: &[u8]| {
            decode_body(body, None, Compression::Auto, LIMIT)
                .unwrap_err()
                .body
                .code
        };
        assert_eq!(code(b"{\"event\": "), "invalid_json");
        assert_eq!(code(&[0x1f, 0x8b, 1, 2, 3]), "invalid_gzip");
        assert_eq!(code(b"not json at all!"), "invalid_json");
        assert_eq!(code(b"{\"event\": \"\xff\xfe\"}"), "invalid_json");
        assert_eq!(code(b"   "), "empty_body");
        assert_eq!(
            decode_body(
                b"data=x",
                Some("application/x-www-form-urlencoded"),
                Compression::Auto,
                LIMIT
            )
            .unwrap_err()
            .body
            .code,
            "invalid_json"
        );
        let err = decode_body(
            b"foo=1",
            Some("application/x-www-form-urlencoded"),
            Compression::Auto,
            LIMIT,
        )
        .unwrap_err();
        assert_eq!(err.body.attr.as_deref(), Some("data"));
        assert_eq!(
            Compression::parse(Some("lz64"))
                .unwrap_err()
                .body
                .attr
                .as_deref(),
            Some("compression")
        );
    }
}
