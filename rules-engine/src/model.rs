//! The YAML shape of a rule file, as authors write it. Unknown keys are errors. The same types
//! generate `rules/schema.json` ([`crate::schema`]), so their doc comments are what editors show.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor, value::MapAccessDeserializer};
use serde_json::{Map, Value};

/// A rule file (`rules/*.yaml`): intents the summary can mention, and rules that turn events
/// into sentences and intent weights.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Clickstream rule file")]
pub struct RuleFile {
    /// `generic`: this file's rules are tried after the rules of every `specific` file, whatever
    /// their priorities (the shipped `posthog.yaml` is generic, so your files win over it).
    /// Default `specific`.
    #[serde(default)]
    pub tier: Tier,
    /// Intents the summary can mention.
    #[serde(default)]
    pub intents: Vec<IntentSpec>,
    /// Rules, tried in order of tier, priority, file name and position.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// Which rules are tried first: every `specific` rule before any `generic` one.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Your own translations (the default).
    #[default]
    Specific,
    /// Generic translations of standard events, tried after every specific rule.
    Generic,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Specific => "specific",
            Tier::Generic => "generic",
        }
    }
}

/// An intent the summary can mention, e.g. `purchase`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IntentSpec {
    /// Letters, digits, `_` or `-`; unique across all files.
    pub name: String,
    /// The sentence the summary uses, e.g. "User showing Purchase Intent."
    pub summary: String,
    /// How fast a signal fades: `30m`, `12h`, `7d`, or seconds.
    #[serde(default)]
    pub half_life: Option<DurationSpec>,
    /// A note for authors.
    #[serde(default)]
    pub description: Option<String>,
}

/// A rule: conditions, then a sentence (`say`), intent weights (`intents`), or `ignore: true`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique across all files: letters, digits, `_`, `-` or `.`.
    pub id: String,
    /// A note for authors.
    #[serde(default)]
    pub description: Option<String>,
    /// Conditions; all must hold.
    #[serde(default)]
    pub when: WhenSpec,
    /// The sentence, with `{{ value | filter }}` insertions. A rule without `say` (and without
    /// `ignore`) only adds intents.
    #[serde(default)]
    pub say: Option<String>,
    /// Drop matching events from descriptions and from the context: they are still stored, add
    /// no intents and are not reported as unmatched. Takes neither `say` nor `intents`.
    #[serde(default)]
    pub ignore: bool,
    /// Weights added to declared intents, e.g. `{ purchase: 3 }`.
    #[serde(default)]
    pub intents: BTreeMap<String, f64>,
    /// Higher is tried first within the file's tier; default 0.
    #[serde(default)]
    pub priority: i32,
    /// Events and what the whole rule set must say about them; run by `worker rules check`.
    #[serde(default)]
    pub examples: Vec<ExampleSpec>,
}

/// Conditions; all present ones must hold.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WhenSpec {
    /// The event name.
    #[serde(default)]
    pub event: Option<MatcherSpec>,
    /// The page path: `$pathname`, else the path of `$current_url`; no query, no trailing `/`.
    #[serde(default)]
    pub path: Option<MatcherSpec>,
    /// `$current_url` as sent.
    #[serde(default)]
    pub url: Option<MatcherSpec>,
    /// Property paths (dots for nesting: `$set.email`) and their tests.
    #[serde(default)]
    pub properties: BTreeMap<String, MatcherSpec>,
    /// The same, on the person properties the event carries.
    #[serde(default)]
    pub person: BTreeMap<String, MatcherSpec>,
    /// The clicked element (`$autocapture`, `$rageclick`).
    #[serde(default)]
    pub element: Option<ElementSpec>,
    /// Holds when some ancestor of the clicked element matches (not the element itself).
    #[serde(default)]
    pub inside: Option<ElementSpec>,
    /// Holds when the clicked element itself or one of its ancestors matches.
    #[serde(default)]
    pub closest: Option<ElementSpec>,
    /// Groups of conditions; holds when at least one group holds. Never empty.
    #[serde(default)]
    pub any: Option<Vec<WhenSpec>>,
    /// A group of conditions that must not hold.
    #[serde(default)]
    pub not: Option<Box<WhenSpec>>,
}

