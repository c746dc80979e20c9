//! Command line: `worker` (or `worker run`) consumes; `worker dlq …` and `worker rules …` are the
//! operator and rule-author tools. Output of the tools goes to stdout; logs go to stderr.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use infra::{
    dlq::{DeadLetters, Selection},
    redis::COMMAND_TIMEOUT,
    unmatched::UnmatchedReport,
};

use crate::{Config, WorkerError};

/// Consumer-group worker: enriches clickstream events and stores them in Postgres.
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume the stream until SIGTERM/SIGINT (the default).
    Run,
    /// Inspect and act on the dead-letter stream (`DLQ_NAME`).
    Dlq {
        #[command(subcommand)]
        action: DlqCommand,
    },
    /// Tools for rule authors.
    Rules {
        #[command(subcommand)]
        action: RulesCommand,
    },
    /// Exit 0 when this replica's `GET /health` on `WORKER_METRICS_BIND` answers 200, 1
    /// otherwise, with a one-line reason: the container health check, without curl.
    Healthcheck,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put dead letters back on the stream they came from.
    Replay(Select),
    /// Delete dead letters.
    Purge(Select),
}

/// `--id ID…` or `--all`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Select {
    /// DLQ entry id (repeatable).
    #[arg(long = "id", value_name = "ID", num_args = 1..)]
    pub ids: Vec<String>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
}

impl Select {
    fn selection(&self) -> Selection {
        if self.all {
            Selection::All
        } else {
            Selection::Ids(self.ids.clone())
        }
    }
}

