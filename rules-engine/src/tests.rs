//! Behaviour of the rule engine as rule authors and the worker see it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::*;

/// The shipped `rules/` directory of the repository.
fn shipped_dir() -> PathBuf {
    let from_manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let from_file = Path::new(file!())
        .ancestors()
        .nth(4)
        .map(|p| p.join("rules"));
    [Some(from_manifest), from_file]
        .into_iter()
        .flatten()
        .find(|p| p.join("posthog.yaml").is_file())
        .expect("shipped rules directory")
}

fn shipped() -> RuleSet {
    RuleSet::load_dir(&shipped_dir()).unwrap_or_else(|e| panic!("shipped rules invalid:\n{e}"))
}

fn props(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("object")
}

/// User `u1`'s event `event`.
fn event_input<'a>(
    event: &'a str,
    p: &'a Map<String, Value>,
    chain: Option<&'a str>,
) -> EventInput<'a> {
    EventInput {
        event,
        distinct_id: "u1",
        properties: p,
        properties_text: None,
        elements_chain: chain,
        person_properties: None,
    }
}

fn enrich(set: &RuleSet, event: &str, p: &Map<String, Value>, chain: Option<&str>) -> Enrichment {
    set.enrich(&event_input(event, p, chain))
}

fn intent_names(e: &Enrichment) -> Vec<&str> {
    e.intents.iter().map(|i| &*i.name).collect()
}

const UPGRADE_CHAIN: &str = r#"button.btn.btn-primary:text="Upgrade Plan"attr__class="btn btn-primary"attr__id="up"nth-child="1";div.container:nth-child="2""#;

#[test]
fn shipped_rules_pass_their_examples() {
    let set = shipped();
    let report = cli::run_examples(&set);
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    assert!(
        report.without_examples.is_empty(),
        "{:?}",
        report.without_examples
    );
    assert!(report.passed >= 20);
    for ev in [
        "$pageview",
        "$pageleave",
        "$autocapture",
        "$rageclick",
        "$identify",
        "$exception",
        "$feature_flag_called",
        "$screen",
    ] {
        assert!(set.by_event.contains_key(ev), "no rule for {ev}");
    }
}

#[test]
fn prototype_examples() {
    let set = shipped();
    let p = props(json!({"$current_url": "https://app.example.com/pricing"}));
    let e = enrich(&set, "$pageview", &p, None);
    assert_eq!(e.description, "Viewed page: /pricing");
    assert_eq!(e.rule_id.as_deref(), Some("pageview"));
    assert!(e.matched);
    assert_eq!(intent_names(&e), ["purchase"]);
    assert_eq!(&*e.intents[0].summary, "User showing Purchase Intent.");
    assert_eq!(e.intents[0].half_life_secs, 3.0 * 86_400.0);

    let p =
        props(json!({"$event_type": "click", "$current_url": "https://app.example.com/pricing"}));
    let e = enrich(&set, "$autocapture", &p, Some(UPGRADE_CHAIN));
    assert_eq!(e.description, "Clicked 'Upgrade Plan' Button");
    // 3 from the button, 1 from being on /pricing.
    assert_eq!(e.intents.len(), 1);
    assert_eq!(e.intents[0].weight, 4.0);

    // The chain may also arrive as a property.
    let p = props(json!({"$event_type": "click", "$elements_chain": UPGRADE_CHAIN}));
    assert_eq!(
        enrich(&set, "$autocapture", &p, None).description,
        "Clicked 'Upgrade Plan' Button"
    );

    let chain = r#"a.nav-link:text="Contact sales"href="/contact"nth-child="1""#;
    let p = props(json!({"$event_type": "click"}));
    let e = enrich(&set, "$autocapture", &p, Some(chain));
    assert_eq!(e.description, "Clicked element: 'Contact sales'");
    assert!(e.intents.is_empty());
}

