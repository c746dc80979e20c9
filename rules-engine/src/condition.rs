//! Compiled conditions and the per-event view they test.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;
use std::sync::Arc;

use regex::{Regex, RegexBuilder};
use rustc_hash::FxHashSet;
use serde_json::{Map, Value};

use crate::elements::{Element, Elements};
use crate::engine::EventInput;
use crate::model::{MatcherOps, MatcherSpec, Scalar};

/// Compiled size limit of one regex (bytes of program).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Longest regex source accepted.
pub const MAX_REGEX_LEN: usize = 4096;

/// A dotted property path (`$set.email`, `items.0.sku`), split once at load.
#[derive(Debug, Clone)]
pub struct PropPath {
    full: Box<str>,
    segments: Box<[Box<str>]>,
    /// Per-event cache slot, for the paths the rule set reads most.
    pub slot: Option<u8>,
}

/// How many property paths get a per-event cache slot.
pub const PROP_SLOTS: usize = 8;

impl PropPath {
    pub fn new(path: &str) -> Result<PropPath, String> {
        if path.is_empty() {
            return Err("empty property path".into());
        }
        Ok(PropPath {
            full: path.into(),
            segments: path.split('.').map(Into::into).collect(),
            slot: None,
        })
    }

    /// Looks the path up; a key that literally contains dots wins over nesting.
    pub fn full(&self) -> &str {
        &self.full
    }

    /// The top-level key the path starts with.
    pub fn first_key(&self) -> &str {
        self.segments.first().map_or(&self.full, |k| k)
    }

    /// Whether the path is one key (no nesting).
    pub fn is_single(&self) -> bool {
        self.segments.len() == 1
    }

    pub fn lookup<'a>(&self, map: &'a Map<String, Value>) -> Option<&'a Value> {
        if let Some(v) = map.get(&*self.full) {
            return Some(v);
        }
        if self.segments.len() < 2 {
            return None;
        }
        let mut cur = map.get(&*self.segments[0])?;
        for seg in &self.segments[1..] {
            cur = match cur {
                Value::Object(m) => m.get(&**seg)?,
                Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }
}

impl fmt::Display for PropPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// A field of an element.
#[derive(Debug, Clone)]
pub enum ElementField {
    Tag,
    Text,
    Id,
    Href,
    Classes,
    Attribute(Box<str>),
}

impl ElementField {
    pub fn get<'a>(&self, el: &Element<'a>) -> Option<Cow<'a, str>> {
        match self {
            ElementField::Tag => el.tag(),
            ElementField::Text => el.text(),
            ElementField::Id => el.id(),
            ElementField::Href => el.href(),
            ElementField::Classes => el.classes(),
            ElementField::Attribute(a) => el.attribute(a),
        }
    }
}

impl fmt::Display for ElementField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElementField::Tag => f.write_str("tag"),
            ElementField::Text => f.write_str("text"),
            ElementField::Id => f.write_str("id"),
            ElementField::Href => f.write_str("href"),
            ElementField::Classes => f.write_str("classes"),
            ElementField::Attribute(a) => write!(f, "attributes.{a}"),
        }
    }
}

/// What a condition or a template variable reads from the event.
#[derive(Debug, Clone)]
pub enum Subject {
    Event,
    DistinctId,
    Path,
    Url,
    Host,
    Property(PropPath),
    Person(PropPath),
    Element(ElementField),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Event => f.write_str("event"),
            Subject::DistinctId => f.write_str("distinct_id"),
            Subject::Path => f.write_str("path"),
            Subject::Url => f.write_str("url"),
            Subject::Host => f.write_str("host"),
            Subject::Property(p) => write!(f, "properties.{p}"),
            Subject::Person(p) => write!(f, "person.{p}"),
            Subject::Element(e) => write!(f, "element.{e}"),
        }
    }
}

/// A value read from an event.
#[derive(Debug, Clone)]
pub enum Val<'a> {
    Str(Cow<'a, str>),
    Json(&'a Value),
}

impl<'a> Val<'a> {
    /// The value as text; `None` for null. Objects and arrays render as compact JSON.
    pub fn text(&self) -> Option<Cow<'a, str>> {
        match self {
            Val::Str(s) => Some(s.clone()),
            Val::Json(v) => json_text(v),
        }
    }

    fn number(&self) -> Option<f64> {
        match self {
            Val::Str(s) => s.trim().parse().ok(),
            Val::Json(Value::Number(n)) => n.as_f64(),
            Val::Json(Value::String(s)) => s.trim().parse().ok(),
            Val::Json(_) => None,
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Val::Json(Value::Null))
    }
}

