//! `moe-coordinator`: the only writer of placement. Leader election among replicas, membership
//! from node leases, placement with minimal movement ([`plan`]), and its two-phase rollout
//! ([`leader`]).

pub mod balance;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod rebalance;

pub use leader::{CoordinatorConfig, CoordinatorStatus, run};
pub use rebalance::RebalanceConfig;
