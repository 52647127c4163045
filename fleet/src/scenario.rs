//! The scenarios, run one after another on one fleet (each measured from where the previous
//! left it): bring-up (always first), then any of steady state, one node death, ten joins at
//! once, a rolling restart (one node at a time, each back before the next goes) and one
//! load-driven rebalance round over all layers (a coordinator with the `moe coordinator`
//! rebalancing defaults takes over from the first, which runs with rebalancing off so the
//! other scenarios measure membership alone).

use std::time::Duration;

use moe_coordinator::RebalanceConfig;
use moe_coordinator::plan::{NodeSlot, plan};
use moe_coordinator::rebalance::{layer_slots, rebalance};
use tokio::time::Instant;

use crate::report::Report;
use crate::share::spread;
use crate::store::Counts;
use crate::world::{World, token_mix};
use crate::{FleetConfig, FleetError};

/// One scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Steady,
    NodeDeath,
    /// This many nodes join at once.
    Join(usize),
    RollingRestart,
    Rebalance,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Steady,
        Scenario::NodeDeath,
        Scenario::Join(10),
        Scenario::RollingRestart,
        Scenario::Rebalance,
    ];

    pub fn name(self) -> String {
        match self {
            Scenario::Steady => "steady".into(),
            Scenario::NodeDeath => "node-death".into(),
            Scenario::Join(n) => format!("join-{n}"),
            Scenario::RollingRestart => "rolling-restart".into(),
            Scenario::Rebalance => "rebalance".into(),
        }
    }

    /// `all`, or scenario names separated by commas (`join-N` for any N ≥ 1).
    pub fn parse(s: &str) -> Result<Vec<Scenario>, String> {
        if s == "all" {
            return Ok(Scenario::ALL.to_vec());
        }
        s.split(',')
            .map(|one| {
                let join = one
                    .strip_prefix("join-")
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&n| n > 0)
                    .map(Scenario::Join);
                join.or_else(|| Scenario::ALL.into_iter().find(|x| x.name() == one))
                    .ok_or_else(|| {
                        format!("unknown scenario `{one}` (steady, node-death, join-10, rolling-restart, rebalance, all)")
                    })
            })
            .collect()
    }
}

/// Longest simulated wait for a membership change to converge.
const CONVERGE_LIMIT: Duration = Duration::from_secs(600);

/// The rebalancing defaults of `moe coordinator`.
fn cli_rebalance() -> RebalanceConfig {
    RebalanceConfig {
        threshold: 0.8,
        interval: Duration::from_secs(10),
        alpha: 0.3,
        min_tokens: 10_000,
        tolerance: 0.01,
        cooldown: Duration::from_secs(60),
    }
}

/// Counters, clocks and rollouts at a scenario's start.
struct Measure {
    counts: Counts,
    sim: Instant,
    wall: std::time::Instant,
    rollouts: u64,
}

impl Measure {
    fn start(w: &mut World) -> Measure {
        w.wall_deadline = w.cfg.wall_limit.map(|d| std::time::Instant::now() + d);
        w.store.reset_maxima();
        Measure {
            counts: w.store.counts(),
            sim: Instant::now(),
            wall: std::time::Instant::now(),
            rollouts: w.rollouts(),
        }
    }

    async fn finish(self, w: &World, name: &str, converged: bool) -> Report {
        let sim_s = self.sim.elapsed().as_secs_f64();
        let out_of_time = w.out_of_wall_time();
        let active = w.active().await;
        let spread = active.as_ref().map(|a| spread(a, &w.moe_layers()));
        let mut r = Report::new(
            name,
            &w.cfg,
            w.store.counts().since(&self.counts),
            sim_s,
            self.wall.elapsed().as_secs_f64(),
            converged.then_some(sim_s),
            spread,
            w.rollouts() - self.rollouts,
        );
        r.out_of_wall_time = out_of_time;
        r
    }
}

