//! A person of two or more `distinct_id`s (table `persons`), joined by `$identify`,
//! `$create_alias` or `$merge_dangerously`. An id no person holds is a person of one id.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "persons")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Joined by an identity call: `$identify` and `$create_alias` no longer merge it into
    /// another person (PostHog's guard); `$merge_dangerously` still does.
    pub is_identified: bool,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
