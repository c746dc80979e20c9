//! Loading and compiling rule files into a [`RuleSet`].

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use regex::RegexSetBuilder;
use sha2::{Digest, Sha256};

use crate::condition::{
    Condition, ElementCondition, ElementField, Matcher, PROP_SLOTS, PropPath, PropSlots,
    PropertyKeys, REGEX_SIZE_LIMIT, Subject, for_each_subject_mut,
};
use crate::engine::{
    CandidateList, Candidates, Dispatch, EventKey, IntentDef, MAX_DISPATCH, MAX_PREFIX_LENGTHS,
    Rule, RuleSet, RuleSplit, UnmatchedCounter, first4,
};
use crate::locate::KeyPositions;
use crate::model::{ElementSpec, MatcherSpec, RuleFile, Tier, WhenSpec};
use crate::template::{CaptureSource, Template};
use crate::{Diagnostic, RulesError};

/// Largest rule file accepted.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Most rule files in a directory.
pub const MAX_FILES: usize = 256;
/// Most rules in a set.
pub const MAX_RULES: usize = 10_000;
/// Deepest nesting of `any` / `not`.
pub const MAX_DEPTH: usize = 8;
/// Default intent half-life: 7 days.
pub const DEFAULT_HALF_LIFE_SECS: f64 = 7.0 * 86_400.0;

impl RuleSet {
    /// Loads and compiles every `*.yaml` / `*.yml` file of `dir` (hidden files skipped).
    pub fn load_dir(dir: &Path) -> Result<RuleSet, RulesError> {
        let sources = read_dir_sources(dir)?;
        let mut set = compile(&sources)?;
        set.files = sources.iter().map(|s| s.path.clone()).collect();
        Ok(set)
    }

    /// Compiles rule files given as (name, content) pairs, in name order.
    pub fn from_sources(files: &[(&str, &str)]) -> Result<RuleSet, RulesError> {
        let mut sources: Vec<Source> = files
            .iter()
            .map(|(n, c)| Source {
                name: (*n).into(),
                path: PathBuf::from(n),
                text: (*c).to_owned(),
            })
            .collect();
        sources.sort_by(|a, b| a.name.cmp(&b.name));
        compile(&sources)
    }
}

/// One rule file's text.
pub(crate) struct Source {
    /// As shown in messages (the path given, e.g. `rules/web.yaml`).
    pub name: Arc<str>,
    pub path: PathBuf,
    pub text: String,
}

/// The version a directory would load as, without compiling it.
pub fn dir_version(dir: &Path) -> Result<String, RulesError> {
    Ok(version_of(&read_dir_sources(dir)?))
}

pub(crate) fn read_dir_sources(dir: &Path) -> Result<Vec<Source>, RulesError> {
    let io = |path: &Path, e: std::io::Error| RulesError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let path = entry.path();
        // Follows symlinks (Kubernetes ConfigMaps link `x.yaml` → `..data/x.yaml`).
        if std::fs::metadata(&path)
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        // Also guards reloads against a half-emptied directory.
        return Err(RulesError::Invalid(vec![Diagnostic::new(
            &dir.display().to_string(),
            1,
            1,
            "no rule files (*.yaml, *.yml) in this directory",
        )]));
    }
    if paths.len() > MAX_FILES {
        return Err(RulesError::TooLarge(format!(
            "{} has {} rule files; at most {MAX_FILES}",
            dir.display(),
            paths.len()
        )));
    }
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        let name: Arc<str> = path.display().to_string().into();
        if bytes.len() > MAX_FILE_BYTES {
            return Err(RulesError::TooLarge(format!(
                "{name} is {} bytes; at most {MAX_FILE_BYTES}",
                bytes.len()
            )));
        }
        let text = String::from_utf8(bytes).map_err(|_| {
            RulesError::Invalid(vec![Diagnostic::new(&name, 1, 1, "file is not UTF-8")])
        })?;
        out.push(Source { name, path, text });
    }
    Ok(out)
}

