//! Rule authoring: tiers, `ignore`, text tests, filters, and the messages `rules check` gives.

use serde_json::{Map, Value, json};

use super::*;

fn set(files: &[(&str, &str)]) -> RuleSet {
    RuleSet::from_sources(files).unwrap_or_else(|e| panic!("invalid rules:\n{e}"))
}

fn errors(files: &[(&str, &str)]) -> Vec<Diagnostic> {
    match RuleSet::from_sources(files) {
        Ok(_) => panic!("expected the rules to be refused"),
        Err(e) => e.diagnostics().to_vec(),
    }
}

fn one_error(text: &str) -> Diagnostic {
    let mut d = errors(&[("a.yaml", text)]);
    assert_eq!(d.len(), 1, "{d:#?}");
    d.remove(0)
}

fn run(set: &RuleSet, event: &str, p: Value, chain: Option<&str>) -> Enrichment {
    let p: Map<String, Value> = p.as_object().cloned().unwrap();
    set.enrich(&EventInput {
        event,
        distinct_id: "u1",
        properties: &p,
        properties_text: None,
        elements_chain: chain,
        person_properties: None,
    })
}

const GENERIC: &str = r#"
tier: generic
rules:
  - id: any-click
    priority: 100
    when: { event: $autocapture }
    say: "Clicked element: '{{ element.text }}'"
"#;

#[test]
fn specific_files_win_over_generic_ones_whatever_the_priority() {
    let s = set(&[
        ("a-generic.yaml", GENERIC),
        (
            "z-mine.yaml",
            r#"
rules:
  - id: export
    priority: -5
    when: { event: $autocapture, element: { text: { istarts_with: export } } }
    say: "Exported"
"#,
        ),
    ]);
    let chain = r#"button:text="Export CSV"nth-child="1""#;
    let e = run(&s, "$autocapture", json!({}), Some(chain));
    assert_eq!(
        (e.description.as_str(), e.rule_id.as_deref()),
        ("Exported", Some("export"))
    );
    let other = r#"button:text="Save"nth-child="1""#;
    assert_eq!(
        run(&s, "$autocapture", json!({}), Some(other))
            .rule_id
            .as_deref(),
        Some("any-click")
    );
    // An unknown tier is refused, naming the valid ones.
    let d = one_error("tier: low\nrules: []\n");
    assert!(
        d.message.contains("specific") && d.message.contains("generic"),
        "{d}"
    );
}

#[test]
fn an_example_that_loses_names_the_winner_and_what_to_change() {
    let mine = r#"
rules:
  - id: broad
    when: { event: $autocapture }
    say: "Clicked"
  - id: export
    when: { event: $autocapture, element: { text: { contains: Export } } }
    say: "Exported"
    examples:
      - event: $autocapture
        elements_chain: 'button:text="Export"nth-child="1"'
        say: "Exported"
"#;
    let report = cli::run_examples(&set(&[("mine.yaml", mine)]));
    let failure = &report.failures[0];
    for part in [
        "mine.yaml:6:5: rule `export` example #1",
        "expected rule `export`, got `broad`",
        "`broad` (mine.yaml:3:5, specific tier, priority 0) matched first",
        "give `export` `priority: 1` or more",
    ] {
        assert!(failure.contains(part), "{part:?} in {failure}");
    }
    // A rule in a generic file losing to a specific one is told to move (an example that names
    // its rule is checked even in a generic file; one that does not is listed as overridden).
    let generic_loser = r#"
tier: generic
rules:
  - id: export
    priority: 50
    when: { event: $autocapture }
    say: "Exported"
    examples:
      - event: $autocapture
        say: "Exported"
        rule: export
"#;
    let mine = "rules:\n  - id: broad\n    when: { event: $autocapture }\n    say: Clicked\n";
    let report = cli::run_examples(&set(&[("g.yaml", generic_loser), ("mine.yaml", mine)]));
    assert!(
        report.failures[0]
            .contains("`export` is in a generic file, tried after every specific rule"),
        "{:?}",
        report.failures
    );
    // A rule whose conditions fail says which one.
    let report = cli::run_examples(&set(&[(
        "a.yaml",
        "rules:\n  - id: x\n    when: { event: a, properties: { n: { gt: 5 } } }\n    say: X\n    examples:\n      - { event: a, properties: { n: 1 } }\n",
    )]));
    assert!(
        report.failures[0].contains("`x` does not match it (properties.n > 5 — event has \"1\")"),
        "{:?}",
        report.failures
    );
}

