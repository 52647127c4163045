//! The router's stream to a node that pushes back: a node holding its per-stream limit stops
//! reading, and the router must go on reading its answers while it waits for room to send, or
//! neither side could move once both HTTP/2 windows were full (the client's actor reads answers
//! while a request waits for room). Thousands of requests queued at once on one client to a
//! node that holds two messages per stream all get their answers.

use std::sync::Arc;
use std::time::Duration;

use moe_expert_node::{ExpertNode, ServerOptions, serve};
use moe_proto::pb::{DispatchRequest, Dtype};
use moe_proto::tensor;
use moe_router::dispatch::ExpertClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_requests_to_a_node_that_pushes_back_is_all_answered() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models/tiny-dsv3-bf16");
    let node =
        Arc::new(ExpertNode::load("n".into(), &dir, &[(1, 3)], Default::default()).expect("load"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let opts = ServerOptions {
        max_in_flight_per_stream: 2,
        ..Default::default()
    };
    tokio::spawn(serve(node, listener, opts, std::future::pending()));
    let client = ExpertClient::spawn(addr.to_string(), 1 << 26, None);
    let tokens = 64;
    let req = DispatchRequest {
        layer: 1,
        num_tokens: tokens as u32,
        dtype: Dtype::F32 as i32,
        hidden: tensor::encode(&vec![0.25f32; tokens * 64], Dtype::F32),
        offsets: (0..=tokens as u32).collect(),
        expert_ids: vec![3; tokens],
        weights: tensor::encode(&vec![1.0f32; tokens], Dtype::F32),
        ..Default::default()
    };
    // 16 KiB each way per request: 4000 are more than the router's queue (1024) and both
    // 16 MiB stream windows hold.
    let waiters: Vec<_> = (0..4000).map(|_| client.send(req.clone())).collect();
    let all = async {
        let mut ok = 0;
        for w in waiters {
            let resp = w.await.expect("answered").expect("ok");
            assert_eq!(resp.code, 0, "{}", resp.message);
            ok += 1;
        }
        ok
    };
    let ok = tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("every request answered: the stream did not lock up");
    assert_eq!(ok, 4000);
}
