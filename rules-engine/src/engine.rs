//! The compiled [`RuleSet`]: describing and explaining one event, and counting unmatched ones.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use regex::RegexSet;
use rustc_hash::FxHashMap;
use serde_json::{Map, Value};

use crate::condition::{Condition, EventCtx, PropSlots, PropertyKeys, Subject, Val, all};
use crate::model::{ExampleSpec, Tier};
use crate::template::{CaptureSource, Template, push_clean};

/// A borrowed view of one event, as the worker decoded it.
#[derive(Debug, Clone, Copy)]
pub struct EventInput<'a> {
    pub event: &'a str,
    pub distinct_id: &'a str,
    pub properties: &'a Map<String, Value>,
    /// All the properties as JSON text, when `properties` holds only those the rules read
    /// ([`RuleSet::reads_property`]); an unmatched event's example is decoded from it.
    pub properties_text: Option<&'a str>,
    /// PostHog's `elements_chain`; when `None`, `properties["$elements_chain"]` is used.
    pub elements_chain: Option<&'a str>,
    pub person_properties: Option<&'a Map<String, Value>>,
}

/// Properties of an event given as JSON without any.
static NO_PROPERTIES: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

impl<'a> EventInput<'a> {
    /// An event as JSON (`worker rules explain`, unmatched examples): `event`, `distinct_id`,
    /// `properties`, `elements_chain`, `person_properties` or `person.properties`; `None` without `event`.
    pub fn from_json(event: &'a Map<String, Value>) -> Option<Self> {
        Some(EventInput {
            event: event.get("event")?.as_str()?,
            distinct_id: event
                .get("distinct_id")
                .and_then(Value::as_str)
                .unwrap_or(""),
            properties: event
                .get("properties")
                .and_then(Value::as_object)
                .unwrap_or(&NO_PROPERTIES),
            properties_text: None,
            elements_chain: event.get("elements_chain").and_then(Value::as_str),
            person_properties: event
                .get("person_properties")
                .or_else(|| event.get("person").and_then(|p| p.get("properties")))
                .and_then(Value::as_object),
        })
    }
}

/// Weight a rule added to an intent, with what the summary needs to use it.
#[derive(Debug, Clone, PartialEq)]
pub struct IntentHit {
    /// Shared with the rule set, so a hit costs no copy.
    pub name: Arc<str>,
    pub weight: f64,
    /// The intent's sentence, e.g. "User showing Purchase Intent."
    pub summary: Arc<str>,
    pub half_life_secs: f64,
}

/// What the rules say about one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrichment {
    /// The sentence; empty when `ignored`.
    pub description: String,
    /// The rule that produced `description` (or ignored the event); `None` for the fallback.
    /// Shared with the rule set.
    pub rule_id: Option<Arc<str>>,
    pub intents: Vec<IntentHit>,
    /// Whether a rule described (or ignored) the event (false: fallback sentence).
    pub matched: bool,
    /// A rule with `ignore: true` matched: the event is stored without a description, adds no
    /// intents and stays out of the context.
    pub ignored: bool,
}

/// An intent declared in the rule files.
#[derive(Debug, Clone, PartialEq)]
pub struct IntentDef {
    pub name: String,
    pub summary: String,
    pub half_life_secs: f64,
    pub description: Option<String>,
}

/// A compiled rule.
#[derive(Debug)]
pub(crate) struct Rule {
    pub id: Arc<str>,
    /// The author's note on the rule.
    pub description: Option<String>,
    pub file: Arc<str>,
    pub line: usize,
    pub column: usize,
    /// The tier of the rule's file: every specific rule is tried before any generic one.
    pub tier: Tier,
    pub priority: i32,
    pub conditions: Box<[Condition]>,
    /// Conditions to skip when the rule is reached through the event-name index (which already
    /// checked the name): 1 when `conditions[0]` is that exact name test, else 0.
    pub indexed_skip: usize,
    pub say: Option<Template>,
    /// `ignore: true`: a match drops the event from descriptions.
    pub ignore: bool,
    /// (index into `RuleSet::intents`, weight)
    pub intents: Box<[(u32, f64)]>,
    pub captures: Box<[CaptureSource]>,
    pub examples: Vec<ExampleSpec>,
}