const IGNORE: &str = r#"
intents:
  - { name: noise, summary: "Noisy." }
rules:
  - id: flags-off
    when:
      event: $feature_flag_called
      properties: { $feature_flag_response: false }
    ignore: true
    examples:
      - event: $feature_flag_called
        properties: { $feature_flag_response: false }
        ignored: true
  - id: flags
    when: { event: $feature_flag_called }
    say: "Flag {{ properties.$feature_flag_response }}"
  - id: flag-intent
    when: { event: $feature_flag_called }
    intents: { noise: 1 }
"#;

#[test]
fn ignored_events_have_no_sentence_no_intents_and_are_not_unmatched() {
    let s = set(&[("a.yaml", IGNORE)]);
    let e = run(
        &s,
        "$feature_flag_called",
        json!({"$feature_flag_response": false}),
        None,
    );
    assert!(e.ignored && e.matched, "{e:?}");
    assert_eq!(e.description, "");
    assert_eq!(e.rule_id.as_deref(), Some("flags-off"));
    assert!(
        e.intents.is_empty(),
        "intent rules add nothing to an ignored event"
    );
    let on = run(
        &s,
        "$feature_flag_called",
        json!({"$feature_flag_response": true}),
        None,
    );
    assert!(!on.ignored);
    assert_eq!(on.description, "Flag true");
    assert_eq!(on.intents.len(), 1);
    assert!(s.unmatched().snapshot().is_empty());
    assert!(cli::run_examples(&s).failures.is_empty());
    // explain says so.
    let p: Map<String, Value> = json!({"$feature_flag_response": false})
        .as_object()
        .cloned()
        .unwrap();
    let ex = s.explain(
        &EventInput::from_json(
            json!({"event": "$feature_flag_called", "properties": p})
                .as_object()
                .unwrap(),
        )
        .unwrap(),
    );
    assert_eq!(ex.steps[0].outcome, StepOutcome::Ignored);
    assert_eq!(ex.steps[1].outcome, StepOutcome::Shadowed);
}

#[test]
fn ignore_and_say_rules_are_checked() {
    let d = one_error("rules:\n  - id: x\n    when: { event: a }\n    say: X\n    ignore: true\n");
    assert_eq!((d.line, d.column), (5, 5), "{d}");
    assert!(
        d.message.contains("takes neither `say` nor `intents`"),
        "{d}"
    );
    let d = one_error("rules:\n  - id: x\n    when: { event: a }\n    say: \"\"\n");
    assert_eq!((d.line, d.column), (4, 5), "{d}");
    assert!(d.message.contains("write `ignore: true`"), "{d}");
}

#[test]
fn examples_assert_ignored_and_fallback() {
    let s = set(&[(
        "a.yaml",
        r#"
rules:
  - id: x
    when: { event: a }
    say: "A"
    examples:
      - { event: a, fallback: true }
      - { event: b, fallback: true }
      - { event: a, ignored: true }
      - { event: a, rule: nonee }
      - { event: a, rule: none }
      - { event: a, rule: xx }
"#,
    )]);
    let f = cli::run_examples(&s).failures;
    assert_eq!(f.len(), 5, "{f:#?}");
    assert!(
        f[0].contains("#1: expected the fallback sentence, got \"A\" from rule `x`"),
        "{}",
        f[0]
    );
    assert!(
        f[1].contains("#3: expected the event ignored, got \"A\" from rule `x`"),
        "{}",
        f[1]
    );
    assert!(
        f[2].contains("`rule: nonee` names no rule of this set"),
        "{}",
        f[2]
    );
    assert!(f[3].contains("write `fallback: true`"), "{}", f[3]);
    assert!(
        f[4].contains("`rule: xx` names no rule of this set (did you mean `x`?)"),
        "{}",
        f[4]
    );
}

