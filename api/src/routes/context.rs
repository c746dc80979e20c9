//! `GET /context/user/:user_id` (what an assistant should know about a user, as JSON or prompt
//! text) and `DELETE /context/user/:user_id` (erase it).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::{
    Enum, Object, OpenApi, ResponseContent,
    param::{Header, Path, Query},
    payload::{Json, PlainText},
};

use super::ApiTags;
use crate::{
    context::{
        self, HistoryItem, ScoredIntent, erase,
        json::SerdeJson,
        relative_time,
        store::{self, HistoryFilter},
        text::{self, TextContext},
    },
    http::{
        auth::{Access, ApiKeyHeader},
        error::{ApiError, responses},
    },
    state::AppState,
};

/// Default and largest number of history items.
const DEFAULT_LIMIT: u32 = 20;
const MAX_LIMIT: u32 = 500;
/// Longest description in the JSON `summary`, in characters.
const SUMMARY_VALUE_CHARS: usize = 2_000;
/// Most ids the JSON `distinct_ids` lists.
const MAX_DISTINCT_IDS: usize = 100;

/// An intent with its score decayed to now.
#[derive(Object, serde::Serialize)]
pub struct IntentView {
    /// Intent name, as declared in the rule files (e.g. `purchase`).
    pub name: String,
    /// Score decayed to the time of the request (older signals weigh less).
    pub score: f64,
    /// When an event last added to it.
    #[serde(serialize_with = "crate::context::json::rfc3339")]
    pub last_seen: DateTime<Utc>,
    /// The sentence the summary uses for it.
    pub summary: String,
    /// Descriptions of the most recent events supporting it, newest first.
    pub evidence: Vec<String>,
}

/// One stored event.
#[derive(Object, serde::Serialize)]
#[oai(skip_serializing_if_is_none)]
pub struct HistoryView {
    /// When it happened.
    #[serde(serialize_with = "crate::context::json::rfc3339")]
    pub time: DateTime<Utc>,
    /// "5 minutes ago".
    pub relative_time: String,
    /// What the user did, in words.
    pub description: String,
    /// Event name (`$pageview`, `$autocapture`, …).
    pub event: String,
    /// Page path (or URL) it happened on; absent when the event had none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    /// The event's `$session_id`; absent when it had none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

/// Totals over everything stored for the user.
#[derive(Object, serde::Serialize)]
pub struct Stats {
    #[serde(serialize_with = "crate::context::json::rfc3339")]
    pub first_seen: DateTime<Utc>,
    #[serde(serialize_with = "crate::context::json::rfc3339")]
    pub last_seen: DateTime<Utc>,
    pub event_count: i64,
    pub session_count: i64,
}

/// How current this context is.
#[derive(Object, serde::Serialize)]
#[oai(skip_serializing_if_is_none)]
pub struct Freshness {
    /// Time of the newest stored event of this user.
    #[serde(serialize_with = "crate::context::json::rfc3339")]
    pub newest_event_at: DateTime<Utc>,
    /// Events of this user accepted but not yet stored (still in the stream). Absent when the
    /// stream is too long to count quickly, while shards of an earlier `STREAM_SHARDS` still
    /// hold entries, or when Redis is unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_events: Option<u64>,
    /// Events of all users waiting in the stream. Absent when Redis is unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_backlog: Option<u64>,
}

/// A user's context: the whole person the id belongs to.
#[derive(Object, serde::Serialize)]
pub struct UserContext {
    pub user_id: String,
    /// Every `distinct_id` of the person this context covers (the id asked for among them),
    /// sorted; at most 100. `$identify`, `$create_alias` and `$merge_dangerously` join ids into
    /// one person.
    pub distinct_ids: Vec<String>,
    /// One or two sentences for a prompt: active intents, then recent activity. The descriptions
    /// in it are cleaned of control, invisible and format characters and line breaks (the other
    /// fields hold values as stored).
    pub summary: String,
    /// Intents strongest first, scores decayed to now.
    pub intents: Vec<IntentView>,
    /// The person's properties, from `$set`, `$set_once` and `$unset` (and the webhook's
    /// `person.properties`) over all its ids, as if every event had been applied in time order
    /// (PostHog's precedence); `{}` when none were sent.
    pub person_properties: BTreeMap<String, serde_json::Value>,
    /// Stored events, newest first (filtered by `limit`, `since`, `session`).
    pub recent_history: Vec<HistoryView>,
    pub stats: Stats,
    pub freshness: Freshness,
}

/// What an erasure removed, and where. Events of the user received up to `erased_at` are
/// erased wherever they are; events received after it are new activity and are stored.
#[derive(Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Erasure {
    pub user_id: String,
    /// Every `distinct_id` erased: the one asked for and the other ids of its person, sorted.
    pub distinct_ids: Vec<String>,
    /// The time of the erasure (the api's clock, which also stamps each event's `received_at`):
    /// the user's events received at or before it are erased, including any still on their way
    /// to the database; later ones are new activity.
    pub erased_at: DateTime<Utc>,
    /// Stored events deleted.
    pub events_deleted: u64,
    /// Session rows deleted.
    pub sessions_deleted: u64,
    /// Whether a profile existed and was deleted.
    pub profile_deleted: bool,
    /// Entries of the dead-letter stream (`DLQ_NAME`) deleted: the user's events that could
    /// not be stored.
    pub dead_letters_deleted: u64,
    /// Kinds of events in the unmatched-events report (`GET /rules/unmatched`) removed because
    /// their example was one of the user's events.
    pub unmatched_examples_deleted: u64,
    /// Events of this user still in the stream, received before the erasure: workers drop them
    /// instead of storing them (a tombstone records the erasure). Absent when they could not be
    /// counted (a long stream, or Redis slow).
    pub pending_events: Option<u64>,
}

