//! `moe-expert-node`: a gRPC service that hosts a slice of the routed experts and computes, for
//! each dispatched batch, every token's weighted sum over its experts on this node.
//!
//! - [`backend`]: the device experts live on (CPU, or a GPU with the `cuda` feature).
//! - [`node`]: the node's state (hosted experts, served placement versions) and compute.
//! - [`validate`]: every check a dispatch must pass, each mapped to a precise gRPC status.
//! - [`service`]: the tonic service (bidirectional data-plane stream, unary compute, info, health).
//! - [`frames`]: messages handed to tonic only once whole (no reservation of declared sizes).
//! - [`server`]: listening, HTTP/2 tuning and graceful drain.
//! - [`membership`]: registration under a lease and following the coordinator's placement.
//! - [`memory`]: returning unloaded weights to the operating system, and private memory.

pub mod backend;
pub mod frames;
pub mod membership;
pub mod node;
pub mod server;
pub mod service;
pub mod stats;
pub mod validate;

pub use node::ExpertNode;
pub use server::{ServerOptions, serve};
