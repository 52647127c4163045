//! Placement with minimal movement: a pure function from (current placement, live nodes with
//! capacities, model shape, replica count) to the next placement.
//!
//! 1. Keep every current assignment on a live node (a dead node's experts are simply gone).
//! 2. Trim nodes over their capacity, dropping their most-replicated experts first.
//! 3. Give every (layer, expert) `min_replicas` replicas on distinct nodes (capped at the number
//!    of nodes), each new replica on the least-loaded node with room.
//! 4. Even out load: while the fullest and emptiest nodes differ by more than one slot, move one
//!    expert from the fullest to the emptiest (a new node fills up this way).
//!
//! Only steps 3 and 4 move weights, and each adds exactly one replica to one node, so the number
//! of moves is what coverage and balance require, not a reshuffle.

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
    /// Replicas added to some node relative to the current placement (weights to load).
    pub moved: usize,
}

type Pair = (u16, u16);

fn mix((l, e): Pair, node: usize) -> u64 {
    let mut h =
        (u64::from(l) << 32 | u64::from(e) << 8 | node as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    h.wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// Plans the next placement (see the module docs).
pub fn plan(
    current: Option<&PlacementRecord>,
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
    let pairs: Vec<Pair> = moe_layers
        .iter()
        .flat_map(|&l| (0..n_experts).map(move |e| (l as u16, e as u16)))
        .collect();
    let replicas = min_replicas.clamp(1, nodes.len());
    let available: usize = nodes.iter().map(|n| n.capacity).sum();
    if pairs.len() * replicas > available {
        return Err(PlanError::Capacity {
            needed: pairs.len() * replicas,
            pairs: pairs.len(),
            replicas,
            available,
        });
    }
    let mut held: Vec<BTreeSet<Pair>> = nodes
        .iter()
        .map(|n| {
            let valid: BTreeSet<Pair> = pairs.iter().copied().collect();
            current
                .and_then(|c| c.nodes.iter().find(|p| p.id == n.id))
                .map(|p| {
                    p.experts
                        .iter()
                        .copied()
                        .filter(|x| valid.contains(x))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    let before = held.clone();
    let mut count: BTreeMap<Pair, usize> = pairs.iter().map(|&p| (p, 0)).collect();
    for h in &held {
        for p in h {
            *count.entry(*p).or_default() += 1;
        }
    }
    // 2. capacity
    for (i, n) in nodes.iter().enumerate() {
        while held[i].len() > n.capacity {
            let Some(&drop) = held[i].iter().max_by_key(|p| (count[p], **p)) else {
                break;
            };
            held[i].remove(&drop);
            if let Some(c) = count.get_mut(&drop) {
                *c -= 1;
            }
        }
    }
    // 3. coverage (ties between equally loaded nodes broken by a hash of (expert, node), so
    // that replica partners spread over all nodes and losing one node spreads its load)
    for &p in &pairs {
        while count[&p] < replicas {
            let Some(i) = (0..nodes.len())
                .filter(|&i| !held[i].contains(&p) && held[i].len() < nodes[i].capacity)
                .min_by_key(|&i| (held[i].len(), mix(p, i)))
            else {
                break; // cannot happen given the capacity check, unless capacities are lopsided
            };
            held[i].insert(p);
            if let Some(c) = count.get_mut(&p) {
                *c += 1;
            }
        }
    }
    // 4. balance (nodes is non-empty, so there is always a fullest node)
    while let Some(max) = (0..nodes.len()).max_by_key(|&i| (held[i].len(), std::cmp::Reverse(i))) {
        let Some(min) = (0..nodes.len())
            .filter(|&i| held[i].len() < nodes[i].capacity)
            .min_by_key(|&i| (held[i].len(), i))
        else {
            break;
        };
        if held[max].len() <= held[min].len() + 1 {
            break;
        }
        let Some(&p) = held[max].iter().find(|p| !held[min].contains(p)) else {
            break;
        };
        held[max].remove(&p);
        held[min].insert(p);
    }
    let moved = held
        .iter()
        .zip(&before)
        .map(|(h, b)| h.difference(b).count())
        .sum();
    let placed = nodes
        .iter()
        .zip(held)
        .map(|(n, h)| PlacedNode {
            id: n.id.clone(),
            addr: n.addr.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize, cap: usize) -> Vec<NodeSlot> {
        (0..n)
            .map(|i| NodeSlot {
                id: format!("n{i}"),
                addr: format!("a{i}"),
                capacity: cap,
            })
            .collect()
    }

    fn record(p: &Plan) -> PlacementRecord {
        PlacementRecord {
            version: 1,
            nodes: p.nodes.clone(),
        }
    }

    fn check_cover(p: &Plan, layers: &[usize], n: usize, replicas: usize) {
        let rec = record(p);
        let placement = rec.to_placement(layers, n).expect("covers every expert");
        for &l in layers {
            for e in 0..n {
                assert!(placement.replicas(l, e).len() >= replicas, "({l}, {e})");
            }
        }
    }

    #[test]
    fn fresh_placement_covers_with_replicas_and_balances() {
        let p = plan(None, &slots(4, 1000), &[1, 2, 3], 256, 2).expect("fits");
        check_cover(&p, &[1, 2, 3], 256, 2);
        let loads: Vec<usize> = p.nodes.iter().map(|n| n.experts.len()).collect();
        assert!(
            loads.iter().max().expect("max") - loads.iter().min().expect("min") <= 1,
            "{loads:?}"
        );
        assert_eq!(p.moved, 3 * 256 * 2);
    }

    #[test]
    fn a_dead_node_is_replaced_by_adding_only_its_replicas() {
        let first = plan(None, &slots(4, 1000), &[1, 2, 3], 256, 2).expect("fits");
        let lost = first.nodes[3].experts.len();
        let survivors = slots(4, 1000)[..3].to_vec();
        let next = plan(Some(&record(&first)), &survivors, &[1, 2, 3], 256, 2).expect("fits");
        check_cover(&next, &[1, 2, 3], 256, 2);
        // The lost replicas are re-created; balancing may move a few more (well under 10%).
        assert!(
            next.moved >= lost && next.moved <= lost + lost / 10,
            "moved {} for {lost} lost",
            next.moved
        );
    }

    #[test]
    fn a_new_node_takes_a_fair_share_and_nothing_else_moves() {
        let first = plan(None, &slots(4, 1000), &[1, 2, 3], 256, 2).expect("fits");
        let next = plan(Some(&record(&first)), &slots(5, 1000), &[1, 2, 3], 256, 2).expect("fits");
        check_cover(&next, &[1, 2, 3], 256, 2);
        let total = 3 * 256 * 2;
        assert!(next.moved <= total / 5 + 1, "moved {}", next.moved);
        assert!(next.nodes[4].experts.len() >= total / 5 - 1);
        let scratch = plan(None, &slots(5, 1000), &[1, 2, 3], 256, 2).expect("fits");
        let differ: usize = scratch
            .nodes
            .iter()
            .zip(&next.nodes)
            .map(|(a, b)| a.experts.iter().filter(|x| !b.experts.contains(x)).count())
            .sum();
        eprintln!(
            "incremental moves {} vs from-scratch difference {differ}",
            next.moved
        );
        assert!(next.moved * 2 < differ);
    }

    #[test]
    fn capacities_are_respected_or_the_plan_refuses() {
        let mut nodes = slots(3, 300);
        nodes[0].capacity = 0; // a node that can hold nothing
        let err = plan(None, &nodes, &[1, 2, 3], 256, 1).expect_err("768 pairs > 600 slots");
        assert!(
            matches!(
                err,
                PlanError::Capacity {
                    needed: 768,
                    available: 600,
                    ..
                }
            ),
            "{err}"
        );
        nodes[1].capacity = 500;
        let p = plan(None, &nodes, &[1, 2, 3], 256, 1).expect("fits in 800");
        assert!(p.nodes[0].experts.is_empty());
        assert!(
            p.nodes
                .iter()
                .zip(&nodes)
                .all(|(p, n)| p.experts.len() <= n.capacity)
        );
        check_cover(&p, &[1, 2, 3], 256, 1);
        assert_eq!(
            plan(None, &[], &[1], 4, 1).expect_err("no nodes"),
            PlanError::NoNodes
        );
    }

    #[test]
    fn replicas_are_capped_by_the_number_of_nodes() {
        let p = plan(None, &slots(1, 100), &[1], 8, 2).expect("one node holds one replica each");
        assert_eq!(p.nodes[0].experts.len(), 8);
    }
}
