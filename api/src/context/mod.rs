//! The user context: what an AI assistant should know about one user, built from the stored,
//! enriched events and the user's profile. Pure logic here; queries live in [`store`].

pub mod conns;
pub mod erase;
pub mod json;
pub mod store;
pub mod text;

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use entity::user_profile::{IntentState, Intents, MAX_EVIDENCE};

/// Intents whose decayed score is at least this are "active" and named in the summary.
pub const ACTIVE_INTENT_SCORE: f64 = 1.0;
/// Intents decayed below this are no longer reported at all.
pub const REPORTED_INTENT_SCORE: f64 = 0.05;
/// Most intents named in the summary.
const SUMMARY_INTENTS: usize = 2;
/// Most distinct activities named in the summary.
const SUMMARY_ACTIVITIES: usize = 3;

/// One stored event as the context shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryItem {
    pub time: DateTime<Utc>,
    pub description: String,
    pub event: String,
    pub page: Option<String>,
    pub session_id: Option<String>,
}

/// An intent with its score decayed to the time of the request.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredIntent {
    pub name: String,
    pub score: f64,
    pub last_seen: DateTime<Utc>,
    pub summary: String,
    pub evidence: Vec<String>,
}

/// The intents of a person's ids as one: each intent's scores decayed to its newest `last_seen`
/// and summed, counts summed, evidence newest first (the newer id's first) and capped; summary
/// and half-life from the newest. Independent of the order of `parts`.
pub fn combine_intents(parts: Vec<Intents>) -> Intents {
    let mut parts = parts.into_iter();
    let mut combined = parts.next().unwrap_or_default();
    for part in parts {
        for (name, state) in part {
            match combined.entry(name) {
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(state);
                }
                std::collections::btree_map::Entry::Occupied(mut slot) => {
                    let mine = slot.get().clone();
                    slot.insert(combine_intent(mine, state));
                }
            }
        }
    }
    combined
}

/// Two ids' states of one intent as one.
fn combine_intent(a: IntentState, b: IntentState) -> IntentState {
    let newer_first = (b.last_seen, b.score, &b.summary) > (a.last_seen, a.score, &a.summary);
    let (mut newer, older) = if newer_first { (b, a) } else { (a, b) };
    newer.score += older.score_at(newer.last_seen);
    newer.count += older.count;
    for evidence in older.evidence {
        if newer.evidence.len() >= MAX_EVIDENCE {
            break;
        }
        if !newer.evidence.contains(&evidence) {
            newer.evidence.push(evidence);
        }
    }
    newer
}

/// Decays every stored intent to `now`, drops the faded ones, strongest first.
pub fn score_intents(intents: &Intents, now: DateTime<Utc>) -> Vec<ScoredIntent> {
    let mut scored: Vec<ScoredIntent> = intents
        .iter()
        .map(|(name, state)| ScoredIntent {
            name: name.clone(),
            score: state.score_at(now),
            last_seen: state.last_seen,
            summary: state.summary.clone(),
            evidence: state.evidence.clone(),
        })
        .filter(|i| i.score >= REPORTED_INTENT_SCORE)
        .collect();
    scored.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.name.cmp(&b.name))
    });
    scored
}

/// One or two sentences: the active intents' summaries, then what the user did most recently
/// (the last hour of `history`, or else their last active moment). `show` renders each event
/// description (the text form quotes them).
pub fn summarize(
    intents: &[ScoredIntent],
    history: &[HistoryItem],
    now: DateTime<Utc>,
    show: &dyn Fn(&str) -> String,
) -> String {
    let mut parts: Vec<String> = intents
        .iter()
        .filter(|i| i.score >= ACTIVE_INTENT_SCORE)
        .take(SUMMARY_INTENTS)
        .map(|i| ensure_period(&i.summary))
        .collect();
    if parts.is_empty() {
        parts.push("No strong intent signals yet.".to_string());
    }
    if let Some(newest) = history.first() {
        let hour_ago = now - Duration::hours(1);
        let (label, window): (String, Vec<&HistoryItem>) = if newest.time >= hour_ago {
            (
                "In the last hour".into(),
                history.iter().take_while(|h| h.time >= hour_ago).collect(),
            )
        } else {
            let since = newest.time - Duration::hours(1);
            (
                format!("Last active {}", relative_time(newest.time, now)),
                history.iter().take_while(|h| h.time >= since).collect(),
            )
        };
        parts.push(format!("{label}: {}.", describe_activities(&window, show)));
    }
    parts.join(" ")
}

