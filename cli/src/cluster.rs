//! What the cluster roles share on the command line: the metadata store (etcd, or the in-memory
//! store inside `moe up`), the cluster name, lease TTLs; and starting each role in-process.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moe_meta::records::Keys;
use moe_meta::store::MetaStore;
use moe_meta::store::etcd::EtcdStore;

/// Cluster options.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// etcd endpoints (`http://127.0.0.1:2379,...`): join a coordinated cluster.
    #[arg(long, env = "MOE_ETCD")]
    pub etcd: Option<String>,
    /// Cluster name (keys live under `/moe/<cluster>/`).
    #[arg(long, env = "MOE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Lease TTL of registrations and leadership, milliseconds.
    #[arg(long, env = "MOE_LEASE_TTL_MS", default_value_t = 3000)]
    pub lease_ttl_ms: u64,
    /// Routers: how often to publish token counts per (layer, expert), milliseconds.
    #[arg(long, env = "MOE_LOAD_PUBLISH_MS", default_value_t = 5000)]
    pub load_publish_ms: u64,
}

impl ClusterArgs {
    pub fn keys(&self) -> Keys {
        Keys::new(&self.cluster)
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms.max(1000))
    }

    /// Connects to etcd (retrying for a while: the cluster may be starting).
    pub async fn connect(&self) -> anyhow::Result<Arc<dyn MetaStore>> {
        let url = self.etcd.as_deref().context("--etcd is required")?;
        let mut last = None;
        for _ in 0..50 {
            match EtcdStore::connect(url).await {
                Ok(s) => return Ok(Arc::new(s)),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(anyhow::anyhow!(
            "cannot reach etcd at {url}: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }
}

/// A unique id for a process of `role`.
pub fn process_id(role: &str, port: u16) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{role}-{port}-{:x}{:x}", std::process::id(), nanos % 0xffff)
}

/// MoE layers and routed-expert count of the model in `dir`.
pub fn model_shape(dir: &Path) -> anyhow::Result<(Vec<usize>, usize)> {
    let cfg =
        moe_model::Config::from_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let n = cfg
        .moe()
        .map(|m| m.n_routed_experts)
        .context("the model has no routed experts")?;
    Ok((cfg.moe_layers(), n))
}