#[test]
fn unmatched_events_fall_back_and_are_counted() {
    let set = shipped();
    let p = props(json!({"$current_url": "https://app.example.com/onboarding"}));
    for _ in 0..3 {
        let e = enrich(&set, "signup_completed", &p, None);
        assert_eq!(e.description, "Triggered 'signup_completed'");
        assert!(!e.matched);
        assert_eq!(e.rule_id, None);
    }
    enrich(&set, "weird\nname", &Map::new(), None);
    let shapes = set.unmatched().snapshot();
    assert_eq!(shapes[0].event, "signup_completed");
    assert_eq!(shapes[0].path.as_deref(), Some("/onboarding"));
    assert_eq!(shapes[0].count, 3);
    assert_eq!(shapes[1].event, "weird name");
    assert_eq!(set.unmatched().take().len(), 2);
    assert!(set.unmatched().snapshot().is_empty());

    // Counts that could not be reported are put back, once per shape however often.
    for _ in 0..2 {
        enrich(&set, "signup_completed", &p, None);
    }
    let taken = set.unmatched().take();
    set.unmatched().restore(taken.clone());
    let again = set.unmatched().take();
    assert_eq!(again, taken);
    set.unmatched().restore(again.clone());
    set.unmatched().restore(again);
    let restored = set.unmatched().snapshot();
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].count, 4);

    // An unknown event on a pricing page still carries the intent.
    let p = props(json!({"$pathname": "/checkout"}));
    let e = enrich(&set, "custom_thing", &p, None);
    assert!(!e.matched);
    assert_eq!(intent_names(&e), ["purchase"]);
}

const BASE: &str = r#"
intents:
  - name: purchase
    summary: "User showing Purchase Intent."
    half_life: 12h
"#;

fn set_of(files: &[(&str, &str)]) -> RuleSet {
    let mut all = vec![("0-intents.yaml", BASE)];
    all.extend_from_slice(files);
    RuleSet::from_sources(&all).unwrap_or_else(|e| panic!("{e}"))
}

fn err_of(files: &[(&str, &str)]) -> Vec<Diagnostic> {
    let mut all = vec![("0-intents.yaml", BASE)];
    all.extend_from_slice(files);
    match RuleSet::from_sources(&all) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.diagnostics().to_vec(),
    }
}

#[test]
fn priority_then_file_then_position() {
    let a = r#"
rules:
  - id: a-generic
    when: { event: signup }
    say: "A generic"
  - id: a-specific
    when: { event: signup, properties: { plan: pro } }
    say: "A specific"
"#;
    let b = r#"
rules:
  - id: b-high
    priority: 5
    when: { event: signup, properties: { plan: team } }
    say: "B high"
"#;
    let set = set_of(&[("b.yaml", b), ("a.yaml", a)]);
    let pro = props(json!({"plan": "pro"}));
    let team = props(json!({"plan": "team"}));
    // Same priority: a.yaml's first rule shadows its second.
    assert_eq!(enrich(&set, "signup", &pro, None).description, "A generic");
    // Higher priority wins across files.
    assert_eq!(enrich(&set, "signup", &team, None).description, "B high");
    let order: Vec<&str> = set.rules.iter().map(|r| &*r.id).collect();
    assert_eq!(order, ["b-high", "a-generic", "a-specific"]);
}

/// Rules with conditions and templates of every kind.
const EVERY_KIND: &str = r#"
rules:
  - id: big-order
    when:
      event: { regex: "^order_(placed|paid)$" }
      properties:
        total: { gte: 100, lt: 1000 }
        items.0.sku: { starts_with: "SKU-" }
        coupon: { exists: false }
      person:
        plan: [pro, team]
    say: "Placed a big order of {{ properties.total }} ({{ properties.items.0.sku }}, {{ person.plan }})"
    intents: { purchase: 2 }
  - id: docs-section
    when:
      event: $pageview
      url: { contains: "example.com" }
      path: { regex: "^/docs/(?P<section>[^/]+)" }
    say: "Read the {{ section }} docs"
  - id: nav-click
    when:
      event: [$autocapture, $rageclick]
      element:
        tag: a
        classes: .nav-link
        href: { regex: "^/" }
        attributes: { data-attr: nav }
      inside:
        tag: nav
    say: "Navigated via {{ element.attributes.data-attr }} to {{ element.href }}"
  - id: any-not
    when:
      event: feedback
      any:
        - properties: { score: { lte: 3 } }
        - properties: { angry: true }
      not:
        properties: { internal: true }
    say: "Left negative feedback"
"#;

