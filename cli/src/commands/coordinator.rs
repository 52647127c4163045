//! `moe coordinator`: a coordinator replica (run two or more; one leads).

use std::path::PathBuf;
use std::time::Duration;

use moe_coordinator::{CoordinatorConfig, CoordinatorStatus};
use tokio::sync::watch;

use crate::cluster::{ClusterArgs, model_shape, process_id};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory (its config gives the MoE layers and expert count).
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    /// Replicas of every expert (capped at the number of nodes).
    #[arg(long, env = "MOE_MIN_REPLICAS", default_value_t = 1)]
    min_replicas: usize,
    /// Longest wait for nodes to load a new placement, milliseconds.
    #[arg(long, env = "MOE_ACK_TIMEOUT_MS", default_value_t = 120_000)]
    ack_timeout_ms: u64,
    /// Replica id (default: generated).
    #[arg(long, env = "MOE_COORDINATOR_ID")]
    id: Option<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

pub fn config(
    model: &std::path::Path,
    min_replicas: usize,
    id: String,
    cluster: &ClusterArgs,
    ack_timeout: Duration,
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
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let id = a.id.clone().unwrap_or_else(|| process_id("coordinator", 0));
    let cfg = config(
        &a.model,
        a.min_replicas,
        id.clone(),
        &a.cluster,
        Duration::from_millis(a.ack_timeout_ms),
    )?;
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
        let report = tokio::spawn(async move {
            let mut last = CoordinatorStatus::default();
            while rx.changed().await.is_ok() {
                let s = rx.borrow().clone();
                if s.leading != last.leading {
                    println!("{}", if s.leading { "leading" } else { "standby" });
                }
                if s.active_version != last.active_version && s.leading {
                    println!(
                        "placement {} active ({} nodes, moved {}, {} ms after the change)",
                        s.active_version,
                        s.nodes,
                        s.last_moved,
                        s.last_rollout.as_millis()
                    );
                }
                last = s;
            }
        });
        let _ = task.await;
        report.abort();
        Ok(())
    })
}
