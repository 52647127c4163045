//! An expert node process against malformed messages: each is answered with the intended gRPC
//! code (in-band on the stream, as a status on the unary call), and the node keeps serving the
//! same stream and others. Also: trace context crosses the wire, and SIGTERM drains and exits.

pub mod harness;

use std::time::Duration;

use harness::*;
use moe_proto::pb::{DispatchRequest, DispatchResponse, Dtype};
use moe_proto::{ExpertServiceClient, tensor};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const HIDDEN: usize = 64;

fn good() -> DispatchRequest {
    let hidden: Vec<f32> = (0..2 * HIDDEN).map(|i| (i as f32 * 0.1).sin()).collect();
    DispatchRequest {
        request_id: 1,
        layer: 1,
        placement_version: 7,
        num_tokens: 2,
        dtype: Dtype::F32 as i32,
        hidden: tensor::encode(&hidden, Dtype::F32),
        offsets: vec![0, 2, 3],
        expert_ids: vec![3, 10, 5],
        weights: tensor::encode(&[0.5, 0.25, 1.0], Dtype::F32),
        traceparent: String::new(),
    }
}

/// Every malformed variant of `good()` and the code it must get.
fn cases() -> Vec<(&'static str, DispatchRequest, Code)> {
    let mut v = Vec::new();
    let mut add = |name, code, f: &dyn Fn(&mut DispatchRequest)| {
        let mut r = good();
        f(&mut r);
        v.push((name, r, code));
    };
    add("short hidden buffer", Code::InvalidArgument, &|r| {
        r.hidden = r.hidden.slice(..r.hidden.len() - 4)
    });
    add("bf16 dtype with f32 bytes", Code::InvalidArgument, &|r| {
        r.dtype = Dtype::Bf16 as i32
    });
    add("unspecified dtype", Code::InvalidArgument, &|r| r.dtype = 0);
    add("zero tokens", Code::InvalidArgument, &|r| r.num_tokens = 0);
    add("offsets of the wrong length", Code::InvalidArgument, &|r| {
        r.offsets = vec![0, 3]
    });
    add("decreasing offsets", Code::InvalidArgument, &|r| {
        r.offsets = vec![0, 3, 2]
    });
    add(
        "offsets not ending at the entries",
        Code::InvalidArgument,
        &|r| r.offsets = vec![0, 1, 2],
    );
    add("weights of the wrong length", Code::InvalidArgument, &|r| {
        r.weights = r.weights.slice(..8)
    });
    add("non-finite weight", Code::InvalidArgument, &|r| {
        r.weights = tensor::encode(&[0.5, f32::NAN, 1.0], Dtype::F32)
    });
    add("non-finite hidden state", Code::InvalidArgument, &|r| {
        let mut h = tensor::decode(&r.hidden, Dtype::F32);
        h[70] = f32::INFINITY;
        r.hidden = tensor::encode(&h, Dtype::F32);
    });
    add("expert beyond the model", Code::InvalidArgument, &|r| {
        r.expert_ids = vec![3, 256, 5]
    });
    add("expert listed twice", Code::InvalidArgument, &|r| {
        r.expert_ids = vec![3, 3, 5]
    });
    add("dense layer", Code::InvalidArgument, &|r| r.layer = 0);
    add("layer beyond the model", Code::InvalidArgument, &|r| {
        r.layer = 9
    });
    add("expert not hosted here", Code::FailedPrecondition, &|r| {
        r.expert_ids = vec![3, 200, 5]
    });
    add(
        "unknown placement version",
        Code::FailedPrecondition,
        &|r| r.placement_version = 8,
    );
    v
}

fn node() -> (Proc, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let file = placement_file(dir.path(), 7, &["1-3:0-127", "1-3:128-255"]);
    let p = expert_node(
        &fixture("tiny-dsv3-bf16"),
        &[
            "--placement",
            file.to_str().expect("utf8"),
            "--node-id",
            "node-0",
        ],
    );
    (p, dir)
}

