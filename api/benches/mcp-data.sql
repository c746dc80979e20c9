-- Data of benches/mcp.rs: 1,000 users with 50 events each (the shape of context-data.sql), one
-- profile per user with a purchase intent.
INSERT INTO events (uuid, distinct_id, event, description, rule_id, intents, properties, url, path,
                    session_id, elements_chain, "timestamp", received_at, rules_version)
SELECT gen_random_uuid(),
       'user_' || u,
       CASE WHEN n % 10 = 0 THEN '$autocapture' ELSE '$pageview' END,
       CASE WHEN n % 10 = 0 THEN 'Clicked ''Upgrade Plan'' Button'
            ELSE 'Viewed page: ' || (ARRAY['/', '/pricing', '/checkout', '/docs', '/blog'])[1 + n % 5] END,
       CASE WHEN n % 10 = 0 THEN 'upgrade-click' ELSE 'pageview' END,
       '{}'::jsonb,
       jsonb_build_object('$pathname', (ARRAY['/', '/pricing', '/checkout', '/docs', '/blog'])[1 + n % 5]),
       'https://shop.example.com' || (ARRAY['/', '/pricing', '/checkout', '/docs', '/blog'])[1 + n % 5],
       (ARRAY['/', '/pricing', '/checkout', '/docs', '/blog'])[1 + n % 5],
       'session_' || u || '_' || (n / 20),
       NULL,
       now() - (n * interval '7 hours') - (u * interval '1 second'),
       now() - (n * interval '7 hours') - (u * interval '1 second'),
       'bench'
FROM generate_series(0, 999) AS u, generate_series(0, 49) AS n;

INSERT INTO user_profiles (distinct_id, first_seen, last_seen, event_count, session_count, intents, updated_at)
SELECT distinct_id, min("timestamp"), max("timestamp"), count(*), count(DISTINCT session_id),
       jsonb_build_object('purchase', jsonb_build_object(
           'score', 4.5, 'last_seen', max("timestamp"), 'summary', 'User showing Purchase Intent.',
           'half_life_secs', 259200, 'count', 20,
           'evidence', jsonb_build_array('Clicked ''Upgrade Plan'' Button', 'Viewed page: /pricing'))),
       now()
FROM events GROUP BY distinct_id;

ANALYZE;
