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
    /// Failures that stopped (part of) a rebalancing round, by reason: `loads_unread` (the
    /// `load/` prefix could not be listed), `load_undecodable` (a router's record skipped),
    /// `compute_failed` (the re-placement task died), `rollout_failed` (a layer's rollout did
    /// not complete).
    pub rebalance_errors: BTreeMap<&'static str, u64>,
    /// Wall seconds the last round's re-placement took, per layer computed.
    pub rebalance_compute: BTreeMap<usize, f64>,
}

/// Every reason of [`CoordinatorStatus::rebalance_errors`].
pub const REBALANCE_ERROR_REASONS: [&str; 4] = [
    "loads_unread",
    "load_undecodable",
    "compute_failed",
    "rollout_failed",
];

impl CoordinatorStatus {
    /// Counts a rebalancing failure (see [`CoordinatorStatus::rebalance_errors`]).
    pub fn rebalance_error(&mut self, reason: &'static str) {
        *self.rebalance_errors.entry(reason).or_default() += 1;
    }
}

impl CoordinatorStatus {
    /// Prometheus text exposition of the status, for the coordinator's `/metrics`.
    pub fn render_metrics(&self) -> String {
        crate::metrics::render(self)
    }
}
