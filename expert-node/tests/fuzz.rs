//! Property tests (bounded, for CI) of what a hostile router can send: arbitrary bytes as a
//! protobuf message, and arbitrary field values in a well-formed message. Decoding and
//! validation never panic, and whatever is refused is refused with the client's code
//! (`InvalidArgument`, or `FailedPrecondition` for experts this node does not host), never an
//! internal error; what is accepted decodes to the shape it declared.

use std::sync::{Arc, OnceLock};

use moe_expert_node::ExpertNode;
use moe_expert_node::validate::{MAX_TOKENS, validate};
use moe_proto::pb::{DispatchRequest, Dtype};
use moe_proto::tensor;
use proptest::prelude::*;
use prost::Message;
use tonic::Code;

fn node() -> Arc<ExpertNode> {
    static NODE: OnceLock<Arc<ExpertNode>> = OnceLock::new();
    NODE.get_or_init(|| {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny-dsv3-bf16");
        let pairs: Vec<(usize, usize)> = (0..8).map(|e| (1, e)).collect();
        Arc::new(ExpertNode::load("fuzz".into(), &dir, &pairs, [3].into()).expect("load"))
    })
    .clone()
}

fn check(req: &DispatchRequest) -> Result<(), TestCaseError> {
    let node = node();
    match validate(req, &node) {
        Ok(job) => {
            prop_assert_eq!(job.hidden.rows, req.num_tokens as usize);
            prop_assert_eq!(job.hidden.cols, node.config().hidden_size());
            prop_assert!(job.hidden.data.iter().all(|v| v.is_finite()));
            prop_assert_eq!(job.assignments.offsets.len(), job.hidden.rows + 1);
        }
        Err(status) => prop_assert!(
            matches!(
                status.code(),
                Code::InvalidArgument | Code::FailedPrecondition
            ),
            "{status}"
        ),
    }
    Ok(())
}

/// A request that is valid, then has its fields perturbed by the strategy's choices.
fn request() -> impl Strategy<Value = DispatchRequest> {
    let hidden = 64usize;
    (
        1usize..6,
        prop::sample::select(vec![0u32, 1, 2, 3, 4, 99]),
        prop::sample::select(vec![0i32, 1, 2, 3, 7, -1]),
        prop::sample::select(vec![0u64, 3, 4, u64::MAX]),
        prop::collection::vec(
            prop_oneof![
                Just(f32::NAN),
                Just(f32::INFINITY),
                Just(3.0e38f32),
                -2.0f32..2.0
            ],
            0..8,
        ),
        any::<[u8; 4]>(),
    )
        .prop_map(move |(t, layer, dtype, version, poison, knobs)| {
            let mut values = vec![0.25f32; t * hidden];
            for (i, v) in poison.iter().enumerate() {
                let k = (i * 97 + knobs[0] as usize) % values.len();
                values[k] = *v;
            }
            let d = Dtype::try_from(dtype).unwrap_or(Dtype::F32);
            let mut offsets: Vec<u32> = (0..=t as u32).map(|i| i * 2).collect();
            let mut experts: Vec<u32> = (0..t).flat_map(|_| [1u32, 2]).collect();
            let mut weights = vec![0.5f32; experts.len()];
            match knobs[1] % 8 {
                0 => offsets[t] += 1,
                1 => offsets.reverse(),
                2 => experts[0] = 300,
                3 => experts[1] = experts[0],
                4 => weights[0] = f32::NAN,
                5 => experts[0] = 200, // exists, not hosted
                6 => {
                    offsets.pop();
                }
                _ => {}
            }
            let mut hidden_bytes = tensor::encode(&values, d).to_vec();
            if knobs[2] % 5 == 0 {
                hidden_bytes.truncate(hidden_bytes.len().saturating_sub(knobs[3] as usize + 1));
            }
            DispatchRequest {
                request_id: u64::from(knobs[3]),
                layer,
                placement_version: version,
                num_tokens: if knobs[2] % 7 == 0 {
                    (MAX_TOKENS + 1) as u32
                } else {
                    t as u32
                },
                dtype,
                hidden: hidden_bytes.into(),
                offsets,
                expert_ids: experts,
                weights: tensor::encode(&weights, Dtype::F32),
                traceparent: String::new(),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_decode_or_fail_and_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(req) = DispatchRequest::decode(bytes.as_slice()) {
            check(&req)?;
        }
    }

    #[test]
    fn perturbed_requests_are_accepted_or_refused_with_the_clients_code(req in request()) {
        check(&req)?;
        // The same message through the wire format.
        let back = DispatchRequest::decode(req.encode_to_vec().as_slice()).expect("round trip");
        check(&back)?;
    }
}