pub fn json_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Null => None,
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        other => Some(Cow::Owned(other.to_string())),
    }
}

/// Every top-level property key a rule set can read: those its rules name, [`ENGINE_KEYS`] and
/// `attr__*`. The worker decodes only these of an event.
#[derive(Debug, Clone, Default)]
pub struct PropertyKeys {
    named: FxHashSet<Box<str>>,
}

/// Property keys the engine reads whatever the rules say: the page, the elements, and the clicked
/// element's own properties (its attributes being the `attr__NAME` keys).
pub const ENGINE_KEYS: [&str; 8] = [
    "$pathname",
    "$current_url",
    "$host",
    "$elements_chain",
    "$elements",
    "$el_text",
    "$el_tag_name",
    "tag_name",
];

impl PropertyKeys {
    /// Both the whole path (which [`PropPath::lookup`] tries first as one key) and its first key.
    pub fn insert(&mut self, path: &PropPath) {
        self.named.insert(path.full().into());
        self.named.insert(path.first_key().into());
    }

    /// Whether describing an event may read its property `key`.
    pub fn reads(&self, key: &str) -> bool {
        key.starts_with("attr__") || ENGINE_KEYS.contains(&key) || self.named.contains(key)
    }
}

/// The property keys a rule set reads most; each is looked up at most once per event.
#[derive(Debug, Clone, Default)]
pub struct PropSlots {
    keys: Vec<Box<str>>,
}

impl PropSlots {
    pub fn new(keys: Vec<Box<str>>) -> PropSlots {
        PropSlots { keys }
    }
}

/// The per-event view conditions and templates read; derived fields are computed once, lazily.
pub struct EventCtx<'a> {
    pub event: &'a str,
    pub distinct_id: &'a str,
    pub props: &'a Map<String, Value>,
    /// All the properties as JSON text, when `props` holds only the keys the rules read.
    pub props_text: Option<&'a str>,
    pub person: Option<&'a Map<String, Value>>,
    chain: Option<&'a str>,
    slots: &'a PropSlots,
    /// Values of the slotted property keys, each looked up on first use.
    slot_values: [OnceCell<Option<&'a Value>>; PROP_SLOTS],
    path: OnceCell<Option<&'a str>>,
    elements: OnceCell<Elements<'a>>,
    clicked: OnceCell<Option<Element<'a>>>,
    text: OnceCell<Option<Cow<'a, str>>>,
}

impl<'a> EventCtx<'a> {
    /// The view of `ev`, caching the values of `slots`.
    pub fn new(ev: &EventInput<'a>, slots: &'a PropSlots) -> Self {
        EventCtx {
            event: ev.event,
            distinct_id: ev.distinct_id,
            props: ev.properties,
            props_text: ev.properties_text,
            person: ev.person_properties,
            chain: ev.elements_chain,
            slots,
            slot_values: Default::default(),
            path: OnceCell::new(),
            elements: OnceCell::new(),
            clicked: OnceCell::new(),
            text: OnceCell::new(),
        }
    }

    /// An event named `event` with only `props`.
    #[cfg(test)]
    pub fn of_props(event: &'a str, props: &'a Map<String, Value>) -> Self {
        static NO_SLOTS: PropSlots = PropSlots { keys: Vec::new() };
        let ev = EventInput {
            event,
            distinct_id: "u1",
            properties: props,
            properties_text: None,
            elements_chain: None,
            person_properties: None,
        };
        Self::new(&ev, &NO_SLOTS)
    }