/// The response body: JSON, or the prompt text.
#[derive(ResponseContent)]
pub enum ContextBody {
    Json(SerdeJson<Box<UserContext>>),
    /// Prompt-ready text: summary, intents, then history as bullet lines.
    Text(PlainText<String>),
    #[oai(
        content_type = "text/markdown; charset=utf-8",
        actual_type = "PlainText<String>"
    )]
    Markdown(PlainText<String>),
}

responses! {
    pub enum ContextResponse {
        /// The user's context.
        Ok(ContextBody),
        /// A bad query parameter (`attr` names it).
        400 BadRequest,
        /// No `X-API-Key` header.
        401 Unauthorized,
        /// Unknown key, or an ingest-only key (those can never read user data).
        403 Forbidden,
        /// Nothing is stored for this user.
        404 NotFound,
        /// The database (Postgres) is unavailable: retry after the given seconds.
        503 Unavailable(u32),
    }
}

responses! {
    pub enum EraseResponse {
        /// The user is erased (also when nothing was stored for them: every count is then 0, and
        /// their events still on their way are dropped all the same).
        Ok(Json<Erasure>),
        /// No `X-API-Key` header.
        401 Unauthorized,
        /// Unknown key, or an ingest-only key.
        403 Forbidden,
        /// The database or Redis is unavailable: retry after the given seconds (erasing again is
        /// safe, and finishes an erasure that stopped part way).
        503 Unavailable(u32),
    }
}

/// Output format.
#[derive(Enum, Clone, Copy, PartialEq, Eq, Debug)]
#[oai(rename_all = "lowercase")]
pub enum Format {
    /// Structured JSON (default).
    Json,
    /// Prompt-ready text.
    Text,
}

fn db_error(err: sea_orm::DbErr) -> ApiError {
    tracing::warn!(error = %err, "database unavailable for the read path");
    ApiError::unavailable(
        "database_unavailable",
        "the database (Postgres) is unavailable: retry later",
        2,
    )
}

/// 404 for a user with nothing stored.
fn unknown_user(user_id: &str) -> ApiError {
    ApiError::not_found(format!("nothing is stored for user {user_id:?}")).at("user_id")
}

pub struct ContextApi;

