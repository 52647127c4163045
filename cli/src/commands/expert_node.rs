//! `moe expert-node`: serve a slice of the routed experts over gRPC.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use moe_expert_node::{ExpertNode, ServerOptions};
use moe_meta::{ExpertSpec, Placement};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory (config.json and safetensors; only the hosted experts are read).
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Experts to host: `LAYERS:EXPERTS[;...]`, e.g. `1-3:0-127` or `*:*`.
    #[arg(long, env = "MOE_EXPERTS", conflicts_with = "placement")]
    experts: Option<String>,
    /// Placement file; the node hosts the experts of its `--node-id` entry and serves its version.
    #[arg(long, env = "MOE_PLACEMENT", requires = "node_id")]
    placement: Option<PathBuf>,
    /// Node id (default: node-<port>).
    #[arg(long, env = "MOE_NODE_ID")]
    node_id: Option<String>,
    /// Largest gRPC message, bytes.
    #[arg(long, env = "MOE_MAX_MESSAGE_BYTES", default_value_t = moe_proto::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = moe_model::Config::from_dir(&a.model)
        .with_context(|| format!("reading {}", a.model.display()))?;
    let n_experts = cfg
        .moe()
        .map(|m| m.n_routed_experts)
        .context("the model has no routed experts")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr()?;
        let id = a
            .node_id
            .clone()
            .unwrap_or_else(|| format!("node-{}", addr.port()));
        let (pairs, versions) = match (&a.experts, &a.placement) {
            (Some(spec), None) => (
                spec.parse::<ExpertSpec>()?
                    .pairs(&cfg.moe_layers(), n_experts)?,
                BTreeSet::new(),
            ),
            (None, Some(file)) => {
                let p = Placement::from_file(file, &cfg.moe_layers(), n_experts)?;
                let spec: ExpertSpec = p.node(&id)?.experts.parse()?;
                (
                    spec.pairs(&cfg.moe_layers(), n_experts)?,
                    [p.version].into(),
                )
            }
            _ => bail!("give --experts SPEC or --placement FILE --node-id ID"),
        };
        let dir = a.model.clone();
        let node =
            tokio::task::spawn_blocking(move || ExpertNode::load(id, &dir, &pairs, versions))
                .await??;
        let node = Arc::new(node);
        // Tests and scripts read this line to learn the port.
        println!("expert node {} listening on {addr}", node.id);
        tracing::info!(node = %node.id, %addr, "serving");
        let opts = ServerOptions {
            max_message_bytes: a.max_message_bytes,
        };
        moe_expert_node::serve(node, listener, opts, crate::signal::shutdown()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}