    /// The value of slotted property key `i`, looked up once per event.
    fn slot(&self, i: usize) -> Option<&'a Value> {
        *self.slot_values[i].get_or_init(|| {
            let key = self.slots.keys.get(i)?;
            self.props.get(&**key)
        })
    }

    /// The page path: `$pathname`, else the path of `$current_url`; no query, no trailing `/`.
    pub fn path(&self) -> Option<&'a str> {
        *self.path.get_or_init(|| {
            let p = match self.props.get("$pathname") {
                Some(Value::String(p)) if !p.is_empty() => p.as_str(),
                _ => url_path(self.url()?)?,
            };
            Some(normalise_path(p))
        })
    }

    /// The `elements_chain` given with the event (not the one in its properties).
    pub fn chain(&self) -> Option<&'a str> {
        self.chain
    }

    pub fn url(&self) -> Option<&'a str> {
        self.props.get("$current_url").and_then(Value::as_str)
    }

    pub fn host(&self) -> Option<&'a str> {
        if let Some(Value::String(h)) = self.props.get("$host") {
            return Some(h);
        }
        split_url(self.url()?).map(|(host, _)| host)
    }

    pub fn elements(&self) -> Elements<'a> {
        *self.elements.get_or_init(|| {
            let chain = self
                .chain
                .or_else(|| self.props.get("$elements_chain").and_then(Value::as_str));
            let array = match chain {
                Some(c) if !c.is_empty() => None,
                _ => self.props.get("$elements"),
            };
            Elements::from_parts(chain, array, self.props)
        })
    }

    /// The clicked element.
    pub fn clicked(&self) -> Option<Element<'a>> {
        *self.clicked.get_or_init(|| self.elements().first())
    }

    /// A field of the clicked element; text falls back to `$el_text`.
    pub fn element_field(&self, f: &ElementField) -> Option<Cow<'a, str>> {
        if let ElementField::Text = f {
            return self
                .text
                .get_or_init(|| {
                    self.clicked().and_then(|e| e.text()).or_else(|| {
                        self.props
                            .get("$el_text")
                            .and_then(json_text)
                            .and_then(crate::elements::tidy_text)
                    })
                })
                .clone();
        }
        self.clicked().and_then(|e| f.get(&e))
    }

    pub fn get(&self, s: &Subject) -> Option<Val<'a>> {
        match s {
            Subject::Event => Some(Val::Str(Cow::Borrowed(self.event))),
            Subject::DistinctId => Some(Val::Str(Cow::Borrowed(self.distinct_id))),
            Subject::Path => self.path().map(|p| Val::Str(Cow::Borrowed(p))),
            Subject::Url => self.url().map(|p| Val::Str(Cow::Borrowed(p))),
            Subject::Host => self.host().map(|p| Val::Str(Cow::Borrowed(p))),
            Subject::Property(p) => match p.slot {
                Some(i) => self.slot(usize::from(i)),
                None => p.lookup(self.props),
            }
            .map(Val::Json),
            Subject::Person(p) => self.person.and_then(|m| p.lookup(m)).map(Val::Json),
            Subject::Element(f) => self.element_field(f).map(Val::Str),
        }
    }
}

/// The path of a URL or of a bare path, without query or fragment, `/` when empty:
/// `https://x.test/a/?q` → `/a/`, `https://x.test?q=/b` → `/`, `/a#b` → `/a`.
pub fn url_path(url: &str) -> Option<&str> {
    let path = match split_url(url) {
        Some((_, after_host)) => after_host,
        None if url.starts_with('/') => url,
        None => return None,
    };
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    Some(if path.is_empty() { "/" } else { path })
}

/// An absolute URL's host and what follows it: `https://x.test/a?q` → (`x.test`, `/a?q`).
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = &url[url.find("://")? + 3..];
    Some(rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len())))
}

fn normalise_path(p: &str) -> &str {
    let b = p.as_bytes();
    let mut end = b
        .iter()
        .position(|&c| c == b'?' || c == b'#')
        .unwrap_or(b.len());
    while end > 0 && b[end - 1] == b'/' {
        end -= 1;
    }
    if end == 0 { "/" } else { &p[..end] }
}

/// A literal compared with event values.
#[derive(Debug, Clone)]
pub struct Literal {
    text: Box<str>,
    number: Option<f64>,
    boolean: Option<bool>,
}

