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
//! - [`rebalance_layer`]: from a current placement. Re-solving shares moves no weights; only if
//!   that leaves the balance more than `tolerance` below a fresh plan are slots reassigned, one at
//!   a time, from a redundant replica of a light expert to the expert that overloads the fullest
//!   GPU. `tolerance` is the knob that trades balance for moves.
//! - [`place_grouped`]: keeps each of `groups` contiguous expert groups on one host
//!   (group-limited routing then bounds the hosts a token touches), balances groups over hosts,
//!   then places within each host.

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

/// Mean / max of `loads` (1 when all are zero).
pub fn balancedness(loads: &[f64]) -> f64 {
    let max = loads.iter().copied().fold(0.0, f64::max);
    if max <= EPS {
        1.0
    } else {
        loads.iter().sum::<f64>() / loads.len() as f64 / max
    }
}

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
    let mut best: Option<LayerPlacement> = None;
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
        if best
            .as_ref()
            .is_none_or(|b| p.balancedness(loads) > b.balancedness(loads))
        {
            best = Some(p);
        }
        if best
            .as_ref()
            .is_some_and(|b| b.balancedness(loads) >= 1.0 - 1e-6)
        {
            break;
        }
    }
    Ok(best.unwrap_or(LayerPlacement {
        gpus: vec![Vec::new(); g_count],
    }))
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

/// Moves load from the fullest GPU to the emptiest until they are even (McNaughton-style
/// transfers): shift share to a GPU that already holds the expert, else put a new replica there
/// if it has a free slot, else move a whole replica. Each step evens at least one of the two
/// GPUs or moves one replica, so it ends quickly.
fn level(p: &mut LayerPlacement, loads: &[f64], slots: &[usize]) {
    let total: f64 = loads.iter().sum();
    let active = slots.iter().filter(|&&s| s > 0).count().max(1);
    let target = total / active as f64;
    let tol = total * 1e-9;
    let mut load = p.gpu_loads(loads);
    for _ in 0..(4 * p.gpus.iter().map(Vec::len).sum::<usize>() + 16) {
        // Fullest GPUs first, each against the emptiest that can take something from it.
        let mut over: Vec<usize> = (0..load.len())
            .filter(|&g| load[g] > target + tol)
            .collect();
        over.sort_by(|&x, &y| load[y].total_cmp(&load[x]));
        let mut under: Vec<usize> = (0..load.len())
            .filter(|&g| slots[g] > 0 && load[g] < target - tol)
            .collect();
        under.sort_by(|&x, &y| load[x].total_cmp(&load[y]));
        let mut progressed = false;
        'pairs: for &a in &over {
            for &b in &under {
                if transfer(p, loads, slots, &mut load, a, b, target, tol) {
                    progressed = true;
                    break 'pairs;
                }
            }
        }
        if !progressed {
            return;
        }
    }
}

