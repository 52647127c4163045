//! Two-batch overlap against real expert nodes (two in-process nodes on loopback, each hosting
//! half of every MoE layer's experts, no replicas, bf16 model): a step's logits and the
//! scheduler's greedy ids are bitwise the serial path's (and the golden ids where the golden
//! margin allows the bf16 wire), both groups' dispatches really travel to the nodes, and a
//! dispatch failure in one group fails only that group's sequences.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use moe_expert_node::{ExpertNode, ServerOptions, serve};
use moe_model::gate::Routing;
use moe_model::model::{Backbone, LogitsMode, SeqInput};
use moe_model::sampling::{Sampler, SamplingParams};
use moe_model::{
    Config, DispatchClass, ExpertBackend, Matrix, ModelError, Overlap, PendingExperts, SeqCache,
};
use moe_router::scheduler::{Event, GenerationRequest, Scheduler, SchedulerConfig};
use moe_router::tokenize::TextCodec;
use moe_router::{DispatchOptions, Engine, RemoteExperts};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-dsv3-bf16")
}

/// The runtime, two nodes splitting every MoE layer's experts, and the remote backend.
struct Cluster {
    rt: tokio::runtime::Runtime,
    cfg: Config,
    experts: Arc<RemoteExperts>,
}

fn cluster() -> Cluster {
    let dir = fixture();
    let cfg = Config::from_dir(&dir).expect("config");
    let n = cfg.moe().expect("moe").n_routed_experts;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut addrs = Vec::new();
    for half in [0..n / 2, n / 2..n] {
        let pairs: Vec<(usize, usize)> = cfg
            .moe_layers()
            .into_iter()
            .flat_map(|l| half.clone().map(move |e| (l, e)))
            .collect();
        let node = Arc::new(
            ExpertNode::load(
                format!("n{}", addrs.len()),
                &dir,
                &pairs,
                Default::default(),
            )
            .expect("node loads"),
        );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        addrs.push(listener.local_addr().expect("addr").to_string());
        rt.spawn(serve(
            node,
            listener,
            ServerOptions::default(),
            std::future::pending(),
        ));
    }
    let experts = rt
        .block_on(moe_router::cluster::remote::connect_static(
            &cfg.clone().into(),
            None,
            addrs,
            DispatchOptions::default(),
            rt.handle().clone(),
        ))
        .expect("nodes ready");
    Cluster {
        rt,
        cfg,
        experts: Arc::new(experts),
    }
}

fn backbone() -> Backbone {
    let (cfg, ckpt) = moe_model::model::open(&fixture()).expect("open");
    Backbone::load(&cfg, &ckpt).expect("backbone")
}

/// The remote experts, recording the rows of every dispatch.
struct Recording {
    inner: Arc<RemoteExperts>,
    rows: Mutex<Vec<usize>>,
}

impl ExpertBackend for Recording {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> moe_model::Result<Box<dyn PendingExperts + 'a>> {
        self.rows.lock().expect("lock").push(x.rows);
        self.inner.dispatch(layer, x, routing)
    }

    fn begin_step(&self) {
        self.inner.begin_step();
    }

    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
}

/// Whether the AVX-512 kernel runs (the bitwise claims are its); says so when it does not.
fn has_avx512() -> bool {
    let yes = moe_model::kernels::kernel_choice() == moe_model::kernels::KernelChoice::Avx512;
    if !yes {
        eprintln!("skipped: the bitwise claim is the AVX-512 kernel's (this CPU has none)");
    }
    yes
}

fn bits(out: &[Matrix]) -> Vec<Vec<u32>> {
    out.iter()
        .map(|m| m.data.iter().map(|v| v.to_bits()).collect())
        .collect()
}

