//! The YAML shape of a rule file, as authors write it. Unknown keys are errors.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor, value::MapAccessDeserializer};
use serde_json::{Map, Value};

/// One `rules/*.yaml` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    #[serde(default)]
    pub intents: Vec<IntentSpec>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// An intent the summary can mention, e.g. `purchase`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentSpec {
    pub name: String,
    /// The sentence the summary uses, e.g. "User showing Purchase Intent."
    pub summary: String,
    /// How fast a signal fades: `30m`, `12h`, `7d`, or seconds.
    #[serde(default)]
    pub half_life: Option<DurationSpec>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A rule: conditions, a sentence, intent weights and examples.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub id: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub when: WhenSpec,
    /// The sentence template; a rule without one only adds intents.
    #[serde(default)]
    pub say: Option<String>,
    #[serde(default)]
    pub intents: BTreeMap<String, f64>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub examples: Vec<ExampleSpec>,
}

/// Conditions; all present ones must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhenSpec {
    #[serde(default)]
    pub event: Option<MatcherSpec>,
    #[serde(default)]
    pub path: Option<MatcherSpec>,
    #[serde(default)]
    pub url: Option<MatcherSpec>,
    #[serde(default)]
    pub properties: BTreeMap<String, MatcherSpec>,
    #[serde(default)]
    pub person: BTreeMap<String, MatcherSpec>,
    #[serde(default)]
    pub element: Option<ElementSpec>,
    #[serde(default)]
    pub inside: Option<ElementSpec>,
    #[serde(default)]
    pub any: Vec<WhenSpec>,
    #[serde(default)]
    pub not: Option<Box<WhenSpec>>,
}

/// Conditions on an element (`$autocapture`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElementSpec {
    #[serde(default)]
    pub tag: Option<MatcherSpec>,
    #[serde(default)]
    pub text: Option<MatcherSpec>,
    #[serde(default)]
    pub id: Option<MatcherSpec>,
    #[serde(default)]
    pub href: Option<MatcherSpec>,
    #[serde(default)]
    pub classes: Option<ClassesSpec>,
    #[serde(default)]
    pub attributes: BTreeMap<String, MatcherSpec>,
}

/// An example event and what the rule set must say about it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleSpec {
    pub event: String,
    #[serde(default)]
    pub distinct_id: Option<String>,
    #[serde(default)]
    pub properties: Map<String, Value>,
    #[serde(default)]
    pub elements_chain: Option<String>,
    #[serde(default)]
    pub person_properties: Option<Map<String, Value>>,
    #[serde(default)]
    pub say: Option<String>,
    #[serde(default)]
    pub intents: Option<Vec<String>>,
    /// The rule expected to describe the event; defaults to the rule carrying the example.
    #[serde(default)]
    pub rule: Option<String>,
}

/// A literal to compare with.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Str(String),
    Num(f64),
    Bool(bool),
}

/// A value test: a bare scalar (equals), a list (one of), or a map of operators.
#[derive(Debug)]
pub enum MatcherSpec {
    Equals(Scalar),
    OneOf(Vec<Scalar>),
    Ops(MatcherOps),
}

/// Operators of a matcher; all present ones must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatcherOps {
    #[serde(default)]
    pub equals: Option<Scalar>,
    #[serde(default)]
    pub one_of: Option<Vec<Scalar>>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub exists: Option<bool>,
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub starts_with: Option<String>,
    #[serde(default)]
    pub ends_with: Option<String>,
    #[serde(default)]
    pub gt: Option<f64>,
    #[serde(default)]
    pub gte: Option<f64>,
    #[serde(default)]
    pub lt: Option<f64>,
    #[serde(default)]
    pub lte: Option<f64>,
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
                f.write_str("a value, a list of values, or a map of operators (equals, one_of, regex, exists, contains, starts_with, ends_with, gt, gte, lt, lte)")
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
                MatcherOps::deserialize(MapAccessDeserializer::new(map)).map(MatcherSpec::Ops)
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
