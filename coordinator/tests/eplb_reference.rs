//! The placement algorithm on the EPLB reference traces (`tests/fixtures/eplb`, numbers computed
//! by DeepSeek's EPLB): same slot budget, DeepSeek's balancedness metric.

use std::collections::BTreeMap;

pub mod common;

use common::{fixture, valid};
use moe_coordinator::balance::place_layer;
use serde_json::Value;

#[test]
fn balances_at_least_as_well_as_eplb_everywhere() {
    let traces = fixture("traces_dev.json");
    let reference = fixture("reference_dev.json");
    // (shape, dist) → (ours, EPLB global, naive) sums and count.
    let mut table: BTreeMap<(String, String), (f64, f64, f64, usize)> = BTreeMap::new();
    let by_trace: BTreeMap<&str, &Value> = traces["traces"]
        .as_array()
        .expect("traces")
        .iter()
        .map(|t| (t["trace_id"].as_str().expect("id"), t))
        .collect();
    for row in reference["results"].as_array().expect("results") {
        if row["num_groups"] != 1 {
            continue;
        }
        let t = by_trace[row["trace_id"].as_str().expect("id")];
        let layer = row["layer"].as_u64().expect("layer") as usize;
        let loads: Vec<f64> = serde_json::from_value(t["load"][layer].clone()).expect("loads");
        let gpus = row["num_gpus"].as_u64().expect("gpus") as usize;
        let per_gpu = row["num_replicas"].as_u64().expect("r") as usize / gpus;
        let p = place_layer(&loads, &vec![per_gpu; gpus]).expect("fits");
        valid(&p, loads.len(), per_gpu);
        let key = (
            row["shape_id"].as_str().expect("shape").to_string(),
            row["dist"].as_str().expect("dist").to_string(),
        );
        let e = table.entry(key).or_default();
        e.0 += p.balancedness(&loads);
        e.1 += row["eplb_balancedness"].as_f64().expect("eplb");
        e.2 += row["naive_balancedness"].as_f64().expect("naive");
        e.3 += 1;
    }
    let mut behind = Vec::new();
    for ((shape, dist), (ours, eplb, naive, n)) in &table {
        let (ours, eplb, naive) = (ours / *n as f64, eplb / *n as f64, naive / *n as f64);
        eprintln!("{shape:<18} {dist:<8} ours {ours:.4}  EPLB {eplb:.4}  naive {naive:.4}");
        assert!(ours >= naive, "{shape} {dist}: worse than no replication");
        if ours + 1e-4 < eplb {
            behind.push(format!("{shape} {dist}: {ours:.4} < {eplb:.4}"));
        }
    }
    assert!(behind.is_empty(), "behind EPLB: {behind:?}");
    for ((shape, dist), (ours, _, _, n)) in &table {
        let ours = ours / *n as f64;
        assert!(ours >= 0.98, "{shape} {dist}: {ours:.4} < 0.98");
    }
}
