//! Planning one layer's dispatch: which node computes each (token, expert), and the per-node
//! CSR lists. A token goes to a node once with all of its experts there; nodes that are down or
//! excluded are skipped.
//!
//! An expert with few tokens in a step (fewer than `split_min`: decode) sends them all to one of
//! its replicas, so that its weights are read once per step rather than once per replica: a
//! decode step's cost on a node is the weights it reads. The replica is drawn per (step, expert)
//! by the published shares (load-balanced placements), so load follows the shares over steps, or
//! else is the one given the fewest experts so far in this step. An expert with many tokens
//! (prefill, where compute dominates) is split per token: by the shares, each (step, token,
//! expert) hashing to a point on them, or else preferring a node the token already visits, then
//! the least loaded one.

use std::collections::{BTreeMap, HashMap};

use moe_meta::Placement;
use moe_model::gate::Routing;

/// The work of one node for one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeWork {
    pub node: usize,
    /// Batch rows (tokens) sent, ascending.
    pub tokens: Vec<usize>,
    /// CSR over `tokens`.
    pub offsets: Vec<u32>,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// A (token, expert) that no live replica can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unplaceable {
    pub token: usize,
    pub expert: usize,
}

fn mix(seed: u64, token: usize, expert: u32) -> u64 {
    let mut h =
        (seed ^ (token as u64) << 20 ^ u64::from(expert) << 44).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 31;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 29)
}

/// The replica whose share interval holds the point `at` of `[0, sum of shares)`, over the
/// (replica, share) pairs `replicas` yields.
fn by_share<I: Iterator<Item = (usize, u32)> + Clone>(replicas: I, at: u64) -> Option<usize> {
    let total: u64 = replicas.clone().map(|r| u64::from(r.1)).sum();
    let mut point = at % total.max(1);
    let mut last = None;
    for (n, s) in replicas {
        if point < u64::from(s) {
            return Some(n);
        }
        point -= u64::from(s);
        last = Some(n);
    }
    last
}

/// Fewest tokens of one expert in one step that are split over its replicas (below it they go
/// to one replica). On a CPU an expert's weight read costs about as much as 5 tokens of its
/// compute, so splitting pays only well above that; on a GPU the crossover is in the hundreds.
pub const DEFAULT_SPLIT_MIN_TOKENS: usize = 32;

/// The usable replica of `expert` whose share interval holds the point `at`; `None` when the
/// expert has no published shares (or no usable replica).
fn draw(
    placement: &Placement,
    layer: usize,
    expert: u32,
    at: u64,
    usable: &impl Fn(usize) -> bool,
) -> Option<usize> {
    let shares = placement.shares(layer, expert as usize)?;
    let replicas = placement.replicas(layer, expert as usize);
    let pairs = replicas.iter().copied().zip(shares.iter().copied());
    by_share(pairs.filter(|&(r, _)| usable(r)), at)
}

/// The replica each expert of this step with fewer than `split_min` tokens uses (experts not
/// listed are split per token).
fn whole_experts(
    placement: &Placement,
    layer: usize,
    entries: &[(usize, u32, f32)],
    seed: u64,
    split_min: usize,
    usable: &impl Fn(usize) -> bool,
) -> Result<HashMap<u32, usize>, Unplaceable> {
    // expert → (tokens this step, first token)
    let mut count: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    for &(tok, expert, _) in entries {
        count.entry(expert).or_insert((0, tok)).0 += 1;
    }
    let mut experts_on = vec![0usize; placement.nodes.len()];
    let mut whole = HashMap::new();
    for (expert, (n, first_token)) in count {
        if n >= split_min {
            continue;
        }
        let node = draw(
            placement,
            layer,
            expert,
            mix(seed, usize::MAX, expert),
            usable,
        )
        .or_else(|| {
            let replicas = placement.replicas(layer, expert as usize).iter().copied();
            replicas
                .filter(|&r| usable(r))
                .min_by_key(|&r| (experts_on[r], r))
        })
        .ok_or(Unplaceable {
            token: first_token,
            expert: expert as usize,
        })?;
        experts_on[node] += 1;
        whole.insert(expert, node);
    }
    Ok(whole)
}

