//! Routed experts: the seam between the gate (router side) and the experts (wherever they run).
//!
//! [`ExpertBackend`] computes, for one MoE layer and a batch of tokens, `Σ_k w_k · expert_k(x)`
//! per token. [`LocalExperts`] runs experts held in this process (the single-process engine; an
//! expert node runs the same [`run_experts`]). A remote backend (the router's dispatch client)
//! implements the same trait, and [`ExpertBackend::dispatch`] returns a pending result so the
//! caller can compute the shared expert while routed experts are in flight.
//!
//! Tokens are grouped per expert (one GEMM pair per expert over all its tokens, never token by
//! token); experts run in parallel; each token's partial results are then summed in a fixed
//! order (its expert list order), so a token's output does not depend on the rest of the batch.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::gate::Routing;
use crate::mlp::Mlp;
use crate::tensor::Matrix;

/// Per-token (expert, weight) lists in CSR form: token `t` owns entries
/// `offsets[t]..offsets[t+1]`. This is also the wire shape of a dispatch to one expert node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assignments {
    pub offsets: Vec<u32>,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Assignments {
    /// Every (expert, weight) of a fixed top-k routing.
    pub fn from_routing(r: &Routing) -> Assignments {
        let t = r.tokens();
        Assignments {
            offsets: (0..=t).map(|i| (i * r.top_k) as u32).collect(),
            experts: r.ids.clone(),
            weights: r.weights.clone(),
        }
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Entry range of token `t`.
    pub fn range(&self, t: usize) -> std::ops::Range<usize> {
        self.offsets[t] as usize..self.offsets[t + 1] as usize
    }
}

/// Computes routed experts for one layer.
pub trait ExpertBackend: Send + Sync {
    /// Starts `Σ_k w_k · expert_k(x_t)` for every token of `x` (`[tokens, hidden]`, the
    /// post-attention-norm hidden states). The pending result may borrow the inputs.
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> Result<Box<dyn PendingExperts + 'a>>;

    /// Called once at the start of every forward pass, before its first layer: a backend with
    /// a time budget per pass (the router's remote experts) starts its clock here.
    fn begin_step(&self) {}

    /// Whether [`PendingExperts::wait`] waits for other processes (I/O) rather than computing
    /// here: two-batch overlap ([`crate::overlap`]) lets the other micro-batch compute during
    /// such waits, and `auto` turns it on only then.
    fn is_remote(&self) -> bool {
        false
    }
}

/// A shared backend (the router's remote experts, also read by its readiness checks).
impl<T: ExpertBackend + ?Sized> ExpertBackend for std::sync::Arc<T> {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> Result<Box<dyn PendingExperts + 'a>> {
        (**self).dispatch(layer, x, routing)
    }

    fn begin_step(&self) {
        (**self).begin_step()
    }

    fn is_remote(&self) -> bool {
        (**self).is_remote()
    }
}

/// A routed-expert result that may still be in flight.
pub trait PendingExperts: Send {
    /// Waits for the `[tokens, hidden]` weighted sums.
    ///
    /// A remote result blocks on I/O here, so callers must not wait inside a rayon job: when
    /// the experts are computed on the same rayon pool (expert nodes in the router's process, as
    /// `moe up` runs them), a worker blocked here, or one waiting for it, can hold that compute
    /// below it on its stack, and neither ever finishes. `Backbone::forward` waits on its own
    /// thread.
    fn wait(self: Box<Self>) -> Result<Matrix>;
}

/// A result that is already there.
#[derive(Debug)]
pub struct Ready(pub Matrix);

impl PendingExperts for Ready {
    fn wait(self: Box<Self>) -> Result<Matrix> {
        Ok(self.0)
    }
}

/// Routed experts held in memory, keyed by (layer, expert).
#[derive(Debug, Default)]
pub struct ExpertStore {
    experts: HashMap<(usize, usize), Mlp>,
}

