//! Events a rule ignores (`ignore: true` in `rules/*.yaml`) are stored without a description:
//! `events.description` becomes nullable. The context's history leaves such rows out.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

// Down: ignored events had no sentence; the fallback's shape keeps them readable.
sql_migration!(
    "ALTER TABLE events ALTER COLUMN description DROP NOT NULL",
    "UPDATE events SET description = 'Triggered ''' || event || '''' WHERE description IS NULL;
     ALTER TABLE events ALTER COLUMN description SET NOT NULL",
);
