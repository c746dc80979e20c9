//! The worker's CPU per event before Postgres: a stream entry decoded, described by the shipped
//! rules and turned into a row, as the worker does it (`store::decode`: only the properties the
//! rules and the row read decoded, the rest stored as written) beside decoding every property and
//! encoding them again (`Envelope::from_fields` + `StoredEvent::new` without the written text),
//! on posthog-js-like events (about 25 properties). Also routing: reading `distinct_id` alone.
//!
//! First the on-CPU time per event of each way, interleaved over rounds (min and median: steadier
//! than wall time on a shared machine), then criterion's wall-time figures.
//!
//! `cargo bench -p worker --bench decode`

use std::hint::black_box;
use std::path::Path;

use chrono::{TimeZone, Utc};
use criterion::{Criterion, Throughput, criterion_group};
use entity::{Envelope, envelope::FIELD_EVENT};
use rules_engine::{RuleSet, enrich::Describer};
use serde_json::json;
use worker::store::{self, StoredEvent};

mod support;
use support::thread_cpu_ns;

const EVENTS: usize = 1_000;

/// Encoded envelopes (the `event` field of each entry): page views, clicks and custom events.
fn entries() -> Vec<Vec<u8>> {
    let pages = [
        "/pricing",
        "/checkout",
        "/docs/billing",
        "/app/section-3",
        "/",
    ];
    let base = Utc.with_ymd_and_hms(2026, 11, 28, 9, 0, 0).unwrap();
    (0..EVENTS)
        .map(|i| {
            let page = pages[i % pages.len()];
            let mut properties = json!({
                "$current_url": format!("https://app.example.com{page}"), "$pathname": page,
                "$host": "app.example.com", "$browser": "Chrome", "$browser_version": 120,
                "$os": "Mac OS X", "$device_type": "Desktop", "$screen_height": 1080,
                "$screen_width": 1920, "$referrer": "https://www.google.com/",
                "$referring_domain": "www.google.com", "$lib": "web", "$lib_version": "1.200.0",
                "$session_id": format!("0193{i:04x}"), "$window_id": format!("w-{i}"),
                "$insert_id": format!("{i:x}"), "utm_source": "newsletter",
                "utm_campaign": "black-friday", "token": "phc_benchmark"
            });
            let (event, chain) = match i % 10 {
                0..5 => ("$pageview", None),
                5..8 => {
                    properties["$event_type"] = json!("click");
                    properties["$el_text"] = json!("Upgrade Plan");
                    let chain = r#"button.btn.btn-primary:text="Upgrade Plan":attr__class="btn btn-primary":nth-child="2";div.card:nth-child="1";body"#;
                    ("$autocapture", Some(chain.to_string()))
                }
                8 => ("$pageleave", None),
                _ => ("signup_completed", None),
            };
            let timestamp = base + chrono::Duration::milliseconds(i as i64 * 10);
            Envelope {
                uuid: uuid::Uuid::now_v7(),
                distinct_id: format!("user_{}", i % 500),
                event: event.into(),
                properties: properties.as_object().cloned().unwrap_or_default(),
                timestamp,
                received_at: timestamp + chrono::Duration::milliseconds(40),
                sent_at: None,
                session_id: Some(format!("0193{i:04x}")),
                lib: Some("web".into()),
                elements_chain: chain,
                person: None,
            }
            .to_json()
            .into_bytes()
        })
        .collect()
}

fn fields<'e>(event: &'e [u8]) -> impl FnMut(&str) -> Option<&'e [u8]> {
    move |name| match name {
        "v" => Some(&b"1"[..]),
        FIELD_EVENT => Some(event),
        _ => None,
    }
}

fn rules() -> RuleSet {
    RuleSet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules"))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// As the worker does: only the properties the rules and the row read decoded.
fn as_the_worker_does(rules: &RuleSet, entries: &[Vec<u8>]) {
    for entry in entries {
        let (envelope, written) = store::decode(fields(entry), rules).unwrap();
        let enrichment = rules.enrich_written(&envelope, written).unwrap();
        black_box(StoredEvent::new(envelope, enrichment, written));
    }
}

/// Every property decoded, the properties stored as written.
fn every_property_decoded(rules: &RuleSet, entries: &[Vec<u8>]) {
    for entry in entries {
        let envelope: Envelope = Envelope::from_fields(fields(entry)).unwrap();
        let written = entity::envelope::scan::first(entry, "properties")
            .and_then(|p| std::str::from_utf8(p).ok());
        let enrichment = Describer::enrich(rules, &envelope).unwrap();
        black_box(StoredEvent::new(envelope, enrichment, written));
    }
}

/// Every property decoded and encoded again (the worker before).
fn every_property_decoded_and_encoded(rules: &RuleSet, entries: &[Vec<u8>]) {
    for entry in entries {
        let envelope: Envelope = Envelope::from_fields(fields(entry)).unwrap();
        let enrichment = Describer::enrich(rules, &envelope).unwrap();
        black_box(StoredEvent::new(envelope, enrichment, None));
    }
}

type Way = (&'static str, fn(&RuleSet, &[Vec<u8>]));

const WAYS: [Way; 3] = [
    ("as the worker does", as_the_worker_does),
    ("every property decoded", every_property_decoded),
    (
        "every property decoded and encoded",
        every_property_decoded_and_encoded,
    ),
];

const ROUNDS: usize = 15;
const PASSES: usize = 20;

/// On-CPU nanoseconds per event of each way, in interleaved rounds.
fn report_cpu() {
    let (rules, entries) = (rules(), entries());
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); WAYS.len()];
    // The kernel counts on-CPU time in scheduler ticks here (4 ms): each sample is long enough
    // (20 passes, about 0.1 s) for that not to matter.
    for _ in 0..ROUNDS {
        for (i, (_, way)) in WAYS.iter().enumerate() {
            let Some(start) = thread_cpu_ns() else { return };
            for _ in 0..PASSES {
                way(&rules, &entries);
            }
            let ns = thread_cpu_ns().unwrap_or(start) - start;
            samples[i].push(ns as f64 / (PASSES * entries.len()) as f64);
        }
    }
    println!(
        "entry to row, on-CPU time per event ({ROUNDS} interleaved rounds of {PASSES} x {EVENTS} events):"
    );
    for ((name, _), mut s) in WAYS.iter().zip(samples) {
        s.sort_by(f64::total_cmp);
        println!(
            "  {name:<36} min {:>6.2} µs  median {:>6.2} µs",
            s[0] / 1e3,
            s[s.len() / 2] / 1e3
        );
    }
}

fn bench(c: &mut Criterion) {
    let (rules, entries) = (rules(), entries());
    let mut g = c.benchmark_group("entry_to_row");
    g.throughput(Throughput::Elements(entries.len() as u64));
    for (name, way) in WAYS {
        g.bench_function(name.replace(' ', "_"), |b| b.iter(|| way(&rules, &entries)));
    }
    g.finish();
    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(entries.len() as u64));
    g.bench_function("distinct_id_of", |b| {
        b.iter(|| {
            for entry in &entries {
                black_box(Envelope::distinct_id_of(entry));
            }
        })
    });
    g.bench_function("distinct_id_by_serde", |b| {
        #[derive(serde::Deserialize)]
        struct User<'a> {
            #[serde(borrow)]
            distinct_id: std::borrow::Cow<'a, str>,
        }
        b.iter(|| {
            for entry in &entries {
                black_box(
                    serde_json::from_slice::<User>(entry)
                        .ok()
                        .map(|u| u.distinct_id),
                );
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    report_cpu();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
