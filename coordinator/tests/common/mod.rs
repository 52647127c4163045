//! Shared helpers for the placement tests: the EPLB fixtures and placement validity.

use moe_coordinator::balance::LayerPlacement;
use serde_json::Value;

/// A JSON file from `tests/fixtures/eplb`.
pub fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../tests/fixtures/eplb/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

/// Every GPU within `slots`, every one of `n` experts placed with shares summing to 1.
pub fn valid(p: &LayerPlacement, n: usize, slots: usize) {
    assert!(p.gpus.iter().all(|g| g.len() <= slots));
    let mut sum = vec![0.0; n];
    for g in &p.gpus {
        for &(e, s) in g {
            assert!((-1e-12..=1.0 + 1e-9).contains(&s), "share {s}");
            sum[e as usize] += s;
        }
    }
    assert!(
        sum.iter().all(|s| (s - 1.0).abs() < 1e-9),
        "every expert placed, shares sum to 1"
    );
}
