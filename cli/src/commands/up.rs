//! `moe up`: a whole local cluster in one process: a coordinator, N expert nodes (each its own
//! gRPC server on loopback), and a router with the HTTP API, meeting through the in-memory
//! metadata store (or a real etcd with `--etcd`). Shows readiness as it comes up and stops
//! everything on Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moe_coordinator::CoordinatorStatus;
use moe_expert_node::membership::{MemberConfig, run_member};
use moe_expert_node::{ExpertNode, ServerOptions};
use moe_meta::store::MetaStore;
use moe_meta::store::memory::MemStore;
use moe_router::cluster::{FollowConfig, check_ready, follow};
use moe_router::{DispatchOptions, Engine, RemoteExperts};
use tokio::sync::watch;

use crate::cluster::{ClusterArgs, model_shape};
use crate::commands::serve::{ServeArgs, app_state, engine_verdict, engine_watch};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Expert nodes to start.
    #[arg(long, env = "MOE_NODES", default_value_t = 4)]
    nodes: usize,
    /// Replicas of every expert (at least; hot experts get more when load rebalancing is on).
    #[arg(long, env = "MOE_REPLICAS", default_value_t = moe_coordinator::leader::DEFAULT_MIN_REPLICAS)]
    replicas: usize,
    /// Wire dtype of hidden states between the router and the nodes: bf16, f32 (exact), or fp8
    /// (e4m3 with one scale per 128 values; nodes answer in bf16).
    #[arg(long, env = "MOE_WIRE", default_value = "bf16", value_parser = crate::engine::parse_wire)]
    wire: moe_proto::pb::Dtype,
    #[command(flatten)]
    rebalance: super::coordinator::RebalanceArgs,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.nodes > 0, "--nodes must be at least 1");
    let device = a.serve.device;
    device
        .check()
        .with_context(|| format!("--device {device}"))?;
    let dir = a.serve.model_dir()?;
    let (moe_layers, n_experts) = model_shape(&dir)?;
    let backbone = crate::progress::load_backbone(&dir)?;
    let hidden = backbone.hidden_size();
    let opts = a.serve.listener_options()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store: Arc<dyn MetaStore> = match &a.cluster.etcd {
            Some(_) => a.cluster.connect().await?,
            None => Arc::new(MemStore::start()),
        };
        let (stop, stopped) = watch::channel(false);
        let keys = a.cluster.keys();
        let ttl = a.cluster.ttl();

        let (status_tx, mut status) = watch::channel(CoordinatorStatus::default());
        let coord = super::coordinator::config(
            &dir,
            a.replicas,
            crate::cluster::process_id("coordinator"),
            &a.cluster,
            Duration::from_secs(120),
            a.rebalance.config(),
        )?;
        let mut tasks = vec![tokio::spawn(moe_coordinator::run(store.clone(), coord, status_tx, stopped.clone()))];

        for i in 0..a.nodes {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding an expert node")?;
            let addr = listener.local_addr()?.to_string();
            let d = dir.clone();
            let node = tokio::task::spawn_blocking(move || ExpertNode::load_on(format!("node-{i}"), &d, &[], Default::default(), device))
                .await??;
            let node = Arc::new(node);
            let member = MemberConfig { keys: keys.clone(), addr: addr.clone(), capacity: moe_layers.len() * n_experts, lease_ttl: ttl };
            let (n, st, sp) = (node.clone(), store.clone(), stopped.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = run_member(n, st, member, sp).await {
                    tracing::error!(error = %e, "expert node left the cluster");
                }
            }));
            let mut s = stopped.clone();
            tasks.push(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = moe_meta::store::wait_until(&mut s, |v| *v).await;
                };
                if let Err(e) = moe_expert_node::serve(node, listener, ServerOptions::default(), shutdown).await {
                    tracing::error!(error = %e, "expert node stopped");
                }
            }));
            println!("expert node node-{i} on {addr}");
        }

        let experts = Arc::new(RemoteExperts::empty(hidden, DispatchOptions { wire: a.wire, ..DispatchOptions::default() }, tokio::runtime::Handle::current()));
        let listener = tokio::net::TcpListener::bind(a.serve.listen).await.with_context(|| format!("binding {}", a.serve.listen))?;
        let http = listener.local_addr()?;
        let fcfg = FollowConfig {
            keys: keys.clone(),
            id: crate::cluster::process_id("router"),
            addr: http.to_string(),
            moe_layers,
            n_experts,
            lease_ttl: ttl,
            load_publish: Duration::from_millis(a.cluster.load_publish_ms),
        };
        tasks.push(tokio::spawn(follow(store.clone(), fcfg, experts.clone(), stopped.clone())));
        let probe = experts.clone();
        let ready = Arc::new(move || check_ready(&probe));
        let state = app_state(&a.serve, Engine::remote(backbone, experts.clone()), ready.clone())?;
        println!("listening on {http}");

        // Readiness, as it comes.
        let progress = tokio::spawn(async move {
            let mut shown = 0;
            loop {
                let v = status.borrow_and_update().active_version;
                if v != shown && v > 0 {
                    shown = v;
                    println!("placement {v} active");
                }
                if v > 0 && ready().is_ok() {
                    println!("ready: curl http://{http}/v1/completions -H 'content-type: application/json' -d '{{\"prompt\": \"Hello\", \"max_tokens\": 16}}'");
                    break;
                }
                tokio::select! {
                    _ = status.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            // Then what load rebalancing does.
            let mut last = status.borrow_and_update().clone();
            while status.changed().await.is_ok() {
                let s = status.borrow_and_update().clone();
                for line in super::coordinator::rebalance_changes(&last, &s) {
                    println!("{line}");
                }
                last = s;
            }
        });
        let signal = async move {
            crate::signal::shutdown().await;
            println!("stopping");
        };
        let (shutdown, died) = engine_watch(&state, &a.serve, signal);
        // Requests in flight finish first (the API stops taking new ones); only then do the
        // nodes drain and the coordinator step down, so a stop loses no request.
        let served = moe_router::http::serve(listener, state, opts, shutdown).await;
        let _ = stop.send(true);
        served?;
        progress.abort();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        println!("stopped");
        engine_verdict(died).await
    })
}
