//! Ingest: from a request's bytes to envelopes in the Redis Stream.
//!
//! [`intake`] drives it: [`decode`] peels gzip, base64 and form encodings down to JSON text;
//! [`parse`] reads the everyday body shapes in one pass and writes their envelopes directly,
//! leaving anything unusual to [`normalize`], which builds them from a JSON tree and owns every
//! error message; both apply the bounds of [`limits`]. [`publish`] appends a request's envelopes
//! to the stream whole or not at all. [`inflight`] bounds the bytes all requests hold at once.

pub mod decode;
pub mod inflight;
pub mod intake;
pub mod limits;
pub mod normalize;
pub mod parse;
pub mod publish;
