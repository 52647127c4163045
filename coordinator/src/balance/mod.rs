//! Load-balanced expert placement with hot-expert replication (the EPLB problem), for one MoE
//! layer: given per-expert loads and GPUs with slot capacities, choose which expert each slot
//! holds and what share of an expert's tokens each of its replicas serves, so that GPU loads are
//! as even as possible (DeepSeek's balancedness: mean GPU load / max GPU load).
//!
//! Shares are what make this better than EPLB's even split: an expert's tokens can be divided
//! unevenly between its replicas, so the load can be cut at any point.
//! - [`place_layer`]: from scratch. Experts in decreasing load go to the GPU with the most
//!   remaining budget (budget = fair share of the total load); an expert larger than that budget
//!   fills it and its remainder continues on the next GPU as another replica (McNaughton's
//!   wrap-around rule), while spare slots remain for every expert not yet placed. Then the
//!   shares are re-solved exactly ([`optimal_shares`]).
//! - [`optimal_shares`]: for fixed slots, the shares that minimise the largest GPU load:
//!   bisection on the target load with a max-flow feasibility check (experts → GPUs hosting them).
//! - [`rebalance_layer`]: from a current placement, to within `tolerance` of a fresh plan's
//!   balance with as few slot changes as it can (max-flow repair, see `migrate.rs`); re-solving
//!   shares moves no weights, so it often needs few moves or none. `tolerance` is the knob that
//!   trades balance for moves.
//! - [`rebalance_with_floor`]: from a current placement that keeps every expert on at least
//!   `min_replicas` GPUs: adds replicas of hot experts in spare slots (or over replicas above
//!   the floor) while the balance improves.
//! - [`place_grouped`]: keeps each of `groups` contiguous expert groups on one host
//!   (group-limited routing then bounds the hosts a token touches), balances groups over hosts,
//!   then places within each host.

mod floor;
mod flow;
mod grouped;
mod level;
mod migrate;
#[cfg(test)]
mod tests;

pub use floor::rebalance_with_floor;
pub use flow::optimal_shares;
pub use grouped::place_grouped;
pub use migrate::{rebalance_layer, relabel};

use level::{level, level_to};

/// One layer's placement: per GPU, its slots as (expert, share of that expert's tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlacement {
    pub gpus: Vec<Vec<(u32, f64)>>,
}

/// Why no placement exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalanceError {
    #[error("{experts} experts need at least as many slots, the GPUs have {slots}")]
    TooFewSlots { experts: usize, slots: usize },
}

const EPS: f64 = 1e-12;

impl LayerPlacement {
    /// Load of every GPU: Σ share × expert load.
    pub fn gpu_loads(&self, loads: &[f64]) -> Vec<f64> {
        self.gpus
            .iter()
            .map(|g| g.iter().map(|&(e, s)| s * loads[e as usize]).sum())
            .collect()
    }

    /// Mean GPU load / max GPU load (1 when there is no load). GPUs without slots count in the
    /// mean, as in DeepSeek's metric.
    pub fn balancedness(&self, loads: &[f64]) -> f64 {
        balancedness(&self.gpu_loads(loads))
    }

    /// Replicas of each of `n` experts.
    pub fn replicas(&self, n: usize) -> Vec<usize> {
        let mut r = vec![0; n];
        for g in &self.gpus {
            for &(e, _) in g {
                r[e as usize] += 1;
            }
        }
        r
    }

    /// Slots that hold a different expert than in `other` (per GPU, as multisets).
    pub fn moves_from(&self, other: &LayerPlacement) -> usize {
        self.gpus
            .iter()
            .enumerate()
            .map(|(g, slots)| {
                let mut before: Vec<u32> = other
                    .gpus
                    .get(g)
                    .map(|s| s.iter().map(|x| x.0).collect())
                    .unwrap_or_default();
                slots
                    .iter()
                    .filter(|(e, _)| match before.iter().position(|b| b == e) {
                        Some(i) => {
                            before.swap_remove(i);
                            false
                        }
                        None => true,
                    })
                    .count()
            })
            .sum()
    }
}

/// DeepSeek's balancedness of per-GPU loads, the one the routers and `moe cluster status`
/// report.
pub use moe_meta::balancedness;

