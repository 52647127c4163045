//! One MoE layer's dispatch + combine round trip to 4 expert nodes on loopback (bf16 wire,
//! top-8 of 256 experts, 64 experts per node) for {1, 16, 64, 256} tokens at hidden 2048 and
//! 7168, against a memcpy of the same bytes and the expert compute of the same batch at real
//! expert sizes (moe_intermediate 1024 for hidden 2048, DeepSeek-V3's 2048 for hidden 7168).
//! The nodes host narrow experts (intermediate 8) so the round trip is mostly transport; the
//! nodes' own compute time (as they report it) is shown too.
//! Each row also times a raw loopback TCP round trip of the same request and answer bytes (a
//! thread that reads the request and writes the answer): the physical reference for the
//! transport, which is the round trip minus the busiest node's compute.
//! `MOE_BENCH_WIRE=bf16,fp8` (default bf16) picks the wire encodings, `MOE_BENCH_TOKENS` the
//! batch sizes. Prints a table; run with `cargo bench -p moe-router --bench dispatch`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_expert_node::{ExpertNode, ServerOptions, serve};
use moe_meta::Placement;
use moe_model::checkpoint::WeightData;
use moe_model::gate::Routing;
use moe_model::mlp::Mlp;
use moe_model::{Config, ExpertBackend, ExpertStore, Matrix};
use moe_proto::pb::Dtype;
use moe_router::{DispatchOptions, RemoteExperts};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const NODES: usize = 4;
const EXPERTS: usize = 256;
const TOP_K: usize = 8;
const NODE_INTER: usize = 8;

fn config(hidden: usize, inter: usize) -> Config {
    let mut v: serde_json::Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/models/tiny-dsv3/config.json"
    ))
    .expect("json");
    v["hidden_size"] = hidden.into();
    v["moe_intermediate_size"] = inter.into();
    v["num_hidden_layers"] = 2.into();
    Config::from_json(&v.to_string()).expect("config")
}

fn bf16(n: usize, rng: &mut ChaCha8Rng) -> WeightData {
    WeightData::Bf16(
        (0..n)
            .map(|_| half::bf16::from_f32(rng.random_range(-0.05..0.05)).to_bits())
            .collect(),
    )
}

fn expert(hidden: usize, inter: usize, rng: &mut ChaCha8Rng) -> Mlp {
    Mlp::from_weights(
        bf16(inter * hidden, rng),
        bf16(inter * hidden, rng),
        bf16(hidden * inter, rng),
        hidden,
        inter,
    )
}