/// Runs bring-up and then `scenarios` on a fleet of `cfg`, on a paused runtime of its own;
/// `on_report` sees each report as it is made.
pub fn simulate(
    cfg: &FleetConfig,
    scenarios: &[Scenario],
    mut on_report: impl FnMut(&Report),
) -> Result<Vec<Report>, FleetError> {
    cfg.validate()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| FleetError::Runtime(e.to_string()))?;
    rt.block_on(async {
        let mut w = World::new(cfg.clone()).map_err(FleetError::Config)?;
        let mut reports = Vec::new();
        let r = bring_up(&mut w).await;
        on_report(&r);
        reports.push(r);
        for &s in scenarios {
            let r = match s {
                Scenario::Steady => steady(&mut w).await,
                Scenario::NodeDeath => node_death(&mut w).await,
                Scenario::Join(n) => join(&mut w, n).await,
                Scenario::RollingRestart => rolling_restart(&mut w).await,
                Scenario::Rebalance => rebalance_round(&mut w).await,
            };
            on_report(&r);
            reports.push(r);
        }
        w.shutdown().await;
        Ok(reports)
    })
}

async fn bring_up(w: &mut World) -> Report {
    let m = Measure::start(w);
    w.start_coordinator(RebalanceConfig::default()).await;
    w.start_routers(w.cfg.routers);
    for i in 0..w.cfg.nodes {
        w.start_node(&World::node_id(i));
    }
    let ok = w.converge(CONVERGE_LIMIT).await;
    m.finish(w, "bring-up", ok).await
}

/// The routers' load window (`LoadWindow` of 60 s): a router publishes more often while its
/// window fills, so the steady state is measured once it has.
const LOAD_WINDOW: Duration = Duration::from_secs(60);

async fn steady(w: &mut World) -> Report {
    let warm = w.store.counts();
    tokio::time::sleep(LOAD_WINDOW).await;
    let warm = w.store.counts().since(&warm);
    let m = Measure::start(w);
    tokio::time::sleep(w.cfg.steady).await;
    let mut r = m.finish(w, "steady", false).await;
    r.converge_s = None;
    let per_hour = r.bytes_written_per_s * 3600.0;
    let mib = |b: f64| b / f64::from(1u32 << 20);
    let quota = crate::store::Limits::default().quota_bytes as f64;
    r.note = format!(
        "measured after the routers' first {} s (their windows filling: {} writes, {:.1} KiB); history grows {:.1} MiB per hour at this rate; periodic compaction with 1 h retention removes the same {:.1} MiB per hour once the first hour has passed, so etcd holds about {:.1} MiB of history ({:.2}% of the 2 GiB quota); peak held in the run {:.1} MiB",
        LOAD_WINDOW.as_secs(),
        warm.writes,
        warm.bytes_written as f64 / 1024.0,
        mib(per_hour),
        mib(per_hour),
        mib(per_hour),
        100.0 * per_hour / quota,
        mib(r.peak_history_bytes as f64),
    );
    r
}

async fn node_death(w: &mut World) -> Report {
    let Some(victim) = w.node_ids().into_iter().nth(w.cfg.nodes / 2) else {
        return Measure::start(w).finish(w, "node-death", false).await;
    };
    // The planner's cost for this change, timed outside the simulation.
    let planned = match w.active().await {
        Some(a) => {
            let live: Vec<NodeSlot> = a
                .nodes
                .iter()
                .filter(|n| n.id != victim)
                .map(|n| NodeSlot {
                    id: n.id.clone(),
                    addr: n.addr.clone(),
                    capacity: w.cfg.node_capacity(),
                })
                .collect();
            let t = std::time::Instant::now();
            let ok = plan(
                Some(&a),
                &live,
                &w.moe_layers(),
                w.cfg.experts,
                w.cfg.min_replicas,
            )
            .is_ok();
            format!(
                "membership plan without one node: {:.3} s wall{}",
                t.elapsed().as_secs_f64(),
                if ok { "" } else { " (no plan)" }
            )
        }
        None => String::new(),
    };
    let m = Measure::start(w);
    w.kill_node(&victim);
    let ok = w.converge(CONVERGE_LIMIT).await;
    let mut r = m.finish(w, "node-death", ok).await;
    r.note = planned;
    r
}

async fn join(w: &mut World, n: usize) -> Report {
    let m = Measure::start(w);
    let first = w.cfg.nodes + 1000;
    for i in 0..n {
        w.start_node(&World::node_id(first + i));
    }
    let ok = w.converge(CONVERGE_LIMIT).await;
    m.finish(w, &format!("join-{n}"), ok).await
}

