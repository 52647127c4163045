//! What a newcomer sees of the `moe` binary itself: `--help` texts that only mention flags the
//! command accepts, and logs without terminal colour codes when stderr is not a terminal.

use std::collections::BTreeSet;
use std::process::Command;

fn moe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .output()
        .expect("runs moe")
}

fn help(path: &[&str]) -> String {
    let mut args = path.to_vec();
    args.push("--help");
    let out = moe(&args);
    assert!(out.status.success(), "moe {path:?} --help failed");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Subcommand names of a help text's `Commands:` section (without `help`).
fn subcommands(text: &str) -> Vec<String> {
    text.split("Commands:")
        .nth(1)
        .map(|s| s.split("Options:").next().unwrap_or_default())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// `--flags` a help text defines (its option lines) and every `--flag` it mentions anywhere.
fn flags(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let word = |s: &str| {
        s.trim_start_matches("--")
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect::<String>()
    };
    let mut defined = BTreeSet::new();
    let mut mentioned = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim_start();
        let t = t.strip_prefix("-h, ").unwrap_or(t);
        if line.starts_with("  ") && t.starts_with("--") {
            defined.insert(word(t));
        }
        for (i, _) in line.match_indices("--") {
            let w = word(&line[i..]);
            let before = line[..i].chars().last();
            if !w.is_empty() && !matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '-')
            {
                mentioned.insert(w);
            }
        }
    }
    (defined, mentioned)
}

#[test]
fn every_help_mentions_only_flags_its_command_accepts() {
    let mut checked = 0;
    let mut todo: Vec<Vec<String>> = subcommands(&help(&[]))
        .into_iter()
        .map(|c| vec![c])
        .collect();
    while let Some(path) = todo.pop() {
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&p);
        for sub in subcommands(&text) {
            let mut next = path.clone();
            next.push(sub);
            todo.push(next);
        }
        let (defined, mentioned) = flags(&text);
        let stray: Vec<&String> = mentioned.difference(&defined).collect();
        assert!(
            stray.is_empty(),
            "`moe {} --help` mentions {stray:?}, which it does not accept:\n{text}",
            p.join(" ")
        );
        checked += 1;
    }
    assert!(checked >= 12, "checked {checked} help texts");
}

#[test]
fn logs_on_a_pipe_have_no_colour_codes() {
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models/tiny-dsv3");
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "The cat", "--max-tokens", "2"])
        .env("MOE_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .expect("runs moe");
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("INFO"), "no log lines: {stderr}");
    assert!(
        !stderr.contains('\u{1b}') && !String::from_utf8_lossy(&out.stdout).contains('\u{1b}'),
        "escape codes on a pipe: {stderr:?}"
    );
}