fn routing(tokens: usize, rng: &mut ChaCha8Rng) -> Routing {
    let mut ids = Vec::new();
    for _ in 0..tokens {
        let mut chosen = BTreeSet::new();
        while chosen.len() < TOP_K {
            chosen.insert(rng.random_range(0..EXPERTS as u32));
        }
        ids.extend(chosen);
    }
    Routing {
        top_k: TOP_K,
        weights: vec![0.125; ids.len()],
        ids,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A loopback TCP peer that reads `req` bytes and answers `resp` bytes, for each round trip.
fn raw_tcp_round_trips(req: usize, resp: usize, iters: usize) -> Vec<Duration> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut inbuf = vec![0u8; req];
        let out = vec![2u8; resp];
        for _ in 0..iters {
            s.read_exact(&mut inbuf).expect("read request");
            s.write_all(&out).expect("write answer");
        }
    });
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let out = vec![1u8; req];
    let mut inbuf = vec![0u8; resp];
    let mut times: Vec<Duration> = (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            s.write_all(&out).expect("write request");
            s.read_exact(&mut inbuf).expect("read answer");
            t0.elapsed()
        })
        .collect();
    peer.join().expect("peer");
    times.sort();
    times
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    println!(
        "| wire | hidden | tokens | bytes moved | p50 | p99 | GB/s (p50) | busiest node's compute | transport (p50 − compute) | raw TCP round trip | memcpy same bytes | expert compute (real size) | round trip / compute |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let wires: Vec<Dtype> = std::env::var("MOE_BENCH_WIRE")
        .unwrap_or("bf16".into())
        .split(',')
        .map(|w| match w {
            "f32" => Dtype::F32,
            "fp8" => Dtype::Fp8E4m3,
            _ => Dtype::Bf16,
        })
        .collect();
    for wire in wires {
        for (hidden, real_inter) in [(2048usize, 1024usize), (7168, 2048)] {
            let cfg = config(hidden, NODE_INTER);
            let placement = Placement::even(NODES, 1, &[1], EXPERTS);
            let mut addrs = Vec::new();
            let mut stops = Vec::new();
            for n in 0..NODES {
                let pairs: Vec<(usize, usize)> = (0..EXPERTS)
                    .filter(|&e| placement.replicas(1, e).contains(&n))
                    .map(|e| (1, e))
                    .collect();
                let mut store = ExpertStore::default();
                for &(l, e) in &pairs {
                    store.insert(l, e, expert(hidden, NODE_INTER, &mut rng));
                }
                let node = Arc::new(ExpertNode::from_store(
                    format!("node-{n}"),
                    cfg.clone(),
                    store,
                    &pairs,
                    BTreeSet::new(),
                ));
                let listener = rt
                    .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                    .expect("bind");
                addrs.push(listener.local_addr().expect("addr").to_string());
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                stops.push(stop);
                rt.spawn(serve(node, listener, ServerOptions::default(), async {
                    let _ = stopped.await;
                }));
            }
            let opts = DispatchOptions {
                wire,
                ..Default::default()
            };
            let remote = RemoteExperts::new(placement, addrs, hidden, opts, rt.handle().clone());
            rt.block_on(remote.ready(Duration::from_secs(10), None))
                .expect("nodes up");
            // Real-size experts for the compute reference: several, so weights come from memory.
            let real: Vec<Mlp> = (0..4)
                .map(|_| expert(hidden, real_inter, &mut rng))
                .collect();
            for tokens in std::env::var("MOE_BENCH_TOKENS")
                .ok()
                .map(|s| {
                    s.split(',')
                        .filter_map(|t| t.parse().ok())
                        .collect::<Vec<usize>>()
                })
                .unwrap_or(vec![1usize, 16, 64, 256])
            {
                let x = Matrix::from_vec(
                    tokens,
                    hidden,
                    (0..tokens * hidden)
                        .map(|i| ((i % 101) as f32 - 50.0) * 0.01)
                        .collect(),
                );
                let r = routing(tokens, &mut rng);
                let iters = if tokens >= 64 { 60 } else { 200 };
                for _ in 0..5 {
                    remote
                        .dispatch(1, &x, &r)
                        .expect("dispatch")
                        .wait()
                        .expect("combine");
                }
                let node_micros = |r: &RemoteExperts| {
                    r.clients()
                        .iter()
                        .map(|c| c.compute_micros())
                        .max()
                        .unwrap_or(0)
                };
                let before = node_micros(&remote);
                let mut times: Vec<Duration> = (0..iters)
                    .map(|_| {
                        let t0 = Instant::now();
                        remote
                            .dispatch(1, &x, &r)
                            .expect("dispatch")
                            .wait()
                            .expect("combine");
                        t0.elapsed()
                    })
                    .collect();
                times.sort();
                let node_compute =
                    Duration::from_micros((node_micros(&remote) - before) / iters as u64);
                // Each token goes to each distinct node it needs once, and its partial sum comes back.
                let visits: usize = (0..tokens)
                    .map(|t| {
                        r.ids_of(t)
                            .iter()
                            .map(|&e| e as usize * NODES / EXPERTS)
                            .collect::<BTreeSet<_>>()
                            .len()
                    })
                    .sum();
                let req_bytes = moe_proto::tensor::payload_len(wire, visits, hidden);
                let answer = moe_proto::tensor::answer_dtype(wire);
                let resp_bytes = moe_proto::tensor::payload_len(answer, visits, hidden);
                let bytes = req_bytes + resp_bytes;
                // One node's share over one connection (the nodes answer in parallel).
                let raw = raw_tcp_round_trips(req_bytes / NODES, resp_bytes / NODES, 50);
                let src = vec![1u8; bytes];
                let mut dst = vec![0u8; bytes];
                let mut copies: Vec<Duration> = (0..50)
                    .map(|_| {
                        let t0 = Instant::now();
                        dst.copy_from_slice(std::hint::black_box(&src));
                        t0.elapsed()
                    })
                    .collect();
                copies.sort();
                // Compute at real size: each distinct expert over its tokens.
                let distinct: BTreeSet<u32> = r.ids.iter().copied().collect();
                let per_expert = (tokens * TOP_K).div_ceil(distinct.len());
                let xe = vec![0.01f32; per_expert * hidden];
                let t0 = Instant::now();
                let reps = 3u32;
                for rep in 0..reps as usize {
                    for (i, _) in distinct.iter().enumerate() {
                        std::hint::black_box(real[(i + rep) % real.len()].forward(&xe, per_expert));
                    }
                }
                let compute = t0.elapsed() / reps;
                let p50 = percentile(&times, 0.5);
                println!(
                    "| {} | {hidden} | {tokens} | {:.2} MB | {:.3} ms | {:.3} ms | {:.2} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.2} ms ({} experts × {per_expert} tok) | {:.3} |",
                    wire.as_str_name(),
                    bytes as f64 / 1e6,
                    p50.as_secs_f64() * 1e3,
                    percentile(&times, 0.99).as_secs_f64() * 1e3,
                    bytes as f64 / p50.as_secs_f64() / 1e9,
                    node_compute.as_secs_f64() * 1e3,
                    p50.saturating_sub(node_compute).as_secs_f64() * 1e3,
                    percentile(&raw, 0.5).as_secs_f64() * 1e3,
                    percentile(&copies, 0.5).as_secs_f64() * 1e3,
                    compute.as_secs_f64() * 1e3,
                    distinct.len(),
                    p50.as_secs_f64() / compute.as_secs_f64(),
                );
            }
            for s in stops {
                let _ = s.send(());
            }
        }
    }
}