#[OpenApi(prefix_path = "/context/user", tag = "ApiTags::Context")]
impl ContextApi {
    /// A user's context
    ///
    /// Summary, intents (decayed to now), recent history, stats and freshness, as JSON or as a
    /// compact block for a system prompt (`format=text`, or `Accept: text/plain` / `text/markdown`).
    /// Any id of a person answers for the whole person (every id `$identify`, `$create_alias` or
    /// `$merge_dangerously` joined), listed in `distinct_ids`. Secret key only: ingest keys get 403.
    #[allow(clippy::too_many_arguments)]
    #[oai(path = "/:user_id", method = "get")]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: ApiKeyHeader,
        /// The user's `distinct_id`.
        user_id: Path<String>,
        /// How many history items, newest first (1–500).
        #[oai(default = "default_limit")]
        limit: Query<u32>,
        /// Only events at or after this: an RFC 3339 time or a duration back from now (`30m`, `24h`, `7d`).
        since: Query<Option<String>>,
        /// Only events of this session (`$session_id`).
        session: Query<Option<String>>,
        /// `json` (default) or `text`. Overrides `Accept`.
        format: Query<Option<Format>>,
        /// Text format only: approximate length bound in tokens (about 4 characters each). The
        /// oldest history lines are dropped first; the summary is always kept.
        max_tokens: Query<Option<u32>>,
        /// `text/plain` or `text/markdown` select the text format.
        #[oai(name = "Accept")]
        accept: Header<Option<String>>,
    ) -> ContextResponse {
        let result = async {
            auth.authorize(&state.keys, Access::Read)?;
            let now = Utc::now();
            if !(1..=MAX_LIMIT).contains(&limit.0) {
                return Err(ApiError::invalid(
                    "invalid_value",
                    format!("limit must be between 1 and {MAX_LIMIT}"),
                )
                .at("limit"));
            }
            let since = since
                .0
                .as_deref()
                .map(|s| context::parse_since(s, now))
                .transpose()
                .map_err(|e| {
                    ApiError::invalid("invalid_value", format!("since: {e}")).at("since")
                })?;
            if max_tokens.0 == Some(0) {
                return Err(
                    ApiError::invalid("invalid_value", "max_tokens must be at least 1")
                        .at("max_tokens"),
                );
            }
            let wants_markdown = accept
                .0
                .as_deref()
                .is_some_and(|a| a.contains("text/markdown"));
            let text = match format.0 {
                Some(f) => f == Format::Text,
                None => accept
                    .0
                    .as_deref()
                    .is_some_and(|a| a.contains("text/plain") || a.contains("text/markdown")),
            };

            let filter = HistoryFilter {
                limit: limit.0 as u64,
                since,
                session: session.0.clone(),
            };
            let read = read_context(&state, &user_id.0, &filter, now).await?;
            if text {
                let body = read.text(max_tokens.0.map(|t| t as usize));
                return Ok(if wants_markdown && format.0.is_none() {
                    ContextBody::Markdown(PlainText(body))
                } else {
                    ContextBody::Text(PlainText(body))
                });
            }
            Ok(ContextBody::Json(SerdeJson(Box::new(read.json()))))
        };
        result.await.into()
    }

    /// Erase a user
    ///
    /// Removes the user, with every other id of their person, everywhere this service holds them
    /// (privacy requests): the person's ids and their stored events,
    /// sessions and profile; their entries in the dead-letter stream; the unmatched-events
    /// report's examples taken from their events. Their events received before the erasure but
    /// not stored yet (still in the stream, retried, or replayed from the dead-letter stream
    /// later) are dropped by the workers instead of being stored: the user does not come back.
    /// Events received after the erasure are new activity and are stored as usual.
    ///
    /// An unknown user is erased all the same (200, every count 0): events of theirs may be on
    /// their way. Erasing again is safe; it also erases what arrived in between. Secret key only.
    #[oai(path = "/:user_id", method = "delete")]
    async fn delete(
        &self,
        state: Data<&AppState>,
        auth: ApiKeyHeader,
        /// The user's `distinct_id`.
        user_id: Path<String>,
    ) -> EraseResponse {
        let result = async {
            auth.authorize(&state.keys, Access::Read)?;
            let erased = erase::erase(&state, &[user_id.0.as_str()], Utc::now())
                .await
                .map_err(erase_error)?;
            tracing::info!(
                events = erased.events,
                dead_letters = erased.dead_letters,
                unmatched_examples = erased.unmatched_examples,
                pending = erased.pending_events,
                "user erased"
            );
            Ok(Json(Erasure {
                user_id: user_id.0.clone(),
                distinct_ids: erased.distinct_ids,
                erased_at: erased.erased_at,
                events_deleted: erased.events,
                sessions_deleted: erased.sessions,
                profile_deleted: erased.profiles > 0,
                dead_letters_deleted: erased.dead_letters,
                unmatched_examples_deleted: erased.unmatched_examples,
                pending_events: erased.pending_events,
            }))
        };
        result.await.into()
    }
}

/// A user's context as read for one request: what both forms (JSON and prompt text) are built
/// from. `GET /context/user/:user_id` and the MCP tools read it the same way.
pub struct ReadContext {
    pub user_id: String,
    pub record: store::UserRecord,
    pub intents: Vec<ScoredIntent>,
    pub pending: Option<crate::ingest::publish::Pending>,
    pub now: DateTime<Utc>,
}

