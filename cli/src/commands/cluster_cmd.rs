//! `moe cluster status` and `moe placement show`: the records in the metadata store, for people.

use moe_meta::records::{self, AckRecord, NodeRecord, PlacementRecord, RouterRecord, spec_of};
use moe_meta::store::election::leader;

use crate::cluster::ClusterArgs;

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Leader, nodes (address, capacity, acknowledged version), routers (version they route
    /// with), active and pending placement versions.
    Status(ClusterArgs),
}

#[derive(Debug, clap::Subcommand)]
pub enum PlacementCommand {
    /// The active (and pending) placement: every node's experts as an expert spec.
    Show(ClusterArgs),
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn placement(
    store: &dyn moe_meta::store::MetaStore,
    key: &str,
) -> anyhow::Result<Option<PlacementRecord>> {
    match store.get(key).await? {
        Some(kv) => Ok(Some(records::decode(key, &kv.value)?)),
        None => Ok(None),
    }
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
        let active = placement(store.as_ref(), &keys.active()).await?;
        let pending = placement(store.as_ref(), &keys.pending()).await?;
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
        Ok(())
    })
}

pub fn run_placement(c: PlacementCommand) -> anyhow::Result<()> {
    let PlacementCommand::Show(a) = c;
    rt()?.block_on(async move {
        let store = a.connect().await?;
        let keys = a.keys();
        for (what, key) in [("active", keys.active()), ("pending", keys.pending())] {
            let Some(p) = placement(store.as_ref(), &key).await? else {
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
