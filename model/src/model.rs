//! The DeepSeek-V3 decoder: embeddings, decoder layers (MLA + dense MLP or MoE), final norm and
//! LM head, over a flattened batch of sequences with compressed KV caches.
//!
//! [`Backbone`] is everything except the routed experts (what a router loads); routed experts
//! come from an [`ExpertBackend`]. [`Model`] pairs a backbone with local experts for the
//! single-process engine. Decoder layer: `h += attn(input_layernorm(h))`;
//! `h += mlp(post_attention_layernorm(h))`; logits = `lm_head(norm(h))`.
//! `Backbone::forward_with` can run the layer loop as two interleaved micro-batches
//! ([`crate::overlap`]). Reference: transformers `modeling_deepseek_v3.py`.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use crate::attention::{self, Mla, SeqSlot};
use crate::cache::SeqCache;
use crate::checkpoint::{Checkpoint, ProgressFn, TensorFilter, WeightData};
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::gate::{Gate, Routing};
use crate::kernels::{self, Linear};
use crate::mlp::Mlp;
use crate::moe::{ExpertBackend, ExpertStore, LocalExperts};
use crate::overlap::{Overlap, Turn};
use crate::rope::{self, Rope};
use crate::tensor::Matrix;

#[derive(Debug)]
enum Embedding {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

#[derive(Debug)]
enum Ffn {
    Dense(Mlp),
    Moe { gate: Gate, shared: Option<Mlp> },
}

#[derive(Debug)]
struct DecoderLayer {
    input_norm: Vec<f32>,
    attn: Mla,
    post_norm: Vec<f32>,
    ffn: Ffn,
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Every new position of every sequence.
    All,
    /// The last new position of each sequence (decoding).
    Last,
}

/// One sequence in a batch: its new tokens and its cache (positions continue from the cache).
#[derive(Debug)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

/// Intermediate values of a forward pass, for golden tests and debugging (rows = batch rows).
#[derive(Debug, Default)]
pub struct Trace {
    pub embed: Matrix,
    /// Residual stream after each decoder layer.
    pub layers: Vec<Matrix>,
    pub final_norm: Matrix,
    /// Routing of each MoE layer.
    pub routing: BTreeMap<usize, Routing>,
}

/// Everything but the routed experts.
#[derive(Debug)]
pub struct Backbone {
    cfg: Config,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    lm_head: Linear,
    rope: Rope,
}

/// Opens a model directory: config plus checkpoint.
pub fn open(dir: &Path) -> Result<(Config, Checkpoint)> {
    let cfg = Config::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir, cfg.fp8_block())?;
    Ok((cfg, ckpt))
}