/// Plans `entries` (token, expert, weight) of `layer` over the placement; `usable(node)` says
/// whether a node may be used; `seed` varies the share draws from step to step; an expert with
/// at least `split_min` tokens is split over its replicas, one with fewer goes to one replica.
pub fn plan(
    placement: &Placement,
    layer: usize,
    entries: &[(usize, u32, f32)],
    seed: u64,
    split_min: usize,
    usable: impl Fn(usize) -> bool,
) -> Result<Vec<NodeWork>, Unplaceable> {
    let n_nodes = placement.nodes.len();
    let whole = whole_experts(placement, layer, entries, seed, split_min, &usable)?;
    let mut load = vec![0usize; n_nodes];
    // node → token → [(expert, weight)]
    let mut per_node: Vec<BTreeMap<usize, Vec<(u32, f32)>>> = vec![Default::default(); n_nodes];
    let mut i = 0;
    while i < entries.len() {
        let tok = entries[i].0;
        let j = i + entries[i..].iter().take_while(|x| x.0 == tok).count();
        // (node, expert, weight) of this token. Experts whose node is decided (one replica for
        // the step, or drawn by the shares) go first; the others then prefer a node this token
        // visits anyway, fewest replicas first, else the least loaded (this token adds load only
        // to nodes it visits, so it is counted once it is placed).
        let mut visits: Vec<(usize, u32, f32)> = Vec::with_capacity(j - i);
        let mut open: Vec<(u32, f32, Vec<usize>)> = Vec::new();
        for &(_, expert, w) in &entries[i..j] {
            if let Some(&node) = whole.get(&expert) {
                visits.push((node, expert, w));
                continue;
            }
            let all = placement.replicas(layer, expert as usize);
            if !all.iter().any(|&n| usable(n)) {
                return Err(Unplaceable {
                    token: tok,
                    expert: expert as usize,
                });
            }
            match draw(placement, layer, expert, mix(seed, tok, expert), &usable) {
                Some(node) => visits.push((node, expert, w)),
                None => open.push((
                    expert,
                    w,
                    all.iter().copied().filter(|&n| usable(n)).collect(),
                )),
            }
        }
        open.sort_by_key(|(e, _, r)| (r.len(), *e));
        for (expert, w, replicas) in open {
            let visited = replicas
                .iter()
                .copied()
                .find(|&n| visits.iter().any(|v| v.0 == n));
            let node = visited.unwrap_or_else(|| {
                let least = replicas.iter().copied().min_by_key(|&n| (load[n], n));
                least.unwrap_or(replicas[0])
            });
            visits.push((node, expert, w));
        }
        for (k, &(node, expert, w)) in visits.iter().enumerate() {
            if visits[..k].iter().all(|v| v.0 != node) {
                load[node] += 1;
            }
            per_node[node].entry(tok).or_default().push((expert, w));
        }
        i = j;
    }
    Ok(per_node
        .into_iter()
        .enumerate()
        .filter(|(_, m)| !m.is_empty())
        .map(|(node, m)| {
            let mut work = NodeWork {
                node,
                tokens: Vec::new(),
                offsets: vec![0],
                experts: Vec::new(),
                weights: Vec::new(),
            };
            for (tok, mut list) in m {
                list.sort_by_key(|(e, _)| *e);
                work.tokens.push(tok);
                for (e, w) in list {
                    work.experts.push(e);
                    work.weights.push(w);
                }
                work.offsets.push(work.experts.len() as u32);
            }
            work
        })
        .collect())
}