/// Reads `user_id`'s stored profile and history (and their events still in the stream):
/// 404 when nothing is stored, 503 when Postgres is unavailable.
pub async fn read_context(
    state: &AppState,
    user_id: &str,
    filter: &HistoryFilter,
    now: DateTime<Utc>,
) -> Result<ReadContext, ApiError> {
    let asked = [user_id];
    let (record, pending) = tokio::join!(
        store::user_record(&state.reads, user_id, filter),
        state.publisher.pending_for_users(&asked),
    );
    let record = record
        .map_err(db_error)?
        .ok_or_else(|| unknown_user(user_id))?;
    // A person of several ids: their events on the way count too.
    let pending = if record.distinct_ids.len() > 1 {
        let ids: Vec<&str> = record.distinct_ids.iter().map(String::as_str).collect();
        state.publisher.pending_for_users(&ids).await
    } else {
        pending
    };
    let intents = context::score_intents(&record.intents, now);
    Ok(ReadContext {
        user_id: user_id.to_owned(),
        record,
        intents,
        pending: pending.ok(),
        now,
    })
}

impl ReadContext {
    /// The prompt text (`format=text`), bounded by `max_tokens`.
    pub fn text(&self, max_tokens: Option<usize>) -> String {
        let r = &self.record;
        let summary = context::summarize(&self.intents, &r.history, self.now, &text::quote);
        text::render(
            &TextContext {
                user_id: &self.user_id,
                distinct_ids: &r.distinct_ids,
                summary: &summary,
                intents: &self.intents,
                history: &r.history,
                event_count: r.event_count,
                session_count: r.session_count,
                first_seen: r.first_seen,
                last_seen: r.last_seen,
                now: self.now,
            },
            max_tokens,
        )
    }

    /// The JSON form.
    pub fn json(self) -> UserContext {
        let now = self.now;
        let r = self.record;
        // The JSON keeps stored values as they are, but `summary` is text made for a
        // prompt: the descriptions in it lose invisible characters and line breaks.
        let summary = context::summarize(&self.intents, &r.history, now, &|d| {
            text::clean(d, SUMMARY_VALUE_CHARS)
        });
        let mut distinct_ids = r.distinct_ids;
        distinct_ids.truncate(MAX_DISTINCT_IDS);
        UserContext {
            user_id: self.user_id,
            distinct_ids,
            summary,
            intents: self.intents.into_iter().map(intent_view).collect(),
            person_properties: r.person_properties.into_iter().collect(),
            recent_history: r
                .history
                .into_iter()
                .map(|h| history_view(h, now))
                .collect(),
            stats: Stats {
                first_seen: r.first_seen,
                last_seen: r.last_seen,
                event_count: r.event_count,
                session_count: r.session_count,
            },
            freshness: Freshness {
                newest_event_at: r.last_seen,
                pending_events: self.pending.as_ref().and_then(|p| p.for_user),
                stream_backlog: self.pending.as_ref().map(|p| p.backlog),
            },
        }
    }
}

/// 503 for an erasure that did not finish: erasing again is safe and finishes it.
fn erase_error(err: erase::EraseError) -> ApiError {
    tracing::warn!(error = %err, "erasure did not finish");
    let detail = match err {
        erase::EraseError::Database(_) => {
            "the database (Postgres) is unavailable: nothing was erased, retry later"
        }
        erase::EraseError::Redis(_) => {
            "stored rows are erased, but the dead-letter stream and the unmatched-events report \
             could not be cleaned (Redis is unavailable): retry later"
        }
        erase::EraseError::Mapping(_) => {
            "the user is erased but for the link between the person's ids (the database is \
             unavailable): retry later"
        }
    };
    ApiError::unavailable("erasure_unfinished", detail, 2)
}

fn default_limit() -> u32 {
    DEFAULT_LIMIT
}

fn intent_view(i: ScoredIntent) -> IntentView {
    IntentView {
        name: i.name,
        score: (i.score * 1000.0).round() / 1000.0,
        last_seen: i.last_seen,
        summary: i.summary,
        evidence: i.evidence,
    }
}

fn history_view(h: HistoryItem, now: DateTime<Utc>) -> HistoryView {
    HistoryView {
        relative_time: relative_time(h.time, now),
        time: h.time,
        description: h.description,
        event: h.event,
        page: h.page,
        session_id: h.session_id,
    }
}
