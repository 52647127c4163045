//! Hostile clients against a real node over loopback gRPC: a client that writes without
//! reading, messages that do not parse, more messages than the node holds, and inputs whose
//! outputs overflow. Each answer is a meaningful status and the node keeps serving.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
pub mod common;

use common::{request, start};
use moe_expert_node::ServerOptions;
use moe_proto::ExpertServiceClient;
use moe_proto::codec::{StrictCodec, StrictDecoder};
use moe_proto::pb::{DispatchRequest, DispatchResponse};
use prost::Message;
use tonic::Code;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::transport::Channel;

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// Sends already-encoded message bodies, valid or not; decodes answers as the router does.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put(item);
        Ok(())
    }
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = DispatchResponse;
    type Encoder = RawEncoder;
    type Decoder = StrictDecoder<DispatchResponse>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        StrictCodec::<DispatchRequest, DispatchResponse>::default().decoder()
    }
}

/// Field 1 (request_id, a varint) with wire type 7, which does not exist.
const GARBAGE: &[u8] = &[0x0f, 0xff, 0xff, 0xff];

fn path(method: &str) -> http::uri::PathAndQuery {
    format!("/moe.expert.v1.ExpertService/{method}")
        .parse()
        .expect("path")
}

async fn raw_grpc(addr: std::net::SocketAddr) -> tonic::client::Grpc<Channel> {
    let mut g = tonic::client::Grpc::new(channel(addr).await);
    g.ready().await.expect("ready");
    g
}

