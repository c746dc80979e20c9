//! `worker rules check [DIR]` and `worker rules explain <event.json>`: tooling for rule authors.
//! Output goes to stdout; the exit code says whether all is well.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;

use crate::engine::{Enrichment, EventInput, Rule, RuleSet, StepOutcome};
use crate::model::{ExampleSpec, Tier};

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
    for line in &report.overridden {
        println!("note: {line}");
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

/// Shows which rule describes each event of `source` (a file, or `-` for stdin) and why the
/// others did not.
pub fn explain(dir: &Path, source: &Path) -> ExitCode {
    let set = match RuleSet::load_dir(dir) {
        Ok(s) => s,
        Err(e) => {
            println!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (name, text) = if source == Path::new("-") {
        let mut text = String::new();
        match std::io::stdin().read_to_string(&mut text) {
            Ok(_) => ("stdin".to_owned(), text),
            Err(e) => {
                println!("cannot read stdin: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        match std::fs::read_to_string(source) {
            Ok(t) => (source.display().to_string(), t),
            Err(e) => {
                println!("cannot read {}: {e}", source.display());
                return ExitCode::FAILURE;
            }
        }
    };
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            println!("{name}: invalid JSON: {e}");
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
    println!(
        "rules version {} ({} rules in {})",
        set.version(),
        set.len(),
        dir.display()
    );
    for (i, ev) in events.iter().enumerate() {
        let Some(obj) = ev.as_object() else {
            println!("{name}: event #{i} is not a JSON object");
            return ExitCode::FAILURE;
        };
        let Some(input) = EventInput::from_json(obj) else {
            println!("{name}: event #{i} has no string field `event`");
            return ExitCode::FAILURE;
        };
        print_explanation(&set, &input);
    }
    ExitCode::SUCCESS
}

fn print_explanation(set: &RuleSet, input: &EventInput<'_>) {
    println!();
    for line in explanation_lines(set, input, &|s| s.to_owned()) {
        println!("{line}");
    }
}

/// What `rules explain` says about one event, line by line: its description, the rule that
/// matched, its intents, then every rule for its event name and why it did or did not match.
/// `show` renders text taken from the event (descriptions, what a condition found): the CLI
/// prints it as is, the api quotes it.
pub fn explanation_lines(
    set: &RuleSet,
    input: &EventInput<'_>,
    show: &dyn Fn(&str) -> String,
) -> Vec<String> {
    let ex = set.explain(input);
    let mut lines = vec![format!("event: {}", show(input.event))];
    enrichment_lines(&ex.enrichment, show, &mut lines);
    let mut other_event = 0;
    lines.push("rules, in order (tier, priority, file, position):".to_owned());
    for step in &ex.steps {
        let (mark, why) = match &step.outcome {
            StepOutcome::Described => ("✓", "describes the event".to_owned()),
            StepOutcome::Ignored => (
                "⌀",
                "ignores the event (stored, left out of the context)".to_owned(),
            ),
            StepOutcome::AddedIntents => ("+", "matched; adds its intents".to_owned()),
            StepOutcome::Shadowed => (
                "=",
                "matched, but a rule before it already described the event".to_owned(),
            ),
            StepOutcome::NoMatch(r) if r.starts_with("event ") => {
                other_event += 1;
                continue;
            }
            StepOutcome::NoMatch(r) => ("✗", show(r)),
        };
        lines.push(format!(
            "  {mark} {} ({} tier, priority {}, {}): {why}",
            step.rule_id, step.tier, step.priority, step.location
        ));
    }
    if other_event > 0 {
        lines.push(format!(
            "  ({other_event} rules for other event names not shown)"
        ));
    }
    lines
}

fn enrichment_lines(e: &Enrichment, show: &dyn Fn(&str) -> String, lines: &mut Vec<String>) {
    if e.ignored {
        lines.push("description: none (ignored: stored, left out of the context)".to_owned());
    } else {
        lines.push(format!("description: {}", show(&e.description)));
    }
    match &e.rule_id {
        Some(id) => lines.push(format!("rule: {id}")),
        None => lines.push("rule: none matched (fallback sentence)".to_owned()),
    }
    for i in &e.intents {
        lines.push(format!(
            "intent: {} +{} ({}; half-life {}s)",
            i.name, i.weight, i.summary, i.half_life_secs
        ));
    }
}

/// The outcome of running all examples.
pub(crate) struct ExampleReport {
    pub passed: usize,
    pub failures: Vec<String>,
    /// Examples of generic rules that a specific rule now describes: not checked, listed.
    pub overridden: Vec<String>,
    pub without_examples: Vec<String>,
}

pub(crate) fn run_examples(set: &RuleSet) -> ExampleReport {
    let mut report = ExampleReport {
        passed: 0,
        failures: Vec::new(),
        overridden: Vec::new(),
        without_examples: Vec::new(),
    };
    for rule in &set.rules {
        if rule.examples.is_empty() {
            report.without_examples.push(rule.id.to_string());
        }
        for (n, ex) in rule.examples.iter().enumerate() {
            if let Some(by) = overriding_rule(set, rule, ex) {
                report.overridden.push(format!(
                    "{}: rule `{}` example #{} is described by `{}` ({}), a specific rule: not checked",
                    rule.location(),
                    rule.id,
                    n + 1,
                    by.id,
                    by.location()
                ));
                continue;
            }
            let problems = example_problems(set, rule, ex);
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

/// The specific rule that describes (or ignores) an example of generic `rule`, when one does: the
/// example documents the generic rule, and overriding it is what specific files are for.
/// An example that names its expected `rule:` is always checked.
fn overriding_rule<'s>(set: &'s RuleSet, rule: &Rule, ex: &ExampleSpec) -> Option<&'s Rule> {
    if rule.tier != Tier::Generic || ex.rule.is_some() {
        return None;
    }
    let got = set.enrich_inner(&example_input(ex), false);
    let id = got.rule_id?;
    set.rules
        .iter()
        .find(|r| r.id == id)
        .filter(|r| r.tier == Tier::Specific)
}

/// What is wrong with one example of `rule`; empty when it passes.
fn example_problems(set: &RuleSet, rule: &Rule, ex: &ExampleSpec) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(named) = &ex.rule
        && !set.rules.iter().any(|r| *r.id == **named)
    {
        let hint = if named == "none" {
            " (to expect the fallback sentence, write `fallback: true`)".to_owned()
        } else {
            closest_id(set, named)
                .map(|id| format!(" (did you mean `{id}`?)"))
                .unwrap_or_default()
        };
        problems.push(format!("`rule: {named}` names no rule of this set{hint}"));
        return problems;
    }
    let input = example_input(ex);
    let got = set.enrich_inner(&input, false);
    let fallback = ex.fallback == Some(true);
    if let Some(say) = &ex.say {
        if got.ignored {
            problems.push(format!(
                "expected say {say:?}, but rule `{}` ignores the event",
                got.rule_id.as_deref().unwrap_or("?")
            ));
        } else if *say != got.description {
            problems.push(format!("expected say {say:?}, got {:?}", got.description));
        }
    }
    if let Some(want) = ex.ignored
        && want != got.ignored
    {
        problems.push(if want {
            format!("expected the event ignored, got {}", outcome(&got))
        } else {
            format!(
                "expected the event not ignored, but rule `{}` ignores it",
                got.rule_id.as_deref().unwrap_or("?")
            )
        });
    }
    if let Some(want) = ex.fallback
        && want == got.matched
    {
        problems.push(if want {
            format!("expected the fallback sentence, got {}", outcome(&got))
        } else {
            "expected a rule to describe the event, got the fallback sentence".to_owned()
        });
    }
    let want_rule = ex
        .rule
        .as_deref()
        .or((rule.describes() && !fallback).then_some(&*rule.id));
    if let Some(want) = want_rule
        && got.rule_id.as_deref() != Some(want)
    {
        problems.push(format!(
            "expected rule `{want}`, got {}{}",
            got.rule_id
                .as_deref()
                .map_or("the fallback".to_owned(), |r| format!("`{r}`")),
            why_not(set, want, &input)
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
        None if !rule.describes() => {
            for &(i, _) in &*rule.intents {
                let name = set.intents[i as usize].name.as_str();
                if !got_intents.contains(&name) {
                    problems.push(format!("expected intent `{name}`, got {got_intents:?}"));
                }
            }
        }
        None => {}
    }
    problems
}

fn outcome(got: &Enrichment) -> String {
    match (&got.rule_id, got.ignored) {
        (Some(id), true) => format!("rule `{id}` ignoring it"),
        (Some(id), false) => format!("{:?} from rule `{id}`", got.description),
        (None, _) => format!("the fallback {:?}", got.description),
    }
}

/// Why rule `want` did not describe the event: the condition that failed, or the rule that came
/// first (where, at what tier and priority) and what to change.
fn why_not(set: &RuleSet, want: &str, input: &EventInput<'_>) -> String {
    let ex = set.explain(input);
    let Some(step) = ex.steps.iter().find(|s| s.rule_id == want) else {
        return String::new();
    };
    match &step.outcome {
        StepOutcome::NoMatch(reason) => format!(": `{want}` does not match it ({reason})"),
        StepOutcome::AddedIntents => {
            format!(": `{want}` has neither `say` nor `ignore`, so it only adds intents")
        }
        StepOutcome::Shadowed => {
            let winner = ex
                .steps
                .iter()
                .find(|s| matches!(s.outcome, StepOutcome::Described | StepOutcome::Ignored));
            let Some(w) = winner else {
                return String::new();
            };
            let change = if w.tier != step.tier {
                format!(
                    "`{want}` is in a {} file, tried after every {} rule: move it to a file without `tier: {}`",
                    step.tier, w.tier, step.tier
                )
            } else {
                format!(
                    "give `{want}` `priority: {}` or more, or narrow `{}`'s conditions",
                    w.priority.saturating_add(1),
                    w.rule_id
                )
            };
            format!(
                ": `{}` ({}, {} tier, priority {}) matched first; {change}",
                w.rule_id, w.location, w.tier, w.priority
            )
        }
        StepOutcome::Described | StepOutcome::Ignored => String::new(),
    }
}

/// The rule id most like `named` (a typo's likely target), if one is close.
fn closest_id<'s>(set: &'s RuleSet, named: &str) -> Option<&'s str> {
    set.rules
        .iter()
        .map(|r| (edit_distance(&r.id, named), &*r.id))
        .filter(|(d, id)| *d <= 2.max(id.len() / 4))
        .min()
        .map(|(_, id)| id)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn example_input(ex: &ExampleSpec) -> EventInput<'_> {
    EventInput {
        event: &ex.event,
        distinct_id: ex.distinct_id.as_deref().unwrap_or("example-user"),
        properties: &ex.properties,
        properties_text: None,
        elements_chain: ex.elements_chain.as_deref(),
        person_properties: ex.person_properties.as_ref(),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