/// From-scratch placement of `loads` on GPUs with `slots[g]` slots each.
pub fn place_layer(loads: &[f64], slots: &[usize]) -> Result<LayerPlacement, BalanceError> {
    let e_count = loads.len();
    let total_slots: usize = slots.iter().sum();
    if total_slots < e_count {
        return Err(BalanceError::TooFewSlots {
            experts: e_count,
            slots: total_slots,
        });
    }
    let g_count = slots.len();
    let total: f64 = loads.iter().sum();
    let active = slots.iter().filter(|&&s| s > 0).count().max(1);
    let target = total / active as f64;
    // 1. Experts heavier than a GPU's fair share are cut into equal pieces (replicas) first,
    //    as far as spare slots allow.
    let mut spare = total_slots - e_count;
    let mut order: Vec<usize> = (0..e_count).collect();
    order.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]).then(a.cmp(&b)));
    let mut pieces: Vec<(usize, f64)> = Vec::with_capacity(total_slots);
    for &e in &order {
        let want = if target > EPS {
            (loads[e] / target).ceil().max(1.0) as usize
        } else {
            1
        };
        let k = want.min(1 + spare).min(active);
        spare -= k - 1;
        pieces.extend(std::iter::repeat_n((e, loads[e] / k as f64), k));
    }
    pieces.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // 2. Two ways to lay the pieces out; the levelled result that balances better wins.
    let mut best: Option<(LayerPlacement, f64)> = None;
    for rounds in [true, false] {
        let gpus = if rounds {
            lpt_rounds(&pieces, loads, slots, active)
        } else {
            lpt_reserve(&pieces, loads, slots)
        };
        let mut p = LayerPlacement { gpus };
        if total <= EPS {
            normalise_even(&mut p, e_count);
            return Ok(p);
        }
        // 3. Level the rest by moving slices of load from the fullest GPU to the emptiest, then
        //    solve the shares exactly for the slots chosen (never worse), and level once more.
        level(&mut p, loads, slots);
        if p.balancedness(loads) < 1.0 - 1e-6 {
            optimal_shares(&mut p, loads);
            level(&mut p, loads, slots);
        }
        let b = p.balancedness(loads);
        if best.as_ref().is_none_or(|(_, best_b)| b > *best_b) {
            best = Some((p, b));
        }
        if best
            .as_ref()
            .is_some_and(|(_, best_b)| *best_b >= 1.0 - 1e-6)
        {
            break;
        }
    }
    Ok(best.map_or_else(
        || LayerPlacement {
            gpus: vec![Vec::new(); g_count],
        },
        |(p, _)| p,
    ))
}

fn put(gpus: &mut [Vec<(u32, f64)>], load: &mut [f64], g: usize, e: usize, l: f64, loads: &[f64]) {
    match gpus[g].iter_mut().find(|s| s.0 == e as u32) {
        Some(s) => s.1 += if loads[e] > EPS { l / loads[e] } else { 0.0 },
        None => gpus[g].push((e as u32, if loads[e] > EPS { l / loads[e] } else { 1.0 })),
    }
    load[g] += l;
}

/// LPT in rounds of one piece per GPU (heaviest piece of the round to the lightest GPU): even
/// piece counts.
fn lpt_rounds(
    pieces: &[(usize, f64)],
    loads: &[f64],
    slots: &[usize],
    active: usize,
) -> Vec<Vec<(u32, f64)>> {
    let g_count = slots.len();
    let mut load = vec![0.0f64; g_count];
    let mut gpus: Vec<Vec<(u32, f64)>> = vec![Vec::new(); g_count];
    for round in pieces.chunks(active.max(1)) {
        let mut by_load: Vec<usize> = (0..g_count).filter(|&g| slots[g] > 0).collect();
        by_load.sort_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)));
        for &(e, l) in round {
            let pick = by_load
                .iter()
                .position(|&g| gpus[g].len() < slots[g] && !gpus[g].iter().any(|s| s.0 == e as u32))
                .or_else(|| by_load.iter().position(|&g| gpus[g].len() < slots[g]));
            let g = match pick {
                Some(i) => by_load.remove(i),
                None => match (0..g_count)
                    .filter(|&g| gpus[g].len() < slots[g])
                    .min_by(|&a, &b| load[a].total_cmp(&load[b]))
                {
                    Some(g) => g,
                    None => unreachable!("slots were counted"),
                },
            };
            put(&mut gpus, &mut load, g, e, l, loads);
        }
    }
    gpus
}

/// Plain LPT (each piece to the least loaded GPU), keeping one slot per GPU free while the
/// spare slots allow, for the levelling step.
fn lpt_reserve(pieces: &[(usize, f64)], loads: &[f64], slots: &[usize]) -> Vec<Vec<(u32, f64)>> {
    let g_count = slots.len();
    let total_slots: usize = slots.iter().sum();
    let mut load = vec![0.0f64; g_count];
    let mut gpus: Vec<Vec<(u32, f64)>> = vec![Vec::new(); g_count];
    let mut left = pieces.len();
    let mut free_total = total_slots;
    for &(e, l) in pieces {
        let keep_reserve = free_total > left + g_count;
        let pick = |reserve: bool, gpus: &[Vec<(u32, f64)>]| {
            (0..g_count)
                .filter(|&g| {
                    gpus[g].len() + usize::from(reserve) < slots[g]
                        && !gpus[g].iter().any(|s| s.0 == e as u32)
                })
                .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
        };
        let g = pick(keep_reserve, &gpus)
            .or_else(|| pick(false, &gpus))
            .or_else(|| (0..g_count).find(|&g| gpus[g].len() < slots[g]));
        let Some(g) = g else {
            unreachable!("slots were counted")
        };
        put(&mut gpus, &mut load, g, e, l, loads);
        left -= 1;
        free_total -= 1;
    }
    gpus
}

fn normalise_even(p: &mut LayerPlacement, n: usize) {
    let r = p.replicas(n);
    for g in &mut p.gpus {
        for s in g.iter_mut() {
            s.1 = 1.0 / r[s.0 as usize] as f64;
        }
    }
}
