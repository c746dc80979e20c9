//! Person properties with the times that decide them (`user_profiles.person_property_times`), so
//! the ids of one person combine in PostHog's order whatever order their events arrive in.
//!
//! PostHog applies an event's `$set_once` (fills a gap), then `$set` (overwrites), then `$unset`
//! (removes), event after event. Replayed in time order over every id of a person, a key ends as:
//! its newest `$set`, unless an `$unset` is as new or newer; else the oldest `$set_once` newer
//! than that `$unset`; else absent. Each id keeps per key just those three stamps ([`KeyTimes`]);
//! [`combine`] merges the ids' stamps and [`resolve`] reads the values.
//!
//! # Format
//! `{"plan": {"s": ["pro", "2026-12-04T10:00:00Z"], "o": ["free", "…"], "u": "…"}}`: `s` the
//! newest `$set` (value, time), `o` the oldest `$set_once` after `u`, `u` the newest `$unset`.
//!
//! One case is approximate: an id keeps only its oldest `$set_once` of a key, so when an `$unset`
//! (of any id of the person) that falls between two of them is applied after both, the key reads
//! absent where a replay would give the later value. Events of one id arrive in order, so this
//! takes a redelivery or a second id.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A value and the time of the event that sent it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stamped(pub Value, pub DateTime<Utc>);

/// What decides one key (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyTimes {
    /// The newest `$set` (or `person.properties`).
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub set: Option<Stamped>,
    /// The oldest `$set_once` newer than `unset`.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub set_once: Option<Stamped>,
    /// The newest `$unset`.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub unset: Option<DateTime<Utc>>,
}

/// The `person_property_times` column, decoded: [`KeyTimes`] by property name.
pub type PropertyTimes = BTreeMap<String, KeyTimes>;

/// A total order on values for ties at the same time, so the result does not depend on arrival.
fn rank(v: &Value) -> String {
    v.to_string()
}

impl KeyTimes {
    /// `$set` of `value` at `at`.
    pub fn set(&mut self, value: Value, at: DateTime<Utc>) {
        let newer = match &self.set {
            None => true,
            Some(Stamped(old, t)) => (at, rank(&value)) > (*t, rank(old)),
        };
        if newer {
            self.set = Some(Stamped(value, at));
        }
    }

    /// `$set_once` of `value` at `at`.
    pub fn set_once(&mut self, value: Value, at: DateTime<Utc>) {
        if self.unset.is_some_and(|u| at <= u) {
            return;
        }
        let older = match &self.set_once {
            None => true,
            Some(Stamped(old, t)) => (at, rank(&value)) < (*t, rank(old)),
        };
        if older {
            self.set_once = Some(Stamped(value, at));
        }
    }

    /// `$unset` at `at`.
    pub fn unset(&mut self, at: DateTime<Utc>) {
        if self.unset.is_some_and(|u| u >= at) {
            return;
        }
        self.unset = Some(at);
        if self.set_once.as_ref().is_some_and(|Stamped(_, t)| *t <= at) {
            self.set_once = None;
        }
    }

    /// Another id's stamps of the same key.
    pub fn absorb(&mut self, other: KeyTimes) {
        if let Some(at) = other.unset {
            self.unset(at);
        }
        if let Some(Stamped(v, at)) = other.set {
            self.set(v, at);
        }
        if let Some(Stamped(v, at)) = other.set_once {
            self.set_once(v, at);
        }
    }

    /// The key's value: the newest `$set` newer than the newest `$unset`, else the kept
    /// `$set_once`; `None` when absent.
    pub fn value(&self) -> Option<&Value> {
        let after_unset = |t: &DateTime<Utc>| self.unset.is_none_or(|u| *t > u);
        match (&self.set, &self.set_once) {
            (Some(Stamped(v, t)), _) if after_unset(t) => Some(v),
            (_, Some(Stamped(v, t))) if after_unset(t) => Some(v),
            _ => None,
        }
    }
}

/// Stamps for properties stored before times were kept: each one set at `at`.
pub fn stamped_at(properties: &Map<String, Value>, at: DateTime<Utc>) -> PropertyTimes {
    properties
        .iter()
        .map(|(k, v)| {
            let times = KeyTimes {
                set: Some(Stamped(v.clone(), at)),
                ..KeyTimes::default()
            };
            (k.clone(), times)
        })
        .collect()
}

/// The stamps of several ids of one person as one; independent of their order.
pub fn combine(parts: impl IntoIterator<Item = PropertyTimes>) -> PropertyTimes {
    let mut combined = PropertyTimes::new();
    for part in parts {
        for (key, times) in part {
            combined.entry(key).or_default().absorb(times);
        }
    }
    combined
}