impl Rule {
    pub fn location(&self) -> String {
        format!("{}:{}:{}", self.file, self.line, self.column)
    }

    /// Whether a match decides the event's description (a sentence, or `ignore`): the first
    /// such rule in priority order wins; the others only add intents.
    pub fn describes(&self) -> bool {
        self.say.is_some() || self.ignore
    }
}

/// How the compiler indexed a rule by event name.
#[derive(Debug, Clone)]
pub(crate) enum EventKey {
    Exact(Vec<String>),
    Regex(String),
    Any,
}

/// Candidate rules for one event name, in priority order.
#[derive(Debug, Default)]
pub(crate) struct Candidates {
    pub describing: CandidateList,
    pub tagging: CandidateList,
}

/// Most dispatch maps one candidate list keeps.
pub(crate) const MAX_DISPATCH: usize = 4;
/// Most distinct prefix lengths one prefix dispatch looks up.
pub(crate) const MAX_PREFIX_LENGTHS: usize = 8;
const MAX_HEADS: usize = 2 + MAX_DISPATCH * MAX_PREFIX_LENGTHS;

/// Rules in priority order, some filed under the value (or literal prefix) a condition of theirs
/// requires, so an event only visits rules its values can satisfy.
#[derive(Debug, Default)]
pub(crate) struct CandidateList {
    pub always: Box<[u32]>,
    pub keyed: Box<[Dispatch]>,
}

/// Rules filed by the literal value (or value prefix) their condition on `subject` requires.
#[derive(Debug)]
pub(crate) struct Dispatch {
    pub subject: Subject,
    /// `None`: exact values; `Some(lengths)`: prefixes of these byte lengths.
    pub prefix_lengths: Option<Box<[usize]>>,
    /// For prefix dispatch when every prefix has 4+ bytes: their first 4 bytes, sorted, so most
    /// values are turned away with one binary search.
    pub quick: Option<Box<[u32]>>,
    pub by_value: FxHashMap<Box<[u8]>, Box<[u32]>>,
}

impl CandidateList {
    /// Calls `f` on each candidate (and each of `extra`, sorted) in priority order, once each,
    /// until it returns true.
    fn for_each(&self, ctx: &EventCtx<'_>, extra: &[u32], mut f: impl FnMut(u32) -> bool) {
        if self.keyed.is_empty() && extra.is_empty() {
            for &i in &*self.always {
                if f(i) {
                    return;
                }
            }
            return;
        }
        let mut heads: [&[u32]; MAX_HEADS] = [&[]; MAX_HEADS];
        heads[0] = &self.always;
        heads[1] = extra;
        let mut n = 2;
        for d in &*self.keyed {
            let value: Option<&[u8]> = match ctx.get(&d.subject) {
                Some(Val::Str(Cow::Borrowed(s))) => Some(s.as_bytes()),
                Some(Val::Json(Value::String(s))) => Some(s.as_bytes()),
                Some(Val::Str(Cow::Owned(s))) => {
                    // Rare (unescaped element text): look up without keeping the borrow.
                    push_lists(d, s.as_bytes(), &mut heads, &mut n);
                    None
                }
                _ => None,
            };
            if let Some(v) = value {
                push_lists(d, v, &mut heads, &mut n);
            }
        }
        let heads = &mut heads[..n];
        // Usually one list is left: no merging then.
        let mut live = heads.iter().filter(|l| !l.is_empty());
        if let (Some(only), None) = (live.next(), live.next()) {
            for &i in *only {
                if f(i) {
                    return;
                }
            }
            return;
        }
        let mut last = u32::MAX;
        loop {
            let mut best: Option<usize> = None;
            for (h, list) in heads.iter().enumerate() {
                if let Some(&x) = list.first()
                    && best.is_none_or(|b| x < heads[b][0])
                {
                    best = Some(h);
                }
            }
            let Some(b) = best else { return };
            let idx = heads[b][0];
            heads[b] = &heads[b][1..];
            if idx == last {
                continue;
            }
            last = idx;
            if f(idx) {
                return;
            }
        }
    }
}