#[test]
fn a_step_against_expert_nodes_gives_the_serial_logits_bit_for_bit() {
    if !has_avx512() {
        return;
    }
    let c = cluster();
    let backbone = backbone();
    // 279 prompt tokens: over auto's minimum (256), which decode steps are not.
    let prompts: Vec<Vec<u32>> = [54usize, 9, 81, 36, 27, 72]
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((s * 97 + i * 41) % 500 + 3) as u32)
                .collect()
        })
        .collect();
    let mut runs = Vec::new();
    for overlap in [Overlap::Off, Overlap::Auto] {
        let backend = Recording {
            inner: c.experts.clone(),
            rows: Mutex::new(Vec::new()),
        };
        let mut caches: Vec<SeqCache> = prompts.iter().map(|_| SeqCache::new(&c.cfg)).collect();
        let mut out = Vec::new();
        for step in 0..4u32 {
            let inputs: Vec<Vec<u32>> = match step {
                0 => prompts.clone(),
                _ => (0..prompts.len() as u32)
                    .map(|s| vec![(s * 13 + step * 5) % 500 + 3])
                    .collect(),
            };
            let mut seqs: Vec<SeqInput<'_>> = caches
                .iter_mut()
                .zip(&inputs)
                .map(|(cache, tokens)| SeqInput { tokens, cache })
                .collect();
            let mode = if step == 0 {
                LogitsMode::All
            } else {
                LogitsMode::Last
            };
            let logits = backbone
                .forward_with(&mut seqs, &backend, mode, None, overlap)
                .expect("forward");
            out.push(bits(&logits));
        }
        let rows = backend.rows.into_inner().expect("lock");
        let moe_layers = c.cfg.moe_layers().len();
        match overlap {
            // 279 prefill rows, then 6 decode rows, per MoE layer.
            Overlap::Off => assert!(rows.iter().all(|&r| r == 279 || r == 6), "{rows:?}"),
            // The prefill splits 144 + 135, a decode step (6 tokens, under auto's minimum) not.
            _ => {
                assert_eq!(rows.iter().filter(|&&r| r == 144).count(), moe_layers);
                assert_eq!(rows.iter().filter(|&&r| r == 135).count(), moe_layers);
                assert_eq!(rows.iter().filter(|&&r| r == 6).count(), 3 * moe_layers);
            }
        }
        runs.push(out);
    }
    assert!(runs[0] == runs[1], "overlapped logits differ from serial");
    drop(c.rt);
}

fn golden() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture().join("golden/golden.json")).expect("golden.json"),
    )
    .expect("golden parses")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        sampler: Sampler::new(SamplingParams::default()),
        stop: Vec::new(),
        ignore_eos: true,
        logprobs: None,
    }
}

/// Every request's generated ids (or its failure), each request on its own sequence.
fn generate(
    engine: Engine,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Vec<Result<Vec<u32>, String>> {
    let codec = Arc::new(TextCodec::from_dir(&fixture()).expect("tokenizer"));
    let scheduler = Scheduler::start(engine, codec, SchedulerConfig::default()).expect("scheduler");
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| {
            scheduler
                .submit(request(p.clone(), max_tokens))
                .expect("submitted")
        })
        .collect();
    rxs.into_iter().map(collect).collect()
}

/// The golden prompts (the 400-token one cut to 64), 4 copies each: 16 sequences.
fn golden_prompts() -> Vec<Vec<u32>> {
    let g = golden();
    let mut out = Vec::new();
    for _ in 0..4 {
        for p in g["prompts"].as_array().expect("prompts") {
            let mut ids = ids(&p["ids"]);
            ids.truncate(64);
            out.push(ids);
        }
    }
    out
}

#[test]
fn greedy_ids_through_the_scheduler_are_the_serial_ones_and_the_golden_ones() {
    if !has_avx512() {
        return;
    }
    let c = cluster();
    let prompts = golden_prompts();
    let run = |overlap| {
        let engine = Engine::remote(backbone(), c.experts.clone()).with_overlap(overlap);
        generate(engine, &prompts, 24)
    };
    let serial = run(Overlap::Off);
    let on = run(Overlap::On);
    assert_eq!(serial, on, "overlap on changes greedy ids");
    // The golden ids (reference in float32) hold on the bf16 wire where the golden margin
    // exceeds 0.05, as the e2e data-plane test checks them.
    let g = golden();
    for (i, got) in on.iter().enumerate().take(3) {
        let got = got.as_ref().expect("generated");
        let want = ids(&g["results"][i]["generated_ids"]);
        let margins = g["results"][i]["greedy_margins"]
            .as_array()
            .expect("margins");
        for (step, w) in want.iter().enumerate() {
            let margin = margins[step].as_f64().expect("margin");
            if got[step] != *w {
                assert!(
                    margin <= 0.05,
                    "prompt {i} step {step}: {} != {w}",
                    got[step]
                );
                break;
            }
            if margin <= 0.05 {
                break;
            }
        }
    }
    drop(c.rt);
}