/// Conditions on an element. Text is compared trimmed, whitespace runs as one space.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ElementSpec {
    /// The tag name (`button`, `a`, `nav`).
    #[serde(default)]
    pub tag: Option<MatcherSpec>,
    /// The visible text (falls back to `$el_text`).
    #[serde(default)]
    pub text: Option<MatcherSpec>,
    /// The `id` attribute.
    #[serde(default)]
    pub id: Option<MatcherSpec>,
    /// The link target.
    #[serde(default)]
    pub href: Option<MatcherSpec>,
    /// CSS classes that must all be present: `.a.b`, `a b` or a list.
    #[serde(default)]
    pub classes: Option<ClassesSpec>,
    /// Any HTML attribute (PostHog's `attr__NAME`), by name.
    #[serde(default)]
    pub attributes: BTreeMap<String, MatcherSpec>,
}

/// An example event and what the whole rule set must say about it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExampleSpec {
    /// The event name.
    pub event: String,
    #[serde(default)]
    pub distinct_id: Option<String>,
    #[serde(default)]
    pub properties: Map<String, Value>,
    /// PostHog's DOM path of a click.
    #[serde(default)]
    pub elements_chain: Option<String>,
    #[serde(default)]
    pub person_properties: Option<Map<String, Value>>,
    /// The expected sentence.
    #[serde(default)]
    pub say: Option<String>,
    /// Exactly these intents are expected.
    #[serde(default)]
    pub intents: Option<Vec<String>>,
    /// The rule expected to describe (or ignore) the event; defaults to the rule carrying the
    /// example when that rule has `say` or `ignore`.
    #[serde(default)]
    pub rule: Option<String>,
    /// `true`: a rule with `ignore: true` must drop the event.
    #[serde(default)]
    pub ignored: Option<bool>,
    /// `true`: no rule may describe the event (it gets the fallback sentence).
    #[serde(default)]
    pub fallback: Option<bool>,
}

/// A literal to compare with: a string, number or boolean.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Str(String),
    Num(f64),
    Bool(bool),
}

/// A value test: a bare value (equals), a list (one of), or a map of operators.
#[derive(Debug)]
pub enum MatcherSpec {
    Equals(Scalar),
    OneOf(Vec<Scalar>),
    Ops(Box<MatcherOps>),
}

/// Operators of a value test; all present ones must hold.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatcherOps {
    /// Equal to this value (numbers and booleans compare by value: 3 equals "3").
    #[serde(default)]
    pub equals: Option<Scalar>,
    /// Equal to one of these values.
    #[serde(default)]
    pub one_of: Option<Vec<Scalar>>,
    /// Equal, ignoring case.
    #[serde(default)]
    pub iequals: Option<String>,
    /// A regex search (Rust syntax; unanchored unless you write `^` / `$`).
    #[serde(default)]
    pub regex: Option<String>,
    /// `true`: present and not null; `false`: absent or null (alone).
    #[serde(default)]
    pub exists: Option<bool>,
    #[serde(default)]
    pub contains: Option<String>,
    /// Contains, ignoring case.
    #[serde(default)]
    pub icontains: Option<String>,
    #[serde(default)]
    pub starts_with: Option<String>,
    /// Starts with, ignoring case.
    #[serde(default)]
    pub istarts_with: Option<String>,
    #[serde(default)]
    pub ends_with: Option<String>,
    /// Ends with, ignoring case.
    #[serde(default)]
    pub iends_with: Option<String>,
    /// Greater than (a number, or a string that parses as one).
    #[serde(default, deserialize_with = "number")]
    #[schemars(with = "Option<NumberSpec>")]
    pub gt: Option<f64>,
    #[serde(default, deserialize_with = "number")]
    #[schemars(with = "Option<NumberSpec>")]
    pub gte: Option<f64>,
    #[serde(default, deserialize_with = "number")]
    #[schemars(with = "Option<NumberSpec>")]
    pub lt: Option<f64>,
    #[serde(default, deserialize_with = "number")]
    #[schemars(with = "Option<NumberSpec>")]
    pub lte: Option<f64>,
}

/// A number, written as one or as a string that parses as one (`100`, `"100"`).
#[allow(dead_code)]
pub struct NumberSpec;

impl JsonSchema for NumberSpec {
    fn schema_name() -> Cow<'static, str> {
        "Number".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A number, or a string that parses as one.",
            "type": ["number", "string"]
        })
    }
}

/// `gt: 100` or `gt: "100"`; any other string is an error naming it.
fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    match Scalar::deserialize(d)? {
        Scalar::Num(n) => Ok(Some(n)),
        Scalar::Str(s) => s
            .trim()
            .parse::<f64>()
            .map(Some)
            .map_err(|_| de::Error::custom(format!("{s:?} is not a number"))),
        Scalar::Bool(b) => Err(de::Error::custom(format!("{b} is not a number"))),
    }
}