impl Literal {
    fn new(s: &Scalar) -> Literal {
        match s {
            Scalar::Str(t) => Literal {
                text: t.as_str().into(),
                number: None,
                boolean: None,
            },
            Scalar::Num(n) => Literal {
                text: fmt_num(*n).into(),
                number: Some(*n),
                boolean: None,
            },
            Scalar::Bool(b) => Literal {
                text: if *b { "true" } else { "false" }.into(),
                number: None,
                boolean: Some(*b),
            },
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn matches(&self, v: &Val<'_>) -> bool {
        match v {
            Val::Str(s) => **s == *self.text,
            Val::Json(Value::String(s)) => **s == *self.text,
            Val::Json(Value::Number(n)) => match self.number {
                Some(x) => n.as_f64() == Some(x),
                None => self
                    .text
                    .parse::<f64>()
                    .ok()
                    .is_some_and(|x| n.as_f64() == Some(x)),
            },
            Val::Json(Value::Bool(b)) => self.boolean == Some(*b) || *self.text == *bool_str(*b),
            Val::Json(_) => false,
        }
    }
}

fn bool_str(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

fn fmt_num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// One compiled test of a value.
#[derive(Debug, Clone)]
pub enum Op {
    Equals(Literal),
    OneOf(Box<[Literal]>),
    Regex(Arc<Regex>, Prefixes),
    Exists(bool),
    Contains(Box<str>),
    StartsWith(Box<str>),
    EndsWith(Box<str>),
    /// The case-insensitive tests hold the operand lowercased.
    IEquals(Box<str>),
    IContains(Box<str>),
    IStartsWith(Box<str>),
    IEndsWith(Box<str>),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
}

/// A compiled value test: all its operators must hold.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub ops: Box<[Op]>,
}

/// Builds a regex under the engine's size limits.
pub fn build_regex(src: &str) -> Result<Regex, String> {
    if src.len() > MAX_REGEX_LEN {
        return Err(format!("regex longer than {MAX_REGEX_LEN} characters"));
    }
    RegexBuilder::new(src)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(2 * REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid regex {src:?}: {e}"))
}

/// Literals one of which every match must start with, for a regex anchored with `^`; lets most
/// values be rejected with a `starts_with` instead of running the regex.
pub type Prefixes = Option<Box<[Box<[u8]>]>>;

fn anchored_prefixes(src: &str) -> Prefixes {
    use regex_syntax::hir::{Look, literal::Extractor};
    let hir = regex_syntax::Parser::new().parse(src).ok()?;
    if !hir.properties().look_set_prefix().contains(Look::Start) {
        return None;
    }
    let mut ex = Extractor::new();
    ex.limit_total(64);
    let seq = ex.extract(&hir);
    let lits = seq.literals()?;
    if lits.is_empty() || lits.iter().any(|l| l.as_bytes().is_empty()) {
        return None;
    }
    Some(lits.iter().map(|l| l.as_bytes().into()).collect())
}

impl Matcher {
    pub fn compile(spec: &MatcherSpec) -> Result<Matcher, String> {
        let ops = match spec {
            MatcherSpec::Equals(s) => vec![Op::Equals(Literal::new(s))],
            MatcherSpec::OneOf(list) => vec![Op::OneOf(list.iter().map(Literal::new).collect())],
            MatcherSpec::Ops(o) => Self::compile_ops(o)?,
        };
        Ok(Matcher { ops: ops.into() })
    }

    fn compile_ops(o: &MatcherOps) -> Result<Vec<Op>, String> {
        let mut ops = Vec::new();
        if let Some(e) = o.exists {
            ops.push(Op::Exists(e));
        }
        if let Some(s) = &o.equals {
            ops.push(Op::Equals(Literal::new(s)));
        }
        if let Some(l) = &o.one_of {
            ops.push(Op::OneOf(l.iter().map(Literal::new).collect()));
        }
        for (v, f) in [
            (&o.contains, Op::Contains as fn(Box<str>) -> Op),
            (&o.starts_with, Op::StartsWith),
            (&o.ends_with, Op::EndsWith),
        ] {
            if let Some(s) = v {
                ops.push(f(s.as_str().into()));
            }
        }
        for (v, f) in [
            (&o.iequals, Op::IEquals as fn(Box<str>) -> Op),
            (&o.icontains, Op::IContains),
            (&o.istarts_with, Op::IStartsWith),
            (&o.iends_with, Op::IEndsWith),
        ] {
            if let Some(s) = v {
                ops.push(f(s.to_lowercase().into()));
            }
        }
        for (v, f) in [
            (o.gt, Op::Gt as fn(f64) -> Op),
            (o.gte, Op::Gte),
            (o.lt, Op::Lt),
            (o.lte, Op::Lte),
        ] {
            if let Some(x) = v {
                if !x.is_finite() {
                    return Err("numeric comparison with a non-finite number".into());
                }
                ops.push(f(x));
            }
        }
        if let Some(r) = &o.regex {
            ops.push(Op::Regex(Arc::new(build_regex(r)?), anchored_prefixes(r)));
        }
        if ops.is_empty() {
            return Err("empty matcher: give a value or an operator".into());
        }
        if o.exists == Some(false) && ops.len() > 1 {
            return Err("`exists: false` cannot be combined with other operators".into());
        }
        Ok(ops)
    }

    /// Tests a value (`None` = absent).
    pub fn test(&self, v: Option<&Val<'_>>) -> bool {
        let v = v.filter(|v| !v.is_null());
        self.ops.iter().all(|op| op_test(op, v))
    }

    /// The regexes of this matcher that define named groups.
    pub fn capture_regexes(&self) -> impl Iterator<Item = &Arc<Regex>> {
        self.ops.iter().filter_map(|op| match op {
            Op::Regex(r, _) if r.capture_names().flatten().next().is_some() => Some(r),
            _ => None,
        })
    }

    /// The exact names this matcher accepts, if it is only equals/one_of on strings.
    pub fn exact_names(&self) -> Option<Vec<&str>> {
        match &*self.ops {
            [Op::Equals(l)] => Some(vec![l.as_str()]),
            [Op::OneOf(ls)] => Some(ls.iter().map(Literal::as_str).collect()),
            _ => None,
        }
    }

    /// The literal prefixes of this matcher's values, if it is a single anchored regex that has them.
    pub fn regex_prefixes(&self) -> Option<&[Box<[u8]>]> {
        match &*self.ops {
            [Op::Regex(_, Some(p))] => Some(p),
            _ => None,
        }
    }

    /// The pattern, if this matcher is a single regex.
    pub fn only_regex(&self) -> Option<&Regex> {
        match &*self.ops {
            [Op::Regex(r, _)] => Some(r),
            _ => None,
        }
    }
}

fn op_test(op: &Op, v: Option<&Val<'_>>) -> bool {
    if let Op::Exists(want) = op {
        return v.is_some() == *want;
    }
    let Some(v) = v else { return false };
    match op {
        Op::Exists(_) => unreachable!("handled above"),
        Op::Equals(l) => l.matches(v),
        Op::OneOf(ls) => ls.iter().any(|l| l.matches(v)),
        Op::Regex(r, prefixes) => v.text().is_some_and(|t| {
            prefixes
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| t.as_bytes().starts_with(p)))
                && r.is_match(&t)
        }),
        Op::Contains(s) => v.text().is_some_and(|t| t.contains(&**s)),
        Op::StartsWith(s) => v.text().is_some_and(|t| t.starts_with(&**s)),
        Op::EndsWith(s) => v.text().is_some_and(|t| t.ends_with(&**s)),
        Op::IEquals(s) => lower(v).is_some_and(|t| *t == **s),
        Op::IContains(s) => lower(v).is_some_and(|t| t.contains(&**s)),
        Op::IStartsWith(s) => lower(v).is_some_and(|t| t.starts_with(&**s)),
        Op::IEndsWith(s) => lower(v).is_some_and(|t| t.ends_with(&**s)),
        Op::Gt(x) => v.number().is_some_and(|n| n > *x),
        Op::Gte(x) => v.number().is_some_and(|n| n >= *x),
        Op::Lt(x) => v.number().is_some_and(|n| n < *x),
        Op::Lte(x) => v.number().is_some_and(|n| n <= *x),
    }
}

/// The value's text lowercased (borrowed when it has no uppercase letters).
fn lower<'a>(v: &Val<'a>) -> Option<Cow<'a, str>> {
    let t = v.text()?;
    if t.chars().any(char::is_uppercase) {
        Some(Cow::Owned(t.to_lowercase()))
    } else {
        Some(t)
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, op) in self.ops.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            match op {
                Op::Equals(l) => write!(f, "equals {:?}", l.as_str())?,
                Op::OneOf(ls) => {
                    let v: Vec<&str> = ls.iter().map(Literal::as_str).collect();
                    write!(f, "one of {v:?}")?
                }
                Op::Regex(r, _) => write!(f, "matches /{}/", r.as_str())?,
                Op::Exists(true) => f.write_str("exists")?,
                Op::Exists(false) => f.write_str("is absent")?,
                Op::Contains(s) => write!(f, "contains {s:?}")?,
                Op::StartsWith(s) => write!(f, "starts with {s:?}")?,
                Op::EndsWith(s) => write!(f, "ends with {s:?}")?,
                Op::IEquals(s) => write!(f, "equals {s:?} ignoring case")?,
                Op::IContains(s) => write!(f, "contains {s:?} ignoring case")?,
                Op::IStartsWith(s) => write!(f, "starts with {s:?} ignoring case")?,
                Op::IEndsWith(s) => write!(f, "ends with {s:?} ignoring case")?,
                Op::Gt(x) => write!(f, "> {x}")?,
                Op::Gte(x) => write!(f, ">= {x}")?,
                Op::Lt(x) => write!(f, "< {x}")?,
                Op::Lte(x) => write!(f, "<= {x}")?,
            }
        }
        Ok(())
    }
}

