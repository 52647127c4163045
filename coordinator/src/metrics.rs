//! Every metric a coordinator exports, by name and with its help text, in one place, rendered
//! from its [`CoordinatorStatus`] as Prometheus text, plus the families every role shares
//! ([`moe_meta::telemetry::process`]). Dashboards read these names.

use std::fmt::Write;

use crate::leader::CoordinatorStatus;

/// 1 while this replica leads.
pub const LEADING: &str = "moe_coordinator_leading";
/// Active placement version (as this replica last wrote or read it).
pub const ACTIVE_VERSION: &str = "moe_placement_active_version";
/// Nodes in the active placement.
pub const NODES: &str = "moe_placement_nodes";
/// Experts the last rollout moved.
pub const LAST_MOVED: &str = "moe_placement_last_moved";
/// Duration of the last rollout.
pub const LAST_ROLLOUT: &str = "moe_placement_last_rollout_seconds";
/// Rollouts started.
pub const ROLLOUTS: &str = "moe_placement_rollouts_total";
/// Total rollout time (with [`ROLLOUTS`]: the mean rollout duration over a window).
pub const ROLLOUT_SECONDS: &str = "moe_placement_rollout_seconds_total";
/// Nodes left out of placement because their load failed or timed out.
pub const EXCLUDED_NODES: &str = "moe_placement_excluded_nodes";
/// Load-driven rounds that changed the placement.
pub const REBALANCE_ROUNDS: &str = "moe_rebalance_rounds_total";
/// Failures that stopped load rebalancing, by `reason`.
pub const REBALANCE_ERRORS: &str = "moe_coordinator_rebalance_errors_total";
/// Wall time of the last round's re-placements, summed over its layers.
pub const REBALANCE_COMPUTE: &str = "moe_coordinator_rebalance_compute_seconds";
/// Balancedness per layer under the smoothed load, by `layer`.
pub const LAYER_BALANCEDNESS: &str = "moe_layer_balancedness";

fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// The `/metrics` text of a coordinator in `status`.
pub fn render(status: &CoordinatorStatus) -> String {
    let mut out = String::new();
    let s = status;
    let g = "gauge";
    let c = "counter";
    sample(
        &mut out,
        LEADING,
        g,
        "1 while this coordinator replica leads.",
        f64::from(u8::from(s.leading)),
    );
    sample(
        &mut out,
        ACTIVE_VERSION,
        g,
        "Active placement version.",
        s.active_version as f64,
    );
    sample(
        &mut out,
        NODES,
        g,
        "Expert nodes in the active placement.",
        s.nodes as f64,
    );
    sample(
        &mut out,
        LAST_MOVED,
        g,
        "Experts the last rollout moved.",
        s.last_moved as f64,
    );
    sample(
        &mut out,
        LAST_ROLLOUT,
        g,
        "Time from the membership change to the active placement, last rollout.",
        s.last_rollout.as_secs_f64(),
    );
    sample(
        &mut out,
        ROLLOUTS,
        c,
        "Placement rollouts started by this replica (membership and load).",
        s.rollouts as f64,
    );
    sample(
        &mut out,
        ROLLOUT_SECONDS,
        c,
        "Total duration of the rollouts completed by this replica.",
        s.rollout_seconds,
    );
    sample(
        &mut out,
        EXCLUDED_NODES,
        g,
        "Nodes left out of placement because their load failed or timed out.",
        s.excluded.len() as f64,
    );
    sample(
        &mut out,
        REBALANCE_ROUNDS,
        c,
        "Load-driven rebalance rounds that changed the placement.",
        s.rebalance_rounds as f64,
    );
    let _ = writeln!(
        out,
        "# HELP {REBALANCE_ERRORS} Failures that stopped (part of) a load rebalancing round, by reason.\n# TYPE {REBALANCE_ERRORS} counter"
    );
    for reason in crate::leader::REBALANCE_ERROR_REASONS {
        let n = s.rebalance_errors.get(reason).copied().unwrap_or(0);
        let _ = writeln!(out, "{REBALANCE_ERRORS}{{reason=\"{reason}\"}} {n}");
    }
    sample(
        &mut out,
        REBALANCE_COMPUTE,
        g,
        "Wall time the last rebalancing round spent re-placing layers (off the async runtime).",
        s.rebalance_compute.values().sum(),
    );
    let _ = writeln!(
        out,
        "# HELP {LAYER_BALANCEDNESS} Mean over max node load of a layer under the smoothed load and the active placement (1 is perfectly balanced).\n# TYPE {LAYER_BALANCEDNESS} gauge"
    );
    for (l, b) in &s.balancedness {
        let _ = writeln!(out, "{LAYER_BALANCEDNESS}{{layer=\"{l}\"}} {b}");
    }
    out.push_str(&moe_meta::telemetry::process::render("coordinator"));
    out
}