/// "Viewed page: /pricing (3 times); Clicked 'Upgrade Plan' Button": the most frequent
/// descriptions of a window, most frequent first, ties by recency.
fn describe_activities(window: &[&HistoryItem], show: &dyn Fn(&str) -> String) -> String {
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for (recency, item) in window.iter().enumerate() {
        let entry = counts
            .entry(item.description.as_str())
            .or_insert((0, recency));
        entry.0 += 1;
    }
    let mut ranked: Vec<(&str, usize, usize)> =
        counts.into_iter().map(|(d, (n, r))| (d, n, r)).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    let total = ranked.len();
    let mut parts: Vec<String> = ranked
        .iter()
        .take(SUMMARY_ACTIVITIES)
        .map(|(d, n, _)| {
            let d = show(d.trim_end_matches('.'));
            if *n > 1 {
                format!("{d} ({n} times)")
            } else {
                d
            }
        })
        .collect();
    if total > SUMMARY_ACTIVITIES {
        parts.push(format!("and {} other actions", total - SUMMARY_ACTIVITIES));
    }
    parts.join("; ")
}

fn ensure_period(s: &str) -> String {
    let s = s.trim();
    if s.ends_with(['.', '!', '?']) {
        s.to_string()
    } else {
        format!("{s}.")
    }
}

/// "just now", "5 minutes ago", "2 hours ago", "3 days ago" (or "in 5 minutes" for future times).
pub fn relative_time(time: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - time).num_seconds();
    let (future, secs) = (secs < 0, secs.unsigned_abs());
    let (n, unit) = match secs {
        0..45 => return "just now".into(),
        45..3_600 => (((secs + 30) / 60).max(1), "minute"),
        3_600..86_400 => (secs / 3_600, "hour"),
        86_400..2_592_000 => (secs / 86_400, "day"),
        2_592_000..31_536_000 => (secs / 2_592_000, "month"),
        _ => (secs / 31_536_000, "year"),
    };
    // Built by hand, not `format!`: one per history entry, on every read.
    let mut text = String::with_capacity(20);
    if future {
        text.push_str("in ");
    }
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    text.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
    text.push(' ');
    text.push_str(unit);
    if n != 1 {
        text.push('s');
    }
    if !future {
        text.push_str(" ago");
    }
    text
}

/// Parses `since`: an RFC 3339 time, or a duration back from `now` like `90s`, `30m`, `24h`, `7d`, `2w`.
pub fn parse_since(raw: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let raw = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (num, unit) = raw.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{raw:?} is neither an RFC 3339 time nor a duration like 24h"))?;
    let secs_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => {
            return Err(format!(
                "{raw:?}: unknown duration unit {unit:?} (use s, m, h, d or w)"
            ));
        }
    };
    n.checked_mul(secs_per)
        .and_then(Duration::try_seconds)
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(|| format!("{raw:?} is too far back"))
}

#[cfg(test)]
mod tests {
    use entity::user_profile::IntentState;

    use super::*;
    use crate::test_now as now;

    /// A page view `mins_ago` minutes before [`now`].
    pub(super) fn item(mins_ago: i64, description: &str) -> HistoryItem {
        HistoryItem {
            time: now() - Duration::minutes(mins_ago),
            description: description.into(),
            event: "$pageview".into(),
            page: Some("/pricing".into()),
            session_id: None,
        }
    }

    fn intent(score: f64, days_ago: i64, half_life_days: f64) -> IntentState {
        IntentState {
            score,
            last_seen: now() - Duration::days(days_ago),
            evidence: vec!["Viewed page: /pricing".into()],
            summary: "User showing Purchase Intent.".into(),
            half_life_secs: half_life_days * 86_400.0,
            count: 1,
        }
    }

