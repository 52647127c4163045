//! The remote-expert backend for static expert nodes (`moe router --experts-at`): the
//! placement comes from a file, or is discovered by asking every node what it hosts (`Info`);
//! then the router connects and waits until every node is up and hosts what the placement says.

use std::time::Duration;

use moe_meta::{NodeEntry, Placement, PlacementError};
use moe_model::ModelConfig;
use tokio::runtime::Handle;

use crate::dispatch::{DispatchError, ExpertClient};
use crate::{DispatchOptions, RemoteExperts};

/// How long static nodes get to come up and answer `Info`.
pub const STATIC_READY_WITHIN: Duration = Duration::from_secs(20);

/// Why the static backend could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the model has no routed experts")]
    NotMoe,
    #[error("asking node {addr} what it hosts: {why}")]
    Discovery { addr: String, why: String },
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("the placement has {nodes} nodes but {addrs} addresses were given")]
    Count { nodes: usize, addrs: usize },
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
}

/// Builds the placement from what each node at `addrs` says it hosts.
pub async fn placement_from_nodes(
    addrs: &[String],
    cfg: &ModelConfig,
    opts: &DispatchOptions,
) -> Result<Placement, RemoteError> {
    let n = cfg.n_routed_experts();
    if n == 0 {
        return Err(RemoteError::NotMoe);
    }
    let mut nodes = Vec::new();
    for addr in addrs {
        let client = ExpertClient::spawn(addr.clone(), opts.max_message_bytes, opts.tls.clone());
        let info = client.info().await;
        // Only for the question: its actor would otherwise keep a stream open (and reconnect)
        // for the life of the process.
        client.stop();
        let info = info.map_err(|s| RemoteError::Discovery {
            addr: addr.clone(),
            why: s.to_string(),
        })?;
        let spec: Vec<String> = info
            .hosted
            .iter()
            .filter(|r| !r.experts.is_empty())
            .map(|r| {
                let list: Vec<String> = r.experts.iter().map(u32::to_string).collect();
                format!("{}:{}", r.layer, list.join(","))
            })
            .collect();
        nodes.push(NodeEntry {
            id: info.node_id,
            address: Some(addr.clone()),
            experts: spec.join(";"),
        });
    }
    Ok(Placement::new(0, nodes, &cfg.moe_layers(), n)?)
}

/// Connects to the static nodes at `addrs` (node i of the placement is the i-th address),
/// with `placement` or the one discovered from the nodes, and waits until they are ready.
pub async fn connect_static(
    cfg: &ModelConfig,
    placement: Option<Placement>,
    addrs: Vec<String>,
    opts: DispatchOptions,
    handle: Handle,
) -> Result<RemoteExperts, RemoteError> {
    let placement = match placement {
        Some(p) => p,
        None => placement_from_nodes(&addrs, cfg, &opts).await?,
    };
    if placement.nodes.len() != addrs.len() {
        return Err(RemoteError::Count {
            nodes: placement.nodes.len(),
            addrs: addrs.len(),
        });
    }
    let n = addrs.len();
    let experts = RemoteExperts::new(placement, addrs, cfg.hidden_size(), opts, handle);
    experts
        .ready(STATIC_READY_WITHIN, Some(&cfg.fingerprint()))
        .await?;
    tracing::info!(nodes = n, "expert nodes ready");
    Ok(experts)
}
