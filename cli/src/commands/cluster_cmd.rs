//! `moe cluster status` and `moe placement show`: the records in the metadata store, for people.

use moe_meta::records::{
    self, AckRecord, LoadRecord, NodeRecord, PlacementRecord, RouterRecord, spec_of,
};
use moe_meta::store::election::leader;
use moe_meta::store::placements::{Slot, read_whole};

use crate::cluster::ClusterArgs;

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Leader, nodes (address, capacity, acknowledged version), routers (version they route
    /// with), active and pending placement versions, and the routers' load: per layer the
    /// hottest experts, each node's share and the balancedness under the active placement.
    Status(ClusterArgs),
}

#[derive(Debug, clap::Subcommand)]
pub enum PlacementCommand {
    /// The active (and pending) placement: every node's experts as an expert spec.
    Show(ClusterArgs),
    /// Run the placement algorithm on load traces (`moe-load-trace/v1`) and write placements
    /// (`expert-placement/v1`, with per-replica shares) for eplb_score.py.
    Plan(PlanArgs),
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Trace file (`moe-load-trace/v1`).
    #[arg(long)]
    traces: std::path::PathBuf,
    /// GPUs (expert-parallel ranks).
    #[arg(long)]
    gpus: usize,
    /// Expert slots per GPU.
    #[arg(long)]
    slots_per_gpu: usize,
    /// Keep this many contiguous expert groups whole on hosts (with --nodes > 1).
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// Hosts the GPUs are spread over.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Only traces with this many logical experts (default: every trace that fits the slots).
    #[arg(long)]
    experts: Option<usize>,
    /// Output file.
    #[arg(long)]
    out: std::path::PathBuf,
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn placement(
    store: &dyn moe_meta::store::MetaStore,
    keys: &records::Keys,
    slot: Slot,
) -> anyhow::Result<Option<PlacementRecord>> {
    Ok(read_whole(store, keys, slot).await?)
}

pub fn run_cluster(c: ClusterCommand) -> anyhow::Result<()> {
    let ClusterCommand::Status(a) = c;
    rt()?.block_on(async move {
        let store = a.connect().await?;
        let keys = a.keys();
        println!("cluster `{}`", a.cluster);
        println!(
            "coordinator leader: {}",
            leader(store.as_ref(), &keys.election())
                .await?
                .unwrap_or_else(|| "none".into())
        );
        let active = placement(store.as_ref(), &keys, Slot::Active).await?;
        let pending = placement(store.as_ref(), &keys, Slot::Pending).await?;
        println!(
            "placement: active {}, pending {}",
            active
                .as_ref()
                .map_or("none".into(), |p| format!("v{}", p.version)),
            pending
                .as_ref()
                .map_or("none".into(), |p| format!("v{}", p.version))
        );
        let (acks, _) = store.list(&keys.acks()).await?;
        let (nodes, _) = store.list(&keys.nodes()).await?;
        println!("expert nodes ({}):", nodes.len());
        for kv in nodes {
            let n: NodeRecord = records::decode(&kv.key, &kv.value)?;
            let ack = acks
                .iter()
                .find(|a| a.key == keys.ack(&n.id))
                .and_then(|a| records::decode::<AckRecord>(&a.key, &a.value).ok())
                .map_or("-".into(), |a| format!("v{}", a.version));
            let hosted = active.as_ref().map_or(0, |p| p.pairs_of(&n.id).len());
            println!(
                "  {:<16} {:<22} capacity {:<6} experts {:<6} acked {:<5} {}",
                n.id, n.addr, n.capacity, hosted, ack, n.backend
            );
        }
        let (routers, _) = store.list(&keys.routers()).await?;
        println!("routers ({}):", routers.len());
        for kv in routers {
            let r: RouterRecord = records::decode(&kv.key, &kv.value)?;
            println!(
                "  {:<28} {:<22} routes with v{}",
                r.id, r.addr, r.placement_version
            );
        }
        let (loads, _) = store.list(&keys.loads()).await?;
        let loads: Vec<LoadRecord> = loads
            .iter()
            .filter_map(|kv| records::decode_load(&kv.key, &kv.value).ok())
            .collect();
        print_loads(&loads, active.as_ref());
        Ok(())
    })
}

/// Per layer: tokens, hottest experts, node shares and balancedness under `active`.
fn print_loads(loads: &[LoadRecord], active: Option<&PlacementRecord>) {
    let window = loads.iter().map(|r| r.window_ms).max().unwrap_or(0);
    println!(
        "load ({} routers, window up to {:.1} s):",
        loads.len(),
        window as f64 / 1e3
    );
    let mut by_layer: std::collections::BTreeMap<u16, Vec<f64>> = Default::default();
    for r in loads {
        for (l, c) in &r.layers {
            let sum = by_layer.entry(*l).or_insert_with(|| vec![0.0; c.len()]);
            sum.resize(sum.len().max(c.len()), 0.0);
            for (s, &x) in sum.iter_mut().zip(c) {
                *s += f64::from(x);
            }
        }
    }
    for (layer, counts) in by_layer {
        let total: f64 = counts.iter().sum();
        if total <= 0.0 {
            println!("  layer {layer}: no tokens");
            continue;
        }
        let mut order: Vec<usize> = (0..counts.len()).collect();
        order.sort_by(|&a, &b| counts[b].total_cmp(&counts[a]));
        let hot: Vec<String> = order
            .iter()
            .take(5)
            .map(|&e| format!("{e} ({:.1}%)", 100.0 * counts[e] / total))
            .collect();
        print!(
            "  layer {layer}: {total} tokens; hottest {}",
            hot.join(", ")
        );
        if let Some(p) = active {
            let layer_p = moe_coordinator::rebalance::layer_of(p, layer as usize, counts.len());
            let node_loads = layer_p.gpu_loads(&counts);
            let shares: Vec<String> = p
                .nodes
                .iter()
                .zip(&node_loads)
                .map(|(n, l)| format!("{} {:.1}%", n.id, 100.0 * l / total))
                .collect();
            print!(
                "; nodes {}; balancedness {:.3}",
                shares.join(", "),
                moe_meta::balancedness(&node_loads)
            );
        }
        println!();
    }
}

fn plan(a: PlanArgs) -> anyhow::Result<()> {
    use moe_coordinator::balance::{place_grouped, place_layer};
    let text = std::fs::read_to_string(&a.traces)?;
    let traces: serde_json::Value = serde_json::from_str(&text)?;
    let slots = vec![a.slots_per_gpu; a.gpus];
    let mut entries = Vec::new();
    let mut call_ms = Vec::new();
    for t in traces["traces"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no `traces` list"))?
    {
        let id = t["trace_id"].as_str().unwrap_or_default();
        let layers: Vec<Vec<f64>> = serde_json::from_value(t["load"].clone())?;
        let e = layers.first().map_or(0, Vec::len);
        if a.experts.is_some_and(|n| n != e) || e > a.gpus * a.slots_per_gpu {
            continue;
        }
        let started = std::time::Instant::now();
        let mut placed = Vec::new();
        for loads in &layers {
            placed.push(if a.groups > 1 && a.nodes > 1 {
                place_grouped(loads, &slots, a.gpus / a.nodes, a.groups)?
            } else {
                place_layer(loads, &slots)?
            });
        }
        call_ms.push(started.elapsed().as_secs_f64() * 1e3);
        for (layer, p) in placed.iter().enumerate() {
            entries.push(serde_json::json!({
                "trace_id": id, "layer": layer, "num_gpus": a.gpus, "num_nodes": a.nodes,
                "num_groups": a.groups,
                "shape_id": format!("n{}g{}_E{e}_r{}", a.nodes, a.gpus, a.gpus * a.slots_per_gpu),
                "algorithm": "moe-cluster",
                "gpu_experts": p.gpus.iter().map(|g| g.iter().map(|s| s.0).collect::<Vec<_>>()).collect::<Vec<_>>(),
                "gpu_expert_shares": p.gpus.iter().map(|g| g.iter().map(|s| s.1).collect::<Vec<_>>()).collect::<Vec<_>>(),
                "balancedness": p.balancedness(&layers[layer]),
            }));
        }
    }
    call_ms.sort_by(f64::total_cmp);
    let median = call_ms.get(call_ms.len() / 2).copied().unwrap_or(0.0);
    println!(
        "{} layer placements; median {median:.2} ms per trace call (all its layers)",
        entries.len()
    );
    std::fs::write(
        &a.out,
        serde_json::to_string(
            &serde_json::json!({"format": "expert-placement/v1", "placements": entries}),
        )?,
    )?;
    Ok(())
}

pub fn run_placement(c: PlacementCommand) -> anyhow::Result<()> {
    let a = match c {
        PlacementCommand::Show(a) => a,
        PlacementCommand::Plan(p) => return plan(p),
    };
    rt()?.block_on(async move {
        let store = a.connect().await?;
        let keys = a.keys();
        for (what, slot) in [("active", Slot::Active), ("pending", Slot::Pending)] {
            let Some(p) = placement(store.as_ref(), &keys, slot).await? else {
                println!("{what}: none");
                continue;
            };
            println!("{what}: version {}", p.version);
            for n in &p.nodes {
                println!(
                    "  {:<16} {:<22} {:>5} experts  {}",
                    n.id,
                    n.addr,
                    n.experts.len(),
                    spec_of(&n.experts)
                );
            }
        }
        Ok(())
    })
}