/// The first 4 bytes of `v` as one number.
pub(crate) fn first4(v: &[u8]) -> Option<u32> {
    v.first_chunk::<4>().map(|b| u32::from_le_bytes(*b))
}

fn push_lists<'l>(d: &'l Dispatch, v: &[u8], heads: &mut [&'l [u32]; MAX_HEADS], n: &mut usize) {
    match &d.prefix_lengths {
        None => {
            if let Some(l) = d.by_value.get(v) {
                heads[*n] = l;
                *n += 1;
            }
        }
        Some(lengths) => {
            if let Some(quick) = &d.quick {
                match first4(v) {
                    Some(k) if quick.binary_search(&k).is_ok() => {}
                    _ => return,
                }
            }
            for &len in &**lengths {
                if len <= v.len()
                    && let Some(l) = d.by_value.get(&v[..len])
                {
                    heads[*n] = l;
                    *n += 1;
                }
            }
        }
    }
}

/// A compiled, immutable set of rules. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RuleSet {
    pub(crate) version: String,
    pub(crate) rules: Vec<Rule>,
    pub(crate) intents: Vec<IntentDef>,
    /// (name, summary) of each of `intents`, shared with every hit.
    pub(crate) intent_labels: Vec<(Arc<str>, Arc<str>)>,
    pub(crate) files: Vec<PathBuf>,
    pub(crate) by_event: FxHashMap<Box<str>, Candidates>,
    /// Rules evaluated for names not in `by_event` whatever the name.
    pub(crate) any_event: Candidates,
    /// Rules whose event condition is one regex, tested for names not in `by_event`.
    pub(crate) event_regexes: Option<RegexSet>,
    pub(crate) regex_rules: Box<[u32]>,
    pub(crate) unmatched: Arc<UnmatchedCounter>,
    pub(crate) prop_slots: PropSlots,
    pub(crate) property_keys: PropertyKeys,
}

/// Most intents one event can hit before extra ones are dropped.
const MAX_HITS: usize = 16;