/// A test on one element.
#[derive(Debug, Clone)]
pub enum ElementCondition {
    Field(ElementField, Matcher),
    Classes(Box<[Box<str>]>),
}

impl ElementCondition {
    fn test(&self, el: &Element<'_>) -> bool {
        match self {
            ElementCondition::Field(f, m) => m.test(f.get(el).map(Val::Str).as_ref()),
            ElementCondition::Classes(cs) => cs.iter().all(|c| el.has_class(c)),
        }
    }
}

/// A compiled condition of a rule.
#[derive(Debug, Clone)]
pub enum Condition {
    /// A field of the event (name, path, property, clicked element field…).
    Field(Subject, Matcher),
    /// CSS classes the clicked element must carry.
    Classes(Box<[Box<str>]>),
    /// Some ancestor of the clicked element satisfies all these.
    Inside(Box<[ElementCondition]>),
    /// The clicked element itself or some ancestor satisfies all these.
    Closest(Box<[ElementCondition]>),
    /// At least one of the groups holds.
    Any(Box<[Box<[Condition]>]>),
    /// The group does not hold.
    Not(Box<[Condition]>),
}

impl Condition {
    pub fn test(&self, ctx: &EventCtx<'_>) -> bool {
        match self {
            Condition::Field(s, m) => m.test(ctx.get(s).as_ref()),
            Condition::Classes(cs) => ctx
                .clicked()
                .is_some_and(|el| cs.iter().all(|c| el.has_class(c))),
            Condition::Inside(conds) => ctx
                .elements()
                .iter()
                .skip(1)
                .any(|el| conds.iter().all(|c| c.test(&el))),
            Condition::Closest(conds) => ctx
                .elements()
                .iter()
                .any(|el| conds.iter().all(|c| c.test(&el))),
            Condition::Any(groups) => groups.iter().any(|g| all(g, ctx)),
            Condition::Not(g) => !all(g, ctx),
        }
    }

