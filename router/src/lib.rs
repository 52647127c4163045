//! `moe-router`: the router side of the cluster.
//!
//! - [`http`]: the OpenAI-compatible API (axum handlers only), with [`api`] types and
//!   [`validation`] turning requests into generation requests.
//! - [`scheduler`]: continuous batching on the engine thread, KV-cache budget, streaming events.
//! - [`engine`]: the backbone plus local or remote experts.
//! - [`dispatch`]: the data-plane client that ships hidden states to expert nodes.
//! - [`cluster`]: how the router takes part in a cluster: membership and load publishing in a
//!   coordinated one, node discovery for static nodes, and the readiness policy.
//! - [`tokenize`], [`metrics`], [`error`]: text, Prometheus metrics, API errors.

pub mod api;
pub mod cluster;
pub mod dispatch;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod scheduler;
pub mod tokenize;
pub mod validation;

pub use dispatch::{DispatchError, DispatchOptions, RemoteExperts};
pub use engine::{AnyBackbone, Engine, ModelShape, SeqKv};
pub use error::ApiError;
