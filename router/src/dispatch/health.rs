//! What the router remembers about each expert node across layers and steps: a moving window of
//! its answer latencies (for its p99), whether it is quarantined (it answered badly: an in-band
//! error, the wrong size, non-finite values, or nothing before the deadline) and whether it is
//! being avoided for being slow (hedged too often). Planning skips a quarantined or avoided node
//! while another replica of the expert is usable; when none is, it is used anyway (better a slow
//! answer than none), except a quarantined one, which is the point of quarantine.
//!
//! The hedge rule follows "The Tail at Scale" (Dean and Barroso, 2013): a request still
//! unanswered after the node's usual p99 times a margin is sent again to another replica, and
//! the first answer wins.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics as m;

/// Latency samples kept per node.
const WINDOW: usize = 256;
/// Fewest samples before a node's p99 is trusted for hedging.
pub const MIN_SAMPLES: usize = 20;
/// Hedges within [`SLOW_WINDOW`] that mark a node slow.
const SLOW_HEDGES: u32 = 3;
const SLOW_WINDOW: Duration = Duration::from_secs(10);

/// Health settings (from [`super::DispatchOptions`]).
#[derive(Debug, Clone, Copy)]
pub struct HealthOptions {
    /// How long a node that answered badly is skipped.
    pub quarantine: Duration,
    /// A request is hedged after the node's p99 × this margin (0: never hedge).
    pub hedge_margin: f64,
    /// Hedges are never sent sooner than this after the request.
    pub hedge_min: Duration,
    /// How long a node that keeps needing hedges is avoided.
    pub slow_cooldown: Duration,
}

#[derive(Debug, Default)]
struct Node {
    latencies: VecDeque<f64>,
    quarantined_until: Option<Instant>,
    slow_until: Option<Instant>,
    hedges: VecDeque<Instant>,
}

impl Node {
    fn p99(&self) -> Option<f64> {
        if self.latencies.len() < MIN_SAMPLES {
            return None;
        }
        let mut v: Vec<f64> = self.latencies.iter().copied().collect();
        let k = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
        let (_, p, _) = v.select_nth_unstable_by(k, f64::total_cmp);
        Some(*p)
    }
}

/// Per-node health, shared by every step.
#[derive(Debug)]
pub struct Health {
    opts: HealthOptions,
    nodes: Mutex<HashMap<String, Node>>,
}

