//! Which person a `distinct_id` belongs to (table `person_distinct_ids`). Stored rows stay keyed
//! by `distinct_id`; the read path and erasure take every id of the person.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "person_distinct_ids")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub distinct_id: String,
    pub person_id: i64,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