#[test]
fn case_insensitive_text_tests() {
    let s = set(&[(
        "a.yaml",
        r#"
rules:
  - { id: eq, when: { event: e, properties: { v: { iequals: "Hello World" } } }, say: eq }
  - { id: has, when: { event: e, properties: { v: { icontains: ÉTÉ } } }, say: has }
  - { id: starts, when: { event: e, properties: { v: { istarts_with: abc } } }, say: starts }
  - { id: ends, when: { event: e, properties: { v: { iends_with: XYZ } } }, say: ends }
"#,
    )]);
    for (value, rule) in [
        ("hello WORLD", Some("eq")),
        ("un été chaud", Some("has")),
        ("ABCdef", Some("starts")),
        ("...xyz", Some("ends")),
        ("hello", None),
    ] {
        assert_eq!(
            run(&s, "e", json!({ "v": value }), None).rule_id.as_deref(),
            rule,
            "{value}"
        );
    }
}

#[test]
fn numeric_comparisons_take_numeric_strings_and_refuse_others() {
    let s = set(&[(
        "a.yaml",
        "rules:\n  - { id: x, when: { event: e, properties: { n: { gte: \"1\", lt: 10 } } }, say: x }\n",
    )]);
    assert!(run(&s, "e", json!({"n": 1}), None).matched);
    assert!(!run(&s, "e", json!({"n": 10}), None).matched);
    let d = one_error(
        "rules:\n  - id: x\n    when: { event: e, properties: { n: { gte: \"one\" } } }\n    say: x\n",
    );
    assert!(d.message.contains("\"one\" is not a number"), "{d}");
}