impl RuleSet {
    /// The content hash of the rule files (16 hex digits).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Declared intents, in file order.
    pub fn intents(&self) -> &[IntentDef] {
        &self.intents
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether describing an event may read its top-level property `key`: one the rules name,
    /// or one the engine reads itself (page, elements). Events may be given with only these.
    pub fn reads_property(&self, key: &str) -> bool {
        self.property_keys.reads(key)
    }

    /// The files the set was loaded from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Counts of events no rule described, by shape.
    pub fn unmatched(&self) -> &Arc<UnmatchedCounter> {
        &self.unmatched
    }

    /// Keeps counting unmatched events into `counter` (so counts survive a reload).
    pub fn with_unmatched(mut self, counter: Arc<UnmatchedCounter>) -> Self {
        self.unmatched = counter;
        self
    }

    /// Describes one event. Never panics; the first matching rule with `say` describes it, every
    /// matching rule adds its intent weights.
    pub fn enrich(&self, ev: &EventInput<'_>) -> Enrichment {
        self.enrich_inner(ev, true)
    }

    /// Whether a rule describes the event; unlike [`Self::enrich`], an unmatched event is not
    /// counted for the unmatched report.
    pub fn describes(&self, ev: &EventInput<'_>) -> bool {
        self.describe(ev).matched
    }

    /// Describes one event like [`Self::enrich`] without counting it for the unmatched report:
    /// for events described before (re-enrichment, shadow runs).
    pub fn describe(&self, ev: &EventInput<'_>) -> Enrichment {
        self.enrich_inner(ev, false)
    }

    pub(crate) fn enrich_inner(&self, ev: &EventInput<'_>, count: bool) -> Enrichment {
        let ctx = EventCtx::new(ev, &self.prop_slots);
        let mut described: Option<u32> = None;
        let mut hits = Hits::default();
        let mut visit = |idx: u32, described: &mut Option<u32>| {
            let rule = &self.rules[idx as usize];
            // Exact-name rules are only reached through their names: skip the name test.
            let skip = rule.indexed_skip;
            let describes = rule.describes();
            if describes && described.is_some() {
                return;
            }
            if all(&rule.conditions[skip..], &ctx) {
                if describes {
                    *described = Some(idx);
                }
                hits.add(&rule.intents);
            }
        };
        let (cands, extra) = match self.by_event.get(ev.event) {
            Some(c) => (c, RuleSplit::default()),
            None => (&self.any_event, self.regex_candidates(ev.event)),
        };
        cands.describing.for_each(&ctx, &extra.describing, |idx| {
            visit(idx, &mut described);
            described.is_some()
        });
        cands.tagging.for_each(&ctx, &extra.tagging, |idx| {
            visit(idx, &mut described);
            false
        });
        self.finish(&ctx, described, &hits, count)
    }

    fn finish(
        &self,
        ctx: &EventCtx<'_>,
        described: Option<u32>,
        hits: &Hits,
        count: bool,
    ) -> Enrichment {
        let intents = hits.as_slice().iter().map(|&(i, w)| {
            let (name, summary) = &self.intent_labels[i as usize];
            IntentHit {
                name: name.clone(),
                weight: w,
                summary: summary.clone(),
                half_life_secs: self.intents[i as usize].half_life_secs,
            }
        });
        let intents = intents.collect();
        match described.map(|idx| &self.rules[idx as usize]) {
            Some(rule) if rule.ignore => Enrichment {
                description: String::new(),
                rule_id: Some(rule.id.clone()),
                intents: Vec::new(),
                matched: true,
                ignored: true,
            },
            Some(rule) => {
                let say = rule.say.as_ref().expect("describing rules have a template");
                Enrichment {
                    description: say.render(ctx, &rule.captures),
                    rule_id: Some(rule.id.clone()),
                    intents,
                    matched: true,
                    ignored: false,
                }
            }
            None => {
                if count {
                    self.unmatched.record(ctx);
                }
                Enrichment {
                    description: fallback_sentence(ctx.event),
                    rule_id: None,
                    intents,
                    matched: false,
                    ignored: false,
                }
            }
        }
    }

    /// Rules whose event-name regex matches a name that no exact rule names.
    fn regex_candidates(&self, name: &str) -> RuleSplit {
        let mut extra = RuleSplit::default();
        if let Some(set) = &self.event_regexes {
            for i in set.matches(name).iter() {
                let idx = self.regex_rules[i];
                extra.push(idx, self.rules[idx as usize].describes());
            }
        }
        extra
    }

    /// Evaluates every rule (no index) and tells, rule by rule, why it did or did not match.
    pub fn explain(&self, ev: &EventInput<'_>) -> Explanation {
        let ctx = EventCtx::new(ev, &self.prop_slots);
        let mut described = None;
        let mut hits = Hits::default();
        let mut steps = Vec::with_capacity(self.rules.len());
        for (idx, rule) in self.rules.iter().enumerate() {
            let failed = rule.conditions.iter().find(|c| !c.test(&ctx));
            let outcome = match failed {
                Some(c) => StepOutcome::NoMatch(c.explain_failure(&ctx)),
                None if !rule.describes() => {
                    hits.add(&rule.intents);
                    StepOutcome::AddedIntents
                }
                None if described.is_some() => StepOutcome::Shadowed,
                None => {
                    described = Some(idx as u32);
                    hits.add(&rule.intents);
                    if rule.ignore {
                        StepOutcome::Ignored
                    } else {
                        StepOutcome::Described
                    }
                }
            };
            steps.push(ExplainStep {
                rule_id: rule.id.to_string(),
                description: rule.description.clone(),
                location: rule.location(),
                tier: rule.tier.name(),
                priority: rule.priority,
                outcome,
            });
        }
        Explanation {
            enrichment: self.finish(&ctx, described, &hits, false),
            steps,
        }
    }
}

/// The fallback sentence, for an event no rule describes: `Triggered 'signup_completed'`, the
/// name cleaned like template values.
pub fn fallback_sentence(event: &str) -> String {
    let mut s = String::with_capacity(event.len() + 13);
    s.push_str("Triggered '");
    push_clean(&mut s, event);
    s.push('\'');
    s
}

/// Rule indexes split like [`Candidates`]: rules with `say`, and intent-only rules.
#[derive(Default)]
pub(crate) struct RuleSplit {
    pub describing: Vec<u32>,
    pub tagging: Vec<u32>,
}

impl RuleSplit {
    pub fn push(&mut self, idx: u32, describes: bool) {
        if describes {
            self.describing.push(idx);
        } else {
            self.tagging.push(idx);
        }
    }
}

/// Intent weights summed per intent, without allocating.
#[derive(Default)]
struct Hits {
    items: [(u32, f64); MAX_HITS],
    len: usize,
}

impl Hits {
    fn add(&mut self, intents: &[(u32, f64)]) {
        for &(i, w) in intents {
            if let Some(h) = self.items[..self.len].iter_mut().find(|h| h.0 == i) {
                h.1 += w;
            } else if self.len < MAX_HITS {
                self.items[self.len] = (i, w);
                self.len += 1;
            }
        }
    }

