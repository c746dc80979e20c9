//! Ingest CPU per event, without the network: turning a request body into stream envelopes
//! (`parse::queue`, the path SDK traffic takes) and packing them into the XADD pipeline sent to
//! Redis. Same 600-byte posthog-js pageview as `ingest-load.sh`; prints events/s (criterion's
//! throughput) and allocations per event (a counting allocator, which costs a little itself).
//!
//! `cargo bench -p api --bench ingest`

use std::alloc::System;
use std::hint::black_box;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group};
use serde_json::{Value, json};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

use api::ingest::{parse, publish::xadd_pipeline};
use infra::shards::StreamShards;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The benchmark's pageview, padded to 600 bytes of JSON.
fn event(i: usize) -> Value {
    let mut e = json!({"event": "$pageview", "distinct_id": format!("user_{}", i % 1000),
        "properties": {"$current_url": "https://shop.example.com/pricing?plan=pro", "$pathname": "/pricing",
            "$host": "shop.example.com", "$browser": "Chrome", "$os": "Mac OS X",
            "$session_id": "0190b5d6-1d3e-7cc4-b1b8-7ab1a2c3d4e5", "$lib": "web", "$lib_version": "1.200.0",
            "$screen_height": 1080, "$screen_width": 1920, "$referrer": "https://www.google.com/",
            "title": "Pricing - Example Shop", "pad": ""},
        "timestamp": "2026-11-28T10:00:00.000Z"});
    let len = serde_json::to_string(&e).unwrap().len();
    e["properties"]["pad"] = json!("x".repeat(600usize.saturating_sub(len)));
    e
}

fn bodies() -> [(&'static str, Vec<u8>, u64); 2] {
    let batch: Vec<Value> = (0..100).map(event).collect();
    [
        ("single", serde_json::to_vec(&event(1)).unwrap(), 1),
        (
            "batch100",
            serde_json::to_vec(&json!({"api_key": "k", "batch": batch})).unwrap(),
            100,
        ),
    ]
}

fn queue(body: &[u8]) -> Vec<parse::Queued> {
    parse::queue(body, Utc::now(), None, usize::MAX, |_| Ok(())).expect("valid body")
}

fn bench(c: &mut Criterion) {
    let shards = StreamShards::new("events", 1);
    let mut group = c.benchmark_group("ingest");
    for (name, body, events) in bodies() {
        group.throughput(Throughput::Elements(events));
        group.bench_function(format!("{name}/normalize"), |b| {
            b.iter(|| queue(black_box(&body)))
        });
        let queued = queue(&body);
        group.bench_function(format!("{name}/pack"), |b| {
            b.iter(|| xadd_pipeline(&shards, black_box(&queued), None).get_packed_pipeline())
        });
        group.bench_function(format!("{name}/normalize+pack"), |b| {
            b.iter(|| xadd_pipeline(&shards, &queue(black_box(&body)), None).get_packed_pipeline())
        });
    }
    group.finish();
}

fn allocations() {
    let shards = StreamShards::new("events", 1);
    for (name, body, events) in bodies() {
        let region = Region::new(GLOBAL);
        let rounds = 200;
        for _ in 0..rounds {
            black_box(xadd_pipeline(&shards, &queue(&body), None).get_packed_pipeline());
        }
        let stats = region.change();
        let per_event = |n: usize| n as f64 / (rounds * events) as f64;
        println!(
            "{name}: {:.1} allocations and {:.0} bytes allocated per event (normalize + pack)",
            per_event(stats.allocations),
            per_event(stats.bytes_allocated),
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    allocations();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
