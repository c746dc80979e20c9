//! Rows in Postgres' binary `COPY` format (`COPY … FROM STDIN (FORMAT binary)`): a header, then
//! per row its field count and each field as its length and bytes (`-1` for NULL), then a trailer.
//! <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Microseconds from the Unix epoch to Postgres' (2000-01-01 00:00:00 UTC).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A buffer of binary `COPY` data: the header first, then rows as they are added.
pub struct CopyBinary(Vec<u8>);

impl CopyBinary {
    /// An empty buffer holding the header.
    pub fn new(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        Self(buf)
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The bytes held, leaving the buffer empty (with its capacity) for what follows.
    pub fn take(&mut self) -> Vec<u8> {
        let capacity = self.0.capacity();
        std::mem::replace(&mut self.0, Vec::with_capacity(capacity))
    }

    /// Starts a row of `fields` fields.
    pub fn row(&mut self, fields: i16) {
        self.0.extend_from_slice(&fields.to_be_bytes());
    }

    /// A field of `len` bytes follows. Lengths beyond `i32` cannot come from a stream entry
    /// (Redis holds at most 512 MiB in one); one would be written as `i32::MAX`, and Postgres
    /// would refuse the data (a data error, as it refuses any field over 1 GiB).
    fn len_prefix(&mut self, len: usize) {
        let len = i32::try_from(len).unwrap_or(i32::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
    }

    /// A `text` field (UTF-8), or NULL.
    pub fn text(&mut self, value: Option<&str>) {
        match value {
            Some(text) => {
                self.len_prefix(text.len());
                self.0.extend_from_slice(text.as_bytes());
            }
            None => self.0.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }

    /// A `jsonb` field from JSON text (format version 1: the text after one version byte).
    pub fn jsonb(&mut self, json: &str) {
        self.len_prefix(json.len() + 1);
        self.0.push(1);
        self.0.extend_from_slice(json.as_bytes());
    }

    /// A `uuid` field.
    pub fn uuid(&mut self, uuid: Uuid) {
        self.len_prefix(16);
        self.0.extend_from_slice(uuid.as_bytes());
    }

    /// A `timestamptz` field: microseconds since 2000-01-01 00:00:00 UTC.
    pub fn timestamptz(&mut self, at: DateTime<Utc>) {
        self.len_prefix(8);
        let micros = at.timestamp_micros() - POSTGRES_EPOCH_MICROS;
        self.0.extend_from_slice(&micros.to_be_bytes());
    }

    /// Ends the data (the trailer); nothing may be added after it.
    pub fn end(&mut self) {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn fields_are_length_prefixed_big_endian() {
        let mut rows = CopyBinary::new(0);
        assert_eq!(rows.take(), b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0");
        rows.row(4);
        rows.text(Some("é"));
        rows.text(None);
        rows.jsonb("{}");
        rows.timestamptz(Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 1).unwrap());
        rows.end();
        let expected: &[u8] = &[
            0, 4, // fields
            0, 0, 0, 2, 0xc3, 0xa9, // "é"
            0xff, 0xff, 0xff, 0xff, // NULL
            0, 0, 0, 3, 1, b'{', b'}', // jsonb
            0, 0, 0, 8, 0, 0, 0, 0, 0, 0x0f, 0x42, 0x40, // one second after 2000
            0xff, 0xff, // trailer
        ];
        assert_eq!(rows.take(), expected);
    }
}