#[test]
fn conditions_of_every_kind() {
    let rules = EVERY_KIND;
    let set = set_of(&[("r.yaml", rules)]);
    let person = props(json!({"plan": "team"}));
    let order = props(json!({"total": "250", "items": [{"sku": "SKU-9"}]}));
    let e = set.enrich(&EventInput {
        person_properties: Some(&person),
        ..event_input("order_paid", &order, None)
    });
    assert_eq!(e.description, "Placed a big order of 250 (SKU-9, team)");
    assert_eq!(e.intents[0].half_life_secs, 43_200.0);
    let coupon = props(json!({"total": 250, "items": [{"sku": "SKU-9"}], "coupon": "X"}));
    let e = set.enrich(&EventInput {
        person_properties: Some(&person),
        ..event_input("order_paid", &coupon, None)
    });
    assert!(!e.matched);

    let p = props(json!({"$current_url": "https://example.com/docs/billing/invoices"}));
    assert_eq!(
        enrich(&set, "$pageview", &p, None).description,
        "Read the billing docs"
    );

    let chain = r#"a.nav-link.active:text="Docs"href="/docs"attr__data-attr="nav";li:nth-child="1";nav.top:nth-child="1""#;
    let e = enrich(&set, "$rageclick", &Map::new(), Some(chain));
    assert_eq!(e.description, "Navigated via nav to /docs");
    let outside = r#"a.nav-link:href="/docs"attr__data-attr="nav";div:nth-child="1""#;
    assert!(!enrich(&set, "$autocapture", &Map::new(), Some(outside)).matched);

    let f = |v: Value| enrich(&set, "feedback", &props(v), None).matched;
    assert!(f(json!({"score": 2})));
    assert!(f(json!({"angry": true, "score": 9})));
    assert!(!f(json!({"score": 2, "internal": true})));
    assert!(!f(json!({"score": 5})));
}

