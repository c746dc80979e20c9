//! What the api and the worker share, so that neither imports the other: configuration reading,
//! telemetry, metrics helpers, dependency health, Redis and Postgres plumbing, and the state both
//! services touch beside the event tables (dead letters, erasures, the unmatched report).

pub mod allocator;
pub mod config;
pub mod dlq;
pub mod erasure;
pub mod health;
pub mod metrics;
pub mod postgres;
pub mod redis;
pub mod redis_settings;
pub mod shards;
pub mod telemetry;
pub mod unmatched;