impl Health {
    pub fn new(opts: HealthOptions) -> Health {
        Health {
            opts,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    fn with<R>(&self, addr: &str, f: impl FnOnce(&mut Node) -> R) -> R {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        match nodes.get_mut(addr) {
            Some(n) => f(n),
            None => f(nodes.entry(addr.to_string()).or_default()),
        }
    }

    /// Records a good answer's round trip.
    pub fn record(&self, addr: &str, latency: Duration) {
        self.with(addr, |n| {
            if n.latencies.len() == WINDOW {
                n.latencies.pop_front();
            }
            n.latencies.push_back(latency.as_secs_f64());
        });
    }

    /// The node's moving p99, once it has enough samples.
    pub fn p99(&self, addr: &str) -> Option<Duration> {
        self.with(addr, |n| n.p99()).map(Duration::from_secs_f64)
    }

    /// When a request sent to `addr` at `sent` should be hedged (`None`: not yet known, or
    /// hedging is off).
    pub fn hedge_at(&self, addr: &str, sent: Instant) -> Option<Instant> {
        if self.opts.hedge_margin <= 0.0 {
            return None;
        }
        let p99 = self.p99(addr)?;
        Some(sent + p99.mul_f64(self.opts.hedge_margin).max(self.opts.hedge_min))
    }

    /// Quarantines `addr` (it answered badly) for the configured time.
    pub fn quarantine(&self, addr: &str, why: &str) {
        self.quarantine_at(addr, why, Instant::now());
    }

    fn quarantine_at(&self, addr: &str, why: &str, now: Instant) {
        let until = now + self.opts.quarantine;
        self.with(addr, |n| n.quarantined_until = Some(until));
        tracing::warn!(node = %addr, reason = why, for_ms = self.opts.quarantine.as_millis() as u64, "node quarantined");
        metrics::counter!(m::DISPATCH_QUARANTINES, "node" => addr.to_string()).increment(1);
        metrics::gauge!(m::DISPATCH_QUARANTINED, "node" => addr.to_string()).set(1.0);
    }

    /// Counts a hedge of a request to `addr`; a node hedged often is avoided for a while.
    pub fn hedged(&self, addr: &str) {
        self.hedged_at(addr, Instant::now());
    }

    fn hedged_at(&self, addr: &str, now: Instant) {
        metrics::counter!(m::DISPATCH_HEDGES, "node" => addr.to_string()).increment(1);
        let slow = self.with(addr, |n| {
            n.hedges.push_back(now);
            while n
                .hedges
                .front()
                .is_some_and(|t| now.duration_since(*t) > SLOW_WINDOW)
            {
                n.hedges.pop_front();
            }
            if n.hedges.len() as u32 >= SLOW_HEDGES && n.slow_until.is_none_or(|t| t <= now) {
                n.slow_until = Some(now + self.opts.slow_cooldown);
                n.hedges.clear();
                true
            } else {
                false
            }
        });
        if slow {
            tracing::warn!(node = %addr, for_ms = self.opts.slow_cooldown.as_millis() as u64, "node slow: avoided");
            metrics::counter!(m::DISPATCH_SLOW, "node" => addr.to_string()).increment(1);
            metrics::gauge!(m::DISPATCH_AVOIDED, "node" => addr.to_string()).set(1.0);
        }
    }

    /// Whether `addr` is quarantined now.
    pub fn quarantined(&self, addr: &str) -> bool {
        self.quarantined_at(addr, Instant::now())
    }

    fn quarantined_at(&self, addr: &str, now: Instant) -> bool {
        let (q, ended) = self.with(addr, |n| match n.quarantined_until {
            Some(t) if t > now => (true, false),
            Some(_) => {
                n.quarantined_until = None;
                (false, true)
            }
            None => (false, false),
        });
        if ended {
            tracing::info!(node = %addr, "quarantine over");
            metrics::gauge!(m::DISPATCH_QUARANTINED, "node" => addr.to_string()).set(0.0);
        }
        q
    }

    /// Whether `addr` is being avoided for being slow.
    pub fn slow(&self, addr: &str) -> bool {
        self.slow_at(addr, Instant::now())
    }

    fn slow_at(&self, addr: &str, now: Instant) -> bool {
        let (s, ended) = self.with(addr, |n| match n.slow_until {
            Some(t) if t > now => (true, false),
            Some(_) => {
                n.slow_until = None;
                (false, true)
            }
            None => (false, false),
        });
        if ended {
            metrics::gauge!(m::DISPATCH_AVOIDED, "node" => addr.to_string()).set(0.0);
        }
        s
    }

    /// Forgets a node (it left the placement).
    pub fn forget(&self, addr: &str) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.remove(addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new(HealthOptions {
            quarantine: Duration::from_secs(5),
            hedge_margin: 2.0,
            hedge_min: Duration::from_millis(1),
            slow_cooldown: Duration::from_secs(30),
        })
    }

    #[test]
    fn p99_needs_samples_and_follows_the_tail() {
        let h = health();
        for i in 0..(MIN_SAMPLES - 1) {
            h.record("a", Duration::from_millis(i as u64));
        }
        assert_eq!(h.p99("a"), None, "too few samples");
        // 200 samples of 1..=200 ms: the 99th percentile is the 198th value.
        let h = health();
        for i in 1..=200u64 {
            h.record("a", Duration::from_millis(i));
        }
        let p = h.p99("a").expect("p99");
        assert!((p.as_secs_f64() - 0.198).abs() < 1e-9, "{p:?}");
        let sent = Instant::now();
        assert_eq!(h.hedge_at("a", sent), Some(sent + p.mul_f64(2.0)));
        // The window slides: 256 fast samples push the slow ones out.
        for _ in 0..WINDOW {
            h.record("a", Duration::from_millis(1));
        }
        assert_eq!(h.p99("a"), Some(Duration::from_millis(1)));
    }

    #[test]
    fn quarantine_ends_after_its_time() {
        let h = health();
        let t0 = Instant::now();
        h.quarantine_at("a", "test", t0);
        assert!(h.quarantined_at("a", t0 + Duration::from_secs(4)));
        assert!(!h.quarantined_at("b", t0), "other nodes are not affected");
        assert!(!h.quarantined_at("a", t0 + Duration::from_secs(6)));
    }

    #[test]
    fn a_node_hedged_repeatedly_is_avoided_for_the_cooldown() {
        let h = health();
        let t0 = Instant::now();
        h.hedged_at("a", t0);
        h.hedged_at("a", t0 + Duration::from_secs(1));
        assert!(!h.slow_at("a", t0 + Duration::from_secs(1)), "two hedges");
        h.hedged_at("a", t0 + Duration::from_secs(2));
        assert!(h.slow_at("a", t0 + Duration::from_secs(3)));
        assert!(!h.slow_at("a", t0 + Duration::from_secs(33)));
        // Hedges spread wider than the window do not add up.
        h.hedged_at("b", t0);
        h.hedged_at("b", t0 + Duration::from_secs(11));
        h.hedged_at("b", t0 + Duration::from_secs(22));
        assert!(!h.slow_at("b", t0 + Duration::from_secs(22)));
    }

    #[test]
    fn no_margin_means_no_hedges() {
        let h = Health::new(HealthOptions {
            hedge_margin: 0.0,
            ..health().opts
        });
        for _ in 0..MIN_SAMPLES {
            h.record("a", Duration::from_millis(3));
        }
        assert_eq!(h.hedge_at("a", Instant::now()), None);
    }
}