impl ExpertStore {
    /// Loads exactly the `(layer, expert)` pairs asked for (only their tensors are read).
    pub fn load(cfg: &Config, ckpt: &Checkpoint, pairs: &[(usize, usize)]) -> Result<ExpertStore> {
        let moe = cfg
            .moe()
            .ok_or_else(|| ModelError::InvalidConfig("the model has no routed experts".into()))?;
        for &(layer, expert) in pairs {
            if !cfg.is_moe_layer(layer) || expert >= moe.n_routed_experts {
                return Err(ModelError::InvalidInput(format!(
                    "no routed expert {expert} in layer {layer} (MoE layers {:?}, {} experts)",
                    cfg.moe_layers(),
                    moe.n_routed_experts
                )));
            }
        }
        let loaded: Vec<((usize, usize), Mlp)> = pairs
            .par_iter()
            .map(|&(layer, expert)| {
                let prefix = format!("model.layers.{layer}.mlp.experts.{expert}");
                Ok((
                    (layer, expert),
                    Mlp::load(ckpt, &prefix, cfg.hidden_size, moe.moe_intermediate_size)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(ExpertStore {
            experts: loaded.into_iter().collect(),
        })
    }

    /// Every routed expert of every MoE layer.
    pub fn all_pairs(cfg: &Config) -> Vec<(usize, usize)> {
        let n = cfg.moe().map_or(0, |m| m.n_routed_experts);
        cfg.moe_layers()
            .into_iter()
            .flat_map(|l| (0..n).map(move |e| (l, e)))
            .collect()
    }

    /// The expert, if held.
    pub fn get(&self, layer: usize, expert: usize) -> Option<&Mlp> {
        self.experts.get(&(layer, expert))
    }

    /// Adds (or replaces) an expert.
    pub fn insert(&mut self, layer: usize, expert: usize, mlp: Mlp) {
        self.experts.insert((layer, expert), mlp);
    }

    /// Moves every expert of `other` into this store.
    pub fn absorb(&mut self, other: ExpertStore) {
        self.experts.extend(other.experts);
    }

    /// Drops an expert; returns whether it was held.
    pub fn remove(&mut self, layer: usize, expert: usize) -> bool {
        self.experts.remove(&(layer, expert)).is_some()
    }

    /// Number of experts held.
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    /// Whether no expert is held.
    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    /// Bytes of expert weights held.
    pub fn bytes(&self) -> usize {
        self.experts.values().map(Mlp::bytes).sum()
    }
}

/// Runs the experts of `assignments` over `x` with experts from `lookup`, grouped per expert,
/// and returns the per-token weighted sums `[tokens, hidden]`.
pub fn run_experts<'a>(
    layer: usize,
    x: &Matrix,
    assignments: &Assignments,
    lookup: impl Fn(usize) -> Option<&'a Mlp> + Sync,
) -> Result<Matrix> {
    let t = assignments.tokens();
    let hidden = x.cols;
    // Group entries by expert: expert → (token rows, entry indices).
    let mut groups: HashMap<u32, (Vec<usize>, Vec<usize>)> = HashMap::new();
    for tok in 0..t {
        for e in assignments.range(tok) {
            let g = groups.entry(assignments.experts[e]).or_default();
            g.0.push(tok);
            g.1.push(e);
        }
    }
    let mut order: Vec<_> = groups.into_iter().collect();
    order.sort_by_key(|(e, _)| *e);
    // Where entry e's result lives: (group, row).
    let mut place = vec![(0usize, 0usize); assignments.experts.len()];
    for (gi, (_, (_, entries))) in order.iter().enumerate() {
        for (row, &e) in entries.iter().enumerate() {
            place[e] = (gi, row);
        }
    }
    let mut mlps = Vec::with_capacity(order.len());
    for (expert, _) in &order {
        mlps.push(lookup(*expert as usize).ok_or_else(|| ModelError::Experts {
            layer,
            reason: format!("routed expert {expert} is not loaded"),
        })?);
    }
    let inputs: Vec<Matrix> = order
        .iter()
        .map(|(_, (tokens, _))| x.gather_rows(tokens))
        .collect();
    let results = crate::mlp::forward_many(&mlps, &inputs);
    let mut out = Matrix::zeros(t, hidden);
    for tok in 0..t {
        let dst = out.row_mut(tok);
        for e in assignments.range(tok) {
            let (gi, row) = place[e];
            let w = assignments.weights[e];
            for (d, s) in dst.iter_mut().zip(&results[gi][row * hidden..][..hidden]) {
                *d += w * s;
            }
        }
    }
    Ok(out)
}

/// The single-process backend: experts from an [`ExpertStore`].
#[derive(Debug)]
pub struct LocalExperts {
    pub store: ExpertStore,
}

impl ExpertBackend for LocalExperts {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> Result<Box<dyn PendingExperts + 'a>> {
        Ok(Box::new(Deferred {
            store: &self.store,
            layer,
            x,
            routing,
        }))
    }
}

/// Local experts computed when waited on (after the caller's shared-expert work).
struct Deferred<'a> {
    store: &'a ExpertStore,
    layer: usize,
    x: &'a Matrix,
    routing: &'a Routing,
}

impl PendingExperts for Deferred<'_> {
    fn wait(self: Box<Self>) -> Result<Matrix> {
        let layer = self.layer;
        run_experts(
            layer,
            self.x,
            &Assignments::from_routing(self.routing),
            |e| self.store.get(layer, e),
        )
    }
}
