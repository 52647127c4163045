//! Placement with minimal movement: a pure function from (current placement, live nodes with
//! capacities, model shape, replica count) to the next placement.
//!
//! 1. Keep every current assignment on a live node (a dead node's experts are simply gone). A
//!    node that comes back after a lease blip keeps what it still holds ([`plan_with`]).
//! 2. Decide how many replicas each expert gets (`min_replicas` on distinct nodes, capped at the
//!    number of nodes; hot experts keep the extra replicas load rebalancing gave them), and from
//!    that how many replicas each node holds of each MoE layer ([`targets`]): every node the
//!    same share of every layer (floor or ceiling of the layer's mean), less only where its
//!    capacity is smaller.
//! 3. Drop surplus: replicas beyond an expert's count, then replicas on nodes above their target
//!    for the layer.
//! 4. Fill: every missing replica goes to the node furthest below its target for that layer that
//!    does not hold the expert and has room for the union of what it holds and what it will
//!    hold (nodes keep `active ∪ pending` loaded during a rollout).
//!
//! Only step 4 loads weights, and it adds exactly what coverage and the per-layer targets need:
//! a joining node takes its fair share of every layer (not whole layers), a lost node's replicas
//! spread over the survivors, and a node that returns holding its experts gets them back.

mod targets;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use moe_meta::records::{PlacedNode, PlacementRecord};

/// A live node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSlot {
    pub id: String,
    pub addr: String,
    /// (layer, expert) pairs it can hold.
    pub capacity: usize,
}

/// Why no placement fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no live expert node")]
    NoNodes,
    #[error(
        "{needed} expert slots are needed ({pairs} experts × {replicas} replicas) but the nodes have {available}"
    )]
    Capacity {
        needed: usize,
        pairs: usize,
        replicas: usize,
        available: usize,
    },
}

/// The outcome of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub nodes: Vec<PlacedNode>,
    /// Replicas added to some node relative to what it holds now (weights to load).
    pub moved: usize,
}

type Pair = (u16, u16);

fn mix(a: u64, b: u64) -> u64 {
    let mut h = (a ^ b.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 32)
}

fn id_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Plans the next placement (see the module docs).
pub fn plan(
    current: Option<&PlacementRecord>,
    nodes: &[NodeSlot],
    moe_layers: &[usize],
    n_experts: usize,
    min_replicas: usize,
) -> Result<Plan, PlanError> {
    plan_with(current, &[], nodes, moe_layers, n_experts, min_replicas)
}

