//! Rebalancing from a current placement with as few slot changes as it can.
//!
//! The target is a fresh plan's balance less `tolerance`, i.e. a cap on the largest GPU load.
//! Load that does not fit under the cap is the deficit of a max flow (experts → the GPUs hosting
//! them → sink at the cap), and its minimum cut names the experts whose load is stuck and the
//! saturated GPUs that hold all their replicas. Each move gives a stuck expert a replica on a GPU
//! with slack, in a free slot or in place of a redundant replica whose tokens can go elsewhere,
//! taking the move that cuts the deficit most (checked with the flow), until nothing is left.
//! The fresh plan itself, and the fresh plan with its GPUs relabelled to overlap the current
//! placement most, are candidates too: whichever reaches the target moving fewest slots wins.

use super::flow::{Flow, flow};
use super::{
    BalanceError, EPS, LayerPlacement, level_to, normalise_even, optimal_shares, place_layer,
};

/// How a repair step picks the moves it checks: two rules, each better on some loads; both
/// run and the result moving fewer slots wins.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// The stuck expert with most load left over, onto every GPU outside the cut, over the
    /// replica whose expert has most room without it.
    Surplus,
    /// The two stuck experts with most load per replica, onto GPUs outside the cut, over the
    /// replica whose flow looks easiest to reroute; only the best few estimates are checked.
    Reroute,
    /// Both sets of candidates at every step.
    Both,
}

/// Moves toward a fresh plan's balance from `current`, changing as few slots as it can (see the
/// module docs). `tolerance` is how much balance may be given up to save moves (0.01 accepts a
/// balancedness 0.01 below the fresh plan's). Returns the placement and the number of slots
/// that changed expert.
pub fn rebalance_layer(
    loads: &[f64],
    slots: &[usize],
    current: &LayerPlacement,
    tolerance: f64,
) -> Result<(LayerPlacement, usize), BalanceError> {
    let n = loads.len();
    let scratch = place_layer(loads, slots)?;
    let goal = scratch.balancedness(loads) - tolerance.max(0.0);
    let total: f64 = loads.iter().sum();
    let mut candidates = Vec::with_capacity(4);
    if let Some(covered) = cover(current, slots, n) {
        // Each rule toward the goal, and the combined rule toward a stricter aim (half the
        // tolerance), which leaves room when it stalls just short.
        let tol = tolerance.max(0.0);
        // Aim a hair above the goal so the shares solved to a tolerance still meet it.
        let cap_at = |b: f64| total / slots.len() as f64 / (b + 1e-6).max(EPS);
        let cap = cap_at(goal);
        for (pick, aim) in [
            (Pick::Surplus, goal),
            (Pick::Reroute, goal),
            (Pick::Both, goal),
            (Pick::Both, goal + tol / 2.0),
            (Pick::Both, goal + tol),
        ] {
            let mut p = covered.clone();
            if total > EPS {
                repair(&mut p, loads, slots, cap_at(aim), cap, pick);
                optimal_shares(&mut p, loads);
                if p.balancedness(loads) < goal {
                    level_to(&mut p, loads, slots, cap);
                    optimal_shares(&mut p, loads);
                }
            } else {
                normalise_even(&mut p, n);
            }
            candidates.push(p);
        }
    }
    candidates.push(relabel(&scratch, current, slots));
    let fresh = scratch.clone();
    candidates.push(scratch);
    // Slot changes the goal does not need go back to what the slot held.
    if total > EPS {
        let cap = total / slots.len() as f64 / (goal + 1e-6).max(EPS);
        for p in &mut candidates {
            prune(p, current, loads, cap);
            optimal_shares(p, loads);
        }
    }
    let best = candidates
        .into_iter()
        .map(|p| (p.moves_from(current), p.balancedness(loads), p))
        .filter(|(_, b, _)| *b >= goal - 1e-9)
        .min_by(|x, y| x.0.cmp(&y.0).then(y.1.total_cmp(&x.1)));
    // Pruning re-solves shares to a tolerance, which can leave every candidate a hair short of
    // a zero-tolerance goal; the fresh plan meets it by definition.
    Ok(best.map_or_else(
        || (fresh.moves_from(current), fresh),
        |(moves, _, p)| (moves, p),
    ))
    .map(|(moves, p)| (p, moves))
}