    /// Rough cost, so cheap tests run first.
    pub fn cost(&self) -> u32 {
        match self {
            Condition::Field(s, m) => {
                let base = match s {
                    Subject::Event | Subject::DistinctId => 1,
                    Subject::Property(_) | Subject::Person(_) | Subject::Url | Subject::Host => 2,
                    Subject::Path => 3,
                    Subject::Element(_) => 4,
                };
                let regex = m.ops.iter().any(|o| matches!(o, Op::Regex(..)));
                base + if regex { 4 } else { 0 }
            }
            Condition::Classes(_) => 5,
            Condition::Inside(_) | Condition::Closest(_) => 12,
            Condition::Any(g) => 6 + g.len() as u32,
            Condition::Not(g) => 6 + g.len() as u32,
        }
    }

    /// Explains a failed test: what was required and what the event had.
    pub fn explain_failure(&self, ctx: &EventCtx<'_>) -> String {
        match self {
            Condition::Field(s, m) => {
                let actual = ctx.get(s).and_then(|v| v.text()).map(|t| format!("{t:?}"));
                format!(
                    "{s} {m} — event has {}",
                    actual.as_deref().unwrap_or("nothing")
                )
            }
            Condition::Classes(cs) => format!(
                "element has classes {:?} — event has {}",
                cs,
                ctx.clicked()
                    .and_then(|e| e.classes())
                    .map(|c| format!("{c:?}"))
                    .unwrap_or_else(|| "no element classes".into())
            ),
            Condition::Inside(_) => "no ancestor element satisfies `inside`".into(),
            Condition::Closest(_) => {
                "neither the clicked element nor an ancestor satisfies `closest`".into()
            }
            Condition::Any(_) => "none of the `any` groups holds".into(),
            Condition::Not(_) => "the `not` group holds".into(),
        }
    }
}