/// Every (token, expert, weight) of a routing, token-major.
pub fn entries(routing: &Routing) -> Vec<(usize, u32, f32)> {
    (0..routing.tokens())
        .flat_map(|t| {
            routing
                .ids_of(t)
                .iter()
                .zip(routing.weights_of(t))
                .map(move |(&e, &w)| (t, e, w))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_meta::NodeEntry;

    /// Split every expert's tokens (the per-token rules), as prefill-sized groups are.
    const SPLIT: usize = 1;

    fn placement(specs: &[&str]) -> Placement {
        let nodes = specs
            .iter()
            .enumerate()
            .map(|(i, s)| NodeEntry {
                id: format!("n{i}"),
                address: None,
                experts: s.to_string(),
            })
            .collect();
        Placement::new(1, nodes, &[1], 8).expect("covers")
    }

    #[test]
    fn a_token_visits_each_node_once() {
        let p = placement(&["1:0-3", "1:4-7"]);
        let e = vec![(0, 0, 0.5), (0, 1, 0.25), (0, 5, 0.25), (1, 6, 1.0)];
        let w = plan(&p, 1, &e, 0, SPLIT, |_| true).expect("placeable");
        assert_eq!(w.len(), 2);
        assert_eq!(
            (
                w[0].node,
                w[0].tokens.clone(),
                w[0].offsets.clone(),
                w[0].experts.clone()
            ),
            (0, vec![0], vec![0, 2], vec![0, 1])
        );
        assert_eq!(
            (
                w[1].node,
                w[1].tokens.clone(),
                w[1].offsets.clone(),
                w[1].experts.clone()
            ),
            (1, vec![0, 1], vec![0, 1, 2], vec![5, 6])
        );
        assert_eq!(w[1].weights, vec![0.25, 1.0]);
    }

    #[test]
    fn replicas_prefer_visited_nodes_then_balance() {
        // Expert 2 lives on both nodes; experts 0 and 7 on one each.
        let p = placement(&["1:0-3", "1:2-7"]);
        // Token 0 must visit node 1 for expert 7: expert 2 joins it there, even listed first.
        let w = plan(&p, 1, &[(0, 2, 1.0), (0, 7, 1.0)], 0, SPLIT, |_| true).expect("ok");
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].node, 1);
        // Tokens that only want expert 2 alternate between the replicas.
        let e: Vec<_> = (0..4).map(|t| (t, 2u32, 1.0f32)).collect();
        let w = plan(&p, 1, &e, 0, SPLIT, |_| true).expect("ok");
        assert_eq!(
            w.iter().map(|x| x.tokens.len()).collect::<Vec<_>>(),
            vec![2, 2]
        );
    }

    #[test]
    fn down_nodes_are_avoided_or_reported() {
        let p = placement(&["1:0-3", "1:2-7"]);
        let w = plan(&p, 1, &[(0, 2, 1.0)], 0, SPLIT, |n| n != 1).expect("replica on node 0");
        assert_eq!(w[0].node, 0);
        let err = plan(&p, 1, &[(3, 5, 1.0)], 0, SPLIT, |n| n != 1).expect_err("no replica");
        assert_eq!(
            err,
            Unplaceable {
                token: 3,
                expert: 5
            }
        );
    }

    #[test]
    fn shares_split_an_experts_tokens_and_skip_down_replicas() {
        let mut p = placement(&["1:0-3", "1:2-7", "1:2"]);
        p.set_shares([(1, 2, 0, 600_000), (1, 2, 1, 300_000), (1, 2, 2, 100_000)]);
        let e: Vec<_> = (0..10_000).map(|t| (t, 2u32, 1.0f32)).collect();
        let count = |w: &[NodeWork]| {
            let mut c = [0usize; 3];
            for x in w {
                c[x.node] += x.tokens.len();
            }
            c
        };
        let c = count(&plan(&p, 1, &e, 7, SPLIT, |_| true).expect("ok"));
        for (got, want) in c.iter().zip([6000.0, 3000.0, 1000.0]) {
            assert!((*got as f64 - want).abs() < want * 0.05, "{c:?}");
        }
        // Node 0 down: its share goes to the others in proportion (3:1).
        let c = count(&plan(&p, 1, &e, 7, SPLIT, |n| n != 0).expect("ok"));
        assert_eq!(c[0], 0);
        assert!((c[1] as f64 / c[2] as f64 - 3.0).abs() < 0.3, "{c:?}");
    }

    fn nodes_of(w: &[NodeWork], expert: u32) -> Vec<usize> {
        w.iter()
            .filter(|x| x.experts.contains(&expert))
            .map(|x| x.node)
            .collect()
    }

    #[test]
    fn an_expert_with_few_tokens_goes_to_one_replica_and_many_are_split() {
        // Expert 2 on both nodes, expert 0 on node 0 only.
        let p = placement(&["1:0-3", "1:2-7"]);
        // 4 tokens want expert 2 (below 8): one replica computes all of them, even for the
        // token that visits node 0 anyway for expert 0.
        let mut e: Vec<_> = (0..4).map(|t| (t, 2u32, 1.0f32)).collect();
        e.insert(0, (0, 0, 1.0));
        let w = plan(&p, 1, &e, 0, 8, |_| true).expect("ok");
        assert_eq!(nodes_of(&w, 2).len(), 1, "{w:?}");
        let tokens_with_2: usize = w
            .iter()
            .map(|x| x.experts.iter().filter(|&&x| x == 2).count())
            .sum();
        assert_eq!(tokens_with_2, 4);
        // 8 tokens (at the threshold): split over both replicas.
        let e: Vec<_> = (0..8).map(|t| (t, 2u32, 1.0f32)).collect();
        let w = plan(&p, 1, &e, 0, 8, |_| true).expect("ok");
        assert_eq!(nodes_of(&w, 2), vec![0, 1]);
    }

    #[test]
    fn whole_experts_spread_over_nodes_and_follow_shares_over_steps() {
        // Experts 0-7 on both nodes, no shares: one token each; each node gets four experts.
        let p = placement(&["1:0-7", "1:0-7"]);
        let e: Vec<_> = (0..8).map(|x| (0, x as u32, 1.0f32)).collect();
        let w = plan(&p, 1, &e, 0, 8, |_| true).expect("ok");
        assert_eq!(
            w.iter().map(|x| x.experts.len()).collect::<Vec<_>>(),
            [4, 4]
        );
        // With shares 3:1 for expert 5, steps (seeds) pick its replica in that proportion, and a
        // down replica is never picked.
        let mut p = placement(&["1:0-7", "1:0-7"]);
        p.set_shares([(1, 5, 0, 750_000), (1, 5, 1, 250_000)]);
        let e = [(0, 5u32, 1.0f32), (1, 5, 1.0)];
        let mut on = [0usize; 2];
        for seed in 0..4000 {
            let w = plan(&p, 1, &e, seed, 8, |_| true).expect("ok");
            assert_eq!(w.len(), 1, "both tokens on one replica");
            on[w[0].node] += 1;
        }
        assert!((on[0] as f64 / 4000.0 - 0.75).abs() < 0.03, "{on:?}");
        for seed in 0..100 {
            let w = plan(&p, 1, &e, seed, 8, |n| n != 0).expect("ok");
            assert_eq!(w[0].node, 1);
        }
        let err = plan(&p, 1, &[(3, 5, 1.0)], 0, 8, |_| false).expect_err("nothing usable");
        assert_eq!(
            err,
            Unplaceable {
                token: 3,
                expert: 5
            }
        );
    }
}
