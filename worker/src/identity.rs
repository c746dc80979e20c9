//! PostHog's identity calls, read from an event (pure): which `distinct_id` joins the event's
//! person, and the guards that refuse a merge. The store applies them ([`crate::store`]).

use serde_json::{Map, Value};

use crate::sanitize;

/// Longest `distinct_id` a merge names, in characters: the api's bound on `distinct_id`.
pub const MAX_DISTINCT_ID_CHARS: usize = 200;

/// The identity call an event makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeKind {
    /// `$identify` with `$anon_distinct_id`: the anonymous id's person joins the identified one's.
    Identify,
    /// `$create_alias` with `alias`: the alias joins the event's person.
    Alias,
    /// `$merge_dangerously` with `alias`: joins even when both persons are identified.
    MergeDangerously,
}

/// `other`'s person joins the person of the event's `distinct_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    pub kind: MergeKind,
    pub other: String,
}

impl Merge {
    /// The merge an event named `event` of `distinct_id` with these (decoded) properties asks
    /// for; `None` for any other event, a missing or empty id, the event's own id, or an id
    /// longer than the api accepts. PostHog takes numbers as their text.
    pub fn of(event: &str, properties: &Map<String, Value>, distinct_id: &str) -> Option<Self> {
        let (kind, key) = match event {
            "$identify" => (MergeKind::Identify, "$anon_distinct_id"),
            "$create_alias" => (MergeKind::Alias, "alias"),
            "$merge_dangerously" => (MergeKind::MergeDangerously, "alias"),
            _ => return None,
        };
        let other = match properties.get(key)? {
            Value::String(s) => sanitize::text(s.clone()),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let usable = !other.trim().is_empty()
            && other != distinct_id
            && other.chars().count() <= MAX_DISTINCT_ID_CHARS;
        usable.then_some(Self { kind, other })
    }

    /// Whether it may join a person already identified into another (PostHog's guard).
    pub fn overrides_identified(&self) -> bool {
        self.kind == MergeKind::MergeDangerously
    }
}

/// Ids SDKs and integrations send by mistake for every user (PostHog's list): a merge naming one
/// would join everyone into one person, so it is refused.
pub fn is_illegal_id(id: &str) -> bool {
    const ANY_CASE: [&str; 10] = [
        "anonymous",
        "guest",
        "distinctid",
        "distinct_id",
        "id",
        "not_authenticated",
        "email",
        "undefined",
        "true",
        "false",
    ];
    const EXACT: [&str; 6] = ["[object Object]", "NaN", "None", "none", "null", "0"];
    let id = id.trim();
    id.is_empty() || EXACT.contains(&id) || ANY_CASE.iter().any(|i| i.eq_ignore_ascii_case(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn identity_calls_name_the_id_that_joins() {
        let identify = Merge::of(
            "$identify",
            &props(json!({"$anon_distinct_id": "anon-1"})),
            "user_42",
        );
        assert_eq!(
            identify,
            Some(Merge {
                kind: MergeKind::Identify,
                other: "anon-1".into()
            })
        );
        let alias = Merge::of("$create_alias", &props(json!({"alias": 7})), "u").unwrap();
        assert_eq!((alias.kind, alias.other.as_str()), (MergeKind::Alias, "7"));
        assert!(
            Merge::of("$merge_dangerously", &props(json!({"alias": "b"})), "a")
                .unwrap()
                .overrides_identified()
        );
        // Not identity calls, or nothing to join.
        for (event, p, id) in [
            ("$pageview", json!({"alias": "b"}), "a"),
            ("$identify", json!({}), "a"),
            ("$identify", json!({"$anon_distinct_id": "a"}), "a"),
            ("$identify", json!({"$anon_distinct_id": " "}), "a"),
            ("$identify", json!({"$anon_distinct_id": ["x"]}), "a"),
            ("$create_alias", json!({"alias": "x".repeat(201)}), "a"),
        ] {
            assert_eq!(Merge::of(event, &props(p.clone()), id), None, "{event} {p}");
        }
    }

    #[test]
    fn placeholder_ids_are_illegal() {
        for id in ["anonymous", "Guest", "NULL_NOT", "user_1"] {
            assert_eq!(
                is_illegal_id(id),
                id != "NULL_NOT" && id != "user_1",
                "{id}"
            );
        }
        assert!(is_illegal_id("null") && is_illegal_id("0") && is_illegal_id("undefined"));
        assert!(!is_illegal_id("Null") && !is_illegal_id("00"));
    }
}