/// `current` fitted to `slots`: slots beyond a GPU's capacity dropped, experts it lacks put in
/// free slots (or over a replica of an expert that has several). `None` if that cannot be done.
fn cover(current: &LayerPlacement, slots: &[usize], n: usize) -> Option<LayerPlacement> {
    let mut p = current.clone();
    p.gpus.resize(slots.len(), Vec::new());
    for (g, gs) in p.gpus.iter_mut().enumerate() {
        gs.retain(|s| (s.0 as usize) < n);
        let mut seen = Vec::with_capacity(gs.len());
        gs.retain(|s| {
            let new = !seen.contains(&s.0);
            seen.push(s.0);
            new
        });
        gs.truncate(slots[g]);
    }
    let mut r = p.replicas(n);
    for e in 0..n {
        if r[e] > 0 {
            continue;
        }
        let free = (0..slots.len())
            .filter(|&g| p.gpus[g].len() < slots[g])
            .max_by_key(|&g| (slots[g] - p.gpus[g].len(), std::cmp::Reverse(g)));
        match free {
            Some(g) => p.gpus[g].push((e as u32, 0.0)),
            None => {
                // Over a replica of the expert with the most replicas.
                let (g, i) = (0..slots.len())
                    .flat_map(|g| (0..p.gpus[g].len()).map(move |i| (g, i)))
                    .filter(|&(g, i)| r[p.gpus[g][i].0 as usize] > 1)
                    .max_by_key(|&(g, i)| r[p.gpus[g][i].0 as usize])?;
                r[p.gpus[g][i].0 as usize] -= 1;
                p.gpus[g][i] = (e as u32, 0.0);
            }
        }
        r[e] = 1;
    }
    Some(p)
}

/// One candidate move: expert `e` into a slot of `g`, over slot `victim` if `g` is full.
#[derive(Debug, Clone, Copy)]
struct Move {
    e: u32,
    g: usize,
    victim: Option<usize>,
    estimate: f64,
}

/// Greedy repair toward max GPU load `cap` (see the module docs), stopping early once the load
/// fits under `enough` (≥ `cap`): aiming past the goal leaves room when the greedy stalls.
fn repair(
    p: &mut LayerPlacement,
    loads: &[f64],
    slots: &[usize],
    cap: f64,
    enough: f64,
    pick: Pick,
) {
    let total: f64 = loads.iter().sum();
    let done = total * 1e-9;
    let limit: usize = slots.iter().sum();
    for _ in 0..limit {
        let f = flow(p, loads, cap);
        let deficit = total - f.total;
        if deficit <= done || (enough > cap && total - flow(p, loads, enough).total <= done) {
            return;
        }
        let mut moves = Vec::new();
        if matches!(pick, Pick::Surplus | Pick::Both) {
            moves.extend(surplus_moves(p, loads, slots, cap, &f).into_iter().take(64));
        }
        if matches!(pick, Pick::Reroute | Pick::Both) {
            moves.extend(
                reroute_moves(p, loads, slots, cap, &f, deficit)
                    .into_iter()
                    .take(6),
            );
        }
        let mut best: Option<(f64, Move)> = None;
        for m in moves {
            let mut q = p.clone();
            apply(&mut q, m);
            let gain = flow(&q, loads, cap).total - f.total;
            if gain > done && best.is_none_or(|(b, _)| gain > b) {
                best = Some((gain, m));
            }
        }
        match best {
            Some((_, m)) => apply(p, m),
            None => return,
        }
    }
}

fn apply(p: &mut LayerPlacement, m: Move) {
    match m.victim {
        Some(i) => p.gpus[m.g][i] = (m.e, 0.0),
        None => p.gpus[m.g].push((m.e, 0.0)),
    }
}

