//! Token counts per (layer, expert) over a sliding window: what the router publishes for the
//! coordinator's load-driven placement. The window is a ring of buckets; recording touches the
//! newest bucket under a short lock, once per layer and step. Time is tokio's clock (the wall
//! clock in production; the fleet simulator's paused, simulated clock there).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One bucket: when it opened, and counts per layer (indexed by expert).
type Bucket = (Instant, BTreeMap<usize, Vec<u32>>);

/// Counts over the last `window`, in `buckets` steps.
#[derive(Debug)]
pub struct LoadWindow {
    bucket: Duration,
    buckets: usize,
    ring: Mutex<VecDeque<Bucket>>,
}

impl LoadWindow {
    pub fn new(window: Duration, buckets: usize) -> LoadWindow {
        let buckets = buckets.max(1);
        LoadWindow {
            bucket: (window / buckets as u32).max(Duration::from_millis(1)),
            buckets,
            ring: Mutex::new(VecDeque::new()),
        }
    }

    /// Adds one token for each (token, expert) entry of `layer`.
    pub fn record(&self, layer: usize, entries: &[(usize, u32, f32)]) {
        self.record_at(Instant::now(), layer, entries)
    }

    fn record_at(&self, now: Instant, layer: usize, entries: &[(usize, u32, f32)]) {
        self.with_newest(now, layer, |counts| {
            for &(_, e, _) in entries {
                let e = e as usize;
                if counts.len() <= e {
                    counts.resize(e + 1, 0);
                }
                counts[e] = counts[e].saturating_add(1);
            }
        })
    }

    /// Adds `counts[e]` tokens to each expert `e` of `layer` at once (the fleet simulator's
    /// routers, which route no real tokens).
    pub fn record_counts(&self, layer: usize, counts: &[u32]) {
        self.with_newest(Instant::now(), layer, |c| {
            if c.len() < counts.len() {
                c.resize(counts.len(), 0);
            }
            for (m, &n) in c.iter_mut().zip(counts) {
                *m = m.saturating_add(n);
            }
        })
    }

    /// Runs `f` on the newest bucket's counts of `layer` (opening a bucket when due).
    fn with_newest(&self, now: Instant, layer: usize, f: impl FnOnce(&mut Vec<u32>)) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut ring, now);
        if ring.back().is_none_or(|b| now >= b.0 + self.bucket) {
            ring.push_back((now, BTreeMap::new()));
        }
        if let Some((_, layers)) = ring.back_mut() {
            f(layers.entry(layer).or_default());
        }
    }

    fn expire(&self, ring: &mut VecDeque<Bucket>, now: Instant) {
        let horizon = self.bucket * self.buckets as u32;
        while ring.front().is_some_and(|b| now >= b.0 + horizon) {
            ring.pop_front();
        }
    }

    /// The counts per layer over the window (each padded to `n_experts`), and the time they
    /// cover (the window, or less while the router is younger than it).
    pub fn snapshot(&self, n_experts: usize) -> (Duration, BTreeMap<usize, Vec<u32>>) {
        self.snapshot_at(Instant::now(), n_experts)
    }

    fn snapshot_at(&self, now: Instant, n_experts: usize) -> (Duration, BTreeMap<usize, Vec<u32>>) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut ring, now);
        let covered = ring.front().map_or(Duration::ZERO, |b| now - b.0);
        let mut sum: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for (_, layers) in ring.iter() {
            for (&l, counts) in layers {
                let s = sum.entry(l).or_insert_with(|| vec![0; n_experts]);
                for (e, &c) in counts.iter().enumerate().take(n_experts) {
                    s[e] = s[e].saturating_add(c);
                }
            }
        }
        (covered, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_slide_out_of_the_window() {
        let w = LoadWindow::new(Duration::from_secs(10), 5);
        let t0 = Instant::now();
        w.record_at(t0, 1, &[(0, 3, 1.0), (1, 3, 1.0), (1, 0, 1.0)]);
        w.record_at(t0 + Duration::from_secs(5), 1, &[(0, 3, 1.0)]);
        w.record_at(t0 + Duration::from_secs(5), 2, &[(0, 1, 1.0)]);
        let (covered, s) = w.snapshot_at(t0 + Duration::from_secs(6), 4);
        assert_eq!(covered, Duration::from_secs(6));
        assert_eq!(s[&1], vec![1, 0, 0, 3]);
        assert_eq!(s[&2], vec![0, 1, 0, 0]);
        // The first bucket leaves the window 10 s after it opened.
        let (_, s) = w.snapshot_at(t0 + Duration::from_secs(11), 4);
        assert_eq!(s[&1], vec![0, 0, 0, 1]);
        let (covered, s) = w.snapshot_at(t0 + Duration::from_secs(30), 4);
        assert!(s.is_empty() && covered.is_zero());
    }
}