async fn client(addr: &str) -> ExpertServiceClient<tonic::transport::Channel> {
    ExpertServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_precise_codes_and_the_node_keeps_serving() {
    let (node, _dir) = node();
    let mut c = client(&node.addr).await;
    let (tx, rx) = mpsc::channel(64);
    let mut inbound = c
        .dispatch(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    // A second stream stays healthy throughout.
    let (tx2, rx2) = mpsc::channel(4);
    let mut inbound2 = client(&node.addr)
        .await
        .dispatch(ReceiverStream::new(rx2))
        .await
        .expect("stream 2")
        .into_inner();

    for (i, (name, mut req, code)) in cases().into_iter().enumerate() {
        req.request_id = 100 + i as u64;
        tx.send(req.clone()).await.expect("send");
        let resp: DispatchResponse = inbound
            .message()
            .await
            .expect("stream alive")
            .expect("answer");
        assert_eq!(resp.request_id, req.request_id, "{name}");
        assert_eq!(Code::from_i32(resp.code), code, "{name}: {}", resp.message);
        assert!(!resp.message.is_empty() && resp.output.is_empty(), "{name}");
        // The unary call answers the same message with a real status.
        let status = c.compute(req).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {}", status.message());
        // The other stream still computes.
        tx2.send(DispatchRequest {
            request_id: i as u64,
            ..good()
        })
        .await
        .expect("send 2");
        let ok = inbound2
            .message()
            .await
            .expect("stream 2 alive")
            .expect("answer 2");
        assert_eq!(
            (ok.code, ok.output.len()),
            (0, 2 * HIDDEN * 4),
            "{name}: {}",
            ok.message
        );
    }
    // And the stream that saw every bad message still serves a good one.
    tx.send(DispatchRequest {
        request_id: 999,
        ..good()
    })
    .await
    .expect("send");
    let ok = inbound.message().await.expect("alive").expect("answer");
    assert_eq!((ok.request_id, ok.code), (999, 0), "{}", ok.message);
    // Precise messages, spot-checked.
    let short = cases().remove(0).1;
    let msg = c
        .compute(short)
        .await
        .expect_err("short")
        .message()
        .to_string();
    assert_eq!(
        msg,
        "hidden has 508 bytes, expected 512 for num_tokens 2 × hidden 64 in DTYPE_F32"
    );
    let mut absent = good();
    absent.expert_ids = vec![3, 200, 5];
    let msg = c
        .compute(absent)
        .await
        .expect_err("absent")
        .message()
        .to_string();
    assert_eq!(msg, "expert 200 of layer 1 is not hosted on node node-0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_crosses_the_wire() {
    let (node, _dir) = node();
    let mut c = client(&node.addr).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let resp = c
        .compute(DispatchRequest {
            traceparent: parent.clone(),
            ..good()
        })
        .await
        .expect("ok")
        .into_inner();
    let child = resp.traceparent;
    assert_eq!(
        moe_meta::telemetry::trace_id(&child),
        Some(trace),
        "node span joins the router's trace: {child}"
    );
    // With tracing off (no OTLP endpoint here) the node passes the context through; its own
    // server span is checked in expert-node/tests/trace.rs and tests/e2e/observability.rs.
    assert_eq!(
        child, parent,
        "passed through unchanged while not exporting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_streams_and_exits_cleanly() {
    let (mut node, _dir) = node();
    let mut c = client(&node.addr).await;
    let (tx, rx) = mpsc::channel(4);
    let mut inbound = c
        .dispatch(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    tx.send(good()).await.expect("send");
    assert_eq!(
        inbound.message().await.expect("ok").expect("answer").code,
        0
    );
    let pid = node.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    // The stream ends cleanly (not with an error) although our side is still open.
    let end = tokio::time::timeout(Duration::from_secs(20), inbound.message())
        .await
        .expect("stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    let status = tokio::task::spawn_blocking(move || node.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
}