/// The remote experts, failing the first dispatch of a batch of `rows` rows (one group of an
/// overlapped step) for its row `fail`. The first step waits in `begin_step` until `open` is
/// called, so that the test can queue requests behind it.
struct FailOnce {
    inner: Arc<RemoteExperts>,
    rows: usize,
    fail: usize,
    failed: Mutex<bool>,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    state: Mutex<(bool, bool)>,
    cv: std::sync::Condvar,
}

impl Gate {
    /// Blocks the first caller until [`Gate::open`] (`.0`: someone waits, `.1`: open).
    fn pass(&self) {
        let mut st = self.state.lock().expect("lock");
        st.0 = true;
        self.cv.notify_all();
        while !st.1 {
            st = self.cv.wait(st).expect("lock");
        }
    }

    fn wait_for_caller(&self) {
        let mut st = self.state.lock().expect("lock");
        while !st.0 {
            st = self.cv.wait(st).expect("lock");
        }
    }

    fn open(&self) {
        self.state.lock().expect("lock").1 = true;
        self.cv.notify_all();
    }
}

impl ExpertBackend for FailOnce {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> moe_model::Result<Box<dyn PendingExperts + 'a>> {
        let mut failed = self.failed.lock().expect("lock");
        if !*failed && x.rows == self.rows {
            *failed = true;
            return Err(ModelError::Dispatch {
                layer,
                class: DispatchClass::Unavailable,
                rows: vec![self.fail],
                reason: "no live replica of expert 7 (test)".into(),
            });
        }
        drop(failed);
        self.inner.dispatch(layer, x, routing)
    }

    fn begin_step(&self) {
        self.gate.pass();
        self.inner.begin_step();
    }

    fn is_remote(&self) -> bool {
        true
    }
}

fn collect(rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Result<Vec<u32>, String> {
    let mut rx = rx;
    let mut got = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { id, .. } => got.push(id),
            Event::Finished { .. } => return Ok(got),
            Event::Failed(e) => return Err(format!("{e:?}")),
        }
    }
    Err("the channel closed".into())
}

#[test]
fn a_dispatch_failure_in_one_group_fails_only_that_groups_sequence() {
    let c = cluster();
    // A first request runs alone while eight 3-token prompts queue behind it; the second step
    // then has its decode token (row 0) and the eight prefills (rows 1..25), split 13 + 12 rows
    // (the first request and prompts 0-3, then prompts 4-7). The second group's dispatch fails
    // for its row 4: batch row 17, a token of prompt 5.
    let first = vec![9u32, 8, 7];
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|s| vec![s * 11 + 5, s * 7 + 40, s + 100])
        .collect();
    let serial = generate(
        Engine::remote(backbone(), c.experts.clone()).with_overlap(Overlap::Off),
        &prompts,
        6,
    );
    let gate = Arc::new(Gate::default());
    let backend = FailOnce {
        inner: c.experts.clone(),
        rows: 12,
        fail: 4,
        failed: Mutex::new(false),
        gate: gate.clone(),
    };
    let engine = Engine::with_backend(backbone(), Box::new(backend)).with_overlap(Overlap::On);
    let codec = Arc::new(TextCodec::from_dir(&fixture()).expect("tokenizer"));
    let scheduler = Scheduler::start(engine, codec, SchedulerConfig::default()).expect("scheduler");
    let first_rx = scheduler.submit(request(first, 6)).expect("submitted");
    gate.wait_for_caller();
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| scheduler.submit(request(p.clone(), 6)).expect("submitted"))
        .collect();
    gate.open();
    assert!(collect(first_rx).is_ok(), "the first request finished");
    let got: Vec<_> = rxs.into_iter().map(collect).collect();
    for (i, g) in got.iter().enumerate() {
        if i == 5 {
            let msg = g.as_ref().expect_err("prompt 5 failed");
            assert!(msg.contains("no live replica"), "{msg}");
        } else {
            assert_eq!(g, &serial[i], "prompt {i} continued to its serial ids");
        }
    }
    drop(c.rt);
}