/// One move of load from `a` (over the target) to `b` (under it): shift share of an expert both
/// hold, else start a replica on `b` in a free slot, else swap a piece of `a` for a lighter piece
/// of `b`. Returns whether anything moved.
#[allow(clippy::too_many_arguments)]
fn transfer(
    p: &mut LayerPlacement,
    loads: &[f64],
    slots: &[usize],
    load: &mut [f64],
    a: usize,
    b: usize,
    target: f64,
    tol: f64,
) -> bool {
    let excess = (load[a] - target).min(target - load[b]);
    if excess <= tol || p.gpus[a].is_empty() {
        return false;
    }
    let piece =
        |p: &LayerPlacement, g: usize, i: usize| p.gpus[g][i].1 * loads[p.gpus[g][i].0 as usize];
    let shared = (0..p.gpus[a].len()).find(|&i| p.gpus[b].iter().any(|t| t.0 == p.gpus[a][i].0));
    let i = match shared {
        Some(i) => i,
        None if p.gpus[b].len() < slots[b] => {
            match (0..p.gpus[a].len()).max_by(|&x, &y| piece(p, a, x).total_cmp(&piece(p, a, y))) {
                Some(i) => i,
                None => return false,
            }
        }
        None if p.gpus[a].len() < slots[a] => {
            // `b` is full, `a` is not: hand `b`'s smallest piece to `a` whole and give `b` a slice
            // of `a`'s largest piece worth that piece plus the gap (slot counts unchanged).
            let Some(j) = (0..p.gpus[b].len())
                .filter(|&j| !p.gpus[a].iter().any(|t| t.0 == p.gpus[b][j].0))
                .min_by(|&x, &y| piece(p, b, x).total_cmp(&piece(p, b, y)))
            else {
                return false;
            };
            let Some(i) = (0..p.gpus[a].len())
                .filter(|&i| !p.gpus[b].iter().any(|t| t.0 == p.gpus[a][i].0))
                .max_by(|&x, &y| piece(p, a, x).total_cmp(&piece(p, a, y)))
            else {
                return false;
            };
            let small = piece(p, b, j);
            let (e, share) = p.gpus[a][i];
            let l = loads[e as usize];
            let slice = (excess + small).min(share * l);
            if slice <= small + tol {
                return false; // would not help
            }
            let x = p.gpus[b].swap_remove(j);
            p.gpus[a].push(x);
            p.gpus[a][i].1 -= slice / l;
            p.gpus[b].push((e, slice / l));
            load[a] += small - slice;
            load[b] += slice - small;
            return true;
        }
        None => {
            // `b` is full and shares nothing with `a`: swap the pair of pieces whose difference
            // comes closest to the gap.
            let mut best: Option<(f64, usize, usize)> = None;
            for i in 0..p.gpus[a].len() {
                for j in 0..p.gpus[b].len() {
                    let d = piece(p, a, i) - piece(p, b, j);
                    let (x, y) = (p.gpus[a][i].0, p.gpus[b][j].0);
                    if d <= tol
                        || d >= 2.0 * excess
                        || p.gpus[b].iter().any(|t| t.0 == x)
                        || p.gpus[a].iter().any(|t| t.0 == y)
                    {
                        continue;
                    }
                    let miss = (d - excess).abs();
                    if best.is_none_or(|(m, _, _)| miss < m) {
                        best = Some((miss, i, j));
                    }
                }
            }
            let Some((_, i, j)) = best else { return false };
            let d = piece(p, a, i) - piece(p, b, j);
            let (x, y) = (p.gpus[a][i], p.gpus[b][j]);
            p.gpus[a][i] = y;
            p.gpus[b][j] = x;
            load[a] -= d;
            load[b] += d;
            return true;
        }
    };
    let (e, share) = p.gpus[a][i];
    let l = loads[e as usize];
    let moved = (share * l).min(excess);
    if moved <= tol {
        return false;
    }
    let ds = moved / l;
    if moved >= share * l - tol {
        p.gpus[a].swap_remove(i);
    } else {
        p.gpus[a][i].1 -= ds;
    }
    match p.gpus[b].iter_mut().find(|t| t.0 == e) {
        Some(t) => t.1 += ds,
        None => p.gpus[b].push((e, ds)),
    }
    load[a] -= moved;
    load[b] += moved;
    true
}

fn normalise_even(p: &mut LayerPlacement, n: usize) {
    let r = p.replicas(n);
    for g in &mut p.gpus {
        for s in g.iter_mut() {
            s.1 = 1.0 / r[s.0 as usize] as f64;
        }
    }
}

