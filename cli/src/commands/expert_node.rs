//! `moe expert-node`: serve a slice of the routed experts over gRPC, either a static slice
//! (`--experts SPEC` or `--placement FILE --node-id ID`) or, with `--etcd`, whatever the
//! coordinator places on it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use moe_expert_node::membership::{MemberConfig, run_member};
use moe_expert_node::{ExpertNode, ServerOptions};
use moe_meta::{ExpertSpec, Placement};
use tokio::sync::watch;

use crate::cluster::ClusterArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory (config.json and safetensors; only the hosted experts are read).
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address routers dial (default: the listening address).
    #[arg(long, env = "MOE_ADVERTISE")]
    advertise: Option<String>,
    /// Experts to host: `LAYERS:EXPERTS[;...]`, e.g. `1-3:0-127` or `*:*`.
    #[arg(long, env = "MOE_EXPERTS", conflicts_with = "placement")]
    experts: Option<String>,
    /// Placement file; the node hosts the experts of its `--node-id` entry and serves its version.
    #[arg(long, env = "MOE_PLACEMENT", requires = "node_id")]
    placement: Option<PathBuf>,
    /// Node id (default: the pod name, `POD_NAME` or `HOSTNAME`, else the host name). With
    /// --etcd, a node whose id is registered by another live process refuses to start.
    #[arg(long, env = "MOE_NODE_ID")]
    node_id: Option<String>,
    /// With --etcd: how many (layer, expert) pairs this node can hold (default: all of them).
    #[arg(long, env = "MOE_CAPACITY")]
    capacity: Option<usize>,
    /// Serve Prometheus metrics (tokens and compute time per expert) over HTTP on this address
    /// (port 0 picks one; the chosen address is printed).
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Also export per-(layer, expert) token and compute-time series (up to layers × experts
    /// series per node; per-layer series are always exported).
    #[arg(long, env = "MOE_EXPERT_METRICS")]
    expert_metrics: bool,
    /// Largest gRPC message, bytes; a larger declaration is refused from its header. A message
    /// is held as its bytes arrive, never reserved at its declared length.
    #[arg(long, env = "MOE_MAX_MESSAGE_BYTES", default_value_t = moe_proto::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Messages one Dispatch stream holds (read, not yet answered) before it stops reading:
    /// a client that writes without reading is pushed back by HTTP/2 flow control.
    #[arg(long, env = "MOE_MAX_IN_FLIGHT_PER_STREAM", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight_per_stream: u32,
    /// Messages the node holds over all streams and Compute calls; more are answered
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "MOE_MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,
    /// Concurrent gRPC calls (HTTP/2 streams) per connection.
    #[arg(long, env = "MOE_MAX_STREAMS_PER_CONNECTION", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    max_streams_per_connection: u32,
    #[command(flatten)]
    tls: crate::tls_args::ClusterTlsArgs,
    /// With cluster TLS: accept only clients whose certificate names one of these (DNS names or
    /// IP addresses; repeat the flag or separate with commas); empty: any certificate of the
    /// cluster CA.
    #[arg(long, env = "MOE_CLUSTER_TLS_ALLOWED_SANS", value_delimiter = ',')]
    cluster_tls_allowed_san: Vec<String>,
    /// Where the experts live and compute: cpu, or cuda / cuda:N (a build with the cargo
    /// feature `cuda` and an NVIDIA driver).
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    device: moe_model::Device,
    #[command(flatten)]
    cluster: ClusterArgs,
}

impl Args {
    /// `--node-id`, when given.
    pub fn node_id(&self) -> Option<String> {
        self.node_id.clone()
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = moe_model::ModelConfig::from_dir(&a.model)
        .with_context(|| format!("reading {}", a.model.display()))?;
    let n_experts = cfg.n_routed_experts();
    if n_experts == 0 {
        bail!("the model has no routed experts");
    }
    // Before binding or loading anything: a device that cannot be used is a start-up error.
    a.device
        .check()
        .with_context(|| format!("--device {}", a.device))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tls = a.tls.load(&a.cluster_tls_allowed_san)?;
    let server_tls = match &tls {
        Some(t) => Some(t.server()?),
        None => None,
    };
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr()?;
        let id = crate::cluster::node_id(a.node_id.as_deref());
        let (pairs, versions) = match (&a.experts, &a.placement, &a.cluster.etcd) {
            (Some(spec), None, _) => (
                spec.parse::<ExpertSpec>()?
                    .pairs(&cfg.moe_layers(), n_experts)?,
                BTreeSet::new(),
            ),
            (None, Some(file), _) => {
                let p = Placement::from_file(file, &cfg.moe_layers(), n_experts)?;
                let spec: ExpertSpec = p.node(&id)?.experts.parse()?;
                (
                    spec.pairs(&cfg.moe_layers(), n_experts)?,
                    [p.version].into(),
                )
            }
            (None, None, Some(_)) => (Vec::new(), BTreeSet::new()),
            _ => bail!("give --experts SPEC, --placement FILE --node-id ID, or --etcd URL"),
        };
        let (dir, device) = (a.model.clone(), a.device);
        let node = tokio::task::spawn_blocking(move || {
            ExpertNode::load_on(id, &dir, &pairs, versions, device)
        })
        .await??;
        let node = Arc::new(node);
        let (stop, stopped) = watch::channel(false);
        let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<String>();
        let member = if a.cluster.etcd.is_some() {
            let store = a.cluster.connect().await?;
            let member = MemberConfig {
                keys: a.cluster.keys(),
                addr: a.advertise.clone().unwrap_or_else(|| addr.to_string()),
                capacity: a.capacity.unwrap_or(cfg.moe_layers().len() * n_experts),
                lease_ttl: a.cluster.ttl(),
            };
            let (node, stopped) = (node.clone(), stopped.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = run_member(node, store, member, stopped).await {
                    let _ = fatal_tx.send(e);
                }
            }))
        } else {
            None
        };
        // Tests and scripts read these lines to learn the ports.
        println!("expert node {} listening on {addr}", node.id);
        if let Some(m) = a.metrics_listen {
            let n = node.clone();
            n.stats.set_per_expert_series(a.expert_metrics);
            crate::metrics_http::start(m, Arc::new(move || n.render_metrics())).await?;
        }
        tracing::info!(node = %node.id, %addr, "serving");
        let opts = ServerOptions {
            max_message_bytes: a.max_message_bytes,
            max_in_flight_per_stream: a.max_in_flight_per_stream as usize,
            max_in_flight: a.max_in_flight as usize,
            max_streams_per_connection: a.max_streams_per_connection,
            tls: server_tls,
        };
        let fatal = Arc::new(std::sync::Mutex::new(None));
        let f = fatal.clone();
        let shutdown = async move {
            tokio::select! {
                _ = crate::signal::shutdown() => {}
                Ok(e) = fatal_rx => {
                    *f.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
            let _ = stop.send(true);
        };
        moe_expert_node::serve(node, listener, opts, shutdown).await?;
        if let Some(m) = member {
            let _ = m.await;
        }
        if let Some(e) = fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
            bail!("{e}");
        }
        tracing::info!("stopped");
        Ok(())
    })
}
