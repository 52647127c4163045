//! Dispatch settings ([`DispatchOptions`]) and why a dispatch failed ([`DispatchError`]), with
//! the class (unavailable or internal) and the batch rows each failure carries into
//! [`ModelError::Dispatch`].

use std::time::Duration;

use moe_model::{DispatchClass, ModelError};
use moe_proto::pb::Dtype;
use tonic::Code;

use super::HealthOptions;
use super::plan;

/// Dispatch settings.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// Wire dtype of hidden states and partial sums.
    pub wire: Dtype,
    /// Deadline of one node's answer.
    pub timeout: Duration,
    /// Time all the layers of one step may spend waiting for experts, together.
    pub step_budget: Duration,
    /// Largest gRPC message.
    pub max_message_bytes: usize,
    /// How long a step whose experts have no live replica waits for a new placement.
    pub replacement_wait: Duration,
    /// Fewest tokens of one expert in one step that are split over its replicas (fewer go to
    /// one replica, so its weights are read once).
    pub split_min_tokens: usize,
    /// Quarantine, hedging and slow-node avoidance.
    pub health: HealthOptions,
    /// Mutual TLS to the nodes; `None`: plaintext.
    pub tls: Option<std::sync::Arc<moe_meta::tls::ClusterTls>>,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            wire: Dtype::Bf16,
            timeout: Duration::from_secs(30),
            step_budget: Duration::from_secs(60),
            max_message_bytes: moe_proto::DEFAULT_MAX_MESSAGE_BYTES,
            replacement_wait: Duration::from_secs(30),
            split_min_tokens: plan::DEFAULT_SPLIT_MIN_TOKENS,
            health: HealthOptions {
                quarantine: Duration::from_secs(10),
                hedge_margin: 3.0,
                hedge_min: Duration::from_millis(20),
                slow_cooldown: Duration::from_secs(30),
            },
            tls: None,
        }
    }
}

/// Why a dispatch failed.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(
        "no live replica of expert {expert} (layer {layer}, token {token}); last failure: {last}"
    )]
    NoReplica {
        layer: usize,
        token: usize,
        expert: usize,
        last: String,
        /// Every batch row that needed an expert without a usable replica.
        rows: Vec<usize>,
    },
    #[error("layer {layer} ran out of the step's dispatch budget of {budget:?}")]
    OutOfTime {
        layer: usize,
        budget: Duration,
        /// The batch rows whose experts had not answered.
        rows: Vec<usize>,
    },
    #[error("no placement yet (waited {0:?} for the coordinator)")]
    NoPlacement(Duration),
    #[error("node {addr} rejected layer {layer}: {code:?}: {message}")]
    Rejected {
        addr: String,
        layer: usize,
        code: Code,
        message: String,
    },
    #[error("node {addr} returned {got} bytes for {tokens} tokens at layer {layer}")]
    BadReply {
        addr: String,
        layer: usize,
        tokens: usize,
        got: usize,
    },
    #[error("node {addr} returned a non-finite partial sum for token {token} at layer {layer}")]
    NonFinite {
        addr: String,
        layer: usize,
        token: usize,
    },
    #[error("not every node connected within {0:?}: {1}")]
    NotReady(Duration, String),
    #[error("node {addr} does not match the placement: {why}")]
    Mismatch { addr: String, why: String },
}

impl DispatchError {
    /// Unavailable (retry later or elsewhere) or internal (a bug, here or on a node).
    pub fn class(&self) -> DispatchClass {
        match self {
            DispatchError::NoReplica { .. }
            | DispatchError::NoPlacement(_)
            | DispatchError::NotReady(..)
            | DispatchError::OutOfTime { .. } => DispatchClass::Unavailable,
            DispatchError::Rejected { .. }
            | DispatchError::BadReply { .. }
            | DispatchError::NonFinite { .. }
            | DispatchError::Mismatch { .. } => DispatchClass::Internal,
        }
    }

    pub(super) fn into_model(self, layer: usize) -> ModelError {
        let class = self.class();
        let rows = match &self {
            DispatchError::NoReplica { rows, .. } | DispatchError::OutOfTime { rows, .. } => {
                rows.clone()
            }
            _ => Vec::new(),
        };
        ModelError::Dispatch {
            layer,
            class,
            rows,
            reason: self.to_string(),
        }
    }
}