fn version_of(sources: &[Source]) -> String {
    let mut h = Sha256::new();
    for s in sources {
        let file = s
            .path
            .file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default();
        h.update(file.as_bytes());
        h.update([0]);
        h.update((s.text.len() as u64).to_le_bytes());
        h.update(s.text.as_bytes());
    }
    let digest = h.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

struct Pending {
    rule: Rule,
    key: EventKey,
    /// (intent, weight, where the weight is written)
    intent_names: Vec<(String, f64, (usize, usize))>,
    order: (Tier, Reverse<i32>, usize, usize),
}

pub(crate) fn compile(sources: &[Source]) -> Result<RuleSet, RulesError> {
    let mut diags = Vec::new();
    let mut intents: Vec<IntentDef> = Vec::new();
    let mut intent_at: HashMap<String, String> = HashMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut ids: HashMap<String, String> = HashMap::new();

    for (file_idx, src) in sources.iter().enumerate() {
        let file: RuleFile = if src.text.trim().is_empty() {
            RuleFile::default()
        } else {
            match serde_yaml::from_str(&src.text) {
                Ok(f) => f,
                Err(e) => {
                    let (line, col) = e
                        .location()
                        .map(|l| (l.line(), l.column()))
                        .unwrap_or((1, 1));
                    let mut message = yaml_message(&e);
                    if let Some(hint) = yaml_hint(&src.text, line) {
                        message.push_str(" (");
                        message.push_str(hint);
                        message.push(')');
                    }
                    diags.push(Diagnostic::new(&src.name, line, col, message));
                    continue;
                }
            }
        };
        let keys = KeyPositions::of(&src.text);
        for (n, spec) in file.intents.into_iter().enumerate() {
            let (line, col) = keys.at(&format!("intents.{n}.name"));
            let d = |m: String| Diagnostic::new(&src.name, line, col, m);
            if !valid_name(&spec.name) {
                diags.push(d(format!(
                    "intent name {:?} must be letters, digits, `_` or `-`",
                    spec.name
                )));
                continue;
            }
            if spec.summary.trim().is_empty() {
                let (line, col) = keys.at(&format!("intents.{n}.summary"));
                diags.push(Diagnostic::new(
                    &src.name,
                    line,
                    col,
                    format!("intent `{}` needs a summary sentence", spec.name),
                ));
            }
            let here = format!("{}:{line}:{col}", src.name);
            if let Some(prev) = intent_at.insert(spec.name.clone(), here) {
                diags.push(d(format!(
                    "intent `{}` already declared at {prev}",
                    spec.name
                )));
                continue;
            }
            intents.push(IntentDef {
                name: spec.name,
                summary: spec.summary.trim().to_owned(),
                half_life_secs: spec.half_life.map_or(DEFAULT_HALF_LIFE_SECS, |d| d.0),
                description: spec.description,
            });
        }

        for (pos, spec) in file.rules.into_iter().enumerate() {
            let base = format!("rules.{pos}");
            let (line, col) = keys.at(&format!("{base}.id"));
            let here = format!("{}:{line}:{col}", src.name);
            // A problem with the rule, reported at `key` (a path below the rule) when given.
            let mut err = |key: &str, m: String| {
                let (line, col) = if key.is_empty() {
                    (line, col)
                } else {
                    keys.at(&format!("{base}.{key}"))
                };
                diags.push(Diagnostic::new(
                    &src.name,
                    line,
                    col,
                    format!("rule `{}`: {m}", spec.id),
                ))
            };
            if !valid_name(&spec.id) {
                err("", "id must be letters, digits, `_`, `-` or `.`".into());
                continue;
            }
            if let Some(prev) = ids.insert(spec.id.clone(), here) {
                err("", format!("id already used at {prev}"));
                continue;
            }
            if spec.ignore && (spec.say.is_some() || !spec.intents.is_empty()) {
                err(
                    "ignore",
                    "`ignore: true` drops the event: it takes neither `say` nor `intents`".into(),
                );
                continue;
            }
            if spec.say.is_none() && spec.intents.is_empty() && !spec.ignore {
                err("", "needs `say`, `intents`, or `ignore: true`".into());
                continue;
            }
            if spec.say.as_deref().is_some_and(|s| s.trim().is_empty()) {
                err(
                    "say",
                    "say: empty sentence; to drop these events write `ignore: true`".into(),
                );
                continue;
            }
            let conditions = match compile_when(&spec.when, 0, "when") {
                Ok(c) => c,
                Err(p) => {
                    err(&p.key, p.message);
                    continue;
                }
            };
            let captures = capture_sources(&conditions);
            let say = match spec.say.as_deref().map(Template::parse).transpose() {
                Ok(t) => t,
                Err(m) => {
                    err("say", format!("say: {m}"));
                    continue;
                }
            };
            if let Some(t) = &say
                && let Some(missing) = t.captures().find(|n| {
                    !captures
                        .iter()
                        .any(|c| c.regex.capture_names().flatten().any(|g| g == *n))
                })
            {
                err(
                    "say",
                    format!(
                        "say: `{{{{ {missing} }}}}` is not a field nor a named group `(?P<{missing}>…)` of this rule's regexes"
                    ),
                );
                continue;
            }
            let mut weights = Vec::new();
            for (name, w) in &spec.intents {
                let at = keys.at(&format!("{base}.intents.{name}"));
                if !w.is_finite() {
                    err(
                        &format!("intents.{name}"),
                        format!("intent `{name}`: weight must be a finite number"),
                    );
                }
                weights.push((name.clone(), *w, at));
            }
            let key = event_key(&spec.when);
            let mut conditions = conditions;
            conditions.sort_by_key(Condition::cost);
            let indexed_skip = usize::from(
                matches!(key, EventKey::Exact(_))
                    && matches!(
                        conditions.first(),
                        Some(Condition::Field(Subject::Event, _))
                    ),
            );
            pending.push(Pending {
                rule: Rule {
                    id: spec.id.into(),
                    description: spec.description,
                    file: src.name.clone(),
                    line,
                    column: col,
                    tier: file.tier,
                    priority: spec.priority,
                    conditions: conditions.into(),
                    indexed_skip,
                    say,
                    ignore: spec.ignore,
                    intents: Box::new([]),
                    captures: captures.into(),
                    examples: spec.examples,
                },
                key,
                intent_names: weights,
                order: (file.tier, Reverse(spec.priority), file_idx, pos),
            });
        }
    }

    if pending.len() > MAX_RULES {
        return Err(RulesError::TooLarge(format!(
            "{} rules; at most {MAX_RULES}",
            pending.len()
        )));
    }
    let intent_idx: HashMap<&str, u32> = intents
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i as u32))
        .collect();
    for p in &mut pending {
        let mut resolved = Vec::new();
        for (name, w, (line, column)) in &p.intent_names {
            match intent_idx.get(name.as_str()) {
                Some(&i) => resolved.push((i, *w)),
                None => diags.push(Diagnostic::new(
                    &p.rule.file,
                    *line,
                    *column,
                    format!(
                        "rule `{}`: intent `{name}` is not declared (add it under `intents:`)",
                        p.rule.id
                    ),
                )),
            }
        }
        p.rule.intents = resolved.into();
    }
    if !diags.is_empty() {
        diags.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        return Err(RulesError::Invalid(diags));
    }

    let prop_slots = assign_property_slots(&mut pending);
    let mut property_keys = PropertyKeys::default();
    for p in pending.iter_mut() {
        visit_rule_subjects(&mut p.rule, &mut |s| {
            if let Subject::Property(path) = s {
                property_keys.insert(path);
            }
        });
    }
    pending.sort_by_key(|p| p.order);
    let keys: Vec<EventKey> = pending.iter().map(|p| p.key.clone()).collect();
    let rules: Vec<Rule> = pending.into_iter().map(|p| p.rule).collect();
    let mut set = build_index(sources, rules, keys, intents)?;
    set.prop_slots = prop_slots;
    set.property_keys = property_keys;
    Ok(set)
}

