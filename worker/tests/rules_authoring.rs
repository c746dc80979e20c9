//! Rule authoring through the `worker rules …` tools, as an author uses them: a new file of
//! translations beside the shipped ones, `explain` on a file or stdin, and every snippet of
//! `rules/README.md` run as written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use testkit::{rules_dir_with, shipped_rules};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `worker` with `args` in the repository root, `stdin` written to it; no configuration needed.
fn worker(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .current_dir(repo())
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const SAAS: &str = include_str!("fixtures/authoring/saas.yaml");

/// The five translations of a B2B SaaS app pass `rules check` beside the shipped files, with no
/// `priority` and no edit to those files.
#[test]
fn an_authors_file_wins_over_the_shipped_generic_rules_without_priority() {
    assert!(
        !SAAS
            .lines()
            .any(|l| l.trim_start().starts_with("priority:"))
    );
    let dir = rules_dir_with(&[("saas.yaml", SAAS)]);
    let out = worker(&["rules", "check", dir.path().to_str().unwrap()], "");
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(" 0 failed"), "{text}");
    assert!(!text.contains("warning"), "{text}");
    // The shipped example of an off flag's sentence is now the author's to decide.
    assert!(
        text.contains("rule `feature-flag-called` example #2 is described by `flags-off`"),
        "{text}"
    );
    // The shipped files are untouched: the copies equal the originals.
    for name in ["posthog.yaml", "product.yaml", "intents.yaml"] {
        assert_eq!(
            std::fs::read(dir.path().join(name)).unwrap(),
            std::fs::read(shipped_rules().join(name)).unwrap()
        );
    }
}

#[test]
fn check_flags_unknown_rule_ids_and_points_at_the_key() {
    let bad_example = "rules:\n  - id: invite\n    when: { event: team_invite_sent }\n    say: Invited\n    examples:\n      - { event: team_invite_sent, rule: invte }\n";
    let dir = rules_dir_with(&[("saas.yaml", bad_example)]);
    let out = worker(&["rules", "check", dir.path().to_str().unwrap()], "");
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("`rule: invte` names no rule of this set (did you mean `invite`?)"),
        "{text}"
    );

    let bad_regex = "rules:\n  - id: invite\n    when:\n      event: team_invite_sent\n      properties:\n        role: { regex: \"[\" }\n    say: Invited\n";
    let dir = rules_dir_with(&[("saas.yaml", bad_regex)]);
    let out = worker(&["rules", "check", dir.path().to_str().unwrap()], "");
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("saas.yaml:6:17: rule `invite`: when.properties.role: invalid regex"),
        "{text}"
    );
}

#[test]
fn explain_reads_a_file_or_stdin_with_the_rules_named_by_flag() {
    let dir = rules_dir_with(&[("saas.yaml", SAAS)]);
    let event = r#"{"event": "$feature_flag_called", "properties": {"$feature_flag": "x", "$feature_flag_response": false}}"#;
    let out = worker(
        &[
            "rules",
            "explain",
            "--rules",
            dir.path().to_str().unwrap(),
            "-",
        ],
        event,
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("description: none (ignored"), "{text}");
    assert!(
        text.contains("⌀ flags-off (specific tier, priority 0"),
        "{text}"
    );
    assert!(
        text.contains("= feature-flag-called (generic tier"),
        "{text}"
    );

    let file = dir.path().join("event.json");
    std::fs::write(
        &file,
        r#"{"batch": [{"event": "$pageview", "properties": {"$pathname": "/settings/cancel"}}]}"#,
    )
    .unwrap();
    let out = worker(
        &[
            "rules",
            "explain",
            "--rules",
            dir.path().to_str().unwrap(),
            file.to_str().unwrap(),
        ],
        "",
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("description: Opened the cancellation page"),
        "{text}"
    );
    assert!(text.contains("intent: churn_risk +5"), "{text}");

    // Without --rules: RULES_DIR's default, the shipped rules (run from the repository root).
    let out = worker(&["rules", "explain", "-"], r#"{"event": "$pageview"}"#);
    assert!(
        stdout(&out).contains("description: Viewed page: (no URL)"),
        "{}",
        stdout(&out)
    );

    let out = worker(&["rules", "explain", "-"], "{\"properties\": {}}");
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("stdin: event #0 has no string field `event`"),
        "{}",
        stdout(&out)
    );
    let help = stdout(&worker(&["rules", "explain", "--help"], ""));
    for part in [
        "--rules <DIR>",
        "elements_chain",
        "person_properties",
        "{\"batch\": [...]}",
    ] {
        assert!(help.contains(part), "{part} in {help}");
    }
}

#[test]
fn the_schema_command_prints_the_checked_in_schema() {
    let out = worker(&["rules", "schema"], "");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        std::fs::read_to_string(shipped_rules().join("schema.json")).unwrap()
    );
}

/// The fenced blocks of `rules/README.md` with their language.
fn readme_blocks() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(shipped_rules().join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(lang)) => current = Some((lang.trim().to_string(), String::new())),
            (Some(_), Some("")) => blocks.push(current.take().unwrap()),
            (Some((_, body)), _) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(current.is_none(), "an unclosed block in rules/README.md");
    blocks
}

/// Every YAML snippet is a rule file that passes `rules check` beside the shipped files (as the
/// first file, so its rules come before the product's), and every shell snippet runs as written.
#[test]
fn every_snippet_of_the_rules_readme_works() {
    let blocks = readme_blocks();
    let yaml: Vec<&String> = blocks
        .iter()
        .filter(|(l, _)| l == "yaml")
        .map(|(_, b)| b)
        .collect();
    let sh: Vec<&String> = blocks
        .iter()
        .filter(|(l, _)| l == "sh")
        .map(|(_, b)| b)
        .collect();
    assert!(yaml.len() >= 6 && sh.len() >= 2, "{blocks:?}");
    for snippet in yaml {
        let dir = rules_dir_with(&[("00-readme-snippet.yaml", snippet)]);
        let out = worker(&["rules", "check", dir.path().to_str().unwrap()], "");
        let text = stdout(&out);
        assert!(out.status.success(), "snippet:\n{snippet}\n{text}");
        assert!(text.contains(" 0 failed"), "snippet:\n{snippet}\n{text}");
    }
    for snippet in sh {
        let script = snippet.replace(
            "cargo run -p worker --",
            &format!("'{}'", env!("CARGO_BIN_EXE_worker")),
        );
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(repo())
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "snippet:\n{snippet}\n{}",
            stdout(&out)
        );
    }
}
