//! How many replicas each node should hold, in total and per MoE layer: node totals by
//! water-filling over capacities (everyone equal up to the level, capped nodes at their
//! capacity), then a rounding of the layer × node matrix of ideal shares that keeps every row
//! (a layer's replica count) and every column (a node's total) exact, with every entry the floor
//! or the ceiling of its ideal share where rounding allows. Ties go to the node that already
//! holds more of that layer, so targets do not move replicas for nothing.

/// Node totals summing to `q`: `min(cap, level)`, the remainder one each to the uncapped nodes
/// that hold the most now (`held`), then by index. `q` must not exceed the sum of `caps`.
pub fn node_totals(q: usize, caps: &[usize], held: &[usize]) -> Vec<usize> {
    let fill = |level: usize| caps.iter().map(|&c| c.min(level)).sum::<usize>();
    let (mut lo, mut hi) = (0, caps.iter().copied().max().unwrap_or(0));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fill(mid) <= q {
            lo = mid
        } else {
            hi = mid - 1
        }
    }
    let mut t: Vec<usize> = caps.iter().map(|&c| c.min(lo)).collect();
    let mut rest = q.saturating_sub(t.iter().sum());
    let mut open: Vec<usize> = (0..caps.len()).filter(|&i| caps[i] > t[i]).collect();
    open.sort_by_key(|&i| (std::cmp::Reverse(held[i]), i));
    for i in open {
        if rest == 0 {
            break;
        }
        t[i] += 1;
        rest -= 1;
    }
    t
}

/// Per layer (rows) and node (columns) targets: row `l` sums to `rows[l]`, column `i` to
/// `totals[i]` (their sums must agree), every entry the floor or the ceiling of its ideal share
/// `rows[l] × totals[i] / Σ totals`. `held[l][i]` is what node `i` holds of layer `l` now: the
/// ceilings go where a node holds more than the floor first, so targets move nothing needlessly.
///
/// Which entries take the ceiling is a bipartite b-matching (layers need `rows[l] − Σ floors`
/// extra units, nodes take `totals[i] − Σ floors`), solved by augmenting paths: first over the
/// entries that need no move, then over all.
pub fn layer_targets(rows: &[usize], totals: &[usize], held: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = totals.len();
    let q: u128 = totals.iter().map(|&t| t as u128).sum();
    if q == 0 {
        return vec![vec![0; n]; rows.len()];
    }
    let ideal = |l: usize, i: usize| rows[l] as u128 * totals[i] as u128;
    let floors: Vec<Vec<usize>> = (0..rows.len())
        .map(|l| (0..n).map(|i| (ideal(l, i) / q) as usize).collect())
        .collect();
    let mut m = Matching {
        lcap: (0..rows.len())
            .map(|l| rows[l] - floors[l].iter().sum::<usize>())
            .collect(),
        rcap: (0..n)
            .map(|i| totals[i].saturating_sub(floors.iter().map(|f| f[i]).sum()))
            .collect(),
        on: vec![vec![false; n]; rows.len()],
        lused: vec![0; rows.len()],
        rused: vec![0; n],
    };
    let fractional = |l: usize, i: usize| ideal(l, i) % q != 0;
    let free = |l: usize, i: usize| fractional(l, i) && held[l][i] > floors[l][i];
    // Greedy start on the free entries, then augment: free entries, then all.
    for l in 0..rows.len() {
        for i in 0..n {
            if free(l, i) && m.lused[l] < m.lcap[l] && m.rused[i] < m.rcap[i] {
                m.set(l, i, true);
            }
        }
    }
    let any = |_: usize, _: usize| true;
    let moved = |l: usize, i: usize| !free(l, i);
    while m.augment(&free, &any) {}
    // Then the other entries, without giving up a free one, and only then at any price.
    while m.augment(&fractional, &moved) {}
    while m.augment(&fractional, &any) {}
    (0..rows.len())
        .map(|l| {
            (0..n)
                .map(|i| floors[l][i] + usize::from(m.on[l][i]))
                .collect()
        })
        .collect()
}

/// Which (layer, node) entries take one unit above the floor.
struct Matching {
    lcap: Vec<usize>,
    rcap: Vec<usize>,
    on: Vec<Vec<bool>>,
    lused: Vec<usize>,
    rused: Vec<usize>,
}

impl Matching {
    fn set(&mut self, l: usize, i: usize, on: bool) {
        self.on[l][i] = on;
        if on {
            self.lused[l] += 1;
            self.rused[i] += 1;
        } else {
            self.lused[l] -= 1;
            self.rused[i] -= 1;
        }
    }

    /// One augmenting path (breadth first) from a layer short of units to a node with units
    /// to spare, taking `allowed` entries and giving up only `release` ones; false when none.
    fn augment(
        &mut self,
        allowed: &dyn Fn(usize, usize) -> bool,
        release: &dyn Fn(usize, usize) -> bool,
    ) -> bool {
        let (layers, n) = (self.on.len(), self.rcap.len());
        let mut from_layer: Vec<Option<usize>> = vec![None; n]; // node ← layer that reached it
        let mut from_node: Vec<Option<usize>> = vec![None; layers]; // layer ← node it came from
        let mut seen = vec![false; layers];
        let mut queue: std::collections::VecDeque<usize> = (0..layers)
            .filter(|&l| self.lused[l] < self.lcap[l])
            .collect();
        for &l in &queue {
            seen[l] = true;
        }
        while let Some(l) = queue.pop_front() {
            for i in 0..n {
                if self.on[l][i] || from_layer[i].is_some() || !allowed(l, i) {
                    continue;
                }
                from_layer[i] = Some(l);
                if self.rused[i] < self.rcap[i] {
                    // Apply: alternate on/off back to the starting layer.
                    let mut i = i;
                    loop {
                        let l = from_layer[i].unwrap_or_default();
                        self.set(l, i, true);
                        match from_node[l] {
                            Some(prev) => {
                                self.set(l, prev, false);
                                i = prev;
                            }
                            None => return true,
                        }
                    }
                }
                // Node full: free one of its units in another layer, which then looks on.
                for l2 in 0..layers {
                    if self.on[l2][i] && !seen[l2] && release(l2, i) {
                        seen[l2] = true;
                        from_node[l2] = Some(i);
                        queue.push_back(l2);
                    }
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_fill_to_a_level_and_respect_capacity() {
        assert_eq!(node_totals(10, &[100, 100, 100], &[0, 5, 0]), vec![3, 4, 3]);
        assert_eq!(node_totals(10, &[1, 100, 100], &[0, 0, 0]), vec![1, 5, 4]);
        assert_eq!(node_totals(6, &[2, 2, 2], &[0, 0, 0]), vec![2, 2, 2]);
    }

    #[test]
    fn rows_and_columns_are_exact_and_entries_round() {
        for n in 2..=64 {
            let rows = vec![256; 7];
            let q: usize = rows.iter().sum();
            let totals = node_totals(q, &vec![10_000; n], &vec![0; n]);
            let held = vec![vec![0; n]; rows.len()];
            let t = layer_targets(&rows, &totals, &held);
            for (l, row) in t.iter().enumerate() {
                assert_eq!(row.iter().sum::<usize>(), rows[l]);
                let (lo, hi) = (rows[l] / n, rows[l].div_ceil(n));
                assert!(row.iter().all(|&x| x >= lo && x <= hi), "n {n}: {row:?}");
            }
            for i in 0..n {
                assert_eq!(t.iter().map(|r| r[i]).sum::<usize>(), totals[i], "n {n}");
            }
        }
    }
}
