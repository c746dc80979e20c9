//! Stored models (sea-orm entities) and the stream envelope shared by `api` and `worker`.
//! No I/O happens here.

pub mod envelope;
pub mod settings;

pub use envelope::{Envelope, EnvelopeError, Person};
