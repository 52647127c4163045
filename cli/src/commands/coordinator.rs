//! `moe coordinator`: a coordinator replica (run two or more; one leads).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moe_coordinator::{CoordinatorConfig, CoordinatorStatus, RebalanceConfig};
use tokio::sync::watch;

use crate::cluster::{ClusterArgs, model_shape, process_id};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory (its config gives the MoE layers and expert count).
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    /// Replicas of every expert (capped at the number of nodes). The default, 2, survives the
    /// loss of any one node with no failed request; 1 halves memory but a node's death stalls
    /// its experts until re-placement.
    #[arg(long, env = "MOE_MIN_REPLICAS", default_value_t = moe_coordinator::leader::DEFAULT_MIN_REPLICAS)]
    min_replicas: usize,
    /// Longest wait for nodes to load a new placement, milliseconds.
    #[arg(long, env = "MOE_ACK_TIMEOUT_MS", default_value_t = 120_000)]
    ack_timeout_ms: u64,
    /// Quiet time membership must keep before a new placement is planned, milliseconds (nodes
    /// that register together are placed together; changes during a rollout wait for it).
    #[arg(long, env = "MOE_SETTLE_MS", default_value_t = moe_coordinator::leader::DEFAULT_SETTLE.as_millis() as u64)]
    settle_ms: u64,
    /// Replica id (default: generated).
    #[arg(long, env = "MOE_COORDINATOR_ID")]
    id: Option<String>,
    /// Serve Prometheus metrics (placement version, per-layer balancedness, rebalance rounds)
    /// over HTTP on this address (port 0 picks one; the chosen address is printed).
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    rebalance: RebalanceArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// The lines a status change is reported with (tests and scripts read them).
pub fn changes(last: &CoordinatorStatus, s: &CoordinatorStatus) -> Vec<String> {
    let mut out = Vec::new();
    if s.leading != last.leading {
        out.push(if s.leading { "leading" } else { "standby" }.to_string());
    }
    if s.active_version != last.active_version && s.leading {
        out.push(format!(
            "placement {} active ({} nodes, moved {}, {} ms after the change)",
            s.active_version,
            s.nodes,
            s.last_moved,
            s.last_rollout.as_millis()
        ));
    }
    out.extend(rebalance_changes(last, s));
    out
}

/// The lines a status change reports about load-driven rebalancing.
pub fn rebalance_changes(last: &CoordinatorStatus, s: &CoordinatorStatus) -> Vec<String> {
    let mut out = Vec::new();
    if s.last_rebalance != last.last_rebalance
        && let Some(r) = &s.last_rebalance
    {
        out.push(format!(
            "layer {} rebalanced: balancedness {:.3} -> {:.3}, moved {} (placement {})",
            r.layer, r.before, r.after, r.moved, r.version
        ));
    }
    if s.rebalance_rounds != last.rebalance_rounds {
        let b: Vec<String> = s
            .balancedness
            .iter()
            .map(|(l, b)| format!("{l}: {b:.3}"))
            .collect();
        out.push(format!(
            "rebalance round {} done; balancedness by layer {}",
            s.rebalance_rounds,
            b.join(", ")
        ));
    }
    out
}

/// Load-driven rebalancing (hot-expert replication from the routers' load counts).
#[derive(Debug, Clone, clap::Args)]
pub struct RebalanceArgs {
    /// Re-place a layer whose balancedness (mean node load / max node load) under the live load
    /// falls below this; 0 turns it off. With a floor of one replica per expert the algorithm
    /// decides replica counts itself; above one it keeps that floor and adds replicas of hot
    /// experts in spare slots.
    #[arg(long, env = "MOE_REBALANCE_THRESHOLD", default_value_t = 0.8)]
    rebalance_threshold: f64,
    /// How often the load is read and checked, milliseconds.
    #[arg(long, env = "MOE_REBALANCE_INTERVAL_MS", default_value_t = 10_000)]
    rebalance_interval_ms: u64,
    /// Least time between two rebalancing rounds, milliseconds.
    #[arg(long, env = "MOE_REBALANCE_COOLDOWN_MS", default_value_t = 60_000)]
    rebalance_cooldown_ms: u64,
    /// Fewest tokens a layer needs in the routers' windows before its balance is judged.
    #[arg(long, env = "MOE_REBALANCE_MIN_TOKENS", default_value_t = 10_000)]
    rebalance_min_tokens: u64,
    /// Weight of the newest load reading in the moving average (1: no smoothing).
    #[arg(long, env = "MOE_REBALANCE_ALPHA", default_value_t = 0.3)]
    rebalance_alpha: f64,
    /// Balancedness given up (below a from-scratch plan) to move fewer experts.
    #[arg(long, env = "MOE_REBALANCE_TOLERANCE", default_value_t = 0.01)]
    rebalance_tolerance: f64,
}

impl RebalanceArgs {
    pub fn config(&self) -> RebalanceConfig {
        RebalanceConfig {
            threshold: self.rebalance_threshold.clamp(0.0, 1.0),
            interval: Duration::from_millis(self.rebalance_interval_ms),
            alpha: self.rebalance_alpha,
            min_tokens: self.rebalance_min_tokens,
            tolerance: self.rebalance_tolerance,
            cooldown: Duration::from_millis(self.rebalance_cooldown_ms),
        }
    }
}

pub fn config(
    model: &std::path::Path,
    min_replicas: usize,
    id: String,
    cluster: &ClusterArgs,
    ack_timeout: Duration,
    rebalance: RebalanceConfig,
) -> anyhow::Result<CoordinatorConfig> {
    let (moe_layers, n_experts) = model_shape(model)?;
    Ok(CoordinatorConfig {
        id,
        keys: cluster.keys(),
        moe_layers,
        n_experts,
        min_replicas,
        lease_ttl: cluster.ttl(),
        ack_timeout,
        settle: moe_coordinator::leader::DEFAULT_SETTLE,
        rebalance,
    })
}

impl Args {
    /// `--id`, when given.
    pub fn id(&self) -> Option<String> {
        self.id.clone()
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let id = a.id.clone().unwrap_or_else(|| process_id("coordinator"));
    let mut cfg = config(
        &a.model,
        a.min_replicas,
        id.clone(),
        &a.cluster,
        Duration::from_millis(a.ack_timeout_ms),
        a.rebalance.config(),
    )?;
    cfg.settle = Duration::from_millis(a.settle_ms);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = a.cluster.connect().await?;
        let (status, mut rx) = watch::channel(CoordinatorStatus::default());
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(async move {
            crate::signal::shutdown().await;
            let _ = stop.send(true);
        });
        // Tests and scripts read these lines.
        println!("coordinator {id} started");
        let task = tokio::spawn(moe_coordinator::run(store, cfg, status, stopped));
        if let Some(m) = a.metrics_listen {
            let probe = rx.clone();
            crate::metrics_http::start(m, Arc::new(move || probe.borrow().render_metrics()))
                .await?;
        }
        let report = tokio::spawn(async move {
            let mut last = CoordinatorStatus::default();
            while rx.changed().await.is_ok() {
                let s = rx.borrow().clone();
                for line in changes(&last, &s) {
                    println!("{line}");
                }
                last = s;
            }
        });
        let _ = task.await;
        report.abort();
        Ok(())
    })
}