/// [`plan`], where `returning` names what live nodes absent from `current` still hold (a node
/// back after a lease blip): they keep it, and the copies made elsewhere meanwhile are dropped.
pub fn plan_with(
    current: Option<&PlacementRecord>,
    returning: &[PlacedNode],
    nodes: &[NodeSlot],
    moe_layers: &[usize],
    n_experts: usize,
    min_replicas: usize,
) -> Result<Plan, PlanError> {
    if nodes.is_empty() {
        return Err(PlanError::NoNodes);
    }
    let mut nodes: Vec<NodeSlot> = nodes.to_vec();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    let n = nodes.len();
    let layers: Vec<u16> = moe_layers.iter().map(|&l| l as u16).collect();
    let layer_index: BTreeMap<u16, usize> =
        layers.iter().enumerate().map(|(i, &l)| (l, i)).collect();
    let replicas = min_replicas.clamp(1, n);
    let caps: Vec<usize> = nodes.iter().map(|x| x.capacity).collect();
    let hashes: Vec<u64> = nodes.iter().map(|x| id_hash(&x.id)).collect();
    let valid = |&(l, e): &Pair| layer_index.contains_key(&l) && (e as usize) < n_experts;
    let in_current = |id: &str| current.and_then(|c| c.nodes.iter().find(|p| p.id == id));
    // What each node holds now, and whether that comes from the current placement.
    let before: Vec<BTreeSet<Pair>> = nodes
        .iter()
        .map(|x| {
            in_current(&x.id)
                .or_else(|| returning.iter().find(|p| p.id == x.id))
                .map(|p| p.experts.iter().copied().filter(valid).collect())
                .unwrap_or_default()
        })
        .collect();
    let placed: Vec<bool> = nodes.iter().map(|x| in_current(&x.id).is_some()).collect();
    // has[l][i][e]
    let mut has = vec![vec![vec![false; n_experts]; n]; layers.len()];
    for (i, b) in before.iter().enumerate() {
        for &(l, e) in b {
            has[layer_index[&l]][i][e as usize] = true;
        }
    }
    // 2. replicas per expert: the floor, or more where the current placement has more.
    let mut want = vec![vec![replicas; n_experts]; layers.len()];
    for (li, layer) in has.iter().enumerate() {
        for e in 0..n_experts {
            let kept = (0..n).filter(|&i| placed[i] && layer[i][e]).count();
            want[li][e] = want[li][e].max(kept);
        }
    }
    let available: usize = caps.iter().sum();
    let pairs = layers.len() * n_experts;
    let mut q: usize = want.iter().flatten().sum();
    if q > available {
        // No room for the hot experts' extra replicas: keep the floor only.
        want.iter_mut().flatten().for_each(|w| *w = replicas);
        q = pairs * replicas;
    }
    if q > available {
        return Err(PlanError::Capacity {
            needed: q,
            pairs,
            replicas,
            available,
        });
    }
    // 3a. replicas beyond an expert's count go first, from nodes of the current placement (the
    // copies made while a returning node was away), the fullest for the layer first.
    for (li, &l) in layers.iter().enumerate() {
        let has = &mut has[li];
        let mut load: Vec<usize> = (0..n)
            .map(|i| has[i].iter().filter(|&&x| x).count())
            .collect();
        for e in 0..n_experts {
            let mut count = (0..n).filter(|&i| has[i][e]).count();
            while count > want[li][e] {
                let Some(i) = (0..n)
                    .filter(|&i| has[i][e])
                    .max_by_key(|&i| (placed[i], load[i], mix(hashes[i], pair_key(l, e))))
                else {
                    break;
                };
                has[i][e] = false;
                count -= 1;
                load[i] -= 1;
            }
        }
    }
    let held_layer: Vec<Vec<usize>> = has
        .iter()
        .map(|layer| {
            layer
                .iter()
                .map(|h| h.iter().filter(|&&x| x).count())
                .collect()
        })
        .collect();
    let held_total: Vec<usize> = (0..n)
        .map(|i| held_layer.iter().map(|l| l[i]).sum())
        .collect();
    let totals = targets::node_totals(q, &caps, &held_total);
    let rows: Vec<usize> = want.iter().map(|w| w.iter().sum()).collect();
    let target = targets::layer_targets(&rows, &totals, &held_layer);
    // Room for the union of what a node holds and what it will hold.
    let mut used: Vec<usize> = before.iter().map(BTreeSet::len).collect();
    for (li, &l) in layers.iter().enumerate() {
        let has = &mut has[li];
        let t = &target[li];
        let want = &want[li];
        let mut count: Vec<usize> = (0..n_experts)
            .map(|e| (0..n).filter(|&i| has[i][e]).count())
            .collect();
        let mut load: Vec<usize> = (0..n)
            .map(|i| has[i].iter().filter(|&&x| x).count())
            .collect();
        let over = |load: &[usize], i: usize| load[i] as i64 - t[i] as i64;
        // 3b. nodes above their target for the layer shed replicas: the most replicated first
        // (never both replicas of one expert while others have two), spread by a hash.
        for i in 0..n {
            while load[i] > t[i] {
                let Some(e) = (0..n_experts)
                    .filter(|&e| has[i][e])
                    .max_by_key(|&e| (count[e], mix(hashes[i], pair_key(l, e))))
                else {
                    break;
                };
                has[i][e] = false;
                count[e] -= 1;
                load[i] -= 1;
            }
        }
        // 4. fill, experts in a hashed order so that partners spread.
        let mut missing: Vec<usize> = (0..n_experts).filter(|&e| count[e] < want[e]).collect();
        missing.sort_by_key(|&e| mix(0x5eed, pair_key(l, e)));
        let fresh = |used: &[usize], i: usize, e: usize, before: &[BTreeSet<Pair>]| {
            before[i].contains(&(l, e as u16)) || used[i] < caps[i]
        };
        for e in missing {
            while count[e] < want[e] {
                let pick = (0..n)
                    .filter(|&i| !has[i][e] && load[i] < t[i] && fresh(&used, i, e, &before))
                    .max_by_key(|&i| (t[i] - load[i], mix(hashes[i], pair_key(l, e))));
                let i = match pick {
                    Some(i) => i,
                    None => match swap_in(has, &mut load, t, e, &caps, &mut used, &before, l) {
                        Some(i) => i,
                        // Beyond the layer target, on the least loaded node with room.
                        None => match (0..n)
                            .filter(|&i| !has[i][e] && fresh(&used, i, e, &before))
                            .min_by_key(|&i| (over(&load, i), mix(hashes[i], pair_key(l, e))))
                        {
                            Some(i) => i,
                            None => break,
                        },
                    },
                };
                if !before[i].contains(&(l, e as u16)) {
                    used[i] += 1;
                }
                has[i][e] = true;
                count[e] += 1;
                load[i] += 1;
            }
        }
    }
    let mut held: Vec<BTreeSet<Pair>> = vec![BTreeSet::new(); n];
    for (li, &l) in layers.iter().enumerate() {
        for (i, h) in held.iter_mut().enumerate() {
            h.extend(
                (0..n_experts)
                    .filter(|&e| has[li][i][e])
                    .map(|e| (l, e as u16)),
            );
        }
    }
    let moved = held
        .iter()
        .zip(&before)
        .map(|(h, b)| h.difference(b).count())
        .sum();
    let placed = nodes
        .iter()
        .zip(held)
        .map(|(x, h)| PlacedNode {
            id: x.id.clone(),
            addr: x.addr.clone(),
            experts: h.into_iter().collect(),
            shares: Vec::new(),
        })
        .collect();
    let placed = carry_shares(current, placed);
    Ok(Plan {
        nodes: placed,
        moved,
    })
}