/// Waits (bounded) for `cond`, polling: the server's progress is only visible from outside.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_pushed_back_at_the_stream_bound() {
    const BOUND: usize = 4;
    const SENT: usize = 600;
    let n = start(ServerOptions {
        max_in_flight_per_stream: BOUND,
        ..Default::default()
    })
    .await;
    let mut client = ExpertServiceClient::new(channel(n.addr).await);
    // 16 KiB answers: the client's default 64 KiB receive window takes four, then the node's
    // sends wait on a client that is not reading.
    let reqs = tokio_stream::iter((1..=SENT as u64).map(|id| request(id, 64, 0.25)));
    let mut answers = client.dispatch(reqs).await.expect("stream").into_inner();
    eventually("the node to hold its bound", || {
        n.node.held() >= BOUND as u64
    })
    .await;
    // Unbounded, the node would go on reading every message the client wrote (600 × 16 KiB
    // fit in HTTP/2's 16 MiB window) and hold each one's answer.
    let mut got = 0;
    while let Some(resp) = answers.message().await.expect("answer") {
        assert_eq!(resp.code, 0, "{}", resp.message);
        got += 1;
        if got == SENT {
            break;
        }
    }
    assert_eq!(got, SENT, "every message is answered once the client reads");
    assert!(
        n.node.held_peak() <= BOUND as u64,
        "held {} messages at once, bound {BOUND}",
        n.node.held_peak()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_node_bound_answers_are_resource_exhausted_and_the_stream_goes_on() {
    const BOUND: usize = 4;
    let n = start(ServerOptions {
        max_in_flight_per_stream: BOUND,
        max_in_flight: BOUND,
        ..Default::default()
    })
    .await;
    // A stream that never reads takes every node-wide slot: once its answers fill the
    // client's window and the send queue, each slot holds an answer waiting on it.
    let mut hog = ExpertServiceClient::new(channel(n.addr).await);
    let reqs = tokio_stream::iter((1..=200u64).map(|id| request(id, 64, 0.25)));
    let hogged = hog.dispatch(reqs).await.expect("stream").into_inner();
    eventually("the hog to stall holding the node's bound", || {
        n.node.held() >= BOUND as u64 && n.node.in_flight() == 0
    })
    .await;

    // Until the hog has stalled for good, a slot may still come free between its messages;
    // after that every call is refused. Any answer before the refusal is a correct one.
    let mut other = ExpertServiceClient::new(channel(n.addr).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match other.compute(request(1, 1, 0.25)).await {
            Ok(resp) => assert_eq!(resp.into_inner().code, 0),
            Err(err) => {
                assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never refused past the node bound"
        );
    }

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = other
        .dispatch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    for id in 7.. {
        tx.send(request(id, 1, 0.25)).await.expect("send");
        let resp = answers.message().await.expect("ok").expect("an answer");
        assert_eq!(resp.request_id, id);
        if resp.code == Code::ResourceExhausted as i32 {
            break;
        }
        assert_eq!(resp.code, 0, "{}", resp.message);
        assert!(Instant::now() < deadline, "never refused in-band");
    }

    // Once the hog goes away its slots come back, and the same stream is served.
    drop(hogged);
    drop(hog);
    eventually("the hog's slots to be freed", || n.node.held() == 0).await;
    tx.send(request(1000, 1, 0.25)).await.expect("send");
    let resp = answers.message().await.expect("ok").expect("an answer");
    assert_eq!((resp.request_id, resp.code), (1000, 0), "{}", resp.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_dispatch_stream_ends_it_with_invalid_argument_after_earlier_answers() {
    let n = start(ServerOptions::default()).await;
    let mut g = raw_grpc(n.addr).await;
    let msgs = vec![
        Bytes::from(request(1, 1, 0.25).encode_to_vec()),
        Bytes::from_static(GARBAGE),
        Bytes::from(request(2, 1, 0.25).encode_to_vec()),
    ];
    let mut answers = g
        .streaming(
            tonic::Request::new(tokio_stream::iter(msgs)),
            path("Dispatch"),
            RawCodec,
        )
        .await
        .expect("stream")
        .into_inner();
    let first = answers.message().await.expect("ok").expect("an answer");
    assert_eq!((first.request_id, first.code), (1, 0), "{}", first.message);
    let end = answers
        .message()
        .await
        .expect_err("the stream ends with a status, not OK");
    assert_eq!(end.code(), Code::InvalidArgument, "{end}");

    // The node goes on serving.
    let mut client = ExpertServiceClient::new(channel(n.addr).await);
    let ok = client.compute(request(3, 1, 0.25)).await.expect("served");
    assert_eq!(ok.into_inner().code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_compute_is_invalid_argument() {
    let n = start(ServerOptions::default()).await;
    let mut g = raw_grpc(n.addr).await;
    let err = g
        .unary(
            tonic::Request::new(Bytes::from_static(GARBAGE)),
            path("Compute"),
            RawCodec,
        )
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_ends_the_stream_with_resource_exhausted() {
    let n = start(ServerOptions {
        max_message_bytes: 1 << 10,
        ..Default::default()
    })
    .await;
    let mut g = raw_grpc(n.addr).await;
    let big = Bytes::from(request(1, 64, 0.25).encode_to_vec());
    let mut answers = g
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![big])),
            path("Dispatch"),
            RawCodec,
        )
        .await
        .expect("stream")
        .into_inner();
    let end = answers.message().await.expect_err("refused");
    assert_eq!(end.code(), Code::ResourceExhausted, "{end}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_outputs_are_an_error_not_ok() {
    let n = start(ServerOptions::default()).await;
    let mut client = ExpertServiceClient::new(channel(n.addr).await);
    // Finite inputs (they pass validation) whose projections overflow f32.
    let err = client
        .compute(request(1, 1, 3.0e38))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(err.message().contains("not finite"), "{err}");

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = client
        .dispatch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    tx.send(request(2, 1, 3.0e38)).await.expect("send");
    let resp = answers.message().await.expect("ok").expect("an answer");
    assert_eq!(resp.code, Code::Internal as i32, "{}", resp.message);
    assert!(resp.output.is_empty());
    tx.send(request(3, 1, 0.25)).await.expect("send");
    let resp = answers.message().await.expect("ok").expect("an answer");
    assert_eq!((resp.request_id, resp.code), (3, 0), "{}", resp.message);
}

/// Sends `frame` (raw gRPC framing) on a Dispatch stream over a bare HTTP/2 connection and
/// keeps the stream open; the grpc-status it ends with, waited for at most 30 s (a node that
/// waits for more bytes fails the test instead of hanging it).
async fn raw_dispatch(addr: std::net::SocketAddr, frame: Vec<u8>) -> Option<String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let req = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/moe.expert.v1.ExpertService/Dispatch"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (resp, mut send) = client.send_request(req, false).expect("send");
    send.send_data(Bytes::from(frame), false).expect("frame");
    let answer = async {
        let resp = resp.await.expect("response");
        let mut status = resp.headers().get("grpc-status").cloned();
        let mut body = resp.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        if let Some(t) = body.trailers().await.expect("trailers") {
            status = t.get("grpc-status").cloned().or(status);
        }
        status
    };
    let status = tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("answered without more bytes");
    drop(send);
    status.and_then(|s| s.to_str().ok().map(str::to_string))
}

fn code(c: Code) -> Option<String> {
    Some((c as i32).to_string())
}

/// A gRPC message header declaring 200 MiB, and no body: refused from the header alone (the
/// stream ends RESOURCE_EXHAUSTED at once) instead of waiting, with the declared size reserved,
/// for bytes that never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_over_the_limit_is_refused_from_its_header() {
    let n = start(ServerOptions {
        max_message_bytes: 1 << 20,
        ..Default::default()
    })
    .await;
    let declared: u32 = 200 << 20;
    let mut header = vec![0u8];
    header.extend_from_slice(&declared.to_be_bytes());
    assert_eq!(
        raw_dispatch(n.addr, header).await,
        code(Code::ResourceExhausted)
    );
}

/// Framing garbage (a compression flag that does not exist) is the client's fault too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_compression_flag_ends_the_stream_with_invalid_argument() {
    let n = start(ServerOptions::default()).await;
    let frame = vec![7u8, 0, 0, 0, 1, 0];
    assert_eq!(
        raw_dispatch(n.addr, frame).await,
        code(Code::InvalidArgument)
    );
}