fn build_index(
    sources: &[Source],
    rules: Vec<Rule>,
    keys: Vec<EventKey>,
    intents: Vec<IntentDef>,
) -> Result<RuleSet, RulesError> {
    let mut regexes = Vec::new();
    let mut regex_rules = Vec::new();
    let mut any_event = RuleSplit::default();
    let mut names = BTreeSet::new();
    for (i, k) in keys.iter().enumerate() {
        match k {
            EventKey::Exact(ns) => names.extend(ns.iter().map(String::as_str)),
            EventKey::Regex(r) => {
                regexes.push(r.as_str());
                regex_rules.push(i as u32);
            }
            EventKey::Any => any_event.push(i as u32, rules[i].describes()),
        }
    }
    let event_regexes = if regexes.is_empty() {
        None
    } else {
        Some(
            RegexSetBuilder::new(&regexes)
                .size_limit(REGEX_SIZE_LIMIT * 8)
                .dfa_size_limit(REGEX_SIZE_LIMIT * 8)
                .build()
                .map_err(|e| RulesError::TooLarge(format!("event regexes: {e}")))?,
        )
    };
    let compiled_regexes: Vec<regex::Regex> = regexes
        .iter()
        .map(|r| crate::condition::build_regex(r))
        .collect::<Result<_, _>>()
        .map_err(RulesError::TooLarge)?;
    let mut by_event = HashMap::default();
    for name in names {
        let mut split = RuleSplit::default();
        let mut ri = 0;
        for (i, k) in keys.iter().enumerate() {
            let candidate = match k {
                EventKey::Exact(ns) => ns.iter().any(|n| n == name),
                EventKey::Regex(_) => {
                    ri += 1;
                    compiled_regexes[ri - 1].is_match(name)
                }
                EventKey::Any => true,
            };
            if candidate {
                split.push(i as u32, rules[i].describes());
            }
        }
        by_event.insert(name.into(), candidates(&rules, split));
    }
    let any_event = candidates(&rules, any_event);
    let intent_labels = intents
        .iter()
        .map(|d| (Arc::from(d.name.as_str()), Arc::from(d.summary.as_str())))
        .collect();
    Ok(RuleSet {
        version: version_of(sources),
        rules,
        intents,
        intent_labels,
        files: Vec::new(),
        by_event,
        any_event,
        event_regexes,
        regex_rules: regex_rules.into(),
        unmatched: Arc::new(UnmatchedCounter::default()),
        prop_slots: PropSlots::default(),
        property_keys: PropertyKeys::default(),
    })
}