/// Events are described from the properties a rule set reads exactly as from all of them, for
/// rules of every kind; an unmatched event's example still keeps them all.
#[test]
fn events_are_described_alike_from_the_properties_the_rules_read() {
    let sets = [
        shipped(),
        set_of(&[("r.yaml", EVERY_KIND)]),
        set_of(&[(
            "p.yaml",
            r#"
rules:
  - id: dotted
    when:
      event: dotted
      properties: { "a.b": 1 }
    say: "Dotted {{ properties.a.b }}"
  - id: captured
    when:
      event: plan_changed
      properties: { plan: { regex: "^(?P<tier>[a-z]+)-" } }
    say: "Moved to {{ tier }} from {{ properties.previous.name | default: \"nothing\" }}"
  - id: clicked
    when:
      event: $autocapture
      element: { text: Buy, attributes: { data-attr: buy } }
    say: "Clicked {{ element.text }} ({{ element.classes }})"
"#,
        )]),
    ];
    let page = |url: &str| json!({"$current_url": url, "$host": "x.test", "utm_source": "mail", "$browser": "Chrome"});
    let mut events: Vec<(&str, Value, Option<&str>)> = vec![
        ("$pageview", page("https://x.test/pricing?a=1"), None),
        (
            "$pageview",
            json!({"$pathname": "/docs/billing/x", "$current_url": "https://example.com/docs/billing/x"}),
            None,
        ),
        ("$pageview", page("https://x.test/checkout"), None),
        ("$pageleave", page("https://x.test/pricing"), None),
        (
            "$autocapture",
            json!({"$el_text": "Buy", "attr__data-attr": "buy", "attr__class": "btn big", "$event_type": "click"}),
            None,
        ),
        (
            "$autocapture",
            json!({"$elements": [{"tag_name": "button", "$el_text": "Upgrade Plan", "attr__class": "btn"}], "other": 1}),
            None,
        ),
        (
            "$autocapture",
            json!({"$elements_chain": UPGRADE_CHAIN, "$current_url": "https://x.test/pricing"}),
            None,
        ),
        (
            "$autocapture",
            json!({"$current_url": "https://x.test/pricing"}),
            Some(UPGRADE_CHAIN),
        ),
        (
            "$rageclick",
            json!({"$el_text": "Docs", "$el_tag_name": "a", "attr__href": "/docs", "attr__data-attr": "nav"}),
            None,
        ),
        (
            "order_paid",
            json!({"total": 250, "items": [{"sku": "SKU-9"}], "junk": [1, 2]}),
            None,
        ),
        (
            "order_paid",
            json!({"total": "250", "items": [{"sku": "SKU-9"}], "coupon": "X"}),
            None,
        ),
        ("order_placed", json!({"total": 5000, "items": []}), None),
        (
            "feedback",
            json!({"score": 2, "internal": false, "comment": "meh"}),
            None,
        ),
        ("feedback", json!({"angry": true, "internal": true}), None),
        ("dotted", json!({"a.b": 1, "a": {"b": 2}}), None),
        ("dotted", json!({"a": {"b": 1}}), None),
        (
            "plan_changed",
            json!({"plan": "pro-yearly", "previous": {"name": "free"}, "seats": 3}),
            None,
        ),
        ("plan_changed", json!({"plan": "team-monthly"}), None),
        (
            "signup_completed",
            json!({"$current_url": "https://x.test/welcome", "$set": {"email": "a@x.test"}}),
            None,
        ),
        (
            "unknown_thing",
            json!({"$pathname": "/checkout", "x": {"y": [1]}}),
            None,
        ),
    ];
    for (name, _, _) in events.clone() {
        events.push((name, json!({}), None));
    }
    for set in &sets {
        for (name, all, chain) in &events {
            let all = props(all.clone());
            let read: Map<String, Value> = all
                .iter()
                .filter(|(k, _)| set.reads_property(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let text = Value::Object(all.clone()).to_string();
            let input = |properties, properties_text| EventInput {
                properties_text,
                ..event_input(name, properties, *chain)
            };
            assert_eq!(
                set.enrich_inner(&input(&read, Some(&text)), false),
                set.enrich_inner(&input(&all, None), false),
                "{name} {all:?} (read {read:?})"
            );
        }
    }
    assert!(!sets[0].reads_property("utm_source"));
    assert!(sets[1].reads_property("items") && sets[1].reads_property("items.0.sku"));

    // An unmatched event's example keeps every property, not only those read.
    let set = &sets[0];
    let all = props(json!({"$current_url": "https://x.test/welcome", "utm_source": "mail"}));
    let read = props(json!({"$current_url": "https://x.test/welcome"}));
    let text = Value::Object(all.clone()).to_string();
    set.enrich(&EventInput {
        properties_text: Some(&text),
        ..event_input("signup_completed", &read, None)
    });
    let example = set.unmatched().snapshot()[0].example.clone().unwrap();
    assert_eq!(example["properties"], Value::Object(all));
}

#[test]
fn index_agrees_with_full_evaluation() {
    let set = shipped();
    let extra = set_of(&[(
        "x.yaml",
        r#"
rules:
  - id: regex-event
    when: { event: { regex: "^survey " } }
    say: "Answered {{ event }}"
  - id: tag-any
    when: { properties: { vip: true } }
    intents: { purchase: 1 }
"#,
    )]);
    let events = [
        (
            "$pageview",
            json!({"$current_url": "https://a.io/pricing/"}),
            None,
        ),
        (
            "$autocapture",
            json!({"$event_type": "click"}),
            Some(UPGRADE_CHAIN),
        ),
        (
            "$autocapture",
            json!({"$event_type": "submit", "$pathname": "/checkout"}),
            Some("form"),
        ),
        ("$autocapture", json!({}), None),
        ("survey sent", json!({"vip": true}), None),
        ("survey", json!({}), None),
        (
            "$exception",
            json!({"$exception_list": [{"value": "boom"}]}),
            None,
        ),
        ("nothing", json!({"vip": true}), None),
    ];
    for set in [&set, &extra] {
        for (name, p, chain) in &events {
            let p = props(p.clone());
            let input = event_input(name, &p, *chain);
            assert_eq!(set.enrich(&input), set.explain(&input).enrichment, "{name}");
        }
    }
    let p = props(json!({"vip": true}));
    let e = enrich(&extra, "survey sent", &p, None);
    assert_eq!(e.description, "Answered survey sent");
    assert_eq!(intent_names(&e), ["purchase"]);
}

#[test]
fn errors_carry_file_line_and_column() {
    let d = err_of(&[(
        "bad.yaml",
        "rules:\n  - id: x\n    when:\n      event: a\n      colour: red\n    say: hi\n",
    )]);
    assert_eq!(
        (d[0].file.as_str(), d[0].line, d[0].column),
        ("bad.yaml", 5, 7)
    );
    assert!(
        d[0].message.contains("unknown field `colour`"),
        "{}",
        d[0].message
    );
    assert!(d[0].to_string().starts_with("bad.yaml:5:7: "));

    let d = err_of(&[(
        "re.yaml",
        "rules:\n  - id: ok\n    say: fine\n  - id: broken\n    when: { event: { regex: \"(\" } }\n    say: x\n",
    )]);
    // At the `regex:` key at fault, not at the rule's first line.
    assert_eq!((d[0].line, d[0].column), (5, 22));
    assert!(d[0].message.contains("rule `broken`") && d[0].message.contains("regex"));

    let d = err_of(&[(
        "i.yaml",
        "rules:\n  - id: r\n    say: x\n    intents: { nope: 1 }\n",
    )]);
    assert!(d[0].message.contains("intent `nope` is not declared"));

    let d = err_of(&[
        ("a.yaml", "rules:\n  - id: same\n    say: x\n"),
        ("b.yaml", "\n\nrules:\n  - id: same\n    say: y\n"),
    ]);
    assert_eq!((d[0].file.as_str(), d[0].line), ("b.yaml", 4));
    assert!(
        d[0].message.contains("already used at a.yaml:2:5"),
        "{}",
        d[0].message
    );

    let d = err_of(&[("t.yaml", "rules:\n  - id: t\n    say: \"{{ section }}\"\n")]);
    assert!(d[0].message.contains("section"));

    let d = err_of(&[("n.yaml", "rules:\n  - id: n\n    when: { event: x }\n")]);
    assert!(d[0].message.contains("needs `say`"));

    let d = err_of(&[("y.yaml", "rules: [\n")]);
    assert_eq!(d[0].file, "y.yaml");

    // Several files: every problem is reported.
    let d = err_of(&[("p.yaml", "rulez: []\n"), ("q.yaml", "rules: 3\n")]);
    assert_eq!(d.len(), 2);
}

#[test]
fn hostile_patterns_are_bounded() {
    let huge = format!(
        "rules:\n  - id: h\n    when: {{ event: {{ regex: \"{}\" }} }}\n    say: x\n",
        "a{1000}{1000}"
    );
    let d = err_of(&[("h.yaml", &huge)]);
    assert!(d[0].message.contains("regex"), "{}", d[0].message);
    // Classic catastrophic-backtracking pattern runs in linear time.
    let set = set_of(&[(
        "e.yaml",
        "rules:\n  - id: e\n    when: { properties: { q: { regex: \"^(a+)+$\" } } }\n    say: x\n",
    )]);
    let p = props(json!({"q": format!("{}!", "a".repeat(50_000))}));
    let start = std::time::Instant::now();
    assert!(!enrich(&set, "x", &p, None).matched);
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn version_is_a_content_hash() {
    let a = set_of(&[("a.yaml", "rules: []\n")]);
    let b = set_of(&[("a.yaml", "rules: []\n")]);
    let c = set_of(&[("a.yaml", "rules: []  # edited\n")]);
    assert_eq!(a.version(), b.version());
    assert_ne!(a.version(), c.version());
    assert_eq!(a.version().len(), 16);
}

#[test]
fn check_and_explain_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(cli::check(&shipped_dir()), std::process::ExitCode::SUCCESS);
    std::fs::write(dir.path().join("i.yaml"), BASE).unwrap();
    std::fs::write(
        dir.path().join("r.yaml"),
        "rules:\n  - id: r\n    when: { event: e }\n    say: Hello\n    examples:\n      - { event: e, say: Goodbye }\n",
    )
    .unwrap();
    assert_eq!(cli::check(dir.path()), std::process::ExitCode::FAILURE);
    let ev = dir.path().join("ev.json");
    std::fs::write(&ev, r#"{"event": "e", "properties": {}}"#).unwrap();
    assert_eq!(
        cli::explain(dir.path(), &ev),
        std::process::ExitCode::SUCCESS
    );
    std::fs::write(dir.path().join("r.yaml"), "rules: [").unwrap();
    assert_eq!(cli::check(dir.path()), std::process::ExitCode::FAILURE);
}

// --- hot reload -------------------------------------------------------------

fn rule_file(say: &str) -> String {
    format!("rules:\n  - id: r\n    when: {{ event: e }}\n    say: \"{say}\"\n")
}

fn describe(handle: &RulesHandle) -> String {
    let p = Map::new();
    enrich(&handle.current(), "e", &p, None).description
}

/// Writes like editors do: a temporary file renamed over the old one.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_file_name(".tmp-write");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn fast() -> WatchOptions {
    WatchOptions {
        debounce: Duration::from_millis(50),
        poll_interval: None,
        sighup: false,
    }
}

/// The rules of a directory, watched until [`Watched::stop`].
struct Watched {
    handle: RulesHandle,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Watched {
    fn start(dir: &Path, opts: WatchOptions) -> Self {
        let handle = RulesHandle::load_dir(dir).unwrap();
        let cancel = CancellationToken::new();
        let task = spawn_watcher_with(dir.into(), handle.clone(), cancel.clone(), opts).unwrap();
        Watched {
            handle,
            cancel,
            task,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}

/// Makes `change` and waits for the reload attempt it causes to fail.
async fn failed_reload(handle: &RulesHandle, change: impl FnOnce()) -> ReloadStatus {
    let mut status = handle.subscribe();
    let before = status.borrow_and_update().attempts;
    change();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.attempts > before && s.error.is_some()),
    )
    .await
    .expect("a reload attempt")
    .unwrap()
    .clone()
}

#[tokio::test]
async fn edits_are_picked_up_and_broken_edits_keep_the_old_rules() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, rule_file("Version one")).unwrap();
    let watched = Watched::start(dir.path(), fast());
    let handle = &watched.handle;
    assert_eq!(describe(handle), "Version one");

    // Unmatched counts survive reloads.
    enrich(&handle.current(), "other", &Map::new(), None);

    replace(&file, &rule_file("Version two"));
    until("the edited rule", || describe(handle) == "Version two").await;
    assert_eq!(handle.unmatched().snapshot()[0].count, 1);

    // In-place write (no rename) too.
    std::fs::write(&file, rule_file("Version three")).unwrap();
    until("the rewritten rule", || describe(handle) == "Version three").await;

    // A broken edit: the attempt fails, the old rules stay.
    let failed = failed_reload(handle, || {
        std::fs::write(&file, "rules:\n  - id: r\n    say: x\n    wen: {}\n").unwrap();
    })
    .await;
    assert!(failed.error.unwrap().contains("rules.yaml:4:5"));
    assert_eq!(describe(handle), "Version three");

    // Emptying the directory keeps the old rules too.
    let moved = dir.path().join("rules.yaml.off");
    failed_reload(handle, || std::fs::rename(&file, &moved).unwrap()).await;
    assert_eq!(describe(handle), "Version three");
    std::fs::rename(&moved, &file).unwrap();

    // A new file in the directory joins the set.
    std::fs::write(&file, rule_file("Version four")).unwrap();
    std::fs::write(
        dir.path().join("more.yml"),
        "rules:\n  - id: m\n    when: { event: m }\n    say: More\n",
    )
    .unwrap();
    until("the new file", || {
        enrich(&handle.current(), "m", &Map::new(), None).description == "More"
    })
    .await;
    assert_eq!(describe(handle), "Version four");
    watched.stop().await;
}

#[cfg(unix)]
#[tokio::test]
async fn configmap_symlink_swaps_are_picked_up() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(d.join("..v1/rules.yaml"), rule_file("Before")).unwrap();
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/rules.yaml", d.join("rules.yaml")).unwrap();
    let watched = Watched::start(d, fast());
    assert_eq!(describe(&watched.handle), "Before");

    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::write(d.join("..v2/rules.yaml"), rule_file("After")).unwrap();
    symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    until("the swapped ConfigMap", || {
        describe(&watched.handle) == "After"
    })
    .await;
    watched.stop().await;
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_forces_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rule_file("Same")).unwrap();
    let opts = WatchOptions {
        sighup: true,
        ..fast()
    };
    let watched = Watched::start(dir.path(), opts);
    let handle = &watched.handle;
    let before = handle.current();
    // The handler is installed when the watcher is created, so the signal cannot kill us.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    until("a forced reload", || {
        !std::sync::Arc::ptr_eq(&before, &handle.current())
    })
    .await;
    assert_eq!(handle.current().version(), before.version());
    watched.stop().await;
}