/// Per GPU: room left under `cap` in the flow `f`.
fn slack(f: &Flow, cap: f64) -> Vec<f64> {
    f.per_slot
        .iter()
        .map(|s| (cap - s.iter().sum::<f64>()).max(0.0))
        .collect()
}

/// GPUs that may take a replica of `e`: outside the cut, with slots, not hosting it yet; with
/// whether a slot is free.
fn targets<'a>(
    p: &'a LayerPlacement,
    f: &'a Flow,
    slots: &'a [usize],
    e: usize,
) -> impl Iterator<Item = (usize, &'a [(u32, f64)], bool)> + 'a {
    p.gpus.iter().enumerate().filter_map(move |(g, gs)| {
        let open = !f.gpu_stuck[g] && slots[g] > 0 && !gs.iter().any(|s| s.0 == e as u32);
        open.then_some((g, gs.as_slice(), gs.len() < slots[g]))
    })
}

/// Slots of `gs` whose replica may give way: its expert has others and is not stuck.
fn victims<'a>(
    gs: &'a [(u32, f64)],
    r: &'a [usize],
    f: &'a Flow,
) -> impl Iterator<Item = usize> + 'a {
    (0..gs.len()).filter(move |&i| r[gs[i].0 as usize] > 1 && !f.expert_stuck[gs[i].0 as usize])
}

/// [`Pick::Surplus`] moves, free slots first, then by the victim's room.
fn surplus_moves(
    p: &LayerPlacement,
    loads: &[f64],
    slots: &[usize],
    cap: f64,
    f: &Flow,
) -> Vec<Move> {
    let n = loads.len();
    let r = p.replicas(n);
    let slack = slack(f, cap);
    // Load the flow could not place, per expert: a replica elsewhere takes it directly.
    let mut unplaced = loads.to_vec();
    for (g, gs) in p.gpus.iter().enumerate() {
        for (i, &(e, _)) in gs.iter().enumerate() {
            unplaced[e as usize] -= f.per_slot[g][i];
        }
    }
    let Some(e) = (0..n)
        .filter(|&e| f.expert_stuck[e] && loads[e] > EPS)
        .max_by(|&a, &b| {
            unplaced[a]
                .total_cmp(&unplaced[b])
                .then((loads[a] / r[a] as f64).total_cmp(&(loads[b] / r[b] as f64)))
                .then(b.cmp(&a))
        })
    else {
        return Vec::new();
    };
    // Room an expert keeps without one of its replicas.
    let room = |v: usize| (r[v] as f64 - 1.0) * cap - loads[v];
    let mut out = Vec::new();
    for (g, gs, free) in targets(p, f, slots, e) {
        if free {
            out.push(Move {
                e: e as u32,
                g,
                victim: None,
                estimate: f64::INFINITY,
            });
            continue;
        }
        let victim = victims(gs, &r, f)
            .max_by(|&i, &j| room(gs[i].0 as usize).total_cmp(&room(gs[j].0 as usize)));
        if let Some(i) = victim {
            out.push(Move {
                e: e as u32,
                g,
                victim: Some(i),
                estimate: room(gs[i].0 as usize) + slack[g],
            });
        }
    }
    out.sort_by(|a, b| b.estimate.total_cmp(&a.estimate));
    out
}