/// Max flow on a small dense bipartite graph: source → experts (their load) → GPUs hosting them
/// → sink (capacity `cap`). Returns the flow on every (expert, gpu slot) edge, in slot order.
fn flow(p: &LayerPlacement, loads: &[f64], cap: f64) -> (f64, Vec<Vec<f64>>) {
    // Nodes: 0 = source, 1..=E experts, E+1..=E+G gpus, E+G+1 sink. Dinic with adjacency lists.
    let (e_n, g_n) = (loads.len(), p.gpus.len());
    let n = e_n + g_n + 2;
    let (s, t) = (0, n - 1);
    let mut to = Vec::new();
    let mut capv = Vec::new();
    let mut adj: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut add = |a: usize, b: usize, c: f64, to: &mut Vec<usize>, capv: &mut Vec<f64>| {
        adj[a].push(to.len());
        to.push(b);
        capv.push(c);
        adj[b].push(to.len());
        to.push(a);
        capv.push(0.0);
        to.len() - 2
    };
    for (e, &l) in loads.iter().enumerate() {
        add(s, 1 + e, l, &mut to, &mut capv);
    }
    let mut slot_edges: Vec<Vec<usize>> = Vec::with_capacity(g_n);
    for (g, slots) in p.gpus.iter().enumerate() {
        slot_edges.push(
            slots
                .iter()
                .map(|&(e, _)| {
                    add(
                        1 + e as usize,
                        1 + e_n + g,
                        f64::INFINITY,
                        &mut to,
                        &mut capv,
                    )
                })
                .collect(),
        );
        add(1 + e_n + g, t, cap, &mut to, &mut capv);
    }
    let mut total = 0.0;
    loop {
        let mut level = vec![usize::MAX; n];
        level[s] = 0;
        let mut queue = std::collections::VecDeque::from([s]);
        while let Some(u) = queue.pop_front() {
            for &id in &adj[u] {
                if capv[id] > EPS && level[to[id]] == usize::MAX {
                    level[to[id]] = level[u] + 1;
                    queue.push_back(to[id]);
                }
            }
        }
        if level[t] == usize::MAX {
            break;
        }
        let mut it = vec![0usize; n];
        #[allow(clippy::too_many_arguments)]
        fn dfs(
            u: usize,
            t: usize,
            f: f64,
            adj: &[Vec<usize>],
            to: &[usize],
            capv: &mut [f64],
            level: &[usize],
            it: &mut [usize],
        ) -> f64 {
            if u == t {
                return f;
            }
            while it[u] < adj[u].len() {
                let id = adj[u][it[u]];
                let v = to[id];
                if capv[id] > EPS && level[v] == level[u] + 1 {
                    let d = dfs(v, t, f.min(capv[id]), adj, to, capv, level, it);
                    if d > EPS {
                        capv[id] -= d;
                        capv[id ^ 1] += d;
                        return d;
                    }
                }
                it[u] += 1;
            }
            0.0
        }
        loop {
            let f = dfs(s, t, f64::INFINITY, &adj, &to, &mut capv, &level, &mut it);
            if f <= EPS {
                break;
            }
            total += f;
        }
    }
    let per_slot = slot_edges
        .iter()
        .map(|edges| edges.iter().map(|&id| capv[id ^ 1]).collect())
        .collect();
    (total, per_slot)
}

/// Sets the shares of `p` to those minimising the largest GPU load (slots fixed).
pub fn optimal_shares(p: &mut LayerPlacement, loads: &[f64]) {
    let total: f64 = loads.iter().sum();
    if total <= EPS {
        normalise_even(p, loads.len());
        return;
    }
    let used = p.gpus.iter().filter(|g| !g.is_empty()).count().max(1);
    let (mut lo, mut hi) = (total / used as f64, total);
    let mut best = flow(p, loads, hi).1;
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        let (f, per_slot) = flow(p, loads, mid);
        if f >= total * (1.0 - 1e-9) {
            hi = mid;
            best = per_slot;
        } else {
            lo = mid;
        }
        if hi - lo <= total * 1e-9 {
            break;
        }
    }
    let r = p.replicas(loads.len());
    for (g, slots) in p.gpus.iter_mut().enumerate() {
        for (i, s) in slots.iter_mut().enumerate() {
            let l = loads[s.0 as usize];
            s.1 = if l > EPS {
                best[g][i] / l
            } else {
                1.0 / r[s.0 as usize] as f64
            };
        }
    }
    renormalise(p, loads.len());
}

/// Makes every expert's shares sum to exactly 1 (flows are solved to a tolerance).
fn renormalise(p: &mut LayerPlacement, n: usize) {
    let mut sum = vec![0.0f64; n];
    for g in &p.gpus {
        for &(e, s) in g {
            sum[e as usize] += s;
        }
    }
    for g in &mut p.gpus {
        for s in g.iter_mut() {
            let t = sum[s.0 as usize];
            s.1 = if t > EPS { s.1 / t } else { 0.0 };
        }
    }
}