/// Gives the most-read property paths a per-event cache slot.
fn assign_property_slots(pending: &mut [Pending]) -> PropSlots {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut count = |s: &mut Subject| {
        if let Subject::Property(p) = s
            && p.is_single()
        {
            *counts.entry(p.full().to_owned()).or_default() += 1;
        }
    };
    for p in pending.iter_mut() {
        visit_rule_subjects(&mut p.rule, &mut count);
    }
    let mut by_use: Vec<(String, usize)> = counts.into_iter().filter(|(_, n)| *n >= 2).collect();
    by_use.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    by_use.truncate(PROP_SLOTS);
    let keys: Vec<Box<str>> = by_use.iter().map(|(k, _)| k.as_str().into()).collect();
    let slots: HashMap<String, u8> = by_use
        .into_iter()
        .enumerate()
        .map(|(i, (k, _))| (k, i as u8))
        .collect();
    let mut assign = |s: &mut Subject| {
        if let Subject::Property(p) = s {
            p.slot = slots.get(p.full()).copied();
        }
    };
    for p in pending.iter_mut() {
        visit_rule_subjects(&mut p.rule, &mut assign);
    }
    PropSlots::new(keys)
}

fn visit_rule_subjects(rule: &mut Rule, f: &mut impl FnMut(&mut Subject)) {
    for_each_subject_mut(&mut rule.conditions, f);
    if let Some(t) = rule.say.as_mut() {
        t.for_each_subject_mut(f);
    }
    for c in rule.captures.iter_mut() {
        f(&mut c.subject);
    }
}

