//! Enrichment throughput: the shipped rules plus 200 generated ones over a realistic event mix.
//! Prints events/s (criterion's throughput) and allocations per event (a counting allocator).
//! The counting allocator wraps the system allocator and costs ~10% itself, so the figures are
//! slightly pessimistic; events are pre-decoded (`serde_json::Map`), as the worker holds them.
//!
//! `cargo bench -p worker --bench enrich` (set `RULES_DIR` to bench another rules directory).

use std::alloc::System;
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group};
use serde_json::{Map, Value, json};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

use rules_engine::{EventInput, RuleSet};

mod support;
use support::thread_cpu_ns;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const EVENTS: usize = 10_000;

fn rules_dir() -> PathBuf {
    std::env::var_os("RULES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules"))
}

/// 200 rules of the kinds authors write: custom events, page paths, element texts/attributes,
/// event-name regexes and intent-only path rules.
fn generated_rules() -> String {
    let mut y = String::from("rules:\n");
    for i in 0..80 {
        y += &format!(
            "  - id: gen-feature-{i}\n    when:\n      event: feature_{i}_used\n      properties:\n        plan: [pro, team]\n    say: \"Used feature {i} on the {{{{ properties.plan }}}} plan\"\n"
        );
    }
    for i in 0..60 {
        let intents = if i % 3 == 0 {
            "    intents: { evaluation: 1 }\n"
        } else {
            ""
        };
        y += &format!(
            "  - id: gen-section-{i}\n    priority: 5\n    when:\n      event: $pageview\n      path: /app/section-{i}\n    say: \"Opened section {i}\"\n{intents}"
        );
    }
    for i in 0..40 {
        let cond = if i % 2 == 0 {
            format!("text: \"Action {i}\"")
        } else {
            format!("attributes: {{ data-attr: action-{i} }}")
        };
        y += &format!(
            "  - id: gen-action-{i}\n    priority: 5\n    when:\n      event: $autocapture\n      element: {{ {cond} }}\n    say: \"Ran action {i} ('{{{{ element.text | default: \\\"no label\\\" }}}}')\"\n"
        );
    }
    for i in 0..10 {
        y += &format!(
            "  - id: gen-experiment-{i}\n    when:\n      event: {{ regex: \"^exp_{i}_(?P<step>[a-z]+)$\" }}\n    say: \"Experiment {i}: {{{{ step }}}}\"\n"
        );
    }
    for i in 0..10 {
        y += &format!(
            "  - id: gen-area-{i}\n    when:\n      path: {{ regex: \"^/area-{i}/\" }}\n    intents: {{ evaluation: 0.5 }}\n"
        );
    }
    y
}

fn rule_set() -> RuleSet {
    let dir = rules_dir();
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("rules dir")
        .filter_map(|e| {
            let p = e.ok()?.path();
            let name = p.file_name()?.to_str()?.to_owned();
            name.ends_with(".yaml")
                .then(|| (name, std::fs::read_to_string(&p).expect("rule file")))
        })
        .collect();
    files.push(("zz-generated.yaml".into(), generated_rules()));
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_str()))
        .collect();
    let set = RuleSet::from_sources(&refs).unwrap_or_else(|e| panic!("{e}"));
    assert!(set.len() >= 200);
    set
}

/// A tiny deterministic generator so runs are comparable.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[(self.next() as usize) % xs.len()]
    }
}

struct Event {
    name: String,
    props: Map<String, Value>,
}

fn base_props(r: &mut Lcg, path: &str) -> Map<String, Value> {
    let v = json!({
        "$os": r.pick(&["Mac OS X", "Windows", "iOS", "Android"]),
        "$browser": r.pick(&["Chrome", "Safari", "Firefox"]),
        "$device_type": "Desktop",
        "$lib": "web",
        "$lib_version": "1.160.0",
        "$host": "app.example.com",
        "$pathname": path,
        "$current_url": format!("https://app.example.com{path}?utm_source=newsletter"),
        "$referrer": "https://www.google.com/",
        "$screen_height": 1080,
        "$screen_width": 1920,
        "$session_id": "0190f0c1-7d2e-7a4b-9c1e-5f7a3b2c1d0e",
        "$window_id": "0190f0c1-7d2e-7a4b-9c1e-5f7a3b2c1d0f",
        "$insert_id": format!("{:x}", r.next()),
        "token": "phc_test",
    });
    v.as_object().cloned().unwrap_or_default()
}