/// Moves toward a fresh plan's balance from `current`, changing as few slots as it can (see the
/// module docs). Returns the placement and the number of slots that changed expert.
///
/// The fresh plan says how many replicas each expert should have. Experts short of that take
/// slots from experts with more than they need (or free slots), most under-served first, each on
/// the least loaded GPU that does not hold it yet; shares are re-solved as it goes and it stops
/// as soon as the balance is within `tolerance` of the fresh plan's.
pub fn rebalance_layer(
    loads: &[f64],
    slots: &[usize],
    current: &LayerPlacement,
    tolerance: f64,
) -> Result<(LayerPlacement, usize), BalanceError> {
    let n = loads.len();
    let scratch = place_layer(loads, slots)?;
    let goal = scratch.balancedness(loads) - tolerance;
    let mut p = current.clone();
    // Drop slots beyond a GPU's (possibly reduced) capacity and cover experts the current
    // placement lacks, using free slots.
    for (g, gs) in p.gpus.iter_mut().enumerate() {
        gs.truncate(slots.get(g).copied().unwrap_or(0));
    }
    p.gpus.resize(slots.len(), Vec::new());
    let mut r = p.replicas(n);
    for (e, re) in r.iter_mut().enumerate() {
        if *re == 0 {
            let Some(g) = (0..slots.len())
                .filter(|&g| p.gpus[g].len() < slots[g])
                .min_by_key(|&g| p.gpus[g].len())
            else {
                return Ok((scratch.clone(), scratch.moves_from(current)));
            };
            p.gpus[g].push((e as u32, 1.0));
            *re = 1;
        }
    }
    optimal_shares(&mut p, loads);
    let mut added: Vec<bool> = vec![false; n];
    let mut moves = 0;
    let limit: usize = slots.iter().sum();
    while p.balancedness(loads) < goal && moves < limit {
        let gl = p.gpu_loads(loads);
        let Some(a) = (0..gl.len()).max_by(|&x, &y| gl[x].total_cmp(&gl[y])) else {
            break;
        };
        // The expert carrying most load on the fullest GPU gets a replica on the lightest GPU
        // that can take one: a free slot, else the replica of the lightest expert that has
        // others (never one given a replica in this pass, so moves do not undo each other).
        // Prefer experts whose every replica sits on a GPU at the maximum: shares cannot move
        // their load anywhere else, so they are what holds the maximum up.
        let max = gl[a];
        let tight: Vec<bool> = gl.iter().map(|&l| l >= max * (1.0 - 1e-6)).collect();
        let stuck = |e: u32| {
            p.gpus
                .iter()
                .enumerate()
                .all(|(g, gs)| !gs.iter().any(|s| s.0 == e) || tight[g])
        };
        let mut on_a: Vec<(u32, f64, bool)> = p.gpus[a]
            .iter()
            .map(|&(e, sh)| (e, sh * loads[e as usize], stuck(e)))
            .collect();
        on_a.sort_by(|x, y| y.2.cmp(&x.2).then(y.1.total_cmp(&x.1)));
        let mut done = false;
        for &(e, _, _) in &on_a {
            let mut best: Option<(f64, usize, Option<usize>)> = None;
            for (g, gs) in p.gpus.iter().enumerate() {
                if tight[g] || gs.iter().any(|s| s.0 == e) || slots[g] == 0 {
                    continue;
                }
                if gs.len() < slots[g] {
                    if best.as_ref().is_none_or(|b| gl[g] < b.0) {
                        best = Some((gl[g], g, None));
                    }
                    continue;
                }
                let r = p.replicas(n);
                let victim = gs
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| r[s.0 as usize] > 1 && !added[s.0 as usize])
                    .min_by(|x, y| {
                        (loads[x.1.0 as usize] / r[x.1.0 as usize] as f64)
                            .total_cmp(&(loads[y.1.0 as usize] / r[y.1.0 as usize] as f64))
                    });
                if let Some((i, s)) = victim {
                    let score = gl[g] + loads[s.0 as usize] / r[s.0 as usize] as f64;
                    if best.as_ref().is_none_or(|b| score < b.0) {
                        best = Some((score, g, Some(i)));
                    }
                }
            }
            if let Some((_, g, slot)) = best {
                match slot {
                    Some(i) => p.gpus[g][i] = (e, 0.0),
                    None => p.gpus[g].push((e, 0.0)),
                }
                added[e as usize] = true;
                moves += 1;
                done = true;
                break;
            }
        }
        if !done {
            break;
        }
        optimal_shares(&mut p, loads);
    }
    if p.balancedness(loads) < goal {
        // Local moves could not get there: take the fresh plan.
        return Ok((scratch.clone(), scratch.moves_from(current)));
    }
    let moved = p.moves_from(current);
    Ok((p, moved))
}

