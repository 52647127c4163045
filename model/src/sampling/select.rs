//! The top-k / top-p cut without sorting the vocabulary.
//!
//! Tokens rank by `(logit desc, id asc)`. With the weights bucketed by their float bits (see
//! [`super::vector::weights_and_histogram`]; a higher bucket holds higher weights, so every
//! token of a bucket ranks below every token of a higher one), the bucket holding the k-th
//! token and the bucket where the top-p mass is reached are found by walking bucket totals from
//! the top; only the tokens of those one or two buckets are gathered and sorted. The result is
//! the lowest-ranked kept token: a token is kept iff it ranks at or above it.

use super::vector::{BUCKET_SHIFT, BUCKETS};

/// The last kept token (by rank) and the mass of everything kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    pub logit: f32,
    pub id: u32,
    pub mass: f64,
}

impl Cut {
    /// Whether token `id` with logit `l` ranks at or above the cut.
    #[inline(always)]
    pub fn keeps(&self, l: f32, id: usize) -> bool {
        l > self.logit || (l == self.logit && id <= self.id as usize)
    }
}

/// Per-sampler scratch space, reused across tokens.
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    pub weights: Vec<f32>,
    pub count: Vec<u32>,
    pub mass: Vec<f64>,
    members: Vec<(f32, u32, f32)>,
}

impl Scratch {
    /// Sized for `n` tokens, histograms cleared.
    pub fn reset(&mut self, n: usize) {
        self.weights.resize(n, 0.0);
        self.count.clear();
        self.count.resize(BUCKETS, 0);
        self.mass.clear();
        self.mass.resize(BUCKETS, 0.0);
    }

    /// The tokens of bucket `b`, best first: `(logit, id, weight)`. Chunks without one are
    /// skipped after a vectorised compare.
    fn gather(&mut self, logits: &[f32], b: usize) -> &[(f32, u32, f32)] {
        const CHUNK: usize = 16;
        self.members.clear();
        let b = b as u32;
        for (c, ws) in self.weights.chunks(CHUNK).enumerate() {
            let mut any = false;
            for &w in ws {
                any |= w.to_bits() >> BUCKET_SHIFT == b;
            }
            if !any {
                continue;
            }
            for (j, &w) in ws.iter().enumerate() {
                if w.to_bits() >> BUCKET_SHIFT == b {
                    let i = c * CHUNK + j;
                    self.members.push((logits[i], i as u32, w));
                }
            }
        }
        self.members
            .sort_unstable_by(|a, c| c.0.total_cmp(&a.0).then(a.1.cmp(&c.1)));
        &self.members
    }
}

/// The cut for `top_k` (0 = off) then `top_p` (1 = off, relative to the mass left by top-k)
/// over the tokens with a nonzero weight. `scratch` holds the weights and their histogram.
pub fn cut(logits: &[f32], scratch: &mut Scratch, top_k: usize, top_p: f32) -> Cut {
    let live: usize = scratch.count.iter().skip(1).map(|&c| c as usize).sum();
    let lowest = (1..BUCKETS).find(|&b| scratch.count[b] > 0).unwrap_or(1);
    // 1. top-k: the bucket where the count reaches k, and how many of its tokens are in.
    let (kb, kb_members, mass_k) = if top_k == 0 || top_k >= live {
        let total: f64 = scratch.mass.iter().skip(1).sum();
        (lowest, None, total)
    } else {
        let mut above = 0usize;
        let mut mass_above = 0.0f64;
        let mut kb = lowest;
        for b in (lowest..BUCKETS).rev() {
            let c = scratch.count[b] as usize;
            if c == 0 {
                continue;
            }
            kb = b;
            if above + c >= top_k {
                break;
            }
            above += c;
            mass_above += scratch.mass[b];
        }
        let members: Vec<(f32, u32, f32)> = scratch.gather(logits, kb)[..top_k - above].to_vec();
        let kb_mass: f64 = members.iter().map(|m| f64::from(m.2)).sum();
        (kb, Some(members), mass_above + kb_mass)
    };
    if top_p >= 1.0 {
        let last = match &kb_members {
            Some(m) => m.last().copied(),
            None => scratch.gather(logits, kb).last().copied(),
        };
        let (logit, id, _) = last.unwrap_or((f32::INFINITY, 0, 0.0));
        return Cut {
            logit,
            id,
            mass: mass_k,
        };
    }
    // 2. top-p over the top-k set: keep a token while the mass ranked before it is < need.
    let need = f64::from(top_p) * mass_k;
    let mut acc = 0.0f64;
    for b in (kb + 1..BUCKETS).rev() {
        if scratch.count[b] == 0 {
            continue;
        }
        if acc + scratch.mass[b] < need {
            acc += scratch.mass[b];
            continue;
        }
        return within(scratch.gather(logits, b), acc, need);
    }
    match &kb_members {
        Some(m) => within(m, acc, need),
        None => within(scratch.gather(logits, kb), acc, need),
    }
}

/// The cut inside one bucket's sorted tokens, entered with `acc` < `need` of mass before it.
fn within(members: &[(f32, u32, f32)], mut acc: f64, need: f64) -> Cut {
    let mut last = members[0];
    for &m in members {
        if acc >= need {
            break;
        }
        acc += f64::from(m.2);
        last = m;
    }
    Cut {
        logit: last.0,
        id: last.1,
        mass: acc,
    }
}