/// The properties the stamps give.
pub fn resolve(times: &PropertyTimes) -> Map<String, Value> {
    times
        .iter()
        .filter_map(|(k, t)| t.value().map(|v| (k.clone(), v.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }

    /// One operation on a key, at a time.
    #[derive(Clone, Debug)]
    enum Op {
        Set(&'static str, i64),
        Once(&'static str, i64),
        Unset(i64),
    }

    impl Op {
        fn time(&self) -> i64 {
            match self {
                Op::Set(_, t) | Op::Once(_, t) | Op::Unset(t) => *t,
            }
        }
        /// Order within one event: `$set_once`, `$set`, `$unset`.
        fn phase(&self) -> u8 {
            match self {
                Op::Once(..) => 0,
                Op::Set(..) => 1,
                Op::Unset(_) => 2,
            }
        }
        fn apply(&self, k: &mut KeyTimes) {
            match self {
                Op::Set(v, t) => k.set(json!(v), at(*t)),
                Op::Once(v, t) => k.set_once(json!(v), at(*t)),
                Op::Unset(t) => k.unset(at(*t)),
            }
        }
    }

    /// PostHog's sequential result: every operation in time order.
    fn replay(ops: &[Op]) -> Option<Value> {
        let mut ops = ops.to_vec();
        ops.sort_by_key(|o| (o.time(), o.phase()));
        let mut value = None;
        for op in ops {
            match op {
                Op::Set(v, _) => value = Some(json!(v)),
                Op::Once(v, _) => {
                    value.get_or_insert(json!(v));
                }
                Op::Unset(_) => value = None,
            }
        }
        value
    }

    fn stamps(ops: &[Op]) -> KeyTimes {
        let mut k = KeyTimes::default();
        for op in ops {
            op.apply(&mut k);
        }
        k
    }

    #[test]
    fn one_id_in_any_arrival_order_matches_the_replay() {
        let cases: Vec<Vec<Op>> = vec![
            vec![Op::Set("a", 1), Op::Set("b", 2)],
            vec![Op::Once("a", 1), Op::Set("b", 2)],
            vec![Op::Set("b", 1), Op::Once("a", 2)],
            vec![Op::Set("b", 1), Op::Unset(2), Op::Once("a", 3)],
            vec![Op::Once("a", 1), Op::Once("b", 2)],
            vec![Op::Set("a", 1), Op::Unset(1)],
            vec![Op::Once("a", 1), Op::Unset(1), Op::Set("b", 1)],
            vec![Op::Unset(1), Op::Once("a", 2), Op::Set("b", 3)],
            vec![Op::Set("a", 3), Op::Unset(2), Op::Once("c", 1)],
        ];
        for ops in cases {
            let want = replay(&ops);
            // every rotation of the arrival order
            for r in 0..ops.len() {
                let mut arrival = ops.clone();
                arrival.rotate_left(r);
                let mut rev = arrival.clone();
                rev.reverse();
                for order in [arrival, rev] {
                    assert_eq!(
                        stamps(&order).value().cloned(),
                        want,
                        "ops {ops:?} arriving as {order:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn ids_combine_as_one_replay_in_any_order() {
        // anonymous id, then identified id
        let anon = vec![Op::Once("google", 1), Op::Set("free", 2)];
        let known = vec![Op::Once("bing", 5), Op::Set("pro", 6)];
        let unsetter = vec![Op::Unset(4)];
        for (parts, want) in [
            (vec![anon.clone(), known.clone()], Some(json!("pro"))),
            (vec![anon.clone(), unsetter.clone()], None),
            (
                vec![anon.clone(), unsetter.clone(), known.clone()],
                Some(json!("pro")),
            ),
        ] {
            let all: Vec<Op> = parts.iter().flatten().cloned().collect();
            assert_eq!(replay(&all), want);
            let times: Vec<KeyTimes> = parts.iter().map(|p| stamps(p)).collect();
            for order in [times.clone(), times.iter().rev().cloned().collect()] {
                let combined = combine(
                    order
                        .into_iter()
                        .map(|t| PropertyTimes::from([("k".to_string(), t)])),
                );
                assert_eq!(combined["k"].value().cloned(), want);
            }
        }
    }

    #[test]
    fn set_once_keeps_the_first_across_ids() {
        let a = stamps(&[Op::Once("google", 1)]);
        let b = stamps(&[Op::Once("bing", 5)]);
        let combined = combine([
            PropertyTimes::from([("ref".into(), b)]),
            PropertyTimes::from([("ref".into(), a)]),
        ]);
        assert_eq!(resolve(&combined)["ref"], "google");
    }

    #[test]
    fn the_stored_format_is_compact_and_reads_back() {
        let mut k = KeyTimes::default();
        k.set(json!("pro"), at(0));
        let times = PropertyTimes::from([("plan".to_string(), k)]);
        let text = serde_json::to_string(&times).unwrap();
        assert_eq!(text, r#"{"plan":{"s":["pro","2023-11-14T22:13:20Z"]}}"#);
        let back: PropertyTimes = serde_json::from_str(&text).unwrap();
        assert_eq!(back, times);
        // as Postgres writes a timestamptz with to_jsonb
        let pg: PropertyTimes =
            serde_json::from_str(r#"{"plan":{"s":["pro","2023-11-14T22:13:20+00:00"]}}"#).unwrap();
        assert_eq!(pg, times);
    }

    #[test]
    fn legacy_properties_are_set_at_the_given_time() {
        let props = json!({"plan": "pro"}).as_object().unwrap().clone();
        let times = stamped_at(&props, at(0));
        assert_eq!(resolve(&times), props);
    }
}
