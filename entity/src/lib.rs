//! Stored models (sea-orm entities) and the stream envelope shared by `api` and `worker`.
//! No I/O happens here.

pub mod envelope;
pub mod event;
pub mod person;
pub mod person_distinct_id;
pub mod person_properties;
pub mod user_profile;
pub mod user_session;

pub use envelope::{Envelope, EnvelopeError, Person};
