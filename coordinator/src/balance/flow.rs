//! Exact shares for fixed slots: bisection on the largest GPU load with a max-flow
//! feasibility check (source → experts → the GPUs hosting them → sink).

use super::{EPS, LayerPlacement, normalise_even};

/// A maximum flow for a placement at one GPU capacity.
pub(super) struct Flow {
    /// Load placed (all of it when the capacity is feasible).
    pub total: f64,
    /// Flow on every (expert, GPU slot) edge, in slot order.
    pub per_slot: Vec<Vec<f64>>,
    /// Experts still reachable from the source in the residual graph: the side of the minimum
    /// cut whose load does not fit; all their replicas sit on `gpu_stuck` GPUs.
    pub expert_stuck: Vec<bool>,
    /// GPUs on the source side of the minimum cut (all saturated).
    pub gpu_stuck: Vec<bool>,
}

/// Max flow on a small dense bipartite graph: source → experts (their load) → GPUs hosting them
/// → sink (capacity `cap`).
pub(super) fn flow(p: &LayerPlacement, loads: &[f64], cap: f64) -> Flow {
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
    let reached = loop {
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
            break level;
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
    };
    let per_slot = slot_edges
        .iter()
        .map(|edges| edges.iter().map(|&id| capv[id ^ 1]).collect())
        .collect();
    let hit = |v: usize| reached[v] != usize::MAX;
    Flow {
        total,
        per_slot,
        expert_stuck: (0..e_n).map(|e| hit(1 + e)).collect(),
        gpu_stuck: (0..g_n).map(|g| hit(1 + e_n + g)).collect(),
    }
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
    let mut best = flow(p, loads, hi).per_slot;
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        let f = flow(p, loads, mid);
        if f.total >= total * (1.0 - 1e-9) {
            hi = mid;
            best = f.per_slot;
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
