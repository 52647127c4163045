//! `moe simulate`: the fleet simulator ([`moe_fleet`]) for capacity planning: the real
//! coordinator, node-membership and router-follow code at fleet size over a counting in-memory
//! store on a simulated clock. Prints a table; `--json` writes one object per scenario.

use std::path::PathBuf;
use std::time::Duration;

use moe_fleet::{FleetConfig, Scenario};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Expert nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Routers (each publishes its load window every 5 s).
    #[arg(long, default_value_t = 64)]
    routers: usize,
    /// MoE layers (DeepSeek-V3: 58).
    #[arg(long, default_value_t = 58)]
    layers: usize,
    /// Routed experts per MoE layer (DeepSeek-V3: 256; V4-Pro class: 384).
    #[arg(long, default_value_t = 256)]
    experts: usize,
    /// Replicas of every expert.
    #[arg(long, default_value_t = moe_coordinator::leader::DEFAULT_MIN_REPLICAS)]
    min_replicas: usize,
    /// Scenario: steady, node-death, join-10, rolling-restart, rebalance or all (bring-up
    /// always runs first; the scenarios run one after another on the same fleet).
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Write the reports here as a JSON array.
    #[arg(long)]
    json: Option<PathBuf>,
    /// (layer, expert) slots per node (default: twice an even share of every replica).
    #[arg(long)]
    capacity: Option<usize>,
    /// Simulated seconds of steady state.
    #[arg(long, default_value_t = 600)]
    steady_s: u64,
    /// Nodes the rolling restart restarts (default: all); the note extrapolates to all.
    #[arg(long)]
    restarts: Option<usize>,
    /// Wall-time budget of each scenario, seconds (one out of it stops and says so).
    #[arg(long)]
    wall_limit_s: Option<u64>,
    /// Tokens per second each router routes.
    #[arg(long, default_value_t = 2000)]
    tokens_per_s: u64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let scenarios = Scenario::parse(&a.scenario).map_err(anyhow::Error::msg)?;
    let cfg = FleetConfig {
        nodes: a.nodes,
        routers: a.routers,
        layers: a.layers,
        experts: a.experts,
        min_replicas: a.min_replicas,
        capacity: a.capacity,
        steady: Duration::from_secs(a.steady_s),
        restarts: a.restarts,
        tokens_per_s: a.tokens_per_s,
        wall_limit: a.wall_limit_s.map(Duration::from_secs),
        ..FleetConfig::default()
    };
    // Each row as it is made (a fleet-size run takes minutes per scenario).
    let reports = moe_fleet::simulate(&cfg, &scenarios, |r| {
        eprint!("{}", moe_fleet::table(std::slice::from_ref(r)))
    })?;
    print!("{}", moe_fleet::table(&reports));
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_string_pretty(&reports)?)?;
    }
    Ok(())
}