    #[test]
    fn summary_names_active_intents_and_recent_activity() {
        let intents = Intents::from([("purchase".to_string(), intent(4.0, 0, 7.0))]);
        let scored = score_intents(&intents, now());
        let history = vec![
            item(1, "Clicked 'Upgrade Plan' Button"),
            item(5, "Viewed page: /pricing"),
            item(20, "Viewed page: /pricing"),
            item(50, "Viewed page: /pricing"),
            item(200, "Viewed page: /"),
        ];
        assert_eq!(
            summarize(&scored, &history, now(), &|d| d.to_string()),
            "User showing Purchase Intent. In the last hour: Viewed page: /pricing (3 times); Clicked 'Upgrade Plan' Button."
        );
    }

    #[test]
    fn old_signals_decay_below_todays() {
        let intents = Intents::from([
            ("purchase".to_string(), intent(8.0, 21, 3.0)),
            (
                "churn".to_string(),
                IntentState {
                    summary: "User may be about to churn.".into(),
                    ..intent(1.5, 0, 3.0)
                },
            ),
        ]);
        let scored = score_intents(&intents, now());
        // 8 * 0.5^7 = 0.06: still reported, but far weaker than today's 1.5 and not active.
        assert_eq!(
            scored.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["churn", "purchase"]
        );
        assert!(scored[1].score < ACTIVE_INTENT_SCORE);
        let summary = summarize(
            &scored,
            &[item(3 * 24 * 60, "Viewed page: /")],
            now(),
            &text::quote,
        );
        assert_eq!(
            summary,
            "User may be about to churn. Last active 3 days ago: \"Viewed page: /\"."
        );
    }

    #[test]
    fn intents_of_a_persons_ids_combine_in_any_order() {
        let at = |hours: i64| now() - Duration::hours(hours);
        let state = |score: f64, hours: i64, evidence: &[&str]| IntentState {
            score,
            last_seen: at(hours),
            evidence: evidence.iter().map(|e| e.to_string()).collect(),
            summary: "User showing Purchase Intent.".into(),
            half_life_secs: 3600.0,
            count: 2,
        };
        let anonymous = Intents::from([
            (
                "purchase".to_string(),
                state(2.0, 2, &["Viewed page: /pricing"]),
            ),
            (
                "churn".to_string(),
                state(1.0, 5, &["Viewed page: /cancel"]),
            ),
        ]);
        let identified = Intents::from([(
            "purchase".to_string(),
            state(
                1.0,
                1,
                &["Clicked 'Upgrade Plan' Button", "Viewed page: /pricing"],
            ),
        )]);
        let combined = combine_intents(vec![anonymous.clone(), identified.clone()]);
        assert_eq!(combined, combine_intents(vec![identified, anonymous]));
        let purchase = &combined["purchase"];
        // 2 decayed by one half-life to the newer last_seen, plus 1.
        assert!((purchase.score - 2.0).abs() < 1e-9, "{}", purchase.score);
        assert_eq!(purchase.last_seen, at(1));
        assert_eq!(purchase.count, 4);
        assert_eq!(
            purchase.evidence,
            ["Clicked 'Upgrade Plan' Button", "Viewed page: /pricing"]
        );
        assert_eq!(combined["churn"].score, 1.0);
        assert!(combine_intents(Vec::new()).is_empty());
    }

    #[test]
    fn relative_times() {
        let ago = |secs| relative_time(now() - Duration::seconds(secs), now());
        assert_eq!(ago(10), "just now");
        assert_eq!(ago(300), "5 minutes ago");
        assert_eq!(ago(60), "1 minute ago");
        assert_eq!(ago(75), "1 minute ago");
        assert_eq!(ago(95), "2 minutes ago");
        assert_eq!(ago(7_200), "2 hours ago");
        assert_eq!(ago(86_400 * 3), "3 days ago");
        assert_eq!(ago(-600), "in 10 minutes");
    }

    #[test]
    fn since_takes_times_and_durations() {
        assert_eq!(
            parse_since("24h", now()).unwrap(),
            now() - Duration::hours(24)
        );
        assert_eq!(parse_since("7d", now()).unwrap(), now() - Duration::days(7));
        assert_eq!(
            parse_since("2026-11-01T00:00:00Z", now())
                .unwrap()
                .to_rfc3339(),
            "2026-11-01T00:00:00+00:00"
        );
        assert!(parse_since("yesterday", now()).is_err());
        assert!(parse_since("5y", now()).unwrap_err().contains("unit"));
        assert!(parse_since("99999999999999d", now()).is_err());
    }
}
