//! `moe-fleet`: the fleet simulator (issue 16). The real coordinator, node-membership and
//! router-follow code at fleet size over the in-memory store wrapped in a counting store with
//! etcd's limits ([`store`]), on tokio's paused clock ([`world`]), through the scenarios of
//! [`scenario`]; `moe simulate` is its command line and the benchmark binary.

pub mod report;
pub mod scenario;
pub mod share;
pub mod store;
pub mod world;

use std::time::Duration;

pub use report::{Report, table};
pub use scenario::{Scenario, simulate};

/// The fleet to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub nodes: usize,
    pub routers: usize,
    /// MoE layers (after three dense ones, as DeepSeek-V3's 61 layers hold 58).
    pub layers: usize,
    /// Routed experts per MoE layer.
    pub experts: usize,
    pub min_replicas: usize,
    /// (layer, expert) slots per node; `None`: twice an even share of every replica, so a
    /// node can hold what the active and the pending placement give it during a rollout.
    pub capacity: Option<usize>,
    /// Lease TTL of every role (the `--lease-ttl-ms` default, 3 s).
    pub lease_ttl: Duration,
    /// The coordinator's settle window (`--settle-ms`, 1 s).
    pub settle: Duration,
    /// How often each router publishes its load window (`--load-publish-ms`, 5 s).
    pub load_publish: Duration,
    /// Tokens per second each router routes (each to 8 experts per MoE layer).
    pub tokens_per_s: u64,
    /// Simulated length of the steady-state scenario.
    pub steady: Duration,
    /// Nodes restarted by the rolling restart (`None`: all of them).
    pub restarts: Option<usize>,
    /// Time a restarted node is away (process exit to registration).
    pub restart_gap: Duration,
    /// Wall-time budget of each scenario's waits (`None`: none); a scenario out of it stops
    /// and says so. Checked between polls of simulated time only: while the runtime is busy
    /// (time frozen, e.g. a rollout's ack storm at 1,000 nodes) it cannot interrupt.
    pub wall_limit: Option<Duration>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            nodes: 1000,
            routers: 64,
            layers: 58,
            experts: 256,
            min_replicas: 2,
            capacity: None,
            lease_ttl: Duration::from_secs(3),
            settle: Duration::from_secs(1),
            load_publish: Duration::from_secs(5),
            tokens_per_s: 2000,
            steady: Duration::from_secs(600),
            restarts: None,
            restart_gap: Duration::from_secs(10),
            wall_limit: None,
        }
    }
}

impl FleetConfig {
    /// Slots per node.
    pub fn node_capacity(&self) -> usize {
        self.capacity.unwrap_or_else(|| {
            let replicas = self.layers * self.experts * self.min_replicas.max(1);
            (2 * replicas).div_ceil(self.nodes.max(1)).max(1)
        })
    }

    /// Rejects shapes the simulator cannot run.
    pub fn validate(&self) -> Result<(), FleetError> {
        let bad = |why: &str| Err(FleetError::Config(why.into()));
        if self.nodes == 0 || self.routers == 0 || self.layers == 0 || self.experts == 0 {
            return bad("nodes, routers, layers and experts must all be at least 1");
        }
        if self.experts > usize::from(u16::MAX) || self.layers + 3 > usize::from(u16::MAX) {
            return bad("layers and experts must fit the placement record's 16-bit fields");
        }
        if self.min_replicas == 0 {
            return bad("min-replicas must be at least 1");
        }
        if self.min_replicas > self.nodes {
            return bad("min-replicas cannot exceed the number of nodes");
        }
        Ok(())
    }
}

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("bad fleet: {0}")]
    Config(String),
    #[error("cannot start the simulated runtime: {0}")]
    Runtime(String),
}