fn candidates(rules: &[Rule], split: RuleSplit) -> Candidates {
    Candidates {
        describing: candidate_list(rules, split.describing),
        tagging: candidate_list(rules, split.tagging),
    }
}

/// Files rules under the literal value (or literal prefixes) one of their conditions requires,
/// when at least 4 rules share such a subject; the rest stay in `always`.
fn candidate_list(rules: &[Rule], idxs: Vec<u32>) -> CandidateList {
    let keys: Vec<Option<DispatchKey>> = idxs
        .iter()
        .map(|&i| dispatch_key(&rules[i as usize]))
        .collect();
    let mut counts: HashMap<(String, bool), usize> = HashMap::new();
    for k in keys.iter().flatten() {
        *counts.entry((k.subject.to_string(), k.prefix)).or_default() += 1;
    }
    let mut groups: Vec<((String, bool), usize)> =
        counts.into_iter().filter(|(_, n)| *n >= 4).collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    groups.truncate(MAX_DISPATCH);
    let mut always = Vec::new();
    type Filed = (Option<Subject>, HashMap<Box<[u8]>, Vec<u32>>);
    let mut maps: Vec<Filed> = groups.iter().map(|_| (None, HashMap::new())).collect();
    for (&i, key) in idxs.iter().zip(&keys) {
        let slot = key.as_ref().and_then(|k| {
            let name = (k.subject.to_string(), k.prefix);
            groups.iter().position(|(g, _)| *g == name)
        });
        match (slot, key) {
            (Some(slot), Some(k)) => {
                let (subject, map) = &mut maps[slot];
                subject.get_or_insert_with(|| k.subject.clone());
                for v in &k.values {
                    let list = map.entry(v.as_slice().into()).or_default();
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
            }
            _ => always.push(i),
        }
    }
    let mut keyed = Vec::new();
    for (((_, prefix), _), (subject, map)) in groups.iter().zip(maps) {
        let Some(subject) = subject else { continue };
        let prefix_lengths = prefix.then(|| {
            let lengths: BTreeSet<usize> = map.keys().map(|k| k.len()).collect();
            lengths.into_iter().collect::<Box<[usize]>>()
        });
        let quick = (*prefix && map.keys().all(|k| k.len() >= 4)).then(|| {
            let mut q: Vec<u32> = map.keys().filter_map(|k| first4(k)).collect();
            q.sort_unstable();
            q.dedup();
            q.into_boxed_slice()
        });
        keyed.push(Dispatch {
            subject,
            prefix_lengths,
            quick,
            by_value: map.into_iter().map(|(k, v)| (k, v.into())).collect(),
        });
    }
    // Prefix dispatches with too many distinct lengths cost more than they save.
    let (keyed, demoted): (Vec<Dispatch>, Vec<Dispatch>) = keyed.into_iter().partition(|d| {
        d.prefix_lengths
            .as_ref()
            .is_none_or(|l| l.len() <= MAX_PREFIX_LENGTHS)
    });
    for d in demoted {
        always.extend(d.by_value.into_values().flat_map(|v| v.into_vec()));
    }
    always.sort_unstable();
    always.dedup();
    CandidateList {
        always: always.into(),
        keyed: keyed.into(),
    }
}

/// The condition a rule can be filed under.
struct DispatchKey {
    subject: Subject,
    /// Values are prefixes (from an anchored regex) rather than exact values.
    prefix: bool,
    values: Vec<Vec<u8>>,
}

/// Picks an exact string (or list of strings) condition on the path, an element field or a
/// property; else an anchored regex with literal prefixes on one of those.
fn dispatch_key(rule: &Rule) -> Option<DispatchKey> {
    let mut best: Option<(u8, DispatchKey)> = None;
    for c in &*rule.conditions {
        let Condition::Field(s, m) = c else { continue };
        let rank = match s {
            Subject::Path => 0,
            Subject::Element(_) => 1,
            Subject::Property(_) => 2,
            _ => continue,
        };
        let key = if let Some(values) = m.exact_names() {
            // Only plain strings: numbers and booleans compare across types.
            if values
                .iter()
                .any(|v| v.parse::<f64>().is_ok() || *v == "true" || *v == "false")
            {
                continue;
            }
            DispatchKey {
                subject: s.clone(),
                prefix: false,
                values: values.iter().map(|v| v.as_bytes().to_vec()).collect(),
            }
        } else if let Some(prefixes) = m.regex_prefixes() {
            // Keep the shortest: `/pricing` already covers `/pricing/`.
            let values = prefixes
                .iter()
                .filter(|p| {
                    !prefixes
                        .iter()
                        .any(|q| q.len() < p.len() && p.starts_with(q))
                })
                .map(|p| p.to_vec())
                .collect();
            DispatchKey {
                subject: s.clone(),
                prefix: true,
                values,
            }
        } else {
            continue;
        };
        let rank = rank * 2 + u8::from(key.prefix);
        if best.as_ref().is_none_or(|b| rank < b.0) {
            best = Some((rank, key));
        }
    }
    best.map(|(_, k)| k)
}

fn event_key(when: &WhenSpec) -> EventKey {
    let Some(spec) = &when.event else {
        return EventKey::Any;
    };
    let Ok(m) = Matcher::compile(spec) else {
        return EventKey::Any;
    };
    if let Some(names) = m.exact_names() {
        return EventKey::Exact(names.into_iter().map(str::to_owned).collect());
    }
    match m.only_regex() {
        Some(r) => EventKey::Regex(r.as_str().to_owned()),
        None => EventKey::Any,
    }
}

/// A problem in a rule's conditions, at `key` (a path below the rule, e.g. `when.element.text`).
struct Problem {
    key: String,
    message: String,
}

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        message: message.into(),
    }
}