/// The event shapes `worker rules explain` reads, shown under its `--help`.
const EXPLAIN_HELP: &str = "\
The event, as JSON: an object with `event` (required), `distinct_id`, `properties`,
`elements_chain` and `person_properties` (or `person.properties`), e.g.

  {\"event\": \"$autocapture\", \"properties\": {\"$current_url\": \"https://app.example.com/pricing\"},
   \"elements_chain\": \"button:text=\\\"Upgrade Plan\\\"nth-child=\\\"1\\\"\"}

That is the shape of a PostHog event (what SDKs send to /capture), of the api's stream envelope,
and of the examples `worker rules unmatched --json` prints. A JSON array of events, or a PostHog
batch body ({\"batch\": [...]}), explains each event in turn.

  worker rules explain --rules rules/ event.json
  echo '{\"event\": \"$pageview\", \"properties\": {\"$pathname\": \"/pricing\"}}' | worker rules explain -";

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Validate a rules directory (default `RULES_DIR`) and run the rules' examples.
    Check { dir: Option<PathBuf> },
    /// Show which rule describes an event, and why each other rule did not.
    #[command(after_help = EXPLAIN_HELP)]
    Explain {
        /// The rules directory (default `RULES_DIR`, else `rules`).
        #[arg(long = "rules", value_name = "DIR")]
        rules: Option<PathBuf>,
        /// A JSON file holding the event, or `-` to read it from stdin.
        #[arg(value_name = "EVENT.json")]
        event: PathBuf,
    },
    /// Print the JSON Schema of rule files (what `rules/schema.json` holds).
    Schema,
    /// Describe stored events again with the rules of `RULES_DIR` (what workers do by themselves
    /// when the rules change, unless `REENRICH_ON_RELOAD=false`), newest first, printing progress.
    Reenrich {
        /// Only events of the last DURATION (`30m`, `24h`, `7d`); default: all.
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        since: Option<chrono::Duration>,
        /// Print what would change (stored → live, grouped by rule and sentence), write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Compare a candidate rules directory with the live rules (`RULES_DIR`) on the newest stored
    /// events: what would change, grouped by rule and by sentence, with examples. Writes nothing.
    Shadow {
        /// The candidate rules directory.
        candidate: PathBuf,
        /// The newest N stored events (default 10000).
        #[arg(long, value_name = "N", conflicts_with = "since")]
        last: Option<i64>,
        /// The stored events of the last DURATION (`30m`, `24h`, `7d`).
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        since: Option<chrono::Duration>,
    },
    /// The most frequent events no rule describes (all replicas), with an example of each:
    /// what to translate next. A shape leaves the list once a reloaded rule describes it.
    Unmatched {
        /// Show at most this many shapes.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Empty the report.
        #[arg(long)]
        clear: bool,
    },
}

/// Runs a DLQ command, printing what it did.
pub async fn dlq(config: &Config, action: &DlqCommand) -> Result<ExitCode, WorkerError> {
    let conn = config
        .redis_client()
        .and_then(|client| client.connection(COMMAND_TIMEOUT))
        .map_err(crate::stream::StreamError::from)?;
    let dlq = DeadLetters::new(conn, &config.dlq_name, config.shards());
    match action {
        DlqCommand::List { limit } => {
            let total = dlq.count().await?;
            let letters = dlq.list(*limit).await?;
            println!(
                "{} of {total} dead letters in {}",
                letters.len(),
                config.dlq_name
            );
            for letter in letters {
                let event = letter
                    .field(entity::envelope::FIELD_EVENT)
                    .unwrap_or_default();
                let summary = serde_json::from_str::<serde_json::Value>(&event)
                    .map(|v| {
                        format!(
                            "event={} distinct_id={} uuid={}",
                            v["event"], v["distinct_id"], v["uuid"]
                        )
                    })
                    .unwrap_or_else(|_| "event=<undecodable>".to_string());
                println!(
                    "{id}  from {src} entry {entry}  at {at}  deliveries {n}  consumer {consumer}\n    error: {error}\n    {summary}",
                    id = letter.id,
                    src = letter.field(infra::dlq::FIELD_SOURCE).unwrap_or_default(),
                    entry = letter.field(infra::dlq::FIELD_ENTRY_ID).unwrap_or_default(),
                    at = letter.field(infra::dlq::FIELD_AT).unwrap_or_default(),
                    n = letter
                        .field(infra::dlq::FIELD_DELIVERIES)
                        .unwrap_or_default(),
                    consumer = letter.field(infra::dlq::FIELD_CONSUMER).unwrap_or_default(),
                    error = letter.field(infra::dlq::FIELD_ERROR).unwrap_or_default(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay(select) => {
            let report = dlq.replay(&select.selection()).await?;
            for (id, target, new_id) in &report.replayed {
                println!("replayed {id} -> {target} {new_id}");
            }
            for id in &report.missing {
                println!("not found: {id}");
            }
            println!(
                "{} replayed, {} not found",
                report.replayed.len(),
                report.missing.len()
            );
            Ok(if report.missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        DlqCommand::Purge(select) => {
            let (deleted, missing) = dlq.purge(&select.selection()).await?;
            for id in &missing {
                println!("not found: {id}");
            }
            println!("{deleted} dead letters deleted from {}", config.dlq_name);
            Ok(if missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Runs a rules command (the rule engine's tooling), printing its report; exits non-zero when
/// the rules are invalid, an example fails, or Redis cannot be read.
pub async fn rules(config: &Config, action: &RulesCommand) -> ExitCode {
    match action {
        RulesCommand::Check { dir } => {
            rules_engine::cli::check(dir.as_deref().unwrap_or(&config.rules_dir))
        }
        RulesCommand::Explain { rules, event } => {
            rules_engine::cli::explain(rules.as_deref().unwrap_or(&config.rules_dir), event)
        }
        RulesCommand::Schema => {
            print!("{}", rules_engine::schema::rule_file_schema());
            ExitCode::SUCCESS
        }
        RulesCommand::Reenrich { since, dry_run } => {
            let since = since.map(|d| chrono::Utc::now() - d);
            match reenrich(config, since, *dry_run).await {
                Ok(code) => code,
                Err(error) => {
                    println!("rules reenrich: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        RulesCommand::Shadow {
            candidate,
            last,
            since,
        } => {
            let since = since.map(|d| chrono::Utc::now() - d);
            match shadow(config, candidate, *last, since).await {
                Ok(code) => code,
                Err(error) => {
                    println!("rules shadow: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        RulesCommand::Unmatched { limit, json, clear } => {
            match unmatched(config, *limit, *json, *clear).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!(
                        "cannot read the unmatched-events report from {}: {error}",
                        config.redis_url
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `30m`, `24h`, `7d`, `2w` or seconds.
fn duration(raw: &str) -> Result<chrono::Duration, String> {
    rules_engine::parse_duration(raw)
        .and_then(|secs| chrono::Duration::try_milliseconds((secs * 1000.0) as i64))
        .ok_or_else(|| format!("invalid duration {raw:?}; write e.g. 30m, 24h, 7d"))
}

/// The live rules of `RULES_DIR`, or the message that says why they do not load.
fn live_rules(config: &Config) -> Result<rules_engine::RuleSet, String> {
    rules_engine::RuleSet::load_dir(&config.rules_dir).map_err(|e| {
        format!(
            "the live rules ({}) do not load:\n{e}",
            config.rules_dir.display()
        )
    })
}

async fn reenrich(
    config: &Config,
    since: Option<chrono::DateTime<chrono::Utc>>,
    dry_run: bool,
) -> Result<ExitCode, String> {
    use crate::history::reenrich::{self, Step};
    let set = live_rules(config)?;
    let db = crate::store::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let pool = db.get_postgres_connection_pool();
    if dry_run {
        let comparison = reenrich::dry_run(pool, &set, since)
            .await
            .map_err(|e| e.to_string())?;
        println!(
            "dry run: stored events not described by the live rules (version {}), compared with what they would say now",
            set.version()
        );
        print!("{}", comparison.render("stored", "live"));
        return Ok(ExitCode::SUCCESS);
    }
    reenrich::begin(pool, set.version(), since, true)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "re-enriching stored events{} with the rules of {} (version {}), newest first",
        since.map_or(String::new(), |s| format!(" since {}", s.to_rfc3339())),
        config.rules_dir.display(),
        set.version()
    );
    let (mut described, mut changed) = (0, 0);
    loop {
        match reenrich::step(pool, &set, config.reenrich_batch_size)
            .await
            .map_err(|e| e.to_string())?
        {
            Step::Batch {
                described: d,
                changed: c,
                ..
            } => {
                described += d;
                changed += c;
                if d > 0 {
                    println!("  {described} events described again, {changed} changed");
                }
            }
            Step::Busy => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            Step::Finished | Step::NoPass => break,
            Step::OtherVersion(other) => {
                println!(
                    "stopped: a pass with other rules (version {other}) was started meanwhile; run the same rules as the workers"
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    println!("done: {described} events described again, {changed} changed");
    Ok(ExitCode::SUCCESS)
}

async fn shadow(
    config: &Config,
    candidate_dir: &std::path::Path,
    last: Option<i64>,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<ExitCode, String> {
    let candidate = rules_engine::RuleSet::load_dir(candidate_dir).map_err(|e| {
        format!(
            "the candidate rules ({}) do not load:\n{e}",
            candidate_dir.display()
        )
    })?;
    let live = live_rules(config)?;
    let db = crate::store::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let limit = match (last, since) {
        (Some(n), _) => n,
        (None, Some(_)) => i64::MAX,
        (None, None) => 10_000,
    };
    let rows = crate::history::newest(db.get_postgres_connection_pool(), limit, since)
        .await
        .map_err(|e| e.to_string())?;
    let mut comparison = crate::history::compare::Comparison::default();
    for row in &rows {
        comparison.add(row, &row.describe(&live), &row.describe(&candidate));
    }
    println!(
        "shadow run: the newest {} stored events{}, described by the live rules ({}, version {}) and by the candidate ({}, version {})",
        rows.len(),
        since.map_or(String::new(), |s| format!(" since {}", s.to_rfc3339())),
        config.rules_dir.display(),
        live.version(),
        candidate_dir.display(),
        candidate.version()
    );
    print!("{}", comparison.render("live", "candidate"));
    Ok(ExitCode::SUCCESS)
}

async fn unmatched(
    config: &Config,
    limit: usize,
    json: bool,
    clear: bool,
) -> Result<(), redis::RedisError> {
    let conn = config.redis_client()?.connection(COMMAND_TIMEOUT)?;
    let report = UnmatchedReport::new(conn, &config.queue_name);
    if clear {
        report.clear().await?;
        println!("unmatched-events report of {} emptied", config.queue_name);
        return Ok(());
    }
    let (shapes, total) = report.top(limit).await?;
    if json {
        let out = serde_json::json!({"total_shapes": total, "shapes": shapes});
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    if shapes.is_empty() {
        println!("every event is described by a rule (no unmatched events reported)");
        return Ok(());
    }
    println!(
        "{} of {total} kinds of events no rule describes, most frequent first:",
        shapes.len()
    );
    for shape in &shapes {
        let mut line = format!("{:>8}  {}", shape.count, shape.event);
        if let Some(path) = &shape.path {
            line.push_str(&format!("  on {path}"));
        }
        if let Some(text) = &shape.element_text {
            line.push_str(&format!("  text {text:?}"));
        }
        if let Some(classes) = &shape.element_classes {
            line.push_str(&format!("  classes {classes:?}"));
        }
        println!("{line}");
        if let Some(example) = &shape.example {
            println!("          example: {example}");
        }
    }
    println!(
        "save an example to a file and run `worker rules explain <file>` to see why no rule matched"
    );
    Ok(())
}
