//! The engine a command runs: everything in this process, or the backbone here with the routed
//! experts on expert nodes (`--experts-at`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use moe_meta::Placement;
use moe_model::model::{Backbone, LogitsMode, SeqInput};
use moe_model::{Config, ExpertBackend, Matrix, SeqCache};
use moe_proto::pb::Dtype;
use moe_router::{DispatchOptions, RemoteExperts};

/// Where the routed experts are.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// Expert node addresses (node i of the placement is the i-th address). Without it, all
    /// experts run in this process.
    #[arg(long, env = "MOE_EXPERTS_AT", value_delimiter = ',')]
    pub experts_at: Option<Vec<String>>,
    /// Placement file; without it the placement is read from the nodes (Info).
    #[arg(long, env = "MOE_PLACEMENT")]
    pub placement: Option<PathBuf>,
    /// Wire dtype of hidden states: bf16, f32, or fp8 (e4m3 with one scale per 128 values, as
    /// DeepEP dispatches; nodes answer in bf16).
    #[arg(long, env = "MOE_WIRE", default_value = "bf16", value_parser = parse_wire)]
    pub wire: Dtype,
    /// Deadline of one node's answer, milliseconds (a node that misses it is quarantined and
    /// its work re-sent to another replica).
    #[arg(long, env = "MOE_DISPATCH_TIMEOUT_MS", default_value_t = 30_000)]
    pub dispatch_timeout_ms: u64,
    /// Time all the layers of one engine step may spend waiting for experts together,
    /// milliseconds (per-layer deadlines never add up past it).
    #[arg(long, env = "MOE_DISPATCH_STEP_BUDGET_MS", default_value_t = 60_000)]
    pub dispatch_step_budget_ms: u64,
    /// How long a node that answered badly (an error, the wrong size, non-finite values, no
    /// answer in time) is skipped while another replica is usable, milliseconds.
    #[arg(long, env = "MOE_DISPATCH_QUARANTINE_MS", default_value_t = 10_000)]
    pub dispatch_quarantine_ms: u64,
    /// A dispatch still unanswered after the node's moving p99 times this margin is hedged to
    /// another replica (0: never hedge).
    #[arg(long, env = "MOE_DISPATCH_HEDGE_MARGIN", default_value_t = 3.0)]
    pub dispatch_hedge_margin: f64,
    /// Never hedge sooner than this after sending, milliseconds.
    #[arg(long, env = "MOE_DISPATCH_HEDGE_MIN_MS", default_value_t = 20)]
    pub dispatch_hedge_min_ms: u64,
    /// How long a node hedged repeatedly (3 times in 10 s) is avoided while another replica is
    /// usable, milliseconds.
    #[arg(long, env = "MOE_DISPATCH_SLOW_COOLDOWN_MS", default_value_t = 30_000)]
    pub dispatch_slow_cooldown_ms: u64,
    /// How long a step whose experts have no live replica waits for one (or a new placement)
    /// before failing, milliseconds.
    #[arg(long, env = "MOE_REPLACEMENT_WAIT_MS", default_value_t = 30_000)]
    pub replacement_wait_ms: u64,
    /// Largest gRPC message to or from a node, bytes.
    #[arg(long, env = "MOE_MAX_MESSAGE_BYTES", default_value_t = moe_proto::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// An expert with fewer tokens than this in one step sends them all to one of its replicas
    /// (its weights are read once: decode); with more they are split over the replicas.
    #[arg(long, env = "MOE_DISPATCH_SPLIT_MIN_TOKENS", default_value_t = moe_router::dispatch::plan::DEFAULT_SPLIT_MIN_TOKENS)]
    pub dispatch_split_min_tokens: usize,
    #[command(flatten)]
    pub tls: crate::tls_args::ClusterTlsArgs,
}

impl RemoteArgs {
    /// The data-plane options these flags give.
    pub fn dispatch_options(&self) -> anyhow::Result<DispatchOptions> {
        Ok(DispatchOptions {
            wire: self.wire,
            timeout: Duration::from_millis(self.dispatch_timeout_ms),
            max_message_bytes: self.max_message_bytes,
            replacement_wait: Duration::from_millis(self.replacement_wait_ms),
            split_min_tokens: self.dispatch_split_min_tokens,
            step_budget: Duration::from_millis(self.dispatch_step_budget_ms),
            health: moe_router::dispatch::HealthOptions {
                quarantine: Duration::from_millis(self.dispatch_quarantine_ms),
                hedge_margin: self.dispatch_hedge_margin,
                hedge_min: Duration::from_millis(self.dispatch_hedge_min_ms),
                slow_cooldown: Duration::from_millis(self.dispatch_slow_cooldown_ms),
            },
            tls: self.tls.load(&[])?,
        })
    }
}

pub(crate) fn parse_wire(s: &str) -> Result<Dtype, String> {
    match s {
        "bf16" => Ok(Dtype::Bf16),
        "f32" => Ok(Dtype::F32),
        "fp8" => Ok(Dtype::Fp8E4m3),
        other => Err(format!("wire dtype `{other}` (bf16, f32, fp8)")),
    }
}