async fn rolling_restart(w: &mut World) -> Report {
    let ids = w.node_ids();
    let k = w.cfg.restarts.unwrap_or(ids.len()).min(ids.len());
    let m = Measure::start(w);
    let mut ok = true;
    let mut done = 0;
    for id in ids.iter().take(k) {
        w.stop_node(id).await;
        tokio::time::sleep(w.cfg.restart_gap).await;
        w.start_node(id);
        ok = w.converge(CONVERGE_LIMIT).await;
        if !ok {
            break;
        }
        done += 1;
    }
    let mut r = m.finish(w, "rolling-restart", ok).await;
    let per = |x: f64| x / done.max(1) as f64;
    r.note = format!(
        "{done} of {} nodes restarted ({:.0} s away each); per restart: {:.1} writes, {:.1} KiB written, {:.0} events, {:.1} MiB delivered, {:.1} s simulated, {:.1} rollouts, {:.2} s wall",
        ids.len(),
        w.cfg.restart_gap.as_secs_f64(),
        per(r.writes as f64),
        per(r.bytes_written as f64) / 1024.0,
        per(r.events_delivered as f64),
        per(r.bytes_delivered as f64) / f64::from(1u32 << 20),
        per(r.sim_s),
        per(r.rollouts as f64),
        per(r.wall_s),
    );
    if done < ids.len() && done > 0 {
        r.note.push_str(&format!(
            "; all {} nodes: about {:.0}× these totals",
            ids.len(),
            ids.len() as f64 / done.max(1) as f64
        ));
    }
    r
}

/// What re-placing each layer costs the coordinator, timed outside the simulation on the active
/// placement for the load the routers publish: every MoE layer, one after another.
async fn layer_compute(w: &World) -> String {
    let Some(active) = w.active().await else {
        return String::new();
    };
    let layers = w.moe_layers();
    let capacity = vec![w.cfg.node_capacity(); active.nodes.len()];
    let mut times = Vec::new();
    let mut improved = 0;
    for &layer in &layers {
        let rate: Vec<f64> = token_mix(layer, w.cfg.experts, w.cfg.tokens_per_s * 8)
            .iter()
            .map(|&c| f64::from(c) * w.cfg.routers as f64)
            .collect();
        let slots = layer_slots(&active, layer, &capacity, layers.len());
        let t = std::time::Instant::now();
        let change = rebalance(&active, layer, &rate, &slots, w.cfg.min_replicas, 0.01);
        times.push((t.elapsed().as_secs_f64(), layer));
        improved += usize::from(change.is_some());
    }
    format!(
        "rebalance compute over all {} layers (outside the simulation): {}; {} layers improvable",
        layers.len(),
        summarize(&times),
        improved
    )
}

/// Max (with its layer), mean and total of per-layer seconds.
fn summarize(times: &[(f64, usize)]) -> String {
    let total: f64 = times.iter().map(|t| t.0).sum();
    let (max, at) = times
        .iter()
        .copied()
        .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    format!(
        "max {max:.3} s (layer {at}), mean {:.3} s, total {total:.2} s",
        total / times.len().max(1) as f64
    )
}

async fn rebalance_round(w: &mut World) -> Report {
    let compute = layer_compute(w).await;
    let m = Measure::start(w);
    w.start_coordinator(cli_rebalance()).await;
    let layers = w.moe_layers().len();
    let measured = w
        .wait_until(CONVERGE_LIMIT, || {
            let b = !w.status().balancedness.is_empty();
            async move { b }
        })
        .await;
    let before = w.status().balancedness;
    let limit = Duration::from_secs(60 + 30 * layers as u64);
    let rounds = w
        .wait_until(limit, || {
            let done = w.status().rebalance_rounds >= 1;
            async move { done }
        })
        .await;
    let ok = measured && rounds && w.converge(CONVERGE_LIMIT).await;
    let after = w.status().balancedness;
    let inside: Vec<(f64, usize)> = w
        .status()
        .rebalance_compute
        .iter()
        .map(|(&l, &t)| (t, l))
        .collect();
    let errors = w.status().rebalance_errors;
    let mut r = m.finish(w, "rebalance", ok).await;
    let worst = |b: &std::collections::BTreeMap<usize, f64>| {
        b.values().copied().fold(f64::INFINITY, f64::min)
    };
    r.note = format!(
        "{}; the coordinator's last round (spawn_blocking, per layer it re-placed: {}): {}; errors {:?}; worst layer balancedness {:.3} -> {:.3}, {} layer rollouts{}",
        compute,
        inside.len(),
        summarize(&inside),
        errors,
        worst(&before),
        worst(&after),
        r.rollouts,
        if rounds {
            ""
        } else {
            " (no round changed the placement)"
        }
    );
    r
}