fn chain(r: &mut Lcg) -> String {
    let clicked = match r.next() % 6 {
        0 => r#"button.btn.btn-primary:text="Upgrade Plan"attr__class="btn btn-primary"nth-child="1""#.to_owned(),
        1 => format!(r#"button.btn:text="Action {}"attr__class="btn"nth-child="2""#, r.next() % 50),
        2 => format!(r#"a.menu-item:attr__data-attr="action-{}"href="/x"nth-child="1""#, r.next() % 50),
        3 => r#"a.nav-link:text="Docs"href="/docs"attr__class="nav-link"nth-child="3""#.to_owned(),
        4 => r#"svg.icon:nth-child="1""#.to_owned(),
        _ => r#"span:text="Save changes"nth-child="1""#.to_owned(),
    };
    format!(
        r#"{clicked};div.toolbar.flex.items-center:attr__class="toolbar flex items-center"nth-child="2";div.container:nth-child="1";main#content:attr__id="content"nth-child="1";body:nth-child="2""#
    )
}

fn events() -> Vec<Event> {
    let mut r = Lcg(42);
    let paths = [
        "/",
        "/pricing",
        "/docs/getting-started",
        "/blog/launch",
        "/checkout",
        "/settings",
        "/app/section-3",
        "/app/section-17",
        "/app/section-59",
        "/area-4/overview",
        "/dashboard",
    ];
    (0..EVENTS)
        .map(|_| {
            let path = *r.pick(&paths);
            let mut props = base_props(&mut r, path);
            let roll = r.next() % 100;
            let name = match roll {
                0..40 => "$pageview".to_owned(),
                40..65 => {
                    let t = match r.next() % 20 {
                        0..17 => "click",
                        17..19 => "submit",
                        _ => "change",
                    };
                    props.insert("$event_type".into(), t.into());
                    props.insert("$elements_chain".into(), chain(&mut r).into());
                    "$autocapture".to_owned()
                }
                65..73 => "$pageleave".to_owned(),
                73..75 => {
                    props.insert("$elements_chain".into(), chain(&mut r).into());
                    "$rageclick".to_owned()
                }
                75..77 => "$identify".to_owned(),
                77..78 => {
                    props.insert(
                        "$exception_message".into(),
                        "TypeError: x is undefined".into(),
                    );
                    "$exception".to_owned()
                }
                78..81 => {
                    props.insert("$feature_flag".into(), "new-onboarding".into());
                    props.insert("$feature_flag_response".into(), true.into());
                    "$feature_flag_called".to_owned()
                }
                81..95 => {
                    props.insert("plan".into(), (*r.pick(&["free", "pro", "team"])).into());
                    format!("feature_{}_used", r.next() % 100)
                }
                95..97 => format!("exp_{}_step", r.next() % 10),
                _ => (*r.pick(&["signup_completed", "invite_sent", "report_exported"])).to_owned(),
            };
            Event { name, props }
        })
        .collect()
}

fn input(e: &Event) -> EventInput<'_> {
    EventInput {
        event: &e.name,
        distinct_id: "user_1",
        properties: &e.props,
        properties_text: None,
        elements_chain: None,
        person_properties: None,
    }
}

fn bench(c: &mut Criterion) {
    let set = rule_set();
    let events = events();
    let mut g = c.benchmark_group("enrich");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("realistic_mix", |b| {
        b.iter(|| {
            for e in &events {
                black_box(set.enrich(black_box(&input(e))));
            }
        })
    });
    for kind in ["$pageview", "$autocapture"] {
        let only: Vec<&Event> = events.iter().filter(|e| e.name == kind).collect();
        g.throughput(Throughput::Elements(only.len() as u64));
        g.bench_function(kind.trim_start_matches('$'), |b| {
            b.iter(|| {
                for e in &only {
                    black_box(set.enrich(black_box(&input(e))));
                }
            })
        });
    }
    g.finish();
}

/// One pass over the mix under the counting allocator.
fn report_allocations() {
    let set = rule_set();
    let events = events();
    for e in &events {
        black_box(set.enrich(&input(e)));
    }
    let region = Region::new(GLOBAL);
    for e in &events {
        black_box(set.enrich(&input(e)));
    }
    let s = region.change();
    let n = events.len() as f64;
    let matched = events
        .iter()
        .filter(|e| set.enrich(&input(e)).matched)
        .count();
    println!(
        "rules: {} ({} shipped + 200 generated); events: {} ({:.1}% described by a rule)",
        set.len(),
        set.len() - 200,
        events.len(),
        100.0 * matched as f64 / n
    );
    println!(
        "allocations/event: {:.2} (reallocations/event {:.2}, bytes/event {:.0})",
        s.allocations as f64 / n,
        s.reallocations as f64 / n,
        s.bytes_allocated as f64 / n
    );
}

/// Events per second of on-CPU time of one thread, over about two seconds.
fn report_cpu_throughput() {
    let set = rule_set();
    let events = events();
    let (Some(cpu0), wall0) = (thread_cpu_ns(), std::time::Instant::now()) else {
        return;
    };
    let mut n = 0u64;
    while wall0.elapsed() < std::time::Duration::from_secs(2) {
        for e in &events {
            black_box(set.enrich(black_box(&input(e))));
        }
        n += events.len() as u64;
    }
    let cpu = thread_cpu_ns().unwrap_or(cpu0) - cpu0;
    let wall = wall0.elapsed().as_nanos() as f64;
    println!(
        "realistic mix, one thread: {:.0} events per CPU-second ({:.0} ns/event on CPU; {:.0} events/s wall, thread was on CPU {:.0}% of the time)",
        n as f64 * 1e9 / cpu as f64,
        cpu as f64 / n as f64,
        n as f64 * 1e9 / wall,
        100.0 * cpu as f64 / wall
    );
}

criterion_group!(benches, bench);

/// Profiling mode (`ENRICH_PROFILE_ITERS=N`): enrich the mix N times and exit, without criterion's
/// timing loop, so an instruction-counting profiler sees only setup plus N passes.
fn profile(iters: usize) {
    let set = rule_set();
    let events = events();
    for _ in 0..iters {
        for e in &events {
            black_box(set.enrich(black_box(&input(e))));
        }
    }
}

fn main() {
    if let Some(n) = std::env::var("ENRICH_PROFILE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        profile(n);
        return;
    }
    report_allocations();
    report_cpu_throughput();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
