//! Levelling: moves load from the fullest GPU to the emptiest by shifting shares, starting
//! replicas in free slots, or exchanging pieces, until GPU loads are even or nothing helps.

use super::LayerPlacement;

/// Moves load from the fullest GPU to the emptiest until they are even (McNaughton-style
/// transfers): shift share to a GPU that already holds the expert, else put a new replica there
/// if it has a free slot, else move a whole replica. Each step evens at least one of the two
/// GPUs or moves one replica, so it ends quickly.
pub(super) fn level(p: &mut LayerPlacement, loads: &[f64], slots: &[usize]) {
    let total: f64 = loads.iter().sum();
    let active = slots.iter().filter(|&&s| s > 0).count().max(1);
    level_to(p, loads, slots, total / active as f64);
}

/// [`level`] toward `target`: only GPUs above it give load, only GPUs below it take.
pub(super) fn level_to(p: &mut LayerPlacement, loads: &[f64], slots: &[usize], target: f64) {
    let total: f64 = loads.iter().sum();
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
