//! `moe serve` (one process, local experts) and `moe router` (routed experts on expert nodes):
//! the OpenAI-compatible HTTP API over the continuous-batching scheduler.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use moe_router::http::AppState;
use moe_router::scheduler::{KvConfig, Scheduler, SchedulerConfig};
use moe_router::tokenize::TextCodec;
use moe_router::validation::Limits;
use moe_router::{Engine, RemoteExperts};

/// Options shared by `serve` and `router`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Where experts compute: cpu, or cuda / cuda:N (a build with the cargo feature `cuda` and
    /// an NVIDIA driver). `moe up` puts its expert nodes there; attention, the gate and the shared experts
    /// (and `serve`'s and `router`'s own compute) run on the CPU so far.
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    pub device: moe_model::Device,
    /// Model directory (config.json, safetensors, tokenizer files); default: the generated
    /// `tiny` preset.
    #[arg(long, env = "MOE_MODEL")]
    pub model: Option<PathBuf>,
    /// Address of the HTTP API (port 0 picks one; the address is printed).
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Model name clients use (default: the model directory's name).
    #[arg(long, env = "MOE_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Tokens per engine step (decode tokens plus prefill chunks).
    #[arg(long, env = "MOE_MAX_BATCH_TOKENS", default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Sequences running at once.
    #[arg(long, env = "MOE_MAX_RUNNING", default_value_t = 256)]
    max_running: usize,
    /// Requests waiting for admission before new ones get 429.
    #[arg(long, env = "MOE_MAX_WAITING", default_value_t = 1024)]
    max_waiting: usize,
    /// KV-cache memory budget, bytes (pages of --kv-page-tokens tokens; sequences are admitted
    /// by the pages their prompt needs and preempted when pages run out).
    #[arg(long, env = "MOE_KV_CACHE_BYTES", default_value_t = 4 << 30)]
    kv_cache_bytes: usize,
    /// Tokens per KV-cache page.
    #[arg(long, env = "MOE_KV_PAGE_TOKENS", default_value_t = moe_model::cache::DEFAULT_PAGE_TOKENS)]
    kv_page_tokens: usize,
    /// KV-cache element type: auto (follows the model; f32 for now, see docs/ARCHITECTURE.md),
    /// bf16 (half the memory) or f32.
    #[arg(long, env = "MOE_KV_CACHE_DTYPE", default_value = "auto")]
    kv_cache_dtype: moe_model::KvCacheDtype,
    /// Do not share KV pages between requests with the same prompt prefix.
    #[arg(long, env = "MOE_NO_PREFIX_CACHING")]
    no_prefix_caching: bool,
    /// Longest context (prompt plus generated tokens) a request may have; default: the model's
    /// context length, capped by what the KV-cache budget holds for one sequence.
    #[arg(long, env = "MOE_MAX_MODEL_LEN")]
    max_model_len: Option<usize>,
    /// Largest request body, bytes.
    #[arg(long, env = "MOE_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Host names `/v1/*` answers for (`name` on any port, or `name:port`; repeat the flag or
    /// comma-separate); any other `Host` gets 421, which defeats DNS rebinding. Default: any.
    #[arg(long, env = "MOE_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// Also serve Prometheus `/metrics` on this address (the API port always serves it; port
    /// 0 picks one, and the address is printed).
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// API keys clients must send as `Authorization: Bearer KEY` (repeat the flag, or a
    /// comma-separated `MOE_API_KEYS`); with none and no key file the API is open.
    #[arg(
        long = "api-key",
        env = "MOE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<ApiKey>,
    /// A file of API keys, one per line (`#` comments), re-read every second: a rotated key
    /// works, and a removed one is refused, without a restart.
    #[arg(long, env = "MOE_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// `/metrics` on the API port needs an API key too (the `--metrics-listen` port never does).
    #[arg(long, env = "MOE_METRICS_REQUIRE_KEY")]
    metrics_require_key: bool,
    /// After the engine thread dies (a panic), how long the API keeps answering (`/ready` 503,
    /// requests 503) so load balancers see it, before the process exits non-zero for its
    /// supervisor to restart it, milliseconds.
    #[arg(long, env = "MOE_ENGINE_FAILURE_GRACE_MS", default_value_t = 2_000)]
    engine_failure_grace_ms: u64,
    /// Serve the API over HTTPS with this certificate chain (PEM); needs --tls-key. Re-read
    /// every second: a renewed certificate reaches new connections without a restart.
    #[arg(long, env = "MOE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "MOE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Time a client has to send a request's line and headers, milliseconds (slowloris). On
    /// HTTP/1 it also bounds the wait for the next request on a kept-alive connection.
    #[arg(long, env = "MOE_HEADER_READ_TIMEOUT_MS", default_value_t = 30_000)]
    header_read_timeout_ms: u64,
    /// Time a client has to send a request's whole body, milliseconds (408 otherwise).
    #[arg(long, env = "MOE_BODY_TIMEOUT_MS", default_value_t = 30_000)]
    body_timeout_ms: u64,
    /// A connection that moves no byte for this long is closed (after the request in progress),
    /// milliseconds.
    #[arg(long, env = "MOE_IDLE_TIMEOUT_MS", default_value_t = 120_000)]
    idle_timeout_ms: u64,
    /// Open connections one client IP may hold; more are closed at once (0: no limit). Behind a
    /// proxy every client has the proxy's IP: raise it there.
    #[arg(long, env = "MOE_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    max_connections_per_ip: usize,
    /// Two-batch overlap: split each step's batch into two micro-batches whose layers
    /// interleave, so one computes attention while the other's routed experts are on the
    /// expert nodes (on, off, or auto: on when the experts are remote and a step has at least
    /// 256 tokens in two sequences or more).
    #[arg(long, env = "MOE_OVERLAP", default_value = "auto")]
    overlap: moe_model::Overlap,
    /// Test hook: the engine thread panics at this step.
    #[arg(long, hide = true)]
    debug_panic_engine_at_step: Option<u64>,
}

