//! README.md's commands as a newcomer runs them: the placement-scoring example, copied from the
//! README text itself, scores against EPLB's reference rows.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The README line that starts with `prefix`, split into words (the examples have no quoting).
fn readme_line(prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("README.md has no line starting with `{prefix}`"));
    line.split('#')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `args` run from a scratch directory: repository paths made absolute, outputs land there.
fn in_scratch(args: &[String]) -> Vec<String> {
    args.iter()
        .map(|a| {
            if a.starts_with("tests/") {
                root().join(a).display().to_string()
            } else {
                a.clone()
            }
        })
        .collect()
}

#[test]
fn the_placement_scoring_example_prints_reference_rows() {
    let dir = tempfile::tempdir().expect("tmp");
    let plan = readme_line("moe placement plan");
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(in_scratch(&plan[1..]))
        .current_dir(dir.path())
        .env("MOE_LOG", "warn")
        .output()
        .expect("runs moe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let score = readme_line("python3 tests/fixtures/eplb/eplb_score.py");
    let out = Command::new("python3")
        .args(in_scratch(&score[1..]))
        .current_dir(dir.path())
        .output()
        .expect("runs python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("no reference row"),
        "the README example scores without reference rows:\n{stdout}"
    );
    let summary: Vec<&str> = stdout.lines().filter(|l| l.contains(" ALL ")).collect();
    assert_eq!(summary.len(), 1, "{stdout}");
    let eplb = summary[0].split_whitespace().nth(4).expect("EPLB column");
    assert!(
        eplb.parse::<f64>().is_ok(),
        "no EPLB reference value in `{}`",
        summary[0]
    );
}