#[tokio::test]
async fn poll_catches_changes_without_notifications() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, rule_file("Old")).unwrap();
    // A huge debounce keeps notification-driven reloads out of the way: only the poll can win.
    let opts = WatchOptions {
        debounce: Duration::from_secs(3600),
        poll_interval: Some(Duration::from_millis(50)),
        sighup: false,
    };
    let watched = Watched::start(dir.path(), opts);
    std::fs::write(&file, rule_file("New")).unwrap();
    until("the polled change", || describe(&watched.handle) == "New").await;
    watched.stop().await;
}

/// Many rules sharing a subject are filed in dispatch maps (exact values and regex prefixes);
/// the result must equal evaluating every rule in order.
#[test]
fn dispatch_agrees_with_full_evaluation() {
    let mut y = String::from("rules:\n");
    for i in 0..12 {
        y += &format!(
            "  - id: path-{i}\n    when: {{ event: $pageview, path: [/p/{i}, /q/{i}] }}\n    say: \"Path {i}\"\n"
        );
        y += &format!(
            "  - id: text-{i}\n    priority: {}\n    when: {{ event: $autocapture, element: {{ text: \"Button {i}\" }} }}\n    say: \"Text {i}\"\n",
            i % 3
        );
        y += &format!(
            "  - id: attr-{i}\n    when: {{ event: $autocapture, element: {{ attributes: {{ data-attr: a-{i} }} }} }}\n    say: \"Attr {i}\"\n"
        );
        y += &format!(
            "  - id: prop-{i}\n    when: {{ event: custom, properties: {{ kind: k{i} }} }}\n    say: \"Kind {i}\"\n    intents: {{ purchase: 1 }}\n"
        );
        // Overlapping prefixes: `^/p/1` is a prefix of `^/p/10`.
        y += &format!(
            "  - id: area-{i}\n    when: {{ path: {{ regex: \"^/(p|q)/{i}\" }} }}\n    intents: {{ purchase: 1 }}\n"
        );
    }
    y += "  - id: catch-all\n    priority: -1\n    when: { event: { regex: \".\" } }\n    say: \"Something\"\n";
    let set = set_of(&[("gen.yaml", &y)]);
    let keyed = set
        .by_event
        .values()
        .map(|c| c.describing.keyed.len() + c.tagging.keyed.len())
        .sum::<usize>();
    assert!(keyed >= 4, "dispatch maps were built");

    let mut checked = 0;
    for i in 0..14 {
        let props_list = [
            json!({"$pathname": format!("/p/{i}")}),
            json!({"$current_url": format!("https://x.io/q/{i}/sub?x=1")}),
            json!({"$pathname": format!("/p/{i}0")}),
            json!({"kind": format!("k{i}"), "$pathname": "/q/1"}),
            json!({"kind": i}),
        ];
        let chains = [
            None,
            Some(format!(
                r#"button:text="Button {i}"attr__data-attr="a-{}";div"#,
                (i + 5) % 14
            )),
            Some(format!(r#"a:attr__data-attr="a-{i}";div"#)),
        ];
        for name in ["$pageview", "$autocapture", "custom", "other"] {
            for p in &props_list {
                for chain in &chains {
                    let p = props(p.clone());
                    let input = event_input(name, &p, chain.as_deref());
                    assert_eq!(
                        set.enrich(&input),
                        set.explain(&input).enrichment,
                        "{name} {p:?} {chain:?}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 500);
    // Spot checks: priority across dispatch maps, prefix overlap summing intents once per rule.
    let p = props(json!({"$pathname": "/p/10"}));
    let e = enrich(&set, "$pageview", &p, None);
    assert_eq!(e.description, "Path 10");
    assert_eq!(
        e.intents[0].weight, 2.0,
        "area-1 and area-10 both match /p/10"
    );
    let chain = r#"button:text="Button 2"attr__data-attr="a-1";div"#;
    assert_eq!(
        enrich(&set, "$autocapture", &Map::new(), Some(chain)).description,
        "Text 2"
    );
}

/// The complete rule file shown in rules/README.md compiles and passes its own example.
#[test]
fn readme_example_compiles() {
    let readme = std::fs::read_to_string(shipped_dir().join("README.md")).unwrap();
    let start = readme
        .find("```yaml\n# yaml-language-server")
        .expect("README example")
        + "```yaml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let intents = std::fs::read_to_string(shipped_dir().join("intents.yaml")).unwrap();
    let set = RuleSet::from_sources(&[
        ("intents.yaml", &intents),
        ("readme.yaml", &readme[start..end]),
    ])
    .unwrap_or_else(|e| panic!("README example invalid:\n{e}"));
    let report = cli::run_examples(&set);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.passed, 1);
}
