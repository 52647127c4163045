//! TLS flags every role shares: the cluster's mutual TLS between routers and expert nodes
//! (`--cluster-tls-*`), loaded through [`moe_meta::tls`] so a bad file stops the process at
//! start-up with the file's name and what is wrong with it.

use std::path::PathBuf;
use std::sync::Arc;

use moe_meta::tls::ClusterTls;

/// Mutual TLS between routers and expert nodes (all three files, or none: plaintext).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterTlsArgs {
    /// CA bundle (PEM) of the cluster's mutual TLS between routers and expert nodes: peers
    /// must present a certificate that chains to it. Needs --cluster-tls-cert and
    /// --cluster-tls-key; without all three the data plane is plaintext.
    #[arg(long, env = "MOE_CLUSTER_TLS_CA")]
    pub cluster_tls_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM) for the cluster's mutual TLS. A node's
    /// certificate must name (DNS or IP SAN) the host routers dial: its advertised address.
    /// Re-read for every new connection: rotate by replacing the files.
    #[arg(long, env = "MOE_CLUSTER_TLS_CERT")]
    pub cluster_tls_cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --cluster-tls-cert.
    #[arg(long, env = "MOE_CLUSTER_TLS_KEY")]
    pub cluster_tls_key: Option<PathBuf>,
}

impl ClusterTlsArgs {
    /// The loaded configuration (checked now), with the SANs a node accepts from clients.
    pub fn load(&self, allowed_sans: &[String]) -> anyhow::Result<Option<Arc<ClusterTls>>> {
        let tls = ClusterTls::from_flags(
            self.cluster_tls_ca.as_deref(),
            self.cluster_tls_cert.as_deref(),
            self.cluster_tls_key.as_deref(),
            allowed_sans,
        )?;
        if let Some(t) = &tls {
            tracing::info!(ca = %t.ca.display(), cert = %t.cert.display(), allowed_sans = ?t.allowed_sans, "cluster mutual TLS on");
        }
        Ok(tls.map(Arc::new))
    }
}
