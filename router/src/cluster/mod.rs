//! How a router takes part in a cluster (none of this is the data plane, which is
//! [`crate::dispatch`]):
//!
//! - [`membership`]: in a coordinated cluster, register under a lease (through
//!   [`moe_meta::store::register`], the one home of the lease-loss policy), follow the active
//!   placement and report the version routed with;
//! - [`load`]: publish token counts per (layer, expert) for load-driven placement;
//! - [`remote`]: build the remote-expert backend, for static nodes (`--experts-at`) with their
//!   placement read from a file or discovered from the nodes;
//! - [`ready`]: the readiness policy behind `/ready`.

pub mod load;
pub mod membership;
pub mod ready;
pub mod remote;

pub use membership::{FollowConfig, follow};
pub use ready::check_ready;
