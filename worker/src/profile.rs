//! Per-user aggregates: what one batch adds to a user's profile, and how it merges into the stored
//! row. Pure functions; the store runs them inside the batch transaction.

use chrono::{DateTime, Utc};
use entity::person_properties::{self, PropertyTimes};
use entity::user_profile::{IntentState, Intents, decay};
use serde_json::{Map, Value};

use rules_engine::enrich::IntentHit;

pub use entity::user_profile::MAX_EVIDENCE;

/// Person properties an event sets, in PostHog's order: `$set_once` fills gaps, then
/// `person.properties` and `$set` overwrite, then `$unset` removes (stamped with the event's time:
/// [`entity::person_properties`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PersonUpdate {
    pub set: Map<String, Value>,
    pub set_once: Map<String, Value>,
    pub unset: Vec<String>,
}

impl PersonUpdate {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.set_once.is_empty() && self.unset.is_empty()
    }
}

/// What newly stored events add to one user's profile.
#[derive(Debug, Clone)]
pub struct ProfileDelta {
    pub distinct_id: String,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub events: i64,
    /// Sessions of this user first seen in this batch.
    pub new_sessions: i64,
    /// Intent hits with the event's time and description, oldest first.
    pub intents: Vec<(DateTime<Utc>, IntentHit, String)>,
    /// Person property updates, oldest first.
    pub person: Vec<(DateTime<Utc>, PersonUpdate)>,
}

impl ProfileDelta {
    /// Whether it changes more than counts and times (intents or person properties).
    pub fn has_details(&self) -> bool {
        !self.intents.is_empty() || !self.person.is_empty()
    }

    pub fn new(distinct_id: String, at: DateTime<Utc>) -> Self {
        Self {
            distinct_id,
            first_seen: at,
            last_seen: at,
            events: 0,
            new_sessions: 0,
            intents: Vec::new(),
            person: Vec::new(),
        }
    }

    /// Counts one stored event.
    pub fn add_event(
        &mut self,
        at: DateTime<Utc>,
        hits: &[IntentHit],
        description: &str,
        person: Option<PersonUpdate>,
    ) {
        self.first_seen = self.first_seen.min(at);
        self.last_seen = self.last_seen.max(at);
        self.events += 1;
        self.intents.extend(
            hits.iter()
                .map(|h| (at, h.clone(), description.to_string())),
        );
        if let Some(update) = person.filter(|p| !p.is_empty()) {
            self.person.push((at, update));
        }
    }
}

/// A user's stored profile columns.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRow {
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub event_count: i64,
    pub session_count: i64,
    pub intents: Intents,
    pub person_property_times: Option<PropertyTimes>,
}

impl ProfileRow {
    /// The columns `delta` writes, given the stored intents and person property times (empty
    /// for a new user): its own counts and times (the store adds those to the stored ones in SQL)
    /// and the details merged.
    pub fn merged(
        delta: &ProfileDelta,
        intents: Intents,
        person_property_times: Option<PropertyTimes>,
    ) -> Self {
        let mut row = Self {
            first_seen: delta.first_seen,
            last_seen: delta.last_seen,
            event_count: delta.events,
            session_count: delta.new_sessions,
            intents,
            person_property_times,
        };
        row.apply_details(delta);
        row
    }

    /// Adds a later delta to the whole row: what the store's SQL does with the counts and times,
    /// plus [`Self::apply_details`].
    #[cfg(test)]
    pub fn apply(&mut self, delta: &ProfileDelta) {
        self.first_seen = self.first_seen.min(delta.first_seen);
        self.last_seen = self.last_seen.max(delta.last_seen);
        self.event_count += delta.events;
        self.session_count += delta.new_sessions;
        self.apply_details(delta);
    }

    /// Adds a delta's intent hits and person properties (what SQL arithmetic cannot merge).
    pub fn apply_details(&mut self, delta: &ProfileDelta) {
        let mut hits: Vec<_> = delta.intents.iter().collect();
        hits.sort_by_key(|(at, _, _)| *at);
        for (at, hit, description) in hits {
            add_intent(&mut self.intents, *at, hit, description);
        }
        if delta.person.is_empty() {
            return;
        }
        let times = self
            .person_property_times
            .get_or_insert_with(PropertyTimes::new);
        for (at, update) in &delta.person {
            for (key, value) in &update.set_once {
                times
                    .entry(key.clone())
                    .or_default()
                    .set_once(value.clone(), *at);
            }
            for (key, value) in &update.set {
                times
                    .entry(key.clone())
                    .or_default()
                    .set(value.clone(), *at);
            }
            for key in &update.unset {
                times.entry(key.clone()).or_default().unset(*at);
            }
        }
    }

    /// The properties `person_property_times` gives: what the id alone says.
    pub fn person_properties(&self) -> Option<Map<String, Value>> {
        self.person_property_times
            .as_ref()
            .map(person_properties::resolve)
    }
}