/// An API key from the command line or the environment; its `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ApiKey(s.to_string()))
    }
}

#[derive(Debug, clap::Args)]
pub struct RouterArgs {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    remote: crate::engine::RemoteArgs,
    #[command(flatten)]
    cluster: crate::cluster::ClusterArgs,
}

impl ServeArgs {
    /// The API listener's TLS and limits (the certificate is loaded and checked here).
    pub fn listener_options(&self) -> anyhow::Result<moe_router::http::listener::ListenerOptions> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(moe_meta::tls::ServerTls::https(cert, key)?),
            _ => None,
        };
        let ms = std::time::Duration::from_millis;
        Ok(moe_router::http::listener::ListenerOptions {
            tls,
            header_read_timeout: ms(self.header_read_timeout_ms.max(1)),
            body_timeout: ms(self.body_timeout_ms.max(1)),
            idle_timeout: ms(self.idle_timeout_ms.max(1)),
            max_connections_per_ip: self.max_connections_per_ip,
        })
    }

    /// `serve` and `router` compute on the CPU only so far: `--device cuda` is checked (so the
    /// error names what is missing) and then refused.
    fn cpu_only(&self, what: &str) -> anyhow::Result<()> {
        if self.device.is_cuda() {
            self.device
                .check()
                .with_context(|| format!("--device {}", self.device))?;
            anyhow::bail!(
                "--device {}: moe {what} runs attention and its experts on the CPU only so far; put the experts on the GPU with moe expert-node --device cuda (or moe up --device cuda)",
                self.device
            );
        }
        Ok(())
    }

    pub fn model_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(dir) => Ok(dir.clone()),
            None => crate::commands::gen_model::cached_preset(moe_model::presets::Preset::Tiny),
        }
    }
}