/// Places with `groups` contiguous expert groups kept whole on hosts of `gpus_per_host` GPUs.
pub fn place_grouped(
    loads: &[f64],
    slots: &[usize],
    gpus_per_host: usize,
    groups: usize,
) -> Result<LayerPlacement, BalanceError> {
    let hosts = slots.len() / gpus_per_host.max(1);
    if hosts <= 1 || groups <= 1 || !loads.len().is_multiple_of(groups) {
        return place_layer(loads, slots);
    }
    let per_group = loads.len() / groups;
    let group_load: Vec<f64> = (0..groups)
        .map(|g| loads[g * per_group..(g + 1) * per_group].iter().sum())
        .collect();
    // Groups to hosts: heaviest first onto the lightest host with room for another group.
    let cap = groups.div_ceil(hosts);
    let mut host_load = vec![0.0f64; hosts];
    let mut host_groups: Vec<Vec<usize>> = vec![Vec::new(); hosts];
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_by(|&a, &b| group_load[b].total_cmp(&group_load[a]).then(a.cmp(&b)));
    for g in order {
        let h = (0..hosts)
            .filter(|&h| host_groups[h].len() < cap)
            .min_by(|&a, &b| host_load[a].total_cmp(&host_load[b]).then(a.cmp(&b)))
            .unwrap_or(0);
        host_load[h] += group_load[g];
        host_groups[h].push(g);
    }
    let mut gpus: Vec<Vec<(u32, f64)>> = vec![Vec::new(); slots.len()];
    for (h, gs) in host_groups.iter().enumerate() {
        let experts: Vec<usize> = gs
            .iter()
            .flat_map(|&g| g * per_group..(g + 1) * per_group)
            .collect();
        let sub_loads: Vec<f64> = experts.iter().map(|&e| loads[e]).collect();
        let range = h * gpus_per_host..(h + 1) * gpus_per_host;
        let sub = place_layer(&sub_loads, &slots[range.clone()])?;
        for (i, g) in range.enumerate() {
            gpus[g] = sub.gpus[i]
                .iter()
                .map(|&(e, s)| (experts[e as usize] as u32, s))
                .collect();
        }
    }
    Ok(LayerPlacement { gpus })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zipf(n: usize, s: f64) -> Vec<f64> {
        (0..n)
            .map(|i| 1000.0 / ((i * 7919 % n) as f64 + 1.0).powf(s))
            .collect()
    }

    fn valid(p: &LayerPlacement, loads: &[f64], slots: &[usize]) {
        for (g, gs) in p.gpus.iter().enumerate() {
            assert!(gs.len() <= slots[g], "gpu {g} over its slots");
        }
        let mut share = vec![0.0; loads.len()];
        for gs in &p.gpus {
            for &(e, s) in gs {
                assert!((0.0..=1.0 + 1e-9).contains(&s));
                share[e as usize] += s;
            }
        }
        for (e, s) in share.iter().enumerate() {
            assert!((s - 1.0).abs() < 1e-6, "expert {e} shares sum to {s}");
        }
    }

    #[test]
    fn skewed_loads_balance_almost_perfectly_with_a_few_spare_slots() {
        let loads = zipf(256, 1.0);
        let slots = vec![36; 8];
        let p = place_layer(&loads, &slots).expect("fits");
        valid(&p, &loads, &slots);
        assert!(
            p.balancedness(&loads) > 0.9999,
            "{}",
            p.balancedness(&loads)
        );
        let r = p.replicas(256);
        let hottest = (0..256)
            .max_by(|&a, &b| loads[a].total_cmp(&loads[b]))
            .expect("max");
        assert!(r[hottest] > 1, "the hottest expert is replicated");
    }

    #[test]
    fn exactly_one_slot_per_expert_packs_without_replicas() {
        let loads = zipf(64, 0.6);
        let slots = vec![8; 8];
        let p = place_layer(&loads, &slots).expect("fits");
        valid(&p, &loads, &slots);
        assert!(p.replicas(64).iter().all(|&r| r == 1));
        assert!(p.balancedness(&loads) > 0.7);
    }

    #[test]
    fn more_slots_than_needed_and_a_node_with_no_capacity() {
        let loads = zipf(32, 1.0);
        let slots = vec![40, 0, 40, 40];
        let p = place_layer(&loads, &slots).expect("fits");
        valid(&p, &loads, &slots);
        assert!(p.gpus[1].is_empty());
        // The zero-capacity GPU counts in the mean, so 3 of 4 GPUs can reach 0.75 at most.
        assert!(
            (p.balancedness(&loads) - 0.75).abs() < 1e-6,
            "{}",
            p.balancedness(&loads)
        );
        assert_eq!(
            place_layer(&loads, &[10, 10]).expect_err("too few"),
            BalanceError::TooFewSlots {
                experts: 32,
                slots: 20
            }
        );
    }

    #[test]
    fn all_load_on_one_expert_and_a_layer_without_load() {
        let mut loads = vec![0.0; 16];
        loads[5] = 1000.0;
        let slots = vec![5; 4];
        let p = place_layer(&loads, &slots).expect("fits");
        valid(&p, &loads, &slots);
        assert_eq!(p.replicas(16)[5], 4, "one replica per GPU");
        assert!(p.balancedness(&loads) > 0.9999);
        let none = place_layer(&[0.0; 16], &slots).expect("fits");
        valid(&none, &[0.0; 16], &slots);
        assert_eq!(none.balancedness(&[0.0; 16]), 1.0);
    }

    #[test]
    fn rebalancing_keeps_balance_and_never_moves_more_than_replanning() {
        let loads = zipf(256, 0.6);
        let slots = vec![10; 32];
        let first = place_layer(&loads, &slots).expect("fits");
        // Small drift: re-solving the shares alone is enough, nothing moves.
        let drift: Vec<f64> = loads
            .iter()
            .enumerate()
            .map(|(i, l)| l * (1.0 + 0.002 * (i % 5) as f64))
            .collect();
        let (kept, n) = rebalance_layer(&drift, &slots, &first, 0.01).expect("fits");
        assert_eq!(n, 0);
        assert!(
            kept.balancedness(&drift)
                >= place_layer(&drift, &slots)
                    .expect("fits")
                    .balancedness(&drift)
                    - 0.01
        );
        // The hottest 10% change: swap the loads of the 26 hottest with 26 cold experts.
        let mut order: Vec<usize> = (0..256).collect();
        order.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]));
        let mut next = loads.clone();
        for i in 0..26 {
            next.swap(order[i], order[255 - i]);
        }
        let scratch = place_layer(&next, &slots).expect("fits");
        let (moved, n) = rebalance_layer(&next, &slots, &first, 0.01).expect("fits");
        valid(&moved, &next, &slots);
        assert!(moved.balancedness(&next) >= scratch.balancedness(&next) - 0.01);
        assert!(
            n <= scratch.moves_from(&first),
            "{n} moves vs {} from scratch",
            scratch.moves_from(&first)
        );
    }

    #[test]
    fn grouped_placement_keeps_groups_on_one_host() {
        let loads = zipf(256, 0.6);
        let slots = vec![10; 32];
        let p = place_grouped(&loads, &slots, 8, 8).expect("fits");
        valid(&p, &loads, &slots);
        for h in 0..4 {
            let groups: std::collections::BTreeSet<u32> = p.gpus[h * 8..(h + 1) * 8]
                .iter()
                .flatten()
                .map(|s| s.0 / 32)
                .collect();
            assert_eq!(groups.len(), 2, "host {h} holds two whole groups");
        }
    }
}
