//! The node's server span is a child of the router's span named in the message's traceparent,
//! and its compute span a child of that (checked on the spans an in-memory OpenTelemetry
//! exporter receives).

use std::sync::Arc;

use moe_expert_node::{ExpertNode, ServerOptions, serve};
use moe_proto::pb::{DispatchRequest, Dtype};
use moe_proto::{ExpertServiceClient, tensor};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_span_is_a_child_of_the_routers_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .init();

    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models/tiny-dsv3-bf16");
    let node =
        ExpertNode::load("n".into(), &dir, &[(1, 3), (1, 5)], Default::default()).expect("load");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        Arc::new(node),
        listener,
        ServerOptions::default(),
        async {
            let _ = stopped.await;
        },
    ));

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let mut c = ExpertServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let resp = c
        .compute(DispatchRequest {
            request_id: 1,
            layer: 1,
            placement_version: 0,
            num_tokens: 1,
            dtype: Dtype::F32 as i32,
            hidden: tensor::encode(&[0.5f32; 64], Dtype::F32),
            offsets: vec![0, 2],
            expert_ids: vec![3, 5],
            weights: tensor::encode(&[0.5, 0.5], Dtype::F32),
            traceparent: format!("00-{trace}-{parent}-01"),
        })
        .await
        .expect("computes")
        .into_inner();
    assert_eq!(resp.code, 0);
    let _ = stop.send(());
    server.await.expect("join").expect("serve");
    provider.force_flush().expect("flush");

    let spans = exporter.get_finished_spans().expect("spans");
    let server = spans
        .iter()
        .find(|s| s.name == "expert.dispatch")
        .expect("a server span");
    assert_eq!(
        server.span_context.trace_id(),
        TraceId::from_hex(trace).expect("hex")
    );
    assert_eq!(
        server.parent_span_id,
        SpanId::from_hex(parent).expect("hex")
    );
    assert_eq!(server.span_kind, opentelemetry::trace::SpanKind::Server);
    assert_eq!(
        resp.traceparent,
        format!("00-{trace}-{}-01", server.span_context.span_id())
    );
    let compute = spans
        .iter()
        .find(|s| s.name == "expert.compute")
        .expect("a compute span");
    assert_eq!(compute.parent_span_id, server.span_context.span_id());
    assert_eq!(
        compute.span_context.trace_id(),
        server.span_context.trace_id()
    );
}
