//! Events a rule ignores (`ignore: true` in `rules/*.yaml`) are stored without a description:
//! `events.description` becomes nullable. The context's history leaves such rows out.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE events ALTER COLUMN description DROP NOT NULL")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Ignored events had no sentence; the fallback's shape keeps them readable.
        manager
            .get_connection()
            .execute_unprepared(
                "UPDATE events SET description = 'Triggered ''' || event || '''' WHERE description IS NULL;
                 ALTER TABLE events ALTER COLUMN description SET NOT NULL",
            )
            .await?;
        Ok(())
    }
}
