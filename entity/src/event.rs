//! A stored, enriched event (table `events`), written by the worker and read by the context API.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "events")]
pub struct Model {
    /// The envelope's uuid: the idempotency key.
    #[sea_orm(primary_key, auto_increment = false)]
    pub uuid: Uuid,
    pub distinct_id: String,
    /// Event name, e.g. `$pageview`.
    pub event: String,
    /// The sentence the rules made of it, e.g. "Viewed page: /pricing"; `None` when a rule
    /// ignores the event (`ignore: true`): stored, but left out of the context.
    pub description: Option<String>,
    /// Id of the rule that matched; `None` when the fallback sentence was used.
    pub rule_id: Option<String>,
    /// Intent weights this event added, `{"purchase": 2.0}`.
    #[sea_orm(column_type = "JsonBinary")]
    pub intents: Json,
    /// Properties as sent (NUL characters removed).
    #[sea_orm(column_type = "JsonBinary")]
    pub properties: Json,
    /// `$current_url`, when present.
    pub url: Option<String>,
    /// `$pathname`, or the path of `$current_url`.
    pub path: Option<String>,
    pub session_id: Option<String>,
    /// PostHog's `elements_chain` for `$autocapture` events, when sent.
    pub elements_chain: Option<String>,
    /// When the event happened.
    pub timestamp: DateTimeUtc,
    /// When the api accepted it.
    pub received_at: DateTimeUtc,
    /// Content hash of the ruleset that described it.
    pub rules_version: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
