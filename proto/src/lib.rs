//! `moe-proto`: the gRPC protocol between routers and expert nodes, generated from
//! `proto/expert.proto`, plus helpers to pack tensors into and out of `bytes` payloads.

#[allow(clippy::all, missing_docs, unused_qualifications)]
pub mod pb {
    //! Generated code (`moe.expert.v1`).
    tonic::include_proto!("moe.expert.v1");
}

pub mod codec;
pub mod tensor;

pub use pb::expert_service_client::ExpertServiceClient;
pub use pb::expert_service_server::{ExpertService, ExpertServiceServer};
pub use pb::{DispatchRequest, DispatchResponse, Dtype};

/// Default gRPC message limit: a batch of 4096 tokens at hidden 7168 in float32 is 117 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 << 20;
