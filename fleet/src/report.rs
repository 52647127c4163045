//! One scenario's numbers (the JSON object `moe simulate --json` writes) and the table it prints.

use std::fmt::Write;

use crate::share::Spread;
use crate::store::Counts;

/// What one scenario cost and how it ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub scenario: String,
    pub nodes: usize,
    pub routers: usize,
    pub layers: usize,
    pub experts: usize,
    pub min_replicas: usize,
    pub writes: u64,
    pub bytes_written: u64,
    pub events_delivered: u64,
    pub bytes_delivered: u64,
    /// Largest value written during the scenario.
    pub largest_value_bytes: u64,
    /// Over the scenario's simulated time (the steady state's is the measure).
    pub writes_per_s: f64,
    pub bytes_written_per_s: f64,
    /// Simulated seconds from the scenario's trigger until the fleet converged (the active
    /// placement names exactly the running nodes, nothing pending, every router on it);
    /// `None` for the steady state, or when it did not converge within the limit.
    pub converge_s: Option<f64>,
    /// Simulated seconds the scenario ran.
    pub sim_s: f64,
    pub wall_s: f64,
    pub converged: bool,
    /// See [`crate::share`]: 0 whenever a layer has under one replica per node.
    pub min_layer_share: f64,
    pub max_layer_share: f64,
    pub layer_replicas_per_node: f64,
    pub layer_counts_within_rounding: bool,
    pub min_node_share: f64,
    pub max_node_share: f64,
    /// Rollouts the coordinator started during the scenario.
    pub rollouts: u64,
    pub largest_list_bytes: u64,
    /// Gets and lists, and their bytes (not watch deliveries).
    pub reads: u64,
    pub bytes_read: u64,
    pub keep_alives: u64,
    pub refused_too_large: u64,
    pub refused_no_space: u64,
    /// Most history within the compaction retention (bytes), since the start of the run.
    pub peak_history_bytes: u64,
    /// The scenario stopped at its wall-time budget (`--wall-limit-s`) before converging.
    pub out_of_wall_time: bool,
    /// What else the scenario measured (per-restart averages, per-layer compute).
    pub note: String,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        scenario: &str,
        cfg: &crate::FleetConfig,
        counts: Counts,
        sim_s: f64,
        wall_s: f64,
        converge_s: Option<f64>,
        spread: Option<Spread>,
        rollouts: u64,
    ) -> Report {
        let per_s = |x: u64| if sim_s > 0.0 { x as f64 / sim_s } else { 0.0 };
        let s = spread.unwrap_or(Spread {
            min_layer_share: 0.0,
            max_layer_share: 0.0,
            layer_mean: 0.0,
            within_rounding: false,
            min_node_share: 0.0,
            max_node_share: 0.0,
        });
        Report {
            scenario: scenario.into(),
            nodes: cfg.nodes,
            routers: cfg.routers,
            layers: cfg.layers,
            experts: cfg.experts,
            min_replicas: cfg.min_replicas,
            writes: counts.writes,
            bytes_written: counts.bytes_written,
            events_delivered: counts.events_delivered,
            bytes_delivered: counts.bytes_delivered,
            largest_value_bytes: counts.largest_value_bytes,
            writes_per_s: per_s(counts.writes),
            bytes_written_per_s: per_s(counts.bytes_written),
            converge_s,
            sim_s,
            wall_s,
            converged: converge_s.is_some() || scenario == "steady",
            min_layer_share: s.min_layer_share,
            max_layer_share: s.max_layer_share,
            layer_replicas_per_node: s.layer_mean,
            layer_counts_within_rounding: s.within_rounding,
            min_node_share: s.min_node_share,
            max_node_share: s.max_node_share,
            rollouts,
            largest_list_bytes: counts.largest_list_bytes,
            reads: counts.reads,
            bytes_read: counts.bytes_read,
            keep_alives: counts.keep_alives,
            refused_too_large: counts.refused_too_large,
            refused_no_space: counts.refused_no_space,
            peak_history_bytes: counts.peak_history_bytes,
            out_of_wall_time: false,
            note: String::new(),
        }
    }
}

fn bytes(b: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let (mut v, mut u) = (b, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The reports as a text table (one row per scenario), then each scenario's note.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>9} {:>11} {:>11} {:>11} {:>11} {:>10} {:>9} {:>10} {:>9} {:>8} {:>8} {:>6} {:>7}",
        "scenario",
        "writes",
        "written",
        "events",
        "delivered",
        "read",
        "largest",
        "writes/s",
        "written/s",
        "converge",
        "wall",
        "share",
        "round",
        "rollout"
    );
    for r in reports {
        let converge = match (r.converge_s, r.scenario.as_str()) {
            _ if r.out_of_wall_time => "stopped".into(),
            (Some(c), _) => format!("{c:.1} s"),
            (None, "steady") => "-".into(),
            (None, _) => "never".into(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:>11} {:>11} {:>11} {:>11} {:>10} {:>9.1} {:>10} {:>9} {:>7.1}s {:>8.3} {:>6} {:>7}",
            r.scenario,
            r.writes,
            bytes(r.bytes_written as f64),
            r.events_delivered,
            bytes(r.bytes_delivered as f64),
            bytes(r.bytes_read as f64),
            bytes(r.largest_value_bytes as f64),
            r.writes_per_s,
            format!("{}/s", bytes(r.bytes_written_per_s)),
            converge,
            r.wall_s,
            r.min_layer_share,
            if r.layer_counts_within_rounding {
                "yes"
            } else {
                "no"
            },
            r.rollouts
        );
    }
    for r in reports.iter().filter(|r| !r.note.is_empty()) {
        let _ = writeln!(out, "{}: {}", r.scenario, r.note);
    }
    out
}