impl Backbone {
    /// Loads every non-routed-expert tensor of the first `num_hidden_layers` layers.
    pub fn load(cfg: &Config, ckpt: &Checkpoint) -> Result<Backbone> {
        let (hid, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let embed = match ckpt.read_weight("model.embed_tokens.weight", &[vocab, hid])? {
            WeightData::Bf16(v) => Embedding::Bf16(v),
            WeightData::F32(v) => Embedding::F32(v),
            _ => Embedding::F32(ckpt.read_f32("model.embed_tokens.weight", &[vocab, hid])?),
        };
        let scale = rope::softmax_scale(cfg);
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|l| -> Result<DecoderLayer> {
                let p = format!("model.layers.{l}");
                let ffn = if cfg.is_moe_layer(l) {
                    let moe = cfg
                        .moe()
                        .ok_or_else(|| ModelError::InvalidConfig("no MoE config".into()))?;
                    let shared = (moe.n_shared_experts > 0)
                        .then(|| {
                            Mlp::load(
                                ckpt,
                                &format!("{p}.mlp.shared_experts"),
                                hid,
                                moe.moe_intermediate_size * moe.n_shared_experts,
                            )
                        })
                        .transpose()?;
                    Ffn::Moe {
                        gate: Gate::load(&moe, hid, ckpt, l)?,
                        shared,
                    }
                } else {
                    Ffn::Dense(Mlp::load(
                        ckpt,
                        &format!("{p}.mlp"),
                        hid,
                        cfg.intermediate_size,
                    )?)
                };
                Ok(DecoderLayer {
                    input_norm: ckpt.read_f32(&format!("{p}.input_layernorm.weight"), &[hid])?,
                    attn: Mla::load(cfg, ckpt, l, scale)?,
                    post_norm: ckpt
                        .read_f32(&format!("{p}.post_attention_layernorm.weight"), &[hid])?,
                    ffn,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head_name = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        Ok(Backbone {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: ckpt.read_f32("model.norm.weight", &[hid])?,
            lm_head: attention::linear(ckpt, head_name, vocab, hid)?,
            rope: Rope::new(cfg),
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn embed_rows(&self, tokens: impl Iterator<Item = u32>, out: &mut Vec<f32>) {
        let hid = self.cfg.hidden_size;
        for t in tokens {
            let start = t as usize * hid;
            match &self.embed {
                Embedding::F32(v) => out.extend_from_slice(&v[start..start + hid]),
                Embedding::Bf16(v) => out.extend(
                    v[start..start + hid]
                        .iter()
                        .map(|&b| f32::from_bits(u32::from(b) << 16)),
                ),
            }
        }
    }

    fn check_inputs(&self, seqs: &[SeqInput<'_>]) -> Result<()> {
        for (i, s) in seqs.iter().enumerate() {
            check_sequence(
                i,
                s.tokens,
                s.cache.len(),
                self.cfg.vocab_size,
                self.cfg.max_position_embeddings,
            )?;
        }
        Ok(())
    }

    /// Runs the new tokens of every sequence through the model, extending each cache, and returns
    /// each sequence's logits (`[positions, vocab]`). On error every cache is left as it was.
    /// The serial layer loop; [`Backbone::forward_with`] can overlap two micro-batches.
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        experts: &dyn ExpertBackend,
        mode: LogitsMode,
        trace: Option<&mut Trace>,
    ) -> Result<Vec<Matrix>> {
        self.forward_with(seqs, experts, mode, trace, Overlap::Off)
    }

    /// [`Backbone::forward`], with the batch split into two interleaved micro-batches where
    /// `overlap` says so ([`crate::overlap`]; never with a `trace`). A dispatch error names rows
    /// of the whole batch either way.
    pub fn forward_with(
        &self,
        seqs: &mut [SeqInput<'_>],
        experts: &dyn ExpertBackend,
        mode: LogitsMode,
        mut trace: Option<&mut Trace>,
        overlap: Overlap,
    ) -> Result<Vec<Matrix>> {
        self.check_inputs(seqs)?;
        experts.begin_step();
        let hid = self.cfg.hidden_size;
        let before: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
        let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let mut positions = Vec::with_capacity(t);
        let mut h = Vec::with_capacity(t * hid);
        for s in seqs.iter() {
            positions.extend(s.cache.len()..s.cache.len() + s.tokens.len());
            self.embed_rows(s.tokens.iter().copied(), &mut h);
        }
        if let Some(tr) = trace.as_deref_mut() {
            tr.embed = Matrix::from_vec(t, hid, h.clone());
        }
        for i in 0..seqs.len() {
            let (done, rest) = seqs.split_at_mut(i);
            let s = &mut rest[0];
            if let Err(e) = s.cache.prepare(s.tokens) {
                for (d, &len) in done.iter_mut().zip(&before) {
                    d.cache.truncate(len);
                }
                return Err(e);
            }
        }
        let (cos, sin) = self.rope.tables(&positions);
        let tokens: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
        let split = match trace {
            Some(_) => None,
            None => overlap.split(experts.is_remote(), &tokens),
        };
        let result = match split {
            None => self
                .layers(
                    seqs,
                    &mut h,
                    (&cos, &sin),
                    experts,
                    trace.as_deref_mut(),
                    &mut Turn::serial(),
                )
                .map(|_| ()),
            Some(k) => crate::overlap::run(self, seqs, &mut h, (&cos, &sin), experts, k),
        };
        let result = result.map(|()| h);
        let mut h = match result {
            Ok(h) => h,
            Err(e) => {
                for (s, &len) in seqs.iter_mut().zip(&before) {
                    s.cache.truncate(len);
                }
                return Err(e);
            }
        };
        for s in seqs.iter_mut() {
            s.cache.commit();
        }

        // Final norm and LM head on the rows that need logits.
        let mut rows = Vec::new();
        let mut start = 0;
        for s in seqs.iter() {
            let n = s.tokens.len();
            match mode {
                LogitsMode::All => rows.extend(start..start + n),
                LogitsMode::Last => rows.push(start + n - 1),
            }
            start += n;
        }
        kernels::rms_norm_rows(&mut h, &self.norm, self.cfg.rms_norm_eps as f32);
        if let Some(tr) = trace {
            tr.final_norm = Matrix::from_vec(t, hid, h.clone());
        }
        let normed = Matrix::from_vec(t, hid, h).gather_rows(&rows);
        let logits = self.lm_head.forward(&normed.data, rows.len());
        let vocab = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(seqs.len());
        let mut offset = 0;
        for s in seqs.iter() {
            let n = if mode == LogitsMode::All {
                s.tokens.len()
            } else {
                1
            };
            out.push(Matrix::from_vec(
                n,
                vocab,
                logits[offset * vocab..(offset + n) * vocab].to_vec(),
            ));
            offset += n;
        }
        Ok(out)
    }
    /// The decoder layers over `seqs` (rows `h`, `[tokens, hidden]`, updated in place; `rope`:
    /// their cos/sin rows), under `turn` (the compute lock of an overlapped group, released while
    /// its remote experts are waited for). `Ok(false)`: stopped early because the other group
    /// failed.
    pub(crate) fn layers(
        &self,
        seqs: &mut [SeqInput<'_>],
        h: &mut [f32],
        (cos, sin): (&[f32], &[f32]),
        experts: &dyn ExpertBackend,
        mut trace: Option<&mut Trace>,
        turn: &mut Turn<'_>,
    ) -> Result<bool> {
        let hid = self.cfg.hidden_size;
        let t = h.len() / hid;
        let eps = self.cfg.rms_norm_eps as f32;
        for (l, layer) in self.layers.iter().enumerate() {
            if turn.stopped() {
                return Ok(false);
            }
            let mut x = h.to_vec();
            kernels::rms_norm_rows(&mut x, &layer.input_norm, eps);
            let mut start = 0;
            let mut slots: Vec<SeqSlot<'_>> = seqs
                .iter_mut()
                .map(|s| {
                    let slot = SeqSlot {
                        start,
                        count: s.tokens.len(),
                        cache: &mut *s.cache,
                    };
                    start += s.tokens.len();
                    slot
                })
                .collect();
            let a = layer
                .attn
                .forward(l, &x, t, &mut slots, &self.rope, (cos, sin));
            for (hv, av) in h.iter_mut().zip(&a) {
                *hv += av;
            }
            let mut x = h.to_vec();
            kernels::rms_norm_rows(&mut x, &layer.post_norm, eps);
            let m = match &layer.ffn {
                Ffn::Dense(mlp) => mlp.forward(&x, t),
                Ffn::Moe { gate, shared } => {
                    let routing = gate.route(&x, t);
                    let xm = Matrix::from_vec(t, hid, x);
                    let pending = experts.dispatch(l, &xm, &routing)?;
                    // The shared expert runs while the routed ones are in flight; the wait
                    // comes after it, on this thread and never inside a rayon job: see
                    // `PendingExperts::wait`. An overlapped group lets the other compute
                    // meanwhile.
                    let shared_out = shared.as_ref().map(|s| s.forward(&xm.data, t));
                    let mut routed = turn.waiting(|| pending.wait())?;
                    if (routed.rows, routed.cols) != (t, hid) {
                        return Err(ModelError::Experts {
                            layer: l,
                            reason: format!(
                                "backend returned [{}, {}], expected [{t}, {hid}]",
                                routed.rows, routed.cols
                            ),
                        });
                    }
                    if let Some(s) = shared_out {
                        for (r, sv) in routed.data.iter_mut().zip(&s) {
                            *r += sv;
                        }
                    }
                    if let Some(tr) = trace.as_deref_mut() {
                        tr.routing.insert(l, routing);
                    }
                    routed.data
                }
            };
            for (hv, mv) in h.iter_mut().zip(&m) {
                *hv += mv;
            }
            if let Some(tr) = trace.as_deref_mut() {
                tr.layers.push(Matrix::from_vec(t, hid, h.to_vec()));
            }
        }
        Ok(true)
    }
}

/// Options for loading a model.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Receives progress after every tensor.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// The single-process engine: backbone plus every routed expert held locally.
#[derive(Debug)]
pub struct Model {
    pub backbone: Backbone,
    pub experts: LocalExperts,
}

impl Model {
    /// Loads everything from a model directory.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let (cfg, mut ckpt) = open(dir)?;
        if let Some(p) = &opts.progress {
            ckpt.set_progress(p.clone());
        }
        let backbone = Backbone::load(&cfg, &ckpt)?;
        let store = ExpertStore::load(&cfg, &ckpt, &ExpertStore::all_pairs(&cfg))?;
        tracing::info!(
            dir = %dir.display(),
            bytes_read = ckpt.bytes_read(),
            experts = store.len(),
            expert_bytes = store.bytes(),
            "model loaded"
        );
        Ok(Model {
            backbone,
            experts: LocalExperts { store },
        })
    }

    /// Bytes a full load reads (for progress bars).
    pub fn load_bytes(dir: &Path) -> Result<u64> {
        let (cfg, ckpt) = open(dir)?;
        Ok(ckpt.selected_bytes(&TensorFilter::All {
            num_layers: cfg.num_hidden_layers,
        }))
    }

    /// The model configuration.
    pub fn config(&self) -> &Config {
        self.backbone.config()
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.config())
    }

    /// [`Backbone::forward`] with the local experts.
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        mode: LogitsMode,
        trace: Option<&mut Trace>,
    ) -> Result<Vec<Matrix>> {
        self.backbone.forward(seqs, &self.experts, mode, trace)
    }
}

/// The checks every forward pass makes of sequence `i`: new tokens, each inside a vocabulary of
/// `vocab`, and `cached` + new within the context length `max_positions`.
pub(crate) fn check_sequence(
    i: usize,
    tokens: &[u32],
    cached: usize,
    vocab: usize,
    max_positions: usize,
) -> Result<()> {
    if tokens.is_empty() {
        return Err(ModelError::InvalidInput(format!(
            "sequence {i} has no new tokens"
        )));
    }
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::InvalidInput(format!(
            "token id {bad} is outside the vocabulary (size {vocab})"
        )));
    }
    let total = cached + tokens.len();
    if total > max_positions {
        return Err(ModelError::InvalidInput(format!(
            "sequence {i} would reach {total} tokens, beyond the context length {max_positions}"
        )));
    }
    Ok(())
}
