//! What the expert node's integration tests share: a real node on loopback hosting experts 3
//! and 5 of layer 1 of the bf16 tiny model, and dispatch requests for it.

use std::sync::Arc;

use moe_expert_node::{ExpertNode, ServerOptions, serve};
use moe_proto::pb::{DispatchRequest, Dtype};
use moe_proto::tensor;

/// Hidden size of the tiny model.
pub const HIDDEN: usize = 64;

/// A node serving on 127.0.0.1 until dropped.
pub struct Node {
    pub node: Arc<ExpertNode>,
    pub addr: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts a node with `opts` on a free loopback port.
pub async fn start(opts: ServerOptions) -> Node {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models/tiny-dsv3-bf16");
    let node = Arc::new(
        ExpertNode::load("n".into(), &dir, &[(1, 3), (1, 5)], Default::default()).expect("load"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(node.clone(), listener, opts, async {
        let _ = stopped.await;
    }));
    Node {
        node,
        addr,
        _stop: stop,
    }
}

/// `tokens` tokens of `value` everywhere, each routed to experts 3 and 5 with weight 0.5.
pub fn request(id: u64, tokens: usize, value: f32) -> DispatchRequest {
    DispatchRequest {
        request_id: id,
        layer: 1,
        placement_version: 0,
        num_tokens: tokens as u32,
        dtype: Dtype::F32 as i32,
        hidden: tensor::encode(&vec![value; tokens * HIDDEN], Dtype::F32),
        offsets: (0..=tokens as u32).map(|t| t * 2).collect(),
        expert_ids: [3, 5].repeat(tokens),
        weights: tensor::encode(&vec![0.5; tokens * 2], Dtype::F32),
        traceparent: String::new(),
    }
}
