//! What the coordinator reports (for `moe up`, its `/metrics` and tests).

use std::collections::BTreeMap;
use std::time::Duration;

/// One load-driven re-placement of a layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerRebalance {
    pub layer: usize,
    pub version: u64,
    /// Balancedness under the smoothed load before and after.
    pub before: f64,
    pub after: f64,
    pub moved: usize,
}

/// What the coordinator reports (for `moe up`, metrics and tests).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CoordinatorStatus {
    pub leading: bool,
    pub active_version: u64,
    /// Experts moved by the last rollout.
    pub last_moved: usize,
    /// Nodes in the active placement.
    pub nodes: usize,
    /// Time from noticing the membership change to the active placement, last rollout.
    pub last_rollout: Duration,
    /// Balancedness per MoE layer under the smoothed load and the active placement.
    pub balancedness: BTreeMap<usize, f64>,
    pub last_rebalance: Option<LayerRebalance>,
    /// Load-driven rounds that changed the placement.
    pub rebalance_rounds: u64,
    /// Rollouts started while leading (membership and load together).
    pub rollouts: u64,
    /// Nodes left out of placement (load failed or timed out), with why.
    pub excluded: Vec<(String, String)>,
}

impl CoordinatorStatus {
    /// Prometheus text exposition of the status, for the coordinator's `/metrics`.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "moe_coordinator_leading",
            "1 while this replica leads.",
            f64::from(u8::from(self.leading)),
        );
        gauge(
            "moe_placement_active_version",
            "Active placement version.",
            self.active_version as f64,
        );
        gauge(
            "moe_placement_nodes",
            "Nodes in the active placement.",
            self.nodes as f64,
        );
        gauge(
            "moe_placement_last_moved",
            "Experts the last rollout moved.",
            self.last_moved as f64,
        );
        gauge(
            "moe_placement_last_rollout_seconds",
            "Time from the change to the active placement, last rollout.",
            self.last_rollout.as_secs_f64(),
        );
        gauge(
            "moe_placement_excluded_nodes",
            "Nodes left out of placement because their load failed or timed out.",
            self.excluded.len() as f64,
        );
        let _ = writeln!(
            out,
            "# HELP moe_placement_rollouts_total Rollouts started while leading.\n\
             # TYPE moe_placement_rollouts_total counter\nmoe_placement_rollouts_total {}",
            self.rollouts
        );
        let _ = writeln!(
            out,
            "# HELP moe_rebalance_rounds_total Load-driven rounds that changed the placement.\n\
             # TYPE moe_rebalance_rounds_total counter\nmoe_rebalance_rounds_total {}",
            self.rebalance_rounds
        );
        let _ = writeln!(
            out,
            "# HELP moe_layer_balancedness Mean / max node load of a layer under the smoothed \
             load and the active placement.\n# TYPE moe_layer_balancedness gauge"
        );
        for (l, b) in &self.balancedness {
            let _ = writeln!(out, "moe_layer_balancedness{{layer=\"{l}\"}} {b}");
        }
        out
    }
}