/// CSS classes that must all be present: `.btn.btn-primary`, `btn-primary`, or a list.
#[derive(Debug, Default)]
pub struct ClassesSpec(pub Vec<String>);

/// A duration in seconds, written `90`, `30s`, `15m`, `12h`, `7d` or `2w`.
#[derive(Debug, Clone, Copy)]
pub struct DurationSpec(pub f64);

/// A visitor's `visit_*` for strings, booleans and numbers: each read as a [`Scalar`], then `$wrap`ped.
macro_rules! visit_scalars {
    ($wrap:expr) => {
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok($wrap(Scalar::Str(v.to_owned())))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok($wrap(Scalar::Bool(v)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            self.visit_f64(v as f64)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            self.visit_f64(v as f64)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok($wrap(Scalar::Num(v)))
        }
    };
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            visit_scalars!(std::convert::identity);
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for MatcherSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MatcherSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value, a list of values, or a map of operators (equals, one_of, iequals, regex, exists, contains, icontains, starts_with, istarts_with, ends_with, iends_with, gt, gte, lt, lte)")
            }
            visit_scalars!(MatcherSpec::Equals);
            fn visit_unit<E: de::Error>(self) -> Result<MatcherSpec, E> {
                Err(E::custom("null is not a matcher; write `exists: false`"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MatcherSpec, A::Error> {
                let mut items = Vec::new();
                while let Some(s) = seq.next_element::<Scalar>()? {
                    items.push(s);
                }
                Ok(MatcherSpec::OneOf(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MatcherSpec, A::Error> {
                MatcherOps::deserialize(MapAccessDeserializer::new(map))
                    .map(|ops| MatcherSpec::Ops(Box::new(ops)))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for ClassesSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn split(s: &str, out: &mut Vec<String>) {
            out.extend(
                s.split(|c: char| c == '.' || c.is_whitespace())
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned),
            );
        }
        impl<'de> Visitor<'de> for V {
            type Value = ClassesSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("classes as `.a.b`, `a b` or a list")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ClassesSpec, E> {
                let mut out = Vec::new();
                split(v, &mut out);
                Ok(ClassesSpec(out))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ClassesSpec, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    split(&s, &mut out);
                }
                Ok(ClassesSpec(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DurationSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 30m, 12h, 7d, or seconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationSpec, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationSpec, E> {
                self.visit_f64(v as f64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<DurationSpec, E> {
                if v.is_finite() && v > 0.0 {
                    Ok(DurationSpec(v))
                } else {
                    Err(E::custom("a duration must be positive"))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationSpec, E> {
                parse_duration(v).map(DurationSpec).ok_or_else(|| {
                    E::custom(format!("invalid duration {v:?}; write e.g. 30m, 12h, 7d"))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `30s`, `15m`, `12h`, `7d`, `2w` or plain seconds.
pub fn parse_duration(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        "w" => 604_800.0,
        _ => return None,
    };
    let v = n * mult;
    (v.is_finite() && v > 0.0).then_some(v)
}

impl JsonSchema for Scalar {
    fn schema_name() -> Cow<'static, str> {
        "Scalar".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A string, number or boolean.",
            "type": ["string", "number", "boolean"]
        })
    }
}

impl JsonSchema for MatcherSpec {
    fn schema_name() -> Cow<'static, str> {
        "ValueTest".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let scalar = generator.subschema_for::<Scalar>();
        let ops = generator.subschema_for::<MatcherOps>();
        json_schema!({
            "description": "A value test: a bare value (equals), a list (one of), or a map of operators.",
            "anyOf": [
                scalar,
                { "type": "array", "items": scalar },
                ops
            ]
        })
    }
}

impl JsonSchema for ClassesSpec {
    fn schema_name() -> Cow<'static, str> {
        "Classes".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "CSS classes that must all be present: `.a.b`, `a b` or a list.",
            "anyOf": [
                { "type": "string" },
                { "type": "array", "items": { "type": "string" } }
            ]
        })
    }
}

impl JsonSchema for DurationSpec {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration: `30s`, `15m`, `12h`, `7d`, `2w`, or seconds.",
            "anyOf": [
                { "type": "number", "exclusiveMinimum": 0 },
                { "type": "string", "pattern": "^\\s*[0-9.]+\\s*[smhdw]?\\s*$" }
            ]
        })
    }
}
