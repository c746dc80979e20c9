//! `SerdeJson<T>`: the context's JSON response body, written straight from `T`'s
//! `serde::Serialize` with the schema documented from `T`'s poem-openapi `Type`, skipping the
//! `serde_json::Value` tree of the whole body that poem-openapi's own `Json` builds first; and
//! the times of the read path, written and read without chrono's general formatter and parser
//! (a context has some twenty of each: they were a tenth of the api's time per read).

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};

use poem::{IntoResponse, Response};
use poem_openapi::{
    payload::Payload,
    registry::{MetaSchemaRef, Registry},
    types::Type,
};

const CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// The body's first allocation: a context with its twenty newest events is about 4 KiB, so
/// serializing it does not grow the buffer step by step.
const BODY_CAPACITY: usize = 8 * 1024;

/// A JSON body serialized with serde. `T`'s serde field names must match its `Object` fields.
pub struct SerdeJson<T>(pub T);

impl<T: Type> Payload for SerdeJson<T> {
    const CONTENT_TYPE: &'static str = CONTENT_TYPE;

    fn check_content_type(content_type: &str) -> bool {
        content_type.starts_with("application/json")
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: serde::Serialize + Send> IntoResponse for SerdeJson<T> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(BODY_CAPACITY);
        match serde_json::to_writer(&mut body, &self.0) {
            Ok(()) => Response::builder().content_type(CONTENT_TYPE).body(body),
            Err(error) => poem::error::ResponseError::as_response(
                &crate::http::error::ApiError::internal(error),
            ),
        }
    }
}

/// Serializes a time as poem-openapi does (`2026-11-28T10:00:00.123456+00:00`: chrono's
/// `to_rfc3339`), so every route writes times alike.
pub fn rfc3339<S: serde::Serializer>(
    time: &DateTime<Utc>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; RFC3339_MAX];
    match write_rfc3339(time, &mut buf) {
        Some(text) => serializer.serialize_str(text),
        None => serializer.collect_str(&time.to_rfc3339()),
    }
}

/// Longest time [`write_rfc3339`] writes: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn+00:00`.
const RFC3339_MAX: usize = 35;