/// Compiles the conditions of `w`, written at `at` (`when`, `when.any.0`…).
fn compile_when(w: &WhenSpec, depth: usize, at: &str) -> Result<Vec<Condition>, Problem> {
    if depth > MAX_DEPTH {
        return Err(problem(
            at,
            format!("`any`/`not` nested deeper than {MAX_DEPTH}"),
        ));
    }
    let mut out = Vec::new();
    // `what` is the key below `at`; a regex's own problem is reported at its `regex:` key.
    let field = |s: Subject, m: &MatcherSpec, what: &str| {
        Matcher::compile(m)
            .map(|m| Condition::Field(s, m))
            .map_err(|e| matcher_problem(&format!("{at}.{what}"), e))
    };
    if let Some(m) = &w.event {
        out.push(field(Subject::Event, m, "event")?);
    }
    if let Some(m) = &w.path {
        out.push(field(Subject::Path, m, "path")?);
    }
    if let Some(m) = &w.url {
        out.push(field(Subject::Url, m, "url")?);
    }
    for (p, m) in &w.properties {
        let path = PropPath::new(p)
            .map_err(|e| problem(format!("{at}.properties"), format!("{at}.properties: {e}")))?;
        out.push(field(
            Subject::Property(path),
            m,
            &format!("properties.{p}"),
        )?);
    }
    for (p, m) in &w.person {
        let path = PropPath::new(p)
            .map_err(|e| problem(format!("{at}.person"), format!("{at}.person: {e}")))?;
        out.push(field(Subject::Person(path), m, &format!("person.{p}"))?);
    }
    if let Some(el) = &w.element {
        for c in compile_element(el, &format!("{at}.element"))? {
            out.push(match c {
                ElementCondition::Field(f, m) => Condition::Field(Subject::Element(f), m),
                ElementCondition::Classes(cs) => Condition::Classes(cs),
            });
        }
    }
    if let Some(el) = &w.inside {
        let conds = compile_element(el, &format!("{at}.inside"))?;
        out.push(Condition::Inside(conds.into()));
    }
    if let Some(el) = &w.closest {
        let conds = compile_element(el, &format!("{at}.closest"))?;
        out.push(Condition::Closest(conds.into()));
    }
    if let Some(any) = &w.any {
        if any.is_empty() {
            return Err(problem(
                format!("{at}.any"),
                format!(
                    "{at}.any: an empty list would always hold; give at least one group of conditions, or remove `any`"
                ),
            ));
        }
        let groups = any
            .iter()
            .enumerate()
            .map(|(i, g)| compile_when(g, depth + 1, &format!("{at}.any.{i}")).map(Into::into))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(Condition::Any(groups.into()));
    }
    if let Some(n) = &w.not {
        out.push(Condition::Not(
            compile_when(n, depth + 1, &format!("{at}.not"))?.into(),
        ));
    }
    Ok(out)
}

