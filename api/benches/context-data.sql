-- Bench data for the context read path: 1,000,000 events across 10,000 users (100 each, over
-- the last 30 days, 5 sessions per user) and one profile per user with a purchase intent.
-- psql -v users=10000 -v per_user=100 [-v person_size=3] -f api/benches/context-data.sql
\set ON_ERROR_STOP on
\if :{?users} \else \set users 10000 \endif
\if :{?per_user} \else \set per_user 100 \endif
\if :{?person_size} \else \set person_size 1 \endif

BEGIN;
INSERT INTO events (uuid, distinct_id, event, description, rule_id, intents, properties, url, path,
                    session_id, elements_chain, "timestamp", received_at, rules_version)
SELECT gen_random_uuid(),
       'user_' || u,
       CASE WHEN n % 10 = 0 THEN '$autocapture' ELSE '$pageview' END,
       CASE WHEN n % 10 = 0 THEN 'Clicked ''Upgrade Plan'' Button'
            ELSE 'Viewed page: ' || (ARRAY['/', '/pricing', '/checkout', '/docs', '/blog'])[1 + n % 5] END,
       CASE WHEN n % 10 = 0 THEN 'upgrade-click' ELSE 'pageview' END,
       CASE WHEN n % 5 = 1 THEN '{"purchase": 1.0}'::jsonb ELSE '{}'::jsonb END,
       jsonb_build_object('$pathname', (ARRAY['/', '/pricing', '/checkout', '/docs', '/blog'])[1 + n % 5],
                          '$browser', 'Chrome', '$os', 'Mac OS X', '$lib', 'web'),
       'https://shop.example.com' || (ARRAY['/', '/pricing', '/checkout', '/docs', '/blog'])[1 + n % 5],
       (ARRAY['/', '/pricing', '/checkout', '/docs', '/blog'])[1 + n % 5],
       'session_' || u || '_' || (n / 20),
       NULL,
       now() - (n * interval '7 hours') - (u * interval '1 second'),
       now() - (n * interval '7 hours') - (u * interval '1 second'),
       'bench'
FROM generate_series(0, :users - 1) AS u, generate_series(0, :per_user - 1) AS n;

INSERT INTO user_profiles (distinct_id, first_seen, last_seen, event_count, session_count, intents, updated_at,
                           person_properties, person_property_times)
SELECT distinct_id, min("timestamp"), max("timestamp"), count(*), count(DISTINCT session_id),
       jsonb_build_object('purchase', jsonb_build_object(
           'score', 4.5, 'last_seen', max("timestamp"), 'summary', 'User showing Purchase Intent.',
           'half_life_secs', 259200, 'count', 20,
           'evidence', jsonb_build_array('Clicked ''Upgrade Plan'' Button', 'Viewed page: /pricing'))),
       now(),
       -- what posthog-js sends: an email and a plan set, the first referrer set once
       jsonb_build_object('email', distinct_id || '@example.com', 'plan', 'pro', '$initial_referrer', 'google'),
       jsonb_build_object(
           'email', jsonb_build_object('s', jsonb_build_array(distinct_id || '@example.com', max("timestamp"))),
           'plan', jsonb_build_object('s', jsonb_build_array('pro', max("timestamp"))),
           '$initial_referrer', jsonb_build_object('o', jsonb_build_array('google', min("timestamp"))))
FROM events GROUP BY distinct_id;

INSERT INTO user_sessions (distinct_id, session_id, first_seen)
SELECT distinct_id, session_id, min("timestamp") FROM events GROUP BY distinct_id, session_id;

-- Persons of :person_size consecutive users (user_0 … user_{n-1} one person, and so on), as
-- identify calls would have joined them; none for 1 (every user a person of one id).
INSERT INTO persons (id, is_identified) OVERRIDING SYSTEM VALUE
SELECT g, true FROM generate_series(0, (:users - 1) / :person_size) AS g WHERE :person_size > 1;
INSERT INTO person_distinct_ids (distinct_id, person_id)
SELECT 'user_' || u, u / :person_size FROM generate_series(0, :users - 1) AS u WHERE :person_size > 1;
COMMIT;
-- Steady state: hint bits set and the visibility map built now, not by autovacuum mid-run, and
-- the load's dirty pages written now, not by a checkpoint during the measured phases.
VACUUM ANALYZE;
CHECKPOINT;