/// `time.to_rfc3339()` into `buf`, for years 0–9999 and no leap second (`None` otherwise):
/// fractional seconds as chrono writes them, none when zero, else 3, 6 or 9 digits.
fn write_rfc3339<'b>(time: &DateTime<Utc>, buf: &'b mut [u8; RFC3339_MAX]) -> Option<&'b str> {
    use chrono::{Datelike, Timelike};
    let year = u32::try_from(time.year()).ok().filter(|y| *y <= 9999)?;
    let nanos = time.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    let mut put = |at: usize, value: u32, digits: usize| {
        let mut value = value;
        for i in (at..at + digits).rev() {
            buf[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year, 4);
    put(5, time.month(), 2);
    put(8, time.day(), 2);
    put(11, time.hour(), 2);
    put(14, time.minute(), 2);
    put(17, time.second(), 2);
    let (fraction, digits) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    let mut end = 19;
    if digits > 0 {
        put(20, fraction, digits);
        buf[19] = b'.';
        end = 20 + digits;
    }
    buf[4] = b'-';
    buf[7] = b'-';
    buf[10] = b'T';
    buf[13] = b':';
    buf[16] = b':';
    buf[end..end + 6].copy_from_slice(b"+00:00");
    std::str::from_utf8(&buf[..end + 6]).ok()
}

/// A time as Postgres writes a `timestamptz` into JSON (`2026-11-28T10:00:00.123456+00:00`),
/// read without chrono's general parser; anything else RFC 3339 allows goes through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTime(pub DateTime<Utc>);

impl<'de> serde::Deserialize<'de> for PgTime {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PgTime;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an RFC 3339 time")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<PgTime, E> {
                parse_time(text)
                    .map(PgTime)
                    .ok_or_else(|| E::custom(format!("{text:?} is not an RFC 3339 time")))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.f…]` then `Z`, `±HH`, `±HH:MM`: the shapes Postgres writes (with any
/// `TimeZone`); anything else through chrono's RFC 3339 parser.
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    fast_time(text.as_bytes()).or_else(|| {
        DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    })
}

fn fast_time(b: &[u8]) -> Option<DateTime<Utc>> {
    let digits = |from: usize, to: usize| -> Option<u32> {
        b.get(from..to)?.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(
        i32::try_from(digits(0, 4)?).ok()?,
        digits(5, 7)?,
        digits(8, 10)?,
    )?;
    let mut at = 19;
    let mut nanos = 0;
    if b[at] == b'.' {
        let start = at + 1;
        at = start;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        let n = at - start;
        if n == 0 || n > 9 {
            return None;
        }
        nanos = digits(start, at)? * 10u32.pow(9 - n as u32);
    }
    let offset_secs = match &b[at..] {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let minutes = match rest {
                [_, _] => digits(at + 1, at + 3)? * 60,
                [_, _, b':', _, _] => digits(at + 1, at + 3)? * 60 + digits(at + 4, at + 6)?,
                _ => return None,
            };
            let secs = i64::from(minutes) * 60;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    let local = date.and_hms_nano_opt(digits(11, 13)?, digits(14, 16)?, digits(17, 19)?, nanos)?;
    Some((local - TimeDelta::seconds(offset_secs)).and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{SecondsFormat, TimeZone};
    use proptest::prelude::*;

    fn written(time: &DateTime<Utc>) -> String {
        let mut buf = [0u8; RFC3339_MAX];
        write_rfc3339(time, &mut buf).unwrap().to_string()
    }

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        for nanos in [0, 123_000_000, 123_456_000, 123_456_789, 1_000, 1] {
            let time = Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 5).unwrap()
                + TimeDelta::nanoseconds(nanos);
            assert_eq!(written(&time), time.to_rfc3339(), "{nanos}");
        }
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        let mut buf = [0u8; RFC3339_MAX];
        assert_eq!(
            write_rfc3339(&leap, &mut buf),
            None,
            "a leap second goes to chrono"
        );
    }

    #[test]
    fn postgres_times_and_other_offsets_are_read() {
        let at = |text: &str| parse_time(text).unwrap();
        let expected = Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 5).unwrap();
        assert_eq!(at("2026-11-28T10:00:05+00:00"), expected);
        assert_eq!(at("2026-11-28T10:00:05Z"), expected);
        assert_eq!(at("2026-11-28T12:00:05+02"), expected);
        assert_eq!(at("2026-11-28T04:30:05-05:30"), expected);
        assert_eq!(
            at("2026-11-28T10:00:05.25+00:00"),
            expected + TimeDelta::milliseconds(250)
        );
        // Not a shape Postgres writes: chrono's parser reads it.
        assert_eq!(at("2026-11-28t10:00:05+00:00"), expected);
        for bad in [
            "",
            "2026-11-28",
            "2026-13-28T10:00:05Z",
            "2026-11-28T10:00:05.+00:00",
            "x",
        ] {
            assert_eq!(parse_time(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn any_time_is_written_and_read_back_as_chrono_would(
            secs in 0i64..253_402_300_799,
            nanos in prop_oneof![Just(0u32), (0u32..1_000).prop_map(|n| n * 1_000_000),
                                 (0u32..1_000_000).prop_map(|n| n * 1_000), 0u32..1_000_000_000],
            offset_minutes in -900i32..900,
        ) {
            let time = DateTime::from_timestamp(secs, nanos).unwrap();
            prop_assert_eq!(written(&time), time.to_rfc3339());
            let offset = chrono::FixedOffset::east_opt(offset_minutes * 60).unwrap();
            let text = time.with_timezone(&offset).to_rfc3339_opts(SecondsFormat::AutoSi, false);
            prop_assert_eq!(parse_time(&text), Some(time), "{}", text);
        }
    }
}
