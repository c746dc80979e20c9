//! Person properties combine over a person's ids in PostHog's order: each profile keeps, per
//! property, the times that decide it (`user_profiles.person_property_times`, the format of
//! `entity::person_properties`). Properties stored before count as set at the profile's
//! `last_seen`.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
ALTER TABLE user_profiles ADD COLUMN person_property_times jsonb;
UPDATE user_profiles p
   SET person_property_times = (
         SELECT jsonb_object_agg(e.key, jsonb_build_object('s', jsonb_build_array(e.value, to_jsonb(p.last_seen))))
           FROM jsonb_each(p.person_properties) AS e)
 WHERE jsonb_typeof(p.person_properties) = 'object' AND p.person_properties <> '{}'::jsonb;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::run_sql(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::run_sql(
            manager,
            "ALTER TABLE user_profiles DROP COLUMN IF EXISTS person_property_times",
        )
        .await
    }
}
