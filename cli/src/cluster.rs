//! What the cluster roles share on the command line: the metadata store (etcd, or the in-memory
//! store inside `moe up`), the cluster name, lease TTLs; and starting each role in-process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moe_meta::records::Keys;
use moe_meta::store::MetaStore;
use moe_meta::store::etcd::{EtcdAuth, EtcdStore};

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
    /// Routers: how often to check the token counts per (layer, expert) and publish them if
    /// they drifted (at least every 12 checks), milliseconds.
    #[arg(long, env = "MOE_LOAD_PUBLISH_MS", default_value_t = 5000)]
    pub load_publish_ms: u64,
    /// CA bundle (PEM) that verifies the etcd members' certificates (`https://` endpoints).
    #[arg(long, env = "MOE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd members that require client certificates; needs --etcd-key.
    #[arg(long, env = "MOE_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "MOE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd authentication); its password comes from --etcd-password-file or
    /// MOE_ETCD_PASSWORD.
    #[arg(long, env = "MOE_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (trailing newline ignored).
    #[arg(long, env = "MOE_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl ClusterArgs {
    pub fn keys(&self) -> Keys {
        Keys::new(&self.cluster)
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms.max(1000))
    }

    /// The etcd credentials these flags give (files read and checked now).
    pub fn etcd_auth(&self) -> anyhow::Result<EtcdAuth> {
        let user = match &self.etcd_user {
            None => None,
            Some(u) => {
                let password = match (&self.etcd_password_file, std::env::var("MOE_ETCD_PASSWORD"))
                {
                    (Some(f), _) => std::fs::read_to_string(f)
                        .with_context(|| format!("reading the etcd password file {}", f.display()))?
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                    (None, Ok(p)) => p,
                    (None, Err(_)) => anyhow::bail!(
                        "--etcd-user needs a password: --etcd-password-file or MOE_ETCD_PASSWORD"
                    ),
                };
                Some((u.clone(), password))
            }
        };
        Ok(EtcdAuth::load(
            self.etcd_ca.as_deref(),
            self.etcd_cert.as_deref(),
            self.etcd_key.as_deref(),
            user,
        )?)
    }

    /// Connects to etcd, retrying for up to 30 s (the cluster may be starting): each try is a
    /// read that passes over every member for up to 5 s; tries are 200 ms apart, jittered.
    pub async fn connect(&self) -> anyhow::Result<Arc<dyn MetaStore>> {
        let url = self.etcd.as_deref().context("--etcd is required")?;
        let auth = self.etcd_auth()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match EtcdStore::connect_checked(url, &auth).await {
                Ok(s) => return Ok(Arc::new(s)),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    anyhow::bail!("cannot reach etcd at {url} for 30 s: {e}")
                }
                Err(e) => tracing::warn!(%url, error = %e, "etcd not reachable yet; retrying"),
            }
            let jitter = 0.75 + rand::random::<f64>() / 2.0;
            tokio::time::sleep(Duration::from_millis(200).mul_f64(jitter)).await;
        }
    }
}

/// This host's name: the pod name in Kubernetes (`POD_NAME` from the downward API, or the
/// `HOSTNAME` a pod's containers get), else the kernel's hostname.
pub fn host_name() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .chain(std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// A unique id for a process of `role` with no configuration: role, host (pod) name and a
/// random 64-bit suffix (`router-moe-router-7f9c-3f2a9c0d1e4b5a68`). Ports and pids repeat
/// across pods (every pod on port 7000; pid 1 in containers); this does not.
pub fn process_id(role: &str) -> String {
    format!("{role}-{}-{:016x}", host_name(), rand::random::<u64>())
}

/// An expert node's id: `--node-id`, else the pod name (a StatefulSet's `moe-node-3` is stable
/// across restarts, which is what lets a restarted node get its experts back), else the host
/// name. A second live process with the same id is refused when it registers.
pub fn node_id(flag: Option<&str>) -> String {
    flag.map(str::to_string).unwrap_or_else(host_name)
}

/// MoE layers and routed-expert count of the model in `dir`.
pub fn model_shape(dir: &Path) -> anyhow::Result<(Vec<usize>, usize)> {
    let cfg = moe_model::ModelConfig::from_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?;
    let n = cfg.n_routed_experts();
    anyhow::ensure!(n > 0, "the model has no routed experts");
    Ok((cfg.moe_layers(), n))
}