fn pair_key(l: u16, e: usize) -> u64 {
    u64::from(l) << 32 | e as u64
}

/// Expert `e` is missing a replica but every node below its layer target holds it already: a
/// node `k` at target that lacks `e` hands one of its experts to such a node `j` and takes `e`.
/// Returns `k`, with the handed expert already moved (its room accounted for).
#[allow(clippy::too_many_arguments)]
fn swap_in(
    has: &mut [Vec<bool>],
    load: &mut [usize],
    t: &[usize],
    e: usize,
    caps: &[usize],
    used: &mut [usize],
    before: &[BTreeSet<Pair>],
    l: u16,
) -> Option<usize> {
    let n = has.len();
    let room = |used: &[usize], i: usize, x: usize| {
        before[i].contains(&(l, x as u16)) || used[i] < caps[i]
    };
    for j in (0..n).filter(|&j| load[j] < t[j]) {
        let found = (0..n)
            .filter(|&k| !has[k][e] && k != j && room(used, k, e))
            .find_map(|k| {
                (0..has[k].len())
                    .find(|&f| f != e && has[k][f] && !has[j][f] && room(used, j, f))
                    .map(|f| (k, f))
            });
        let Some((k, f)) = found else { continue };
        has[k][f] = false;
        has[j][f] = true;
        if !before[j].contains(&(l, f as u16)) {
            used[j] += 1;
        }
        load[k] -= 1;
        load[j] += 1;
        return Some(k);
    }
    None
}

/// Keeps the current replica shares of every expert whose set of replica nodes is unchanged;
/// the others split evenly until the next load-driven rebalance.
pub fn carry_shares(
    current: Option<&PlacementRecord>,
    mut next: Vec<PlacedNode>,
) -> Vec<PlacedNode> {
    let Some(current) = current else {
        return next;
    };
    let holders = |nodes: &[PlacedNode]| {
        let mut m: BTreeMap<Pair, BTreeSet<String>> = BTreeMap::new();
        for n in nodes {
            for &p in &n.experts {
                m.entry(p).or_default().insert(n.id.clone());
            }
        }
        m
    };
    let (before, after) = (holders(&current.nodes), holders(&next));
    let mut any = false;
    for n in &mut next {
        let Some(old) = current.nodes.iter().find(|c| c.id == n.id) else {
            continue;
        };
        if old.shares.len() != old.experts.len() {
            continue;
        }
        let share: BTreeMap<Pair, u32> = old
            .experts
            .iter()
            .copied()
            .zip(old.shares.iter().copied())
            .collect();
        n.shares = n
            .experts
            .iter()
            .map(|p| match before.get(p) == after.get(p) {
                true => share.get(p).copied().unwrap_or(0),
                false => 0,
            })
            .collect();
        any |= n.shares.iter().any(|&s| s > 0);
    }
    if !any {
        for n in &mut next {
            n.shares.clear();
        }
    }
    next
}
