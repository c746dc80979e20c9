//! The context read's CPU outside Postgres and HTTP: decoding the history Postgres sends (a JSON
//! array of twenty `[time, description, event, page, session]`), writing times, and writing a
//! whole response body. Where the read path has its own code for times (`context::json`),
//! chrono's general parser or formatter runs beside it in the same run.
//!
//! `cargo bench -p api --bench context`

use std::hint::black_box;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use criterion::{Criterion, criterion_group};
use serde::Serialize;

use api::context::{
    HistoryItem,
    json::rfc3339,
    score_intents,
    store::{HistoryTuple, UserRecord},
};
use api::routes::context::ReadContext;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap()
}

/// Twenty entries as `CONTEXT_SQL`'s `json_agg` writes them (a `timestamptz` in JSON carries
/// microseconds and the offset).
fn history_json() -> String {
    let entries: Vec<String> = (0..20)
        .map(|i| {
            let time = now() - TimeDelta::seconds(97 * i) - TimeDelta::microseconds(123_457 * i);
            format!(
                r#"["{}", "Viewed the pricing page (plan {i})", "$pageview", "/pricing", "0190b5d6-1d3e-7cc4-b1b8-7ab1a2c3d4e5"]"#,
                time.format("%Y-%m-%dT%H:%M:%S%.6f%:z")
            )
        })
        .collect();
    format!("[{}]", entries.join(", "))
}

/// A history entry with its time read by chrono's parser (the read path's is [`HistoryTuple`]).
type ChronoRow = (
    DateTime<Utc>,
    String,
    String,
    Option<String>,
    Option<String>,
);

/// A time written the way the read path wrote it before it had its own writer.
struct ChronoTime(DateTime<Utc>);

impl Serialize for ChronoTime {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0.to_rfc3339())
    }
}

struct OwnTime(DateTime<Utc>);

impl Serialize for OwnTime {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        rfc3339(&self.0, serializer)
    }
}

fn read_context(history: Vec<HistoryItem>) -> ReadContext {
    let record = UserRecord {
        distinct_ids: vec!["user_1".into()],
        first_seen: now() - TimeDelta::days(30),
        last_seen: now(),
        event_count: 100,
        session_count: 7,
        intents: Default::default(),
        person_properties: Default::default(),
        history,
    };
    ReadContext {
        user_id: "user_1".into(),
        intents: score_intents(&record.intents, now()),
        record,
        pending: None,
        now: now(),
    }
}

fn bench(c: &mut Criterion) {
    let json = history_json();
    let mut decode = c.benchmark_group("history decode (20 entries)");
    decode.bench_function("chrono's parser", |b| {
        b.iter(|| serde_json::from_str::<Vec<ChronoRow>>(black_box(&json)).unwrap())
    });
    decode.bench_function("read path (PgTime)", |b| {
        b.iter(|| serde_json::from_str::<Vec<HistoryTuple>>(black_box(&json)).unwrap())
    });
    decode.finish();

    let times: Vec<DateTime<Utc>> = (0..20)
        .map(|i| now() - TimeDelta::microseconds(97_123_457 * i))
        .collect();
    let mut write = c.benchmark_group("time write (20 times)");
    write.bench_function("chrono's to_rfc3339", |b| {
        let times: Vec<ChronoTime> = times.iter().copied().map(ChronoTime).collect();
        b.iter(|| serde_json::to_vec(black_box(&times)).unwrap())
    });
    write.bench_function("read path (rfc3339)", |b| {
        let times: Vec<OwnTime> = times.iter().copied().map(OwnTime).collect();
        b.iter(|| serde_json::to_vec(black_box(&times)).unwrap())
    });
    write.finish();

    let rows = serde_json::from_str::<Vec<HistoryTuple>>(&json).unwrap();
    let history: Vec<HistoryItem> = rows.into_iter().map(HistoryItem::from).collect();
    let mut body = c.benchmark_group("response body");
    body.bench_function("JSON of a context of 20 events", |b| {
        b.iter_batched(
            || read_context(history.clone()),
            |read| {
                let mut out = Vec::with_capacity(8 * 1024);
                serde_json::to_writer(&mut out, &read.json()).unwrap();
                out
            },
            criterion::BatchSize::SmallInput,
        )
    });
    body.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
