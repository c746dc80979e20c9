//! The thin HTTP handlers, one `#[OpenApi]` impl per resource: they authorise, call [`crate::ingest`]
//! or [`crate::context`], and answer.

pub mod capture;
pub mod context;
pub mod health;
pub mod ingest;
pub mod rules;

use poem_openapi::Tags;

#[derive(Tags)]
pub enum ApiTags {
    /// PostHog capture protocol: point a PostHog SDK's host here.
    Capture,
    /// Plain JSON webhooks, including PostHog's HTTP Webhook destination.
    Webhooks,
    /// What an AI assistant should know about a user, and erasing it.
    Context,
    /// What rule authors need: events no rule describes yet.
    Rules,
    /// Liveness, readiness and Prometheus metrics.
    Health,
}

/// The paths that browsers post to directly (CORS open), trailing slash removed.
pub const CAPTURE_PATHS: [&str; 5] = ["/capture", "/batch", "/e", "/i/v0/e", "/track"];
