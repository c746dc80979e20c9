//! Sessions seen per user (table `user_sessions`): makes `user_profiles.session_count` exact
//! and lets the read path list a user's sessions.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "user_sessions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub distinct_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub session_id: String,
    /// Timestamp of the first stored event of the session.
    pub first_seen: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