/// Adds one event's weight to an intent: `score = old * 0.5^((at - last_seen) / half_life) + weight`.
/// An event older than `last_seen` (replicas do not keep order) adds its weight decayed to
/// `last_seen` instead, so the result does not depend on arrival order.
pub fn add_intent(intents: &mut Intents, at: DateTime<Utc>, hit: &IntentHit, description: &str) {
    let state = intents
        .entry(hit.name.to_string())
        .or_insert_with(|| IntentState {
            score: 0.0,
            last_seen: at,
            evidence: Vec::new(),
            summary: hit.summary.to_string(),
            half_life_secs: hit.half_life_secs,
            count: 0,
        });
    if state.summary != *hit.summary {
        state.summary.clear();
        state.summary.push_str(&hit.summary);
    }
    state.half_life_secs = hit.half_life_secs;
    state.count += 1;
    let seconds =
        |from: DateTime<Utc>, to: DateTime<Utc>| (to - from).num_milliseconds() as f64 / 1000.0;
    if at >= state.last_seen {
        state.score =
            state.score * decay(seconds(state.last_seen, at), hit.half_life_secs) + hit.weight;
        state.last_seen = at;
        state.evidence.retain(|e| e != description);
        state.evidence.insert(0, description.to_string());
        state.evidence.truncate(MAX_EVIDENCE);
    } else {
        state.score += hit.weight * decay(seconds(at, state.last_seen), hit.half_life_secs);
        if state.evidence.len() < MAX_EVIDENCE && !state.evidence.iter().any(|e| e == description) {
            state.evidence.push(description.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn hit(weight: f64) -> IntentHit {
        IntentHit {
            name: "purchase".into(),
            weight,
            summary: "User showing Purchase Intent.".into(),
            half_life_secs: 3600.0,
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn score_decays_by_half_life_and_is_order_independent() {
        let mut in_order = Intents::new();
        add_intent(&mut in_order, at(0), &hit(2.0), "Viewed page: /pricing");
        add_intent(&mut in_order, at(3600), &hit(1.0), "Clicked 'Upgrade Plan'");
        let state = &in_order["purchase"];
        assert!(
            (state.score - 2.0).abs() < 1e-9,
            "2 * 0.5 + 1 = {}",
            state.score
        );
        assert_eq!(state.last_seen, at(3600));
        assert_eq!(
            state.evidence,
            ["Clicked 'Upgrade Plan'", "Viewed page: /pricing"]
        );
        assert_eq!(state.count, 2);

        let mut reversed = Intents::new();
        add_intent(&mut reversed, at(3600), &hit(1.0), "Clicked 'Upgrade Plan'");
        add_intent(&mut reversed, at(0), &hit(2.0), "Viewed page: /pricing");
        assert!((reversed["purchase"].score - 2.0).abs() < 1e-9);
        assert_eq!(reversed["purchase"].last_seen, at(3600));
        assert!((state.score_at(at(7200)) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn evidence_is_distinct_newest_first_and_bounded() {
        let mut intents = Intents::new();
        for i in 0..8 {
            add_intent(&mut intents, at(i), &hit(1.0), &format!("e{}", i % 7));
        }
        assert_eq!(intents["purchase"].evidence, ["e0", "e6", "e5", "e4", "e3"]);
    }

    #[test]
    fn profile_counts_and_person_properties() {
        let mut delta = ProfileDelta::new("u".into(), at(10));
        let set = |k: &str, v: &str| PersonUpdate {
            set: [(k.to_string(), Value::from(v))].into_iter().collect(),
            ..PersonUpdate::default()
        };
        delta.add_event(at(10), &[], "a", Some(set("plan", "free")));
        delta.add_event(at(5), &[hit(1.0)], "b", None);
        delta.new_sessions = 1;
        let mut row = ProfileRow::merged(&delta, Intents::new(), None);
        assert_eq!(
            (
                row.first_seen,
                row.last_seen,
                row.event_count,
                row.session_count
            ),
            (at(5), at(10), 2, 1)
        );

        let mut later = ProfileDelta::new("u".into(), at(20));
        later.add_event(at(20), &[], "c", Some(set("plan", "pro")));
        later.person.push((
            at(20),
            PersonUpdate {
                set: Map::new(),
                set_once: [("plan".to_string(), Value::from("x"))]
                    .into_iter()
                    .collect(),
                unset: Vec::new(),
            },
        ));
        row.apply(&later);
        assert_eq!(row.event_count, 3);
        assert_eq!(row.last_seen, at(20));
        assert_eq!(row.person_properties().unwrap()["plan"], "pro");

        // `$unset` removes, after that event's `$set`.
        let mut unset = ProfileDelta::new("u".into(), at(30));
        let mut update = set("email", "a@x.test");
        update.unset = vec!["plan".into(), "email".into()];
        unset.add_event(at(30), &[], "d", Some(update));
        row.apply(&unset);
        assert_eq!(row.person_properties(), Some(Map::new()));
    }
}
