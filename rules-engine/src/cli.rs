//! `worker rules check [DIR]` and `worker rules explain <event.json>`: tooling for rule authors.
//! Output goes to stdout; the exit code says whether all is well.

use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;

use crate::engine::{Enrichment, EventInput, RuleSet, StepOutcome};
use crate::model::ExampleSpec;

/// Validates `dir` and runs every rule's `examples:`; non-zero exit on any error or failure.
pub fn check(dir: &Path) -> ExitCode {
    let set = match RuleSet::load_dir(dir) {
        Ok(s) => s,
        Err(e) => {
            let n = e.diagnostics().len().max(1);
            println!("{e}");
            println!(
                "rules check: {} is invalid ({n} error{})",
                dir.display(),
                plural(n)
            );
            return ExitCode::FAILURE;
        }
    };
    let report = run_examples(&set);
    for line in &report.failures {
        println!("{line}");
    }
    for id in &report.without_examples {
        println!("warning: rule `{id}` has no examples");
    }
    println!(
        "rules check: {} rules, {} intents in {} files (version {})",
        set.len(),
        set.intents().len(),
        set.files().len(),
        set.version()
    );
    println!(
        "examples: {} passed, {} failed",
        report.passed,
        report.failures.len()
    );
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Shows which rule describes the event in `event_json` and why the others did not.
pub fn explain(dir: &Path, event_json: &Path) -> ExitCode {
    let set = match RuleSet::load_dir(dir) {
        Ok(s) => s,
        Err(e) => {
            println!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let text = match std::fs::read_to_string(event_json) {
        Ok(t) => t,
        Err(e) => {
            println!("cannot read {}: {e}", event_json.display());
            return ExitCode::FAILURE;
        }
    };
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            println!("{}: invalid JSON: {e}", event_json.display());
            return ExitCode::FAILURE;
        }
    };
    let events = match value {
        Value::Array(a) => a,
        Value::Object(ref m) if m.get("batch").is_some_and(Value::is_array) => {
            m["batch"].as_array().cloned().unwrap_or_default()
        }
        v => vec![v],
    };
    println!("rules version {} ({} rules)", set.version(), set.len());
    for (i, ev) in events.iter().enumerate() {
        let Some(obj) = ev.as_object() else {
            println!("event #{i}: not a JSON object");
            return ExitCode::FAILURE;
        };
        let Some(input) = EventInput::from_json(obj) else {
            println!("event #{i}: missing string field `event`");
            return ExitCode::FAILURE;
        };
        print_explanation(&set, &input);
    }
    ExitCode::SUCCESS
}

fn print_explanation(set: &RuleSet, input: &EventInput<'_>) {
    let name = input.event;
    let ex = set.explain(input);
    println!();
    println!("event: {name}");
    print_enrichment(&ex.enrichment);
    let mut other_event = 0;
    println!("rules, in priority order:");
    for step in &ex.steps {
        let (mark, why) = match &step.outcome {
            StepOutcome::Described => ("✓", "describes the event".to_owned()),
            StepOutcome::AddedIntents => ("+", "matched; adds its intents".to_owned()),
            StepOutcome::Shadowed => (
                "=",
                "matched, but a rule before it already described the event".to_owned(),
            ),
            StepOutcome::NoMatch(r) if r.starts_with("event ") => {
                other_event += 1;
                continue;
            }
            StepOutcome::NoMatch(r) => ("✗", r.clone()),
        };
        println!(
            "  {mark} {} (priority {}, {}): {why}",
            step.rule_id, step.priority, step.location
        );
    }
    if other_event > 0 {
        println!("  ({other_event} rules for other event names not shown)");
    }
}

fn print_enrichment(e: &Enrichment) {
    println!("description: {}", e.description);
    match &e.rule_id {
        Some(id) => println!("rule: {id}"),
        None => println!("rule: none matched (fallback sentence)"),
    }
    for i in &e.intents {
        println!(
            "intent: {} +{} ({}; half-life {}s)",
            i.name, i.weight, i.summary, i.half_life_secs
        );
    }
}

/// The outcome of running all examples.
pub(crate) struct ExampleReport {
    pub passed: usize,
    pub failures: Vec<String>,
    pub without_examples: Vec<String>,
}

pub(crate) fn run_examples(set: &RuleSet) -> ExampleReport {
    let mut report = ExampleReport {
        passed: 0,
        failures: Vec::new(),
        without_examples: Vec::new(),
    };
    for rule in &set.rules {
        if rule.examples.is_empty() {
            report.without_examples.push(rule.id.to_string());
        }
        for (n, ex) in rule.examples.iter().enumerate() {
            let got = enrich_example(set, ex);
            let mut problems = Vec::new();
            if let Some(say) = &ex.say
                && *say != got.description
            {
                problems.push(format!("expected say {say:?}, got {:?}", got.description));
            }
            let want_rule = ex.rule.as_deref().or(rule.say.as_ref().map(|_| &*rule.id));
            if let Some(want) = want_rule
                && got.rule_id.as_deref() != Some(want)
            {
                problems.push(format!(
                    "expected rule `{want}`, got {}",
                    got.rule_id
                        .as_deref()
                        .map_or("the fallback".to_owned(), |r| format!("`{r}`"))
                ));
            }
            let mut got_intents: Vec<&str> = got.intents.iter().map(|i| &*i.name).collect();
            got_intents.sort_unstable();
            match &ex.intents {
                Some(want) => {
                    let mut want: Vec<&str> = want.iter().map(String::as_str).collect();
                    want.sort_unstable();
                    if want != got_intents {
                        problems.push(format!("expected intents {want:?}, got {got_intents:?}"));
                    }
                }
                None if rule.say.is_none() => {
                    for &(i, _) in &*rule.intents {
                        let name = set.intents[i as usize].name.as_str();
                        if !got_intents.contains(&name) {
                            problems.push(format!("expected intent `{name}`, got {got_intents:?}"));
                        }
                    }
                }
                None => {}
            }
            if problems.is_empty() {
                report.passed += 1;
            } else {
                report.failures.push(format!(
                    "{}: rule `{}` example #{}: {}",
                    rule.location(),
                    rule.id,
                    n + 1,
                    problems.join("; ")
                ));
            }
        }
    }
    report
}

pub(crate) fn enrich_example(set: &RuleSet, ex: &ExampleSpec) -> Enrichment {
    let input = EventInput {
        event: &ex.event,
        distinct_id: ex.distinct_id.as_deref().unwrap_or("example-user"),
        properties: &ex.properties,
        properties_text: None,
        elements_chain: ex.elements_chain.as_deref(),
        person_properties: ex.person_properties.as_ref(),
    };
    set.enrich_inner(&input, false)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
