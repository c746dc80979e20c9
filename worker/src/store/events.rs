//! The events of a batch: one binary `COPY` when all are new, else `INSERT … ON CONFLICT DO
//! NOTHING`, in statements of bounded size.

use std::collections::HashSet;

use sea_orm::sqlx::{self, Row};
use uuid::Uuid;

use infra::postgres::StoreError;

use super::{StoredEvent, Txn, column, copy::CopyBinary};

/// Most bytes of column data per events statement: a batch of large events is sent as several
/// statements, as Postgres refuses a message over 1 GiB.
const STATEMENT_BYTES: usize = 32 << 20;

/// The columns of `events` a batch writes, in the order [`COPY_EVENTS`] and [`INSERT_NEW_EVENTS`]
/// take them (and [`copy_events`] and [`insert_event_rows`] give them).
macro_rules! event_columns {
    () => {
        r#"events (rules_version, uuid, distinct_id, event, description, rule_id, intents,
    properties, url, path, session_id, elements_chain, "timestamp", received_at)"#
    };
}

/// Like [`COPY_EVENTS`], skipping the events already stored; returns the uuids it created.
pub(super) const INSERT_NEW_EVENTS: &str = concat!(
    "INSERT INTO ",
    event_columns!(),
    r#"
SELECT $1, u, d, e, ds, r, i::jsonb, p::jsonb, url, path, s, ec, t, ra
  FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
              $9::text[], $10::text[], $11::text[], $12::text[], $13::timestamptz[], $14::timestamptz[])
       AS x(u, d, e, ds, r, i, p, url, path, s, ec, t, ra)
ON CONFLICT (uuid) DO NOTHING RETURNING uuid"#
);

/// Rows in `uuid` order (the order they are sent in, so concurrent replicas lock alike), all
/// new: `COPY` fails on the first one already stored (`23505` on `events_pkey`), and the batch
/// is then written again with [`INSERT_NEW_EVENTS`]. Stored events are rare (redeliveries,
/// clients retrying), and Postgres takes less time over a `COPY` than over an `INSERT` of the
/// same rows (no arrays to build and expand, rows written to the table in groups).
const COPY_EVENTS: &str = concat!("COPY ", event_columns!(), " FROM STDIN (FORMAT binary)");

/// How a batch's events are inserted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Inserts {
    /// All are new ([`COPY_EVENTS`]), or the transaction fails with
    /// [`StoreError::is_stored_event`].
    AllNew,
    /// Some may be stored already ([`INSERT_NEW_EVENTS`]).
    SkipStored,
}

/// Inserts the events (sorted by uuid, distinct); returns the uuids the insert created, or
/// `None` for all of them ([`Inserts::AllNew`]).
pub(super) async fn insert_events(
    txn: &mut Txn,
    events: &[&StoredEvent],
    rules_version: &str,
    inserts: Inserts,
) -> Result<Option<HashSet<Uuid>>, StoreError> {
    // The intents column encoded once.
    let intents: Vec<String> = events
        .iter()
        .map(|e| e.intents_json().to_string())
        .collect();
    if inserts == Inserts::AllNew {
        copy_events(txn, events, &intents, rules_version).await?;
        return Ok(None);
    }
    let size = |i: usize| {
        let e = events[i];
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        64 + intents[i].len()
            + e.properties.len()
            + e.distinct_id.len()
            + e.event.len()
            + text(&e.description)
            + text(&e.rule_id)
            + text(&e.url)
            + text(&e.path)
            + text(&e.session_id)
            + text(&e.elements_chain)
    };
    let mut created = HashSet::with_capacity(events.len());
    let mut start = 0;
    while start < events.len() {
        let (mut end, mut bytes) = (start + 1, size(start));
        while end < events.len() && bytes + size(end) <= STATEMENT_BYTES {
            bytes += size(end);
            end += 1;
        }
        let (rows, intents) = (&events[start..end], &intents[start..end]);
        for row in insert_event_rows(rows, intents, rules_version)
            .fetch_all(&mut **txn)
            .await?
        {
            created.insert(row.try_get(0)?);
        }
        start = end;
    }
    Ok(Some(created))
}

/// Bytes of `COPY` data sent to Postgres at a time: what a batch of large events holds in memory
/// beyond the events themselves.
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// Writes `events` (whose intents columns are `intents`) with [`COPY_EVENTS`].
async fn copy_events(
    txn: &mut Txn,
    events: &[&StoredEvent],
    intents: &[String],
    rules_version: &str,
) -> Result<(), StoreError> {
    let mut copy = txn.copy_in_raw(COPY_EVENTS).await?;
    let mut rows = CopyBinary::new(COPY_CHUNK_BYTES + (64 << 10));
    for (e, intents) in events.iter().zip(intents) {
        rows.row(14);
        rows.text(Some(rules_version));
        rows.uuid(e.uuid);
        rows.text(Some(&e.distinct_id));
        rows.text(Some(&e.event));
        rows.text(e.description.as_deref());
        rows.text(e.rule_id.as_deref());
        rows.jsonb(intents);
        rows.jsonb(&e.properties);
        rows.text(e.url.as_deref());
        rows.text(e.path.as_deref());
        rows.text(e.session_id.as_deref());
        rows.text(e.elements_chain.as_deref());
        rows.timestamptz(e.timestamp);
        rows.timestamptz(e.received_at);
        if rows.len() >= COPY_CHUNK_BYTES {
            copy.send(rows.take()).await?;
        }
    }
    rows.end();
    copy.send(rows.take()).await?;
    copy.finish().await?;
    Ok(())
}

/// [`INSERT_NEW_EVENTS`] for `events`, whose intents columns are `intents`.
fn insert_event_rows<'q>(
    events: &'q [&StoredEvent],
    intents: &'q [String],
    rules_version: &'q str,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(INSERT_NEW_EVENTS)
        .bind(rules_version)
        .bind(column(events, |e| e.uuid))
        .bind(column(events, |e| e.distinct_id.as_str()))
        .bind(column(events, |e| e.event.as_str()))
        .bind(column(events, |e| e.description.as_deref()))
        .bind(column(events, |e| e.rule_id.as_deref()))
        .bind(column(intents, String::as_str))
        .bind(column(events, |e| e.properties.as_str()))
        .bind(column(events, |e| e.url.as_deref()))
        .bind(column(events, |e| e.path.as_deref()))
        .bind(column(events, |e| e.session_id.as_deref()))
        .bind(column(events, |e| e.elements_chain.as_deref()))
        .bind(column(events, |e| e.timestamp))
        .bind(column(events, |e| e.received_at))
}