    fn as_slice(&self) -> &[(u32, f64)] {
        &self.items[..self.len]
    }
}

/// Why one rule did or did not apply, for `rules explain`.
#[derive(Debug, Clone)]
pub struct ExplainStep {
    pub rule_id: String,
    pub description: Option<String>,
    pub location: String,
    /// `specific` or `generic`.
    pub tier: &'static str,
    pub priority: i32,
    pub outcome: StepOutcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// This rule's sentence describes the event.
    Described,
    /// This rule (`ignore: true`) drops the event from descriptions.
    Ignored,
    /// Matched, but an earlier rule already described the event.
    Shadowed,
    /// An intent-only rule matched and added its weights.
    AddedIntents,
    /// The first condition that failed, with what the event had.
    NoMatch(String),
}

/// The result of [`RuleSet::explain`].
#[derive(Debug, Clone)]
pub struct Explanation {
    pub enrichment: Enrichment,
    pub steps: Vec<ExplainStep>,
}

/// Most distinct unmatched shapes kept; further new shapes are only counted in `overflow`.
pub const MAX_UNMATCHED_SHAPES: usize = 10_000;

/// One kind of event no rule describes: the event name, the page path and, for clicks, the
/// clicked element's text and classes; with how often it was seen and the first such event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UnmatchedShape {
    pub event: String,
    pub path: Option<String>,
    pub element_text: Option<String>,
    pub element_classes: Option<String>,
    pub count: u64,
    /// The first event of this shape (`event`, `distinct_id`, `properties`, `elements_chain`):
    /// what `worker rules explain` takes, and how a reload tells whether a new rule covers it.
    pub example: Option<Value>,
}

/// Longest `properties` kept in an example, in bytes of JSON; larger ones keep only PostHog's `$` keys.
const MAX_EXAMPLE_PROPERTIES: usize = 4096;

/// In-memory counts of unmatched events by (event name, path, element text and classes).
#[derive(Debug, Default)]
pub struct UnmatchedCounter {
    shapes: Mutex<HashMap<u64, UnmatchedShape>>,
    overflow: AtomicU64,
}