/// [`Pick::Reroute`] moves, best estimated gain first: slack gained on the target less the
/// victim's flow that its other GPUs' slack could not take.
fn reroute_moves(
    p: &LayerPlacement,
    loads: &[f64],
    slots: &[usize],
    cap: f64,
    f: &Flow,
    deficit: f64,
) -> Vec<Move> {
    let n = loads.len();
    let r = p.replicas(n);
    let slack = slack(f, cap);
    let mut stuck: Vec<usize> = (0..n)
        .filter(|&e| f.expert_stuck[e] && loads[e] > EPS)
        .collect();
    stuck.sort_by(|&a, &b| {
        (loads[b] / r[b] as f64)
            .total_cmp(&(loads[a] / r[a] as f64))
            .then(a.cmp(&b))
    });
    let mut elsewhere = vec![0.0f64; n];
    for (g, gs) in p.gpus.iter().enumerate() {
        for &(e, _) in gs {
            elsewhere[e as usize] += slack[g];
        }
    }
    let mut out = Vec::new();
    for &e in stuck.iter().take(2) {
        for (g, gs, free) in targets(p, f, slots, e) {
            if free {
                out.push(Move {
                    e: e as u32,
                    g,
                    victim: None,
                    estimate: slack[g].min(deficit),
                });
                continue;
            }
            let victim = victims(gs, &r, f)
                .map(|i| {
                    let v = gs[i].0 as usize;
                    let x = f.per_slot[g][i];
                    let lost = (x - (elsewhere[v] - slack[g])).max(0.0);
                    ((slack[g] + x).min(deficit) - lost, i)
                })
                .max_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((estimate, i)) = victim {
                out.push(Move {
                    e: e as u32,
                    g,
                    victim: Some(i),
                    estimate,
                });
            }
        }
    }
    out.sort_by(|a, b| {
        b.estimate
            .total_cmp(&a.estimate)
            .then(a.victim.is_some().cmp(&b.victim.is_some()))
    });
    out
}

/// Reverts slots of `p` that differ from `current` to an expert `current` had on that GPU,
/// one at a time, wherever every expert stays placed and all load still fits under `cap`.
fn prune(p: &mut LayerPlacement, current: &LayerPlacement, loads: &[f64], cap: f64) {
    let n = loads.len();
    let total: f64 = loads.iter().sum();
    let done = total * 1e-9;
    if total - flow(p, loads, cap).total > done {
        return;
    }
    let mut r = p.replicas(n);
    for g in 0..p.gpus.len() {
        let Some(before) = current.gpus.get(g) else {
            continue;
        };
        let mut missing: Vec<u32> = before
            .iter()
            .map(|s| s.0)
            .filter(|&e| (e as usize) < n && !p.gpus[g].iter().any(|s| s.0 == e))
            .collect();
        let added: Vec<usize> = (0..p.gpus[g].len())
            .filter(|&i| !before.iter().any(|s| s.0 == p.gpus[g][i].0))
            .collect();
        for i in added {
            let a = p.gpus[g][i].0 as usize;
            if missing.is_empty() {
                break;
            }
            if r[a] < 2 {
                continue;
            }
            for k in 0..missing.len() {
                let mut q = p.clone();
                q.gpus[g][i] = (missing[k], 0.0);
                if total - flow(&q, loads, cap).total <= done {
                    *p = q;
                    r[a] -= 1;
                    r[missing.swap_remove(k) as usize] += 1;
                    break;
                }
            }
        }
    }
}

/// `fresh` with its GPUs renumbered to keep as many slots as possible where `current` has them
/// (greedy matching on overlap, respecting capacities).
pub fn relabel(
    fresh: &LayerPlacement,
    current: &LayerPlacement,
    slots: &[usize],
) -> LayerPlacement {
    let g_n = fresh.gpus.len();
    let overlap = |a: &[(u32, f64)], b: &[(u32, f64)]| {
        a.iter().filter(|x| b.iter().any(|y| y.0 == x.0)).count()
    };
    let mut pairs: Vec<(usize, usize, usize)> = Vec::new();
    for (fg, fs) in fresh.gpus.iter().enumerate() {
        for (cg, &room) in slots.iter().enumerate().take(g_n) {
            if fs.len() <= room {
                let o = current.gpus.get(cg).map_or(0, |cs| overlap(fs, cs));
                pairs.push((o, fg, cg));
            }
        }
    }
    pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut to: Vec<Option<usize>> = vec![None; g_n];
    let mut taken = vec![false; g_n];
    for (_, fg, cg) in pairs {
        if to[fg].is_none() && !taken[cg] {
            to[fg] = Some(cg);
            taken[cg] = true;
        }
    }
    let mut gpus = vec![Vec::new(); g_n];
    for (fg, t) in to.iter().enumerate() {
        match t {
            Some(cg) => gpus[*cg] = fresh.gpus[fg].clone(),
            None => return fresh.clone(),
        }
    }
    LayerPlacement { gpus }
}
