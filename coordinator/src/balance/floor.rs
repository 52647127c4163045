//! Rebalancing that keeps every expert on at least `min_replicas` GPUs (fault tolerance), for
//! clusters that want both: the current placement already has the floor; spare slots, and slots
//! of replicas above the floor, are what may change. Greedy: while it improves the balance, give
//! one of the experts loading the fullest GPU one more replica on a lightly loaded GPU (in a free
//! slot, or over a replica above the floor of a light expert), judging every candidate with
//! exact shares ([`optimal_shares`]).

use super::{EPS, LayerPlacement, optimal_shares};

/// Candidates checked per step: experts on the fullest GPU, and target GPUs.
const EXPERTS: usize = 4;
const TARGETS: usize = 4;

/// From `current` (which every expert must be on at least `min_replicas` times, on distinct
/// GPUs), adds replicas of hot experts within `slots` while the balancedness improves by more
/// than `min_gain` per move, up to `max_moves`. Returns the placement (with exact shares) and
/// the slots that changed expert.
pub fn rebalance_with_floor(
    loads: &[f64],
    slots: &[usize],
    current: &LayerPlacement,
    min_replicas: usize,
    min_gain: f64,
    max_moves: usize,
) -> (LayerPlacement, usize) {
    let n = loads.len();
    let mut p = current.clone();
    p.gpus.resize(slots.len(), Vec::new());
    optimal_shares(&mut p, loads);
    let mut moves = 0;
    while moves < max_moves {
        let b = p.balancedness(loads);
        if b >= 1.0 - 1e-9 {
            break;
        }
        let gl = p.gpu_loads(loads);
        let replicas = p.replicas(n);
        let Some(hot) = (0..gl.len()).max_by(|&a, &b| gl[a].total_cmp(&gl[b])) else {
            break;
        };
        let mut experts: Vec<(u32, f64)> = p.gpus[hot]
            .iter()
            .map(|&(e, s)| (e, s * loads[e as usize]))
            .filter(|&(_, l)| l > EPS)
            .collect();
        experts.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut targets: Vec<usize> = (0..gl.len())
            .filter(|&g| g != hot && slots[g] > 0)
            .collect();
        targets.sort_by(|&a, &b| gl[a].total_cmp(&gl[b]));
        let mut best: Option<(f64, LayerPlacement)> = None;
        for &(e, _) in experts.iter().take(EXPERTS) {
            for &t in targets
                .iter()
                .filter(|&&t| !p.gpus[t].iter().any(|s| s.0 == e))
                .take(TARGETS)
            {
                let mut q = p.clone();
                if q.gpus[t].len() < slots[t] {
                    q.gpus[t].push((e, 0.0));
                } else {
                    // Over the replica above the floor whose expert has least load per replica.
                    let victim = (0..q.gpus[t].len())
                        .filter(|&i| replicas[q.gpus[t][i].0 as usize] > min_replicas.max(1))
                        .min_by(|&i, &j| {
                            let per = |k: usize| {
                                let f = q.gpus[t][k].0 as usize;
                                loads[f] / replicas[f] as f64
                            };
                            per(i).total_cmp(&per(j))
                        });
                    let Some(v) = victim else { continue };
                    q.gpus[t][v] = (e, 0.0);
                }
                optimal_shares(&mut q, loads);
                let qb = q.balancedness(loads);
                if best.as_ref().is_none_or(|(bb, _)| qb > *bb) {
                    best = Some((qb, q));
                }
            }
        }
        match best {
            Some((qb, q)) if qb > b + min_gain.max(1e-9) => {
                p = q;
                moves += 1;
            }
            _ => break,
        }
    }
    (p, moves)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_experts_gain_replicas_and_no_expert_drops_below_the_floor() {
        // 16 experts, 4 GPUs × 9 slots; every expert on 2 GPUs (32 slots), 4 spare.
        let mut loads = vec![1.0; 16];
        loads[3] = 40.0;
        loads[9] = 6.0;
        let current = LayerPlacement {
            gpus: (0..4)
                .map(|g| {
                    (0..16u32)
                        .filter(|e| (*e as usize / 4 == g) || ((*e as usize / 4 + 1) % 4 == g))
                        .map(|e| (e, 0.5))
                        .collect()
                })
                .collect(),
        };
        // Re-solving the shares alone cannot split expert 3 over more than its 2 GPUs.
        let mut shares_only = current.clone();
        optimal_shares(&mut shares_only, &loads);
        let before = shares_only.balancedness(&loads);
        assert!(before < 0.8, "{before}");
        let (p, moves) = rebalance_with_floor(&loads, &[9; 4], &current, 2, 1e-4, 64);
        let after = p.balancedness(&loads);
        assert!(after > 0.95, "{before} → {after}");
        assert_eq!(moves, p.moves_from(&current));
        assert!(
            moves <= 4,
            "only the spare slots were needed, moved {moves}"
        );
        let r = p.replicas(16);
        assert!(r.iter().all(|&k| k >= 2), "{r:?}");
        assert!(r[3] > 2, "the hottest expert gained a replica: {r:?}");
        for g in &p.gpus {
            assert!(g.len() <= 9);
            let mut ids: Vec<u32> = g.iter().map(|s| s.0).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), g.len(), "an expert twice on one GPU");
        }
        // Full GPUs and every expert at the floor: nothing may move.
        let (q, moves) = rebalance_with_floor(&loads, &[8; 4], &current, 2, 1e-4, 64);
        assert_eq!(moves, 0);
        assert_eq!(q.replicas(16), vec![2; 16]);
    }
}