#[test]
fn element_text_is_trimmed_and_collapsed() {
    let s = set(&[(
        "a.yaml",
        r#"
rules:
  - id: export
    when: { event: $autocapture, element: { text: { starts_with: Export } } }
    say: "'{{ element.text }}'"
  - id: exact
    when: { event: $autocapture, element: { text: "Save changes" } }
    say: "saved"
"#,
    )]);
    let e = run(
        &s,
        "$autocapture",
        json!({}),
        Some(r#"button:text=" Export  "nth-child="1""#),
    );
    assert_eq!(e.description, "'Export'");
    let e = run(
        &s,
        "$autocapture",
        json!({"$el_text": "  Save\n\t changes "}),
        None,
    );
    assert_eq!(e.rule_id.as_deref(), Some("exact"));
    let blank = run(&s, "$autocapture", json!({"$el_text": "   "}), None);
    assert!(!blank.matched);
}

#[test]
fn closest_holds_for_the_element_itself_or_an_ancestor_inside_only_for_ancestors() {
    let s = set(&[(
        "a.yaml",
        r#"
rules:
  - { id: closest, when: { event: $rageclick, closest: { tag: nav } }, say: closest }
  - { id: inside, when: { event: $autocapture, inside: { tag: nav } }, say: inside }
"#,
    )]);
    let on_nav = r#"nav.sidebar:nth-child="1";body:nth-child="1""#;
    let in_nav = r#"span:text="Billing"nth-child="1";a:nth-child="1";nav:nth-child="1""#;
    let elsewhere = r#"button:nth-child="1";main:nth-child="1""#;
    assert!(run(&s, "$rageclick", json!({}), Some(on_nav)).matched);
    assert!(run(&s, "$rageclick", json!({}), Some(in_nav)).matched);
    assert!(!run(&s, "$rageclick", json!({}), Some(elsewhere)).matched);
    assert!(!run(&s, "$autocapture", json!({}), Some(on_nav)).matched);
    assert!(run(&s, "$autocapture", json!({}), Some(in_nav)).matched);
}

#[test]
fn filters_chain_and_refuse_unknown_names() {
    let s = |say: &str| {
        let text = format!("rules:\n  - id: x\n    when: {{ event: e }}\n    say: {say:?}\n");
        let set = set(&[("a.yaml", &text)]);
        run(
            &set,
            "e",
            json!({"slug": "monthly-revenue_report", "name": "  ada LOVELACE ", "empty": ""}),
            None,
        )
        .description
    };
    for (template, want) in [
        ("{{ properties.slug | humanize }}", "monthly revenue report"),
        (
            "{{ properties.slug | humanize | title }}",
            "Monthly Revenue Report",
        ),
        ("{{ properties.name | title }}", "Ada LOVELACE"),
        ("{{ properties.name | lower }}", "ada lovelace"),
        ("{{ properties.name | upper }}", "ADA LOVELACE"),
        ("{{ properties.slug | truncate: 7 }}", "monthly…"),
        (
            "{{ properties.slug | truncate(100) }}",
            "monthly-revenue_report",
        ),
        ("{{ properties.name | trim }}", "ada LOVELACE"),
        (
            "{{ properties.missing | default: \"a report\" | upper }}",
            "A REPORT",
        ),
        (
            "{{ properties.empty | humanize | default: 'none' }}",
            "none",
        ),
        ("{{ properties.missing | lower }}", MISSING),
        ("{{ properties.missing | default: \" | \" }}", " | "),
    ] {
        assert_eq!(s(template), want, "{template}");
    }
    let d =
        one_error("rules:\n  - id: x\n    when: { event: e }\n    say: \"{{ path | shout }}\"\n");
    assert_eq!((d.line, d.column), (4, 5), "{d}");
    assert!(d.message.contains("unknown filter `shout`; filters are default: \"text\", lower, upper, title, trim, humanize, truncate: N"), "{d}");
}

#[test]
fn problems_found_after_parsing_point_at_their_key() {
    let d = one_error(
        "rules:\n  - id: x\n    when:\n      event: e\n      element:\n        text: { regex: \"(\" }\n    say: X\n",
    );
    assert_eq!((d.line, d.column), (6, 17), "{d}");
    assert!(
        d.message
            .starts_with("rule `x`: when.element.text: invalid regex"),
        "{d}"
    );
    let d = one_error("rules:\n  - id: x\n    when:\n      event: e\n      any: []\n    say: X\n");
    assert_eq!((d.line, d.column), (5, 7), "{d}");
    assert!(
        d.message
            .contains("when.any: an empty list would always hold"),
        "{d}"
    );
    let d = one_error(
        "rules:\n  - id: x\n    when:\n      any:\n        - event: a\n        - properties: { \"\": 1 }\n    say: X\n",
    );
    assert_eq!((d.line, d.column), (6, 11), "{d}");
    let d = one_error("rules:\n  - id: x\n    when: { event: e }\n    intents:\n      nope: 1\n");
    assert_eq!((d.line, d.column), (5, 7), "{d}");
    assert!(d.message.contains("intent `nope` is not declared"), "{d}");
}

#[test]
fn yaml_mistakes_get_hints() {
    let d = one_error("rules:\n  - id: x\n\twhen: { event: e }\n");
    assert!(
        d.message.contains("spaces only; this line has a tab"),
        "{d}"
    );
    let d = one_error("rules:\n  - id: x\n    when: { event: e }\n    say: {{ path }}\n");
    assert!(d.message.contains("must be quoted"), "{d}");
}

#[test]
fn the_checked_in_schema_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/schema.json");
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == schema::rule_file_schema(),
        "rules/schema.json is stale: run `cargo run -p worker -- rules schema > rules/schema.json`"
    );
    let schema: Value = serde_json::from_str(&stored).unwrap();
    let rule = &schema["definitions"]["RuleSpec"]["properties"];
    for key in ["ignore", "say", "when", "examples", "priority"] {
        assert!(rule.get(key).is_some(), "{key} in {rule}");
    }
    assert!(
        schema["properties"]["tier"]
            .to_string()
            .contains("#/definitions/Tier")
    );
    // Every shipped file points editors at it.
    for entry in std::fs::read_dir(path.parent().unwrap()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                text.starts_with("# yaml-language-server: $schema=./schema.json\n"),
                "{}",
                p.display()
            );
        }
    }
}