impl UnmatchedCounter {
    fn record(&self, ctx: &EventCtx<'_>) {
        let path = ctx.path();
        let clicked = ctx.event == "$autocapture" || ctx.event == "$rageclick";
        let element = |field| {
            if clicked {
                ctx.element_field(&field)
            } else {
                None
            }
        };
        let text = element(crate::condition::ElementField::Text);
        let classes = element(crate::condition::ElementField::Classes);
        let mut h = std::hash::DefaultHasher::new();
        (ctx.event, path, text.as_deref(), classes.as_deref()).hash(&mut h);
        let Ok(mut shapes) = self.shapes.lock() else {
            return;
        };
        self.count(&mut shapes, h.finish(), 1, || {
            let clean = |v: &str| {
                let mut s = String::new();
                push_clean(&mut s, v);
                s
            };
            UnmatchedShape {
                event: clean(ctx.event),
                path: path.map(clean),
                element_text: text.as_deref().map(clean),
                element_classes: classes.as_deref().map(clean),
                count: 1,
                example: Some(example_of(ctx)),
            }
        });
    }

    /// Adds `n` events to the shape kept under `key`, or keeps the shape `new` makes (with its
    /// count set to `n`) while the table has room; beyond it they go to [`Self::overflow`].
    fn count(
        &self,
        shapes: &mut HashMap<u64, UnmatchedShape>,
        key: u64,
        n: u64,
        new: impl FnOnce() -> UnmatchedShape,
    ) {
        if let Some(kept) = shapes.get_mut(&key) {
            kept.count += n;
        } else if shapes.len() < MAX_UNMATCHED_SHAPES {
            shapes.insert(key, UnmatchedShape { count: n, ..new() });
        } else {
            self.overflow.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Current counts, most frequent first.
    pub fn snapshot(&self) -> Vec<UnmatchedShape> {
        let mut v: Vec<_> = self
            .shapes
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        sort_shapes(&mut v);
        v
    }

    /// Takes the counts and resets them (for persisting).
    pub fn take(&self) -> Vec<UnmatchedShape> {
        let mut v: Vec<_> = self
            .shapes
            .lock()
            .map(|mut s| s.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        sort_shapes(&mut v);
        v
    }

    /// Puts back counts the shared report could not write, for the next flush; a shape put back
    /// again keeps one entry, and counts that find the table full go to [`Self::overflow`].
    pub fn restore(&self, shapes: Vec<UnmatchedShape>) {
        let Ok(mut map) = self.shapes.lock() else {
            return;
        };
        for shape in shapes {
            let mut h = std::hash::DefaultHasher::new();
            (
                "restored",
                &shape.event,
                &shape.path,
                &shape.element_text,
                &shape.element_classes,
            )
                .hash(&mut h);
            self.count(&mut map, h.finish(), shape.count, || shape);
        }
    }

    /// Unmatched events not kept by shape because the table was full.
    pub fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }
}

/// An event as `worker rules explain` reads it; oversized properties keep only `$` keys.
fn example_of(ctx: &EventCtx<'_>) -> Value {
    // All the properties, not only those the rules read.
    let all: Option<Map<String, Value>> = ctx.props_text.and_then(|t| serde_json::from_str(t).ok());
    let props = all.as_ref().unwrap_or(ctx.props);
    let size = serde_json::to_vec(props).map_or(usize::MAX, |v| v.len());
    let properties: Map<String, Value> = if size <= MAX_EXAMPLE_PROPERTIES {
        props.clone()
    } else {
        props
            .iter()
            .filter(|(k, v)| k.starts_with('$') && v.to_string().len() <= 1024)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let mut example = Map::new();
    example.insert("event".into(), Value::from(ctx.event));
    example.insert("distinct_id".into(), Value::from(ctx.distinct_id));
    example.insert("properties".into(), Value::Object(properties));
    if let Some(chain) = ctx.chain() {
        example.insert("elements_chain".into(), Value::from(chain));
    }
    Value::Object(example)
}

fn sort_shapes(v: &mut [UnmatchedShape]) {
    v.sort_by(|a, b| {
        b.count.cmp(&a.count).then_with(|| {
            (&a.event, &a.path, &a.element_text, &a.element_classes).cmp(&(
                &b.event,
                &b.path,
                &b.element_text,
                &b.element_classes,
            ))
        })
    });
}
