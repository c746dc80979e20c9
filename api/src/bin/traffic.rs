//! Traffic simulator: users browsing a shop, sent as PostHog (posthog-js shaped) events through
//! the PostHog routes.
//!
//! Every second user (`user_2`, `user_4`, …) browses anonymously first, as posthog-js does before
//! sign-in (a random `distinct_id`), and signs in midway: an `$identify` naming the anonymous id,
//! after which the context of `user_N` holds what the anonymous visitor did.
//!
//! Story mode (default) prints `P` per pageview, `C` per click or form submit, `I` per sign-in
//! (`$identify`), then `.` when the request was accepted or `x<status>` when it was not. Load mode (`--rate`, `--concurrency`,
//! `--duration`, `--batch`) prints a progress line each second and throughput and latency
//! percentiles at the end. Either way it stops by itself.

use std::{
    collections::BTreeMap,
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use rand::{Rng, SeedableRng, rngs::SmallRng, seq::IndexedRandom};
use serde_json::{Value, json};

#[derive(Parser, Debug, Clone)]
#[command(about = "Simulates users browsing a shop, sending PostHog events to the api")]
struct Args {
    /// Base URL of the api. Default: the api's own `API_BIND` (environment or `.env`), else
    /// http://127.0.0.1:8000.
    #[arg(long, env = "TRAFFIC_URL")]
    url: Option<String>,
    /// Ingest key sent as the PostHog project key (`api_key` in the body, as the SDKs send it;
    /// the secret key is refused there). Default: the first of the api's `INGEST_API_KEYS`
    /// (environment or `.env`), else the development ingest key.
    #[arg(long)]
    key: Option<String>,
    /// Simulated users (`user_1` … `user_N`; every second one browses anonymously first and signs
    /// in midway).
    #[arg(long, default_value_t = 5)]
    users: u32,
    /// Story mode: journeys to walk per user.
    #[arg(long, default_value_t = 3)]
    journeys: u32,
    /// Story mode: pause between events, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pause_ms: u64,
    /// Load mode: target events per second (0 = as fast as possible). Setting any load option selects load mode.
    #[arg(long)]
    rate: Option<u64>,
    /// Load mode: requests in flight at once.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Load mode: seconds to run.
    #[arg(long)]
    duration: Option<u64>,
    /// Load mode: events per request (1 posts to /e/, more to /batch/).
    #[arg(long)]
    batch: Option<usize>,
}

impl Args {
    fn load_mode(&self) -> bool {
        self.rate.is_some()
            || self.concurrency.is_some()
            || self.duration.is_some()
            || self.batch.is_some()
    }
}

/// One simulated user's browsing state.
struct Visitor {
    /// The `distinct_id` events are sent with: a random one until the visitor signs in.
    id: String,
    /// `user_N`, the id the visitor signs in as.
    user: String,
    session: String,
    step: usize,
    signed_in: bool,
}

/// The journey step at which anonymous visitors sign in: after reading the pricing page.
const SIGN_IN_STEP: usize = 3;

const JOURNEY: [&str; 6] = [
    "/",
    "/pricing",
    "/pricing",
    "click:upgrade",
    "/checkout",
    "submit:checkout",
];

impl Visitor {
    fn new(n: u32) -> Self {
        let user = format!("user_{n}");
        let anonymous = n.is_multiple_of(2);
        Self {
            id: if anonymous {
                uuid::Uuid::now_v7().to_string()
            } else {
                user.clone()
            },
            user,
            session: uuid::Uuid::now_v7().to_string(),
            step: 0,
            signed_in: !anonymous,
        }
    }

    /// The next event of this user's journey; `(kind, event)` with kind `P`, `C` or `I`.
    fn next_event(&mut self, rng: &mut SmallRng) -> (char, Value) {
        if !self.signed_in && self.step == SIGN_IN_STEP {
            // posthog.identify(user): the identified id, naming the anonymous one it replaces.
            self.signed_in = true;
            let anonymous = std::mem::replace(&mut self.id, self.user.clone());
            let properties = json!({
                "$anon_distinct_id": anonymous, "$session_id": self.session, "$lib": "web",
                "$set": {"email": format!("{}@example.com", self.user)}
            });
            return (
                'I',
                json!({"event": "$identify", "distinct_id": self.id, "uuid": uuid::Uuid::now_v7().to_string(),
                       "timestamp": chrono::Utc::now().to_rfc3339(), "properties": properties}),
            );
        }
        let step = JOURNEY[self.step % JOURNEY.len()];
        self.step += 1;
        if self.step.is_multiple_of(JOURNEY.len()) {
            self.session = uuid::Uuid::now_v7().to_string();
        }
        // Now and then a detour, as real people do.
        let step = if rng.random_ratio(1, 6) {
            *["/docs", "/blog", "click:docs"].choose(rng).unwrap()
        } else {
            step
        };
        let page = |path: &str| {
            json!({
                "$current_url": format!("https://shop.example.com{path}"), "$pathname": path, "$host": "shop.example.com",
                "$session_id": self.session, "$lib": "web", "$lib_version": "1.200.0", "$browser": "Chrome",
                "$os": "Mac OS X", "title": format!("Example Shop {path}")
            })
        };
        let event = |name: &str, properties: Value| {
            json!({"event": name, "distinct_id": self.id, "uuid": uuid::Uuid::now_v7().to_string(),
                   "timestamp": chrono::Utc::now().to_rfc3339(), "properties": properties})
        };
        match step.split_once(':') {
            None => ('P', event("$pageview", page(step))),
            Some(("click", target)) => {
                let (text, class, path) = match target {
                    "upgrade" => ("Upgrade Plan", "btn btn-primary", "/pricing"),
                    _ => ("Read the docs", "nav-link", "/"),
                };
                let mut props = page(path);
                props["$event_type"] = json!("click");
                props["$el_text"] = json!(text);
                props["$elements_chain"] = json!(format!(
                    "button.{}:text=\"{text}\"attr__class=\"{class}\"nth-child=\"2\"nth-of-type=\"1\";div.container:nth-child=\"1\"",
                    class.replace(' ', ".")
                ));
                ('C', event("$autocapture", props))
            }
            Some((_, _)) => {
                let mut props = page("/checkout");
                props["$event_type"] = json!("submit");
                props["$elements_chain"] = json!(
                    "form#checkout-form:attr__id=\"checkout-form\"nth-child=\"1\";div.checkout:nth-child=\"1\""
                );
                ('C', event("$autocapture", props))
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The api reads `.env`; so does the simulator, so both use the same key.
    let _ = dotenvy::dotenv();
    let mut args = Args::parse();
    args.key = args.key.or_else(|| {
        let keys = std::env::var("INGEST_API_KEYS").unwrap_or_default();
        let first = keys.split(',').map(str::trim).find(|k| !k.is_empty());
        Some(
            first
                .unwrap_or(api::config::DEVELOPMENT_INGEST_KEY)
                .to_string(),
        )
    });
    args.url = args
        .url
        .filter(|url| !url.trim().is_empty())
        .or_else(|| Some(default_url()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(256)
        .build()?;
    if args.load_mode() {
        load(args, http).await
    } else {
        story(args, http).await
    }
}

/// Where the api listens by its own configuration (`API_BIND`; all interfaces means this host).
fn default_url() -> String {
    let bind = std::env::var("API_BIND").unwrap_or_else(|_| "127.0.0.1:8000".into());
    let bind = bind
        .trim()
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "[::1]:");
    format!("http://{bind}")
}

async fn send(http: &reqwest::Client, args: &Args, events: Vec<Value>) -> Result<(), String> {
    let url = args.url.as_deref().unwrap_or_default();
    let (path, body) = if events.len() == 1 {
        let mut e = events.into_iter().next().unwrap();
        e["api_key"] = json!(args.key);
        ("/e/", e)
    } else {
        (
            "/batch/",
            json!({"api_key": args.key, "sent_at": chrono::Utc::now().to_rfc3339(), "batch": events}),
        )
    };
    match http
        .post(format!("{}{path}", url.trim_end_matches('/')))
        .json(&body)
        .send()
        .await
    {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(resp.status().as_u16().to_string()),
        Err(e) if e.is_connect() => Err("connection refused".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Each user walks its journeys; one line of symbols per user.
async fn story(args: Args, http: reqwest::Client) -> anyhow::Result<()> {
    let mut rng = SmallRng::from_os_rng();
    let (mut accepted, mut rejected) = (0u64, 0u64);
    for n in 1..=args.users {
        let mut visitor = Visitor::new(n);
        print!("{:<8} ", visitor.user);
        let sign_in = usize::from(!visitor.signed_in);
        for _ in 0..args.journeys as usize * JOURNEY.len() + sign_in {
            let (kind, event) = visitor.next_event(&mut rng);
            print!("{kind}");
            match send(&http, &args, vec![event]).await {
                Ok(()) => {
                    accepted += 1;
                    print!(".");
                }
                Err(status) => {
                    rejected += 1;
                    print!("x{status} ");
                }
            }
            std::io::stdout().flush()?;
            tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
        }
        println!();
    }
    println!("{accepted} accepted, {rejected} rejected");
    if rejected > 0 {
        eprintln!("{HINT}");
        std::process::exit(1);
    }
    Ok(())
}

/// What the usual rejections mean, printed when any request failed.
const HINT: &str = "hint: 401 = no key sent; 403 = the key (--key, or the first of INGEST_API_KEYS in \
the environment or .env) is not one of the api's ingest keys (the secret key is refused in bodies); 503 = Redis is down or the stream backlog is over \
STREAM_MAX_BACKLOG (start a worker); connection refused = the api is not listening on --url";

/// Counters shared by the load tasks.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    events: AtomicU64,
    failures: AtomicU64,
}

async fn load(args: Args, http: reqwest::Client) -> anyhow::Result<()> {
    let concurrency = args.concurrency.unwrap_or(16).max(1);
    let batch = args.batch.unwrap_or(1).max(1);
    let duration = Duration::from_secs(args.duration.unwrap_or(10));
    let rate = args.rate.unwrap_or(0);
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + duration;
    // Requests per second for the whole run, split across tasks.
    let per_task_interval = (rate > 0).then(|| {
        let requests_per_sec = (rate as f64 / batch as f64).max(0.001);
        Duration::from_secs_f64(concurrency as f64 / requests_per_sec)
    });

    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let (http, args, tally) = (http.clone(), args.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(task as u64);
            let mut visitors: Vec<Visitor> = (0..args.users.max(1))
                .map(|n| Visitor::new(n + 1))
                .collect();
            let mut latencies = Vec::new();
            let mut rejections: BTreeMap<String, u64> = BTreeMap::new();
            let mut next = Instant::now();
            while Instant::now() < deadline {
                if let Some(interval) = per_task_interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                }
                let events: Vec<Value> = (0..batch)
                    .map(|_| {
                        let i = rng.random_range(0..visitors.len());
                        visitors[i].next_event(&mut rng).1
                    })
                    .collect();
                let sent = Instant::now();
                let result = send(&http, &args, events).await;
                latencies.push(sent.elapsed());
                tally.requests.fetch_add(1, Ordering::Relaxed);
                match result {
                    Ok(()) => {
                        tally.events.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                    Err(status) => {
                        tally.failures.fetch_add(1, Ordering::Relaxed);
                        *rejections.entry(status).or_default() += 1;
                    }
                }
            }
            (latencies, rejections)
        }));
    }

    let progress = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let events = tally.events.load(Ordering::Relaxed);
                eprint!(
                    "\r{:>4.0}s  {:>9} events accepted  {:>7} events/s  {} failed requests   ",
                    start.elapsed().as_secs_f64(),
                    events,
                    events - last,
                    tally.failures.load(Ordering::Relaxed)
                );
                last = events;
            }
        })
    };
    let mut latencies = Vec::new();
    let mut rejections: BTreeMap<String, u64> = BTreeMap::new();
    for task in tasks {
        let (task_latencies, task_rejections) = task.await?;
        latencies.extend(task_latencies);
        for (status, n) in task_rejections {
            *rejections.entry(status).or_default() += n;
        }
    }
    progress.abort();
    eprintln!();
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
    };
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let requests = tally.requests.load(Ordering::Relaxed);
    let events = tally.events.load(Ordering::Relaxed);
    let failures = tally.failures.load(Ordering::Relaxed);
    println!(
        "{requests} requests ({failures} failed), {events} events accepted in {elapsed:.1} s: {:.0} events/s, {:.0} requests/s",
        events as f64 / elapsed,
        requests as f64 / elapsed
    );
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(latencies.last())
    );
    if failures > 0 {
        let by_status: Vec<String> = rejections
            .iter()
            .map(|(status, n)| format!("x{status}: {n}"))
            .collect();
        println!("rejected requests: {}", by_status.join(", "));
        eprintln!("{HINT}");
        std::process::exit(1);
    }
    Ok(())
}
