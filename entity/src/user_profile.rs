//! Per-user aggregate (table `user_profiles`), kept current by the worker in the same transaction
//! as the events it counts.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "user_profiles")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub distinct_id: String,
    /// Timestamp of the user's earliest stored event.
    pub first_seen: DateTimeUtc,
    /// Timestamp of the user's latest stored event.
    pub last_seen: DateTimeUtc,
    pub event_count: i64,
    /// Distinct `session_id`s seen (rows of `user_sessions`).
    pub session_count: i64,
    /// Intent scores: a JSON object of [`IntentState`] by intent name (see [`Intents`]).
    #[sea_orm(column_type = "JsonBinary")]
    pub intents: Json,
    /// PostHog person properties (`person.properties`, `$set`, `$set_once`), when any were sent.
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub person_properties: Option<Json>,
    pub updated_at: DateTimeUtc,
    /// What decides each person property, with times, so a person's ids combine in PostHog's
    /// order (the format of [`crate::person_properties`]).
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub person_property_times: Option<Json>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// Evidence descriptions kept per intent.
pub const MAX_EVIDENCE: usize = 5;

/// The `intents` column, decoded.
pub type Intents = BTreeMap<String, IntentState>;

/// One intent's score for one user, as stored in `user_profiles.intents`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntentState {
    /// Decayed score as of `last_seen`. At read time: `score * 0.5^((now - last_seen) / half_life_secs)`.
    pub score: f64,
    /// Timestamp of the newest event that added to this intent.
    pub last_seen: DateTime<Utc>,
    /// Up to [`MAX_EVIDENCE`] most recent distinct descriptions supporting it, newest first.
    pub evidence: Vec<String>,
    /// The sentence a summary should use, e.g. "User showing Purchase Intent.".
    pub summary: String,
    /// Half-life of the score in seconds; not positive or not finite means no decay.
    pub half_life_secs: f64,
    /// How many events added to it.
    #[serde(default)]
    pub count: u64,
}

impl IntentState {
    /// The score decayed to `at` (never grows for `at` before `last_seen`).
    pub fn score_at(&self, at: DateTime<Utc>) -> f64 {
        let elapsed = (at - self.last_seen).num_milliseconds().max(0) as f64 / 1000.0;
        self.score * decay(elapsed, self.half_life_secs)
    }
}

/// `0.5^(elapsed / half_life)`; 1 when the half-life is not a positive finite number.
pub fn decay(elapsed_secs: f64, half_life_secs: f64) -> f64 {
    if half_life_secs.is_finite() && half_life_secs > 0.0 {
        0.5f64.powf(elapsed_secs / half_life_secs)
    } else {
        1.0
    }
}

impl Model {
    /// Decodes the `intents` column.
    pub fn intents(&self) -> Result<Intents, serde_json::Error> {
        Intents::deserialize(&self.intents)
    }
}