/// A loaded V3-family engine for `moe logits` / `moe generate`, with the runtime its
/// expert-node clients run on when the experts are remote. Fields drop in order: the clients
/// before their runtime.
pub struct Engine {
    backbone: Backbone,
    experts: Box<dyn ExpertBackend>,
    _rt: Option<tokio::runtime::Runtime>,
}

impl Engine {
    /// Loads the model in `dir`, locally or against expert nodes.
    pub fn load(dir: &Path, remote: &RemoteArgs) -> anyhow::Result<Engine> {
        if remote.experts_at.is_none() {
            let model = crate::progress::load_model(dir)?;
            return Ok(Engine {
                backbone: model.backbone,
                experts: Box::new(model.experts),
                _rt: None,
            });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (backbone, experts) = load_remote(dir, remote, rt.handle())?;
        Ok(Engine {
            backbone,
            experts: Box::new(experts),
            _rt: Some(rt),
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &Config {
        self.backbone.config()
    }

    /// A fresh cache.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.config())
    }

    /// One forward pass.
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        mode: LogitsMode,
    ) -> moe_model::Result<Vec<Matrix>> {
        self.backbone
            .forward(seqs, self.experts.as_ref(), mode, None)
    }
}

/// Loads the backbone of `dir` and connects to the expert nodes of `remote` on `handle`'s runtime
/// (which must outlive the returned backend).
pub fn load_remote(
    dir: &Path,
    remote: &RemoteArgs,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<(Backbone, RemoteExperts)> {
    let backbone = crate::progress::load_v3_backbone(dir)?;
    anyhow::ensure!(
        backbone.config().moe().is_some(),
        "the model has no routed experts"
    );
    let experts = connect_remote(&backbone.config().clone().into(), remote, handle)?;
    Ok((backbone, experts))
}

/// Connects to the expert nodes of `remote` (`--experts-at`) for a model shaped `cfg`, with the
/// placement from `--placement` or the nodes' Info, on `handle`'s runtime.
fn connect_remote(
    cfg: &moe_model::ModelConfig,
    remote: &RemoteArgs,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<RemoteExperts> {
    let addrs = remote.experts_at.clone().unwrap_or_default();
    let placement = match &remote.placement {
        Some(file) => Some(Placement::from_file(
            file,
            &cfg.moe_layers(),
            cfg.n_routed_experts(),
        )?),
        None => None,
    };
    Ok(handle.block_on(moe_router::cluster::remote::connect_static(
        cfg,
        placement,
        addrs,
        remote.dispatch_options()?,
        handle.clone(),
    ))?)
}

/// Loads the backbone of `dir`, of either family, and connects to the expert nodes of
/// `remote` on `handle`'s runtime (`moe router --experts-at`).
pub fn load_remote_any(
    dir: &Path,
    remote: &RemoteArgs,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<(moe_router::AnyBackbone, RemoteExperts)> {
    if !is_v4(dir)? {
        let (backbone, experts) = load_remote(dir, remote, handle)?;
        return Ok((backbone.into(), experts));
    }
    let backbone = crate::progress::load_backbone(dir)?;
    let experts = connect_remote(&moe_model::ModelConfig::from_dir(dir)?, remote, handle)?;
    Ok((backbone, experts))
}

/// A DeepSeek-V4 engine: the V4 backbone with its experts in this process or on expert nodes
/// (`--experts-at`, placement from `--placement` or the nodes' Info). Fields drop in order: the
/// clients before their runtime.
pub struct V4Engine {
    backbone: moe_model::v4::V4Backbone,
    experts: Box<dyn moe_model::ExpertBackend>,
    _rt: Option<tokio::runtime::Runtime>,
}

impl V4Engine {
    /// Loads the V4 model in `dir`, locally or against expert nodes.
    pub fn load(dir: &Path, remote: &RemoteArgs) -> anyhow::Result<V4Engine> {
        use moe_model::v4::{V4Backbone, V4Model, model::open};
        if remote.experts_at.is_none() {
            let model = V4Model::load(dir).with_context(|| format!("loading {}", dir.display()))?;
            return Ok(V4Engine {
                backbone: model.backbone,
                experts: Box::new(model.experts),
                _rt: None,
            });
        }
        let (cfg, ckpt) = open(dir)?;
        let backbone = V4Backbone::load(&cfg, &ckpt)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let experts = connect_remote(&cfg.clone().into(), remote, rt.handle())?;
        Ok(V4Engine {
            backbone,
            experts: Box::new(experts),
            _rt: Some(rt),
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &moe_model::v4::V4Config {
        self.backbone.config()
    }

    /// A fresh cache.
    pub fn new_cache(&self) -> moe_model::v4::V4Cache {
        self.backbone.new_cache()
    }

    /// One forward pass.
    pub fn forward(
        &self,
        seqs: &mut [moe_model::v4::V4SeqInput<'_>],
        mode: LogitsMode,
    ) -> moe_model::Result<Vec<Matrix>> {
        self.backbone
            .forward(seqs, self.experts.as_ref(), mode, None)
    }
}

/// Whether the model in `dir` is a DeepSeek-V4 one.
pub fn is_v4(dir: &Path) -> anyhow::Result<bool> {
    Ok(matches!(
        moe_model::ModelConfig::from_dir(dir)?,
        moe_model::ModelConfig::V4(_)
    ))
}