/// Visits every subject of the conditions, nested groups included.
pub fn for_each_subject_mut(conds: &mut [Condition], f: &mut impl FnMut(&mut Subject)) {
    for c in conds {
        match c {
            Condition::Field(s, _) => f(s),
            Condition::Any(groups) => {
                for g in groups.iter_mut() {
                    for_each_subject_mut(g, f);
                }
            }
            Condition::Not(g) => for_each_subject_mut(g, f),
            Condition::Classes(_) | Condition::Inside(_) | Condition::Closest(_) => {}
        }
    }
}

/// Whether all conditions hold.
pub fn all(conds: &[Condition], ctx: &EventCtx<'_>) -> bool {
    conds.iter().all(|c| c.test(ctx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_are_normalised() {
        let path = |props: Value| {
            let props = props.as_object().cloned().unwrap();
            EventCtx::of_props("e", &props).path().map(str::to_owned)
        };
        for url in [
            "https://x.com/pricing/?a=1",
            "/pricing/#x",
            "https://x.com/pricing//",
        ] {
            assert_eq!(
                path(json!({ "$current_url": url })).as_deref(),
                Some("/pricing")
            );
        }
        assert_eq!(
            path(json!({"$current_url": "https://x.com?q=/a"})).as_deref(),
            Some("/")
        );
        assert_eq!(
            path(json!({"$pathname": "/a/?b", "$current_url": "https://x.com/c"})).as_deref(),
            Some("/a")
        );
        assert_eq!(path(json!({"$current_url": "nonsense"})), None);
        assert_eq!(normalise_path("/pricing/?a=1"), "/pricing");
        assert_eq!(normalise_path("/"), "/");
    }

    #[test]
    fn nested_property_paths() {
        let m = json!({"a": {"b": [{"c": 5}]}, "x.y": 1});
        let m = m.as_object().unwrap();
        assert_eq!(PropPath::new("a.b.0.c").unwrap().lookup(m), Some(&json!(5)));
        assert_eq!(PropPath::new("x.y").unwrap().lookup(m), Some(&json!(1)));
        assert_eq!(PropPath::new("a.z").unwrap().lookup(m), None);
    }

    #[test]
    fn anchored_regexes_get_prefixes() {
        let p = anchored_prefixes("^/(pricing|plans)(/|$)").unwrap();
        assert!(p.len() >= 2);
        assert!(anchored_prefixes("/pricing").is_none());
        assert!(anchored_prefixes("(?m)^x").is_none());
        assert!(anchored_prefixes("^\\s*x").is_none());
        let m = Matcher::compile(&MatcherSpec::Ops(Box::new(MatcherOps {
            regex: Some("^/(pricing|plans)(/|$)".into()),
            ..Default::default()
        })))
        .unwrap();
        for (path, want) in [
            ("/pricing", true),
            ("/plans/x", true),
            ("/pricingx", false),
            ("/docs", false),
        ] {
            assert_eq!(m.test(Some(&Val::Str(path.into()))), want, "{path}");
        }
    }

    #[test]
    fn literal_equality_crosses_types() {
        let n = json!(3);
        let s = json!("3");
        let l = Literal::new(&Scalar::Num(3.0));
        assert!(l.matches(&Val::Json(&n)));
        assert!(l.matches(&Val::Json(&s)));
        let l = Literal::new(&Scalar::Str("3".into()));
        assert!(l.matches(&Val::Json(&n)));
    }
}