/// `moe serve`.
pub fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    a.cpu_only("serve")?;
    let listener = bind(&a)?;
    let engine = crate::progress::load_engine(&a.model_dir()?)?;
    let rt = runtime()?;
    run(a, listener, engine, Arc::new(|| Ok(())), rt)
}

/// `moe router`.
pub fn run_router(a: RouterArgs) -> anyhow::Result<()> {
    a.serve.cpu_only("router")?;
    let listener = bind(&a.serve)?;
    if a.cluster.etcd.is_some() {
        return run_coordinated_router(a, listener);
    }
    anyhow::ensure!(
        a.remote.experts_at.is_some(),
        "moe router needs --etcd (a coordinated cluster) or --experts-at (static nodes); moe serve runs experts locally"
    );
    let rt = runtime()?;
    let (backbone, experts) =
        crate::engine::load_remote_any(&a.serve.model_dir()?, &a.remote, rt.handle())?;
    let experts = Arc::new(experts);
    run_remote(a.serve, listener, backbone, experts, rt)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Serves with the routed experts on expert nodes; ready while every expert has a live replica.
fn run_remote(
    serve: ServeArgs,
    listener: std::net::TcpListener,
    backbone: moe_router::AnyBackbone,
    experts: Arc<RemoteExperts>,
    rt: tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let probe = experts.clone();
    let ready = Arc::new(move || moe_router::cluster::check_ready(&probe));
    run(
        serve,
        listener,
        Engine::remote(backbone, experts),
        ready,
        rt,
    )
}

/// Binds the API address (before loading anything, so a taken port fails fast and the real
/// port is known to whoever registers it).
fn bind(a: &ServeArgs) -> anyhow::Result<std::net::TcpListener> {
    let l =
        std::net::TcpListener::bind(a.listen).with_context(|| format!("binding {}", a.listen))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn run(
    a: ServeArgs,
    listener: std::net::TcpListener,
    engine: Engine,
    ready: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    rt: tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let opts = a.listener_options()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let state = app_state(&a, engine, ready)?;
        println!("listening on {}", listener.local_addr()?);
        if let Some(m) = a.metrics_listen {
            let handle = state.metrics.clone();
            crate::metrics_http::start(m, Arc::new(move || moe_router::metrics::render(&handle)))
                .await?;
        }
        let (shutdown, died) = engine_watch(&state, &a, crate::signal::shutdown());
        moe_router::http::serve(listener, state, opts, shutdown).await?;
        engine_verdict(died).await
    })
}

