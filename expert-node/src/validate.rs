//! Validation of a dispatch: every way a message can be malformed, each answered with the gRPC
//! code that says whose fault it is. `InvalidArgument`: the message contradicts itself or the
//! model (buffer sizes, CSR offsets, layer or expert out of range, non-finite values).
//! `FailedPrecondition`: a well-formed message this node cannot serve now (an expert it does not
//! host, a placement version newer than any it knows) — the router should re-route, not retry
//! as is. Older placement versions are accepted: expert weights do not change between versions,
//! so hosting the requested experts is what makes an answer correct, and routers still finishing
//! a step on the previous placement must not fail during a switch.

use moe_model::{Assignments, Matrix};
use moe_proto::pb::{DispatchRequest, Dtype};
use moe_proto::tensor;
use tonic::Status;

use crate::node::ExpertNode;

/// Most tokens one message may carry.
pub const MAX_TOKENS: usize = 1 << 16;

/// A validated dispatch, decoded.
#[derive(Debug)]
pub struct Job {
    pub layer: usize,
    pub dtype: Dtype,
    pub hidden: Matrix,
    pub assignments: Assignments,
}

/// Checks `req` against `node` and decodes it.
pub fn validate(req: &DispatchRequest, node: &ExpertNode) -> Result<Job, Status> {
    let cfg = node.config();
    let inv = |m: String| Err(Status::invalid_argument(m));
    let dtype = match Dtype::try_from(req.dtype) {
        Ok(d @ (Dtype::Bf16 | Dtype::F32 | Dtype::Fp8E4m3)) => d,
        _ => {
            return inv(format!(
                "dtype {} is not BF16 (1), F32 (2) or FP8_E4M3 (3)",
                req.dtype
            ));
        }
    };
    let layer = req.layer as usize;
    if !cfg.is_moe_layer(layer) {
        return inv(format!(
            "layer {layer} is not an MoE layer (MoE layers: {:?})",
            cfg.moe_layers()
        ));
    }
    if let Some(&newest) = node.versions().iter().next_back()
        && req.placement_version > newest
    {
        return Err(Status::failed_precondition(format!(
            "placement version {} is newer than node {} knows (newest {newest})",
            req.placement_version, node.id
        )));
    }
    let t = req.num_tokens as usize;
    if t == 0 || t > MAX_TOKENS {
        return inv(format!("num_tokens must be in 1..={MAX_TOKENS}, got {t}"));
    }
    let h = cfg.hidden_size();
    let want = tensor::payload_len(dtype, t, h);
    if req.hidden.len() != want {
        return inv(format!(
            "hidden has {} bytes, expected {want} for num_tokens {t} × hidden {h} in {}",
            req.hidden.len(),
            dtype.as_str_name()
        ));
    }
    if req.offsets.len() != t + 1 {
        return inv(format!(
            "offsets has {} entries, expected num_tokens + 1 = {}",
            req.offsets.len(),
            t + 1
        ));
    }
    let entries = req.expert_ids.len();
    if req.offsets[0] != 0
        || req.offsets.windows(2).any(|w| w[0] > w[1])
        || req.offsets[t] as usize != entries
    {
        return inv(format!(
            "offsets must start at 0, never decrease and end at the {entries} expert entries"
        ));
    }
    if req.weights.len() != entries * 4 {
        return inv(format!(
            "weights has {} bytes, expected 4 per expert entry = {}",
            req.weights.len(),
            entries * 4
        ));
    }
    let weights = tensor::decode(&req.weights, Dtype::F32);
    let n_experts = cfg.n_routed_experts();
    for tok in 0..t {
        let range = req.offsets[tok] as usize..req.offsets[tok + 1] as usize;
        for i in range.clone() {
            let e = req.expert_ids[i] as usize;
            if e >= n_experts {
                return inv(format!(
                    "token {tok}: expert {e} does not exist (the model has {n_experts})"
                ));
            }
            if !weights[i].is_finite() {
                return inv(format!(
                    "token {tok}: weight of expert {e} is not finite ({})",
                    weights[i]
                ));
            }
            if req.expert_ids[range.start..i].contains(&req.expert_ids[i]) {
                return inv(format!("token {tok}: expert {e} is listed twice"));
            }
            if !node.hosts(layer, e) {
                return Err(Status::failed_precondition(format!(
                    "expert {e} of layer {layer} is not hosted on node {}",
                    node.id
                )));
            }
        }
    }
    let values = match tensor::decode_finite(&req.hidden, t, h, dtype) {
        Ok(v) => v,
        Err(tensor::NonFinite(i)) => {
            return inv(format!(
                "hidden state of token {} is not finite at feature {}",
                i / h,
                i % h
            ));
        }
    };
    Ok(Job {
        layer,
        dtype,
        hidden: Matrix::from_vec(t, h, values),
        assignments: Assignments {
            offsets: req.offsets.clone(),
            experts: req.expert_ids.clone(),
            weights,
        },
    })
}