/// A matcher's compile error as a problem at `key` (at its `regex:` when the regex is at fault).
fn matcher_problem(key: &str, e: String) -> Problem {
    let at = if e.starts_with("invalid regex") || e.starts_with("regex longer") {
        format!("{key}.regex")
    } else {
        key.to_owned()
    };
    problem(at, format!("{key}: {e}"))
}

fn compile_element(el: &ElementSpec, at: &str) -> Result<Vec<ElementCondition>, Problem> {
    let mut out = Vec::new();
    let fields = [
        (ElementField::Tag, &el.tag, "tag"),
        (ElementField::Text, &el.text, "text"),
        (ElementField::Id, &el.id, "id"),
        (ElementField::Href, &el.href, "href"),
    ];
    for (f, spec, name) in fields {
        if let Some(m) = spec {
            out.push(ElementCondition::Field(
                f,
                Matcher::compile(m).map_err(|e| matcher_problem(&format!("{at}.{name}"), e))?,
            ));
        }
    }
    if let Some(cs) = &el.classes {
        if cs.0.is_empty() {
            return Err(problem(
                format!("{at}.classes"),
                format!("{at}.classes: empty"),
            ));
        }
        out.push(ElementCondition::Classes(
            cs.0.iter().map(|c| c.as_str().into()).collect(),
        ));
    }
    for (a, m) in &el.attributes {
        let key = format!("{at}.attributes.{a}");
        let a = a.strip_prefix("attr__").unwrap_or(a);
        out.push(ElementCondition::Field(
            ElementField::Attribute(a.into()),
            Matcher::compile(m).map_err(|e| matcher_problem(&key, e))?,
        ));
    }
    Ok(out)
}

/// Regexes with named groups among the rule's top-level conditions.
fn capture_sources(conds: &[Condition]) -> Vec<CaptureSource> {
    let mut out = Vec::new();
    for c in conds {
        if let Condition::Field(s, m) = c {
            for r in m.capture_regexes() {
                out.push(CaptureSource {
                    subject: s.clone(),
                    regex: r.clone(),
                });
            }
        }
    }
    out
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// serde_yaml's message without its trailing " at line X column Y" (the diagnostic carries it).
fn yaml_message(e: &serde_yaml::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg,
    }
}

/// A hint for the YAML mistakes authors make most, from the line serde_yaml stopped at (or the
/// line before it: a mapping's error often lands on the next line).
fn yaml_hint(text: &str, line: usize) -> Option<&'static str> {
    let lines: Vec<&str> = text.lines().collect();
    let around = [line.checked_sub(1), line.checked_sub(2)];
    for l in around.into_iter().flatten().filter_map(|i| lines.get(i)) {
        let indent = &l[..l.len() - l.trim_start().len()];
        if indent.contains('\t') {
            return Some("YAML indents with spaces only; this line has a tab");
        }
        if let Some((_, value)) = l.split_once(": ")
            && value.trim_start().starts_with("{{")
        {
            return Some(
                "a value that starts with `{{` must be quoted: say: \"{{ element.text }}\"",
            );
        }
    }
    None
}