/// The shutdown future of a server: `signal`, or the engine thread's death followed by the
/// grace period (`/ready` answers 503 meanwhile); the receiver learns about a death.
pub fn engine_watch(
    state: &AppState,
    a: &ServeArgs,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> (
    impl std::future::Future<Output = ()> + Send + 'static,
    tokio::sync::oneshot::Receiver<bool>,
) {
    let scheduler = state.scheduler.clone();
    let grace = std::time::Duration::from_millis(a.engine_failure_grace_ms);
    let (died_tx, died_rx) = tokio::sync::oneshot::channel::<bool>();
    let shutdown = async move {
        tokio::select! {
            () = signal => {}
            panicked = scheduler.ended() => {
                tracing::error!(panicked, grace_ms = grace.as_millis() as u64, "the engine stopped; exiting after the grace period");
                tokio::time::sleep(grace).await;
                let _ = died_tx.send(panicked);
            }
        }
    };
    (shutdown, died_rx)
}

/// An error (the process exits non-zero, for its supervisor to restart it) if the engine died.
pub async fn engine_verdict(died: tokio::sync::oneshot::Receiver<bool>) -> anyhow::Result<()> {
    match died.await {
        Ok(panicked) => anyhow::bail!(
            "the engine thread {}; exiting for a restart",
            if panicked { "panicked" } else { "stopped" }
        ),
        Err(_) => Ok(()),
    }
}

/// The API state: tokenizer, limits, metrics, and the scheduler started on `engine` (call
/// inside the runtime).
pub fn app_state(
    a: &ServeArgs,
    engine: Engine,
    ready: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
) -> anyhow::Result<AppState> {
    let dir = a.model_dir()?;
    let codec = Arc::new(TextCodec::from_dir(&dir).map_err(anyhow::Error::msg)?);
    let shape = engine.shape();
    anyhow::ensure!(
        (1..=4096).contains(&a.kv_page_tokens),
        "--kv-page-tokens must be in 1..=4096, got {}",
        a.kv_page_tokens
    );
    let kv = KvConfig {
        budget_bytes: a.kv_cache_bytes,
        page_tokens: a.kv_page_tokens,
        dtype: a.kv_cache_dtype,
        prefix_caching: !a.no_prefix_caching,
    };
    let layout = engine.kv_layout(&kv).map_err(anyhow::Error::msg)?;
    let context =
        moe_router::scheduler::max_model_len(shape.context, &kv, &layout, a.max_model_len)
            .map_err(anyhow::Error::msg)?;
    let sched_cfg = SchedulerConfig {
        max_batch_tokens: a.max_batch_tokens,
        max_running: a.max_running,
        max_waiting: a.max_waiting,
        kv,
        panic_at_step: a.debug_panic_engine_at_step,
    };
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
    });
    let limits = Limits {
        model_name: name,
        vocab: shape.vocab_size,
        context,
    };
    tracing::info!(
        kv_cache_tokens = sched_cfg.kv.tokens(&layout),
        max_model_len = context,
        "scheduler limits"
    );
    let keys: Vec<String> = a.api_keys.iter().map(|k| k.0.clone()).collect();
    let api_keys = moe_router::http::auth::ApiKeys::new(&keys, a.api_key_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    if let Some(k) = &api_keys {
        tracing::info!(keys = k.count(), file = ?a.api_key_file, "API keys required on /v1");
        k.watch();
    }
    // The recorder first: the scheduler publishes gauges as it starts.
    let metrics = moe_router::metrics::install();
    tracing::info!(overlap = %a.overlap, "two-batch overlap");
    let scheduler = Scheduler::start(engine.with_overlap(a.overlap), codec.clone(), sched_cfg)
        .map_err(anyhow::Error::msg)?;
    Ok(AppState {
        scheduler,
        codec,
        limits,
        metrics,
        ready,
        max_body_bytes: a.max_body_bytes,
        api_keys,
        metrics_need_key: a.metrics_require_key,
        allowed_hosts: moe_router::http::guard::AllowedHosts::new(&a.allowed_hosts),
        blocking: moe_router::http::blocking::BlockingPool::per_cpu(),
    })
}

/// `moe router --etcd`: the placement and node addresses come from the coordinator.
fn run_coordinated_router(a: RouterArgs, listener: std::net::TcpListener) -> anyhow::Result<()> {
    let rt = runtime()?;
    let dir = a.serve.model_dir()?;
    let backbone = crate::progress::load_backbone(&dir)?;
    let (moe_layers, n_experts) = crate::cluster::model_shape(&dir)?;
    let opts = a.remote.dispatch_options()?;
    let experts = Arc::new(RemoteExperts::empty(
        backbone.hidden_size(),
        opts,
        rt.handle().clone(),
    ));
    let store = rt.block_on(a.cluster.connect())?;
    let follow = moe_router::cluster::FollowConfig {
        keys: a.cluster.keys(),
        id: crate::cluster::process_id("router"),
        addr: listener.local_addr()?.to_string(),
        moe_layers,
        n_experts,
        lease_ttl: a.cluster.ttl(),
        load_publish: std::time::Duration::from_millis(a.cluster.load_publish_ms),
    };
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    rt.spawn(moe_router::cluster::follow(
        store,
        follow,
        experts.clone(),
        stopped,
    ));
    run_remote(a.serve, listener, backbone, experts, rt)
}
