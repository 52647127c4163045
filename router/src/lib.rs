//! `moe-router`: the router side of the cluster. For now the data-plane client: the remote
//! expert backend that ships each MoE layer's hidden states to the expert nodes hosting the
//! chosen experts and combines their answers ([`dispatch`]).

pub mod dispatch;

pub use dispatch::{DispatchError, DispatchOptions, RemoteExperts};
