//! What an expert node has processed, per (layer, expert): tokens, and compute time attributed
//! to each expert by its share of the request's tokens (a request's experts run as one grouped
//! job, so their times cannot be told apart). Rendered in Prometheus text for `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Counters since the node started.
#[derive(Debug, Default)]
pub struct NodeStats {
    per_expert: Mutex<BTreeMap<(usize, usize), (u64, f64)>>,
}

impl NodeStats {
    /// Records one computed request of `layer`: its expert ids (one entry per token and expert)
    /// and the time it took.
    pub fn record(&self, layer: usize, expert_ids: &[u32], took: Duration) {
        if expert_ids.is_empty() {
            return;
        }
        let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
        for &e in expert_ids {
            *counts.entry(e).or_default() += 1;
        }
        let per_token = took.as_secs_f64() / expert_ids.len() as f64;
        let mut m = self.per_expert.lock().unwrap_or_else(|p| p.into_inner());
        for (e, c) in counts {
            let s = m.entry((layer, e as usize)).or_default();
            s.0 += c;
            s.1 += per_token * c as f64;
        }
    }

    /// Prometheus text exposition of the counters, labelled with the node id.
    pub fn render(&self, node: &str, in_flight: u64) -> String {
        let m = self.per_expert.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let total: u64 = m.values().map(|v| v.0).sum();
        let _ = writeln!(
            out,
            "# HELP moe_node_expert_tokens_total (token, expert) pairs computed, all experts.\n\
             # TYPE moe_node_expert_tokens_total counter\n\
             moe_node_expert_tokens_total{{node=\"{node}\"}} {total}"
        );
        let _ = writeln!(
            out,
            "# HELP moe_node_in_flight Dispatch requests being computed.\n\
             # TYPE moe_node_in_flight gauge\nmoe_node_in_flight{{node=\"{node}\"}} {in_flight}"
        );
        let per_expert =
            |out: &mut String, name: &str, help: &str, value: &dyn Fn(&(u64, f64)) -> String| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for ((l, e), v) in m.iter() {
                    let _ = writeln!(
                        out,
                        "{name}{{node=\"{node}\",layer=\"{l}\",expert=\"{e}\"}} {}",
                        value(v)
                    );
                }
            };
        per_expert(
            &mut out,
            "moe_node_layer_expert_tokens_total",
            "Tokens computed per (layer, expert).",
            &|v| v.0.to_string(),
        );
        per_expert(
            &mut out,
            "moe_node_layer_expert_compute_seconds_total",
            "Compute time per (layer, expert), attributed by token share within each request.",
            &|v| format!("{:.6}", v.1),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_time_are_attributed_by_share() {
        let s = NodeStats::default();
        s.record(1, &[3, 3, 5, 3], Duration::from_millis(8));
        s.record(2, &[3], Duration::from_millis(1));
        let text = s.render("n0", 2);
        assert!(text.contains(
            "moe_node_layer_expert_tokens_total{node=\"n0\",layer=\"1\",expert=\"3\"} 3"
        ));
        assert!(
            text.contains("moe_node_expert_tokens_total{node=\"n0\"} 5"),
            "{text}"
        );
        assert!(text.contains(
            "moe_node_layer_expert_compute_seconds_total{node=\"n0\",layer=\"1\",expert=\"3\"} 0.006000"
        ));
        assert!(text.contains("moe_node_in_flight{node=\"n0\"} 2"));
    }
}
