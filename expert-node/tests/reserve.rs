//! Stalled declarations against a real node over loopback gRPC: many streams each declare a
//! huge message, send a little of it and stall. The node must not reserve the declared sizes
//! (measured with a counting allocator over the whole test process, node included) and keeps
//! answering other clients.
#![allow(unsafe_code)] // the counting allocator only

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
pub mod common;

use common::{request, start};
use moe_expert_node::ServerOptions;
use moe_proto::ExpertServiceClient;

/// Counts live bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const STREAMS: usize = 20;
const DECLARED: u32 = 150 << 20;
const SENT: usize = 64 << 10;

/// Opens a Dispatch stream on `client`, sends a header declaring `DECLARED` bytes and `SENT`
/// bytes of it, and returns once the node has answered with response headers (the stream is
/// being read); the send half is kept open, stalled.
async fn stall(
    client: &mut h2::client::SendRequest<Bytes>,
    addr: std::net::SocketAddr,
) -> (h2::SendStream<Bytes>, h2::RecvStream) {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/moe.expert.v1.ExpertService/Dispatch"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let ready = client.clone().ready().await.expect("ready");
    *client = ready;
    let (resp, mut send) = client.send_request(req, false).expect("send");
    let mut frame = vec![0u8];
    frame.extend_from_slice(&DECLARED.to_be_bytes());
    frame.resize(5 + SENT, 0x0a);
    send.send_data(Bytes::from(frame), false).expect("frame");
    let resp = resp.await.expect("response headers");
    (send, resp.into_body())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_huge_declarations_reserve_only_what_arrived() {
    let opts = ServerOptions {
        max_message_bytes: 200 << 20,
        ..Default::default()
    };
    let node = start(opts).await;
    let addr = node.addr;

    let good = || async {
        let mut c = ExpertServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        c.compute(request(1, 4, 0.25))
            .await
            .expect("answered")
            .into_inner()
            .output
    };
    let reference = good().await;
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);

    // Two connections (the node takes 16 streams per connection).
    let mut held = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
        let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2");
        tokio::spawn(conn);
        for _ in 0..STREAMS / 2 {
            held.push(stall(&mut client, addr).await);
        }
        clients.push(client);
    }
    // The node still answers, and the same as before.
    for _ in 0..3 {
        assert_eq!(good().await, reference);
    }
    let grown = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let declared = STREAMS * DECLARED as usize;
    // What arrived (20 × 64 KiB) plus the node's and the test's own bookkeeping: far below
    // one declared message, let alone twenty.
    assert!(
        grown < 64 << 20,
        "{STREAMS} stalled streams declaring {declared} bytes in all grew the heap by {grown} bytes"
    );
    drop(held);
    drop(clients);
}
