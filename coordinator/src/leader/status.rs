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
    /// Rollouts started while leading (membership and load together), and the total duration
    /// of those that completed.
    pub rollouts: u64,
    pub rollout_seconds: f64,
    /// Nodes left out of placement (load failed or timed out), with why.
    pub excluded: Vec<(String, String)>,
}

impl CoordinatorStatus {
    /// Prometheus text exposition of the status, for the coordinator's `/metrics`.
    pub fn render_metrics(&self) -> String {
        crate::metrics::render(self)
    }
}
