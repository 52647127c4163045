//! Metrics of the metadata store every role uses: etcd request latency and errors per
//! operation, leases kept alive and leases lost. Process-wide atomics (a process holds one
//! store client), rendered by [`super::process::render`].

use std::fmt::Write;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

/// etcd request latency, by `op`.
pub const ETCD_LATENCY: &str = "moe_etcd_request_duration_seconds";
/// etcd requests that failed, by `op`.
pub const ETCD_ERRORS: &str = "moe_etcd_request_errors_total";
/// Leases this process keeps alive (1 for a registered node, router or coordinator).
pub const LEASES_ALIVE: &str = "moe_lease_alive";
/// Leases lost (expired, or unreachable etcd for a whole TTL).
pub const LEASE_LOSSES: &str = "moe_lease_losses_total";

/// The store operations measured (a fixed set: bounded label values).
pub const OPS: [&str; 9] = [
    "get",
    "list",
    "put",
    "delete",
    "txn",
    "grant",
    "keep_alive",
    "revoke",
    "watch",
];
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

struct OpStats {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
    errors: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const OP: OpStats = OpStats {
    buckets: [ZERO; BUCKETS.len()],
    count: ZERO,
    sum_micros: ZERO,
    errors: ZERO,
};
static STATS: [OpStats; OPS.len()] = [OP; OPS.len()];
static ALIVE: AtomicI64 = AtomicI64::new(0);
static LOSSES: AtomicU64 = AtomicU64::new(0);

/// Awaits `f`, an etcd request of operation `op` (one of [`OPS`]), recording its latency and
/// whether it failed.
pub async fn observe<T, E>(
    op: &'static str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let r = f.await;
    if let Some(i) = OPS.iter().position(|&o| o == op) {
        let s = &STATS[i];
        let secs = started.elapsed().as_secs_f64();
        for (b, le) in s.buckets.iter().zip(BUCKETS) {
            if secs <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        s.count.fetch_add(1, Ordering::Relaxed);
        s.sum_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        if r.is_err() {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    r
}

/// Counts a lease kept alive for as long as it lives.
#[derive(Debug)]
pub struct LeaseAlive(());

impl LeaseAlive {
    pub fn new() -> LeaseAlive {
        ALIVE.fetch_add(1, Ordering::Relaxed);
        LeaseAlive(())
    }

    /// The lease was lost (then dropped).
    pub fn lost(self) {
        LOSSES.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for LeaseAlive {
    fn default() -> Self {
        LeaseAlive::new()
    }
}

impl Drop for LeaseAlive {
    fn drop(&mut self) {
        ALIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The families, as Prometheus text (etcd series only for operations seen).
pub fn render(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP {LEASES_ALIVE} Store leases this process keeps alive.\n# TYPE {LEASES_ALIVE} gauge\n{LEASES_ALIVE} {}",
        ALIVE.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP {LEASE_LOSSES} Store leases lost (expired, or etcd unreachable for a whole TTL).\n# TYPE {LEASE_LOSSES} counter\n{LEASE_LOSSES} {}",
        LOSSES.load(Ordering::Relaxed)
    );
    let seen: Vec<usize> = (0..OPS.len())
        .filter(|&i| STATS[i].count.load(Ordering::Relaxed) > 0)
        .collect();
    if seen.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP {ETCD_LATENCY} Metadata-store (etcd) request latency, by operation.\n# TYPE {ETCD_LATENCY} histogram"
    );
    for &i in &seen {
        let (op, s) = (OPS[i], &STATS[i]);
        for (b, le) in s.buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                out,
                "{ETCD_LATENCY}_bucket{{op=\"{op}\",le=\"{le}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = s.count.load(Ordering::Relaxed);
        let sum = s.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{ETCD_LATENCY}_bucket{{op=\"{op}\",le=\"+Inf\"}} {count}\n{ETCD_LATENCY}_sum{{op=\"{op}\"}} {sum}\n{ETCD_LATENCY}_count{{op=\"{op}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP {ETCD_ERRORS} Metadata-store (etcd) requests that failed, by operation.\n# TYPE {ETCD_ERRORS} counter"
    );
    for &i in &seen {
        let _ = writeln!(
            out,
            "{ETCD_ERRORS}{{op=\"{}\"}} {}",
            OPS[i],
            STATS[i].errors.load(Ordering::Relaxed)
        );
    }
}
