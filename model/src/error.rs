//! Errors of the model engine, classified where they happen.
//!
//! One enum for the crate: configuration problems, checkpoint problems (missing tensor, wrong
//! shape or dtype, I/O), bad inputs to a forward pass, and failures of an expert backend. Callers
//! match on the variant, never on the message.

use std::path::PathBuf;

/// Result alias of the model engine.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` could not be read or parsed.
    #[error("cannot read model config {path}: {reason}")]
    ConfigRead { path: PathBuf, reason: String },
    /// The configuration parsed but describes an impossible model.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// A checkpoint file could not be opened, mapped or parsed.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    /// A tensor has a different shape than the config implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype the engine cannot use for it.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },
    /// An input to a forward pass is invalid (token out of vocabulary, context too long, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The routed experts of a layer could not be computed.
    #[error("expert backend failed at layer {layer}: {reason}")]
    Experts { layer: usize, reason: String },
    /// A remote expert dispatch failed; `class` says whose fault it is, `rows` which batch rows
    /// (tokens of this forward pass) needed the experts that could not be computed (empty: all).
    #[error("expert dispatch failed at layer {layer}: {reason}")]
    Dispatch {
        layer: usize,
        class: DispatchClass,
        rows: Vec<usize>,
        reason: String,
    },
    /// The KV-cache pool has no page left for a forward pass (the scheduler preempts first).
    #[error("KV cache full: {needed} pages needed, {free} free")]
    KvCacheFull { needed: usize, free: usize },
    /// The compute device asked for cannot be used (no CUDA in this build, no driver, no such
    /// device) or failed.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// Writing an output file failed.
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Whose fault a failed dispatch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchClass {
    /// No reachable replica could compute the experts (or the step ran out of time): retry
    /// later or elsewhere.
    Unavailable,
    /// A bug or an answer nobody should send (the router's or a node's): not the client's.
    Internal,
}
