//! The DeepSeek-V4 decoder over a batch of sequences with decode caches: embeddings repeated into
//! `hc_mult` residual streams, decoder layers (hyper-connection → attention → hyper-connection →
//! MoE), the HC head, final norm and LM head.
//!
//! [`V4Backbone`] is everything but the routed experts (what a router loads); routed experts come
//! from the same [`ExpertBackend`] seam as V3, with the same [`Routing`], so the wire does not
//! change. The gate receives the input token ids (hash layers route by them). [`V4Model`] pairs a
//! backbone with local experts. Layer:
//! `post,comb,c = attn_hc(X); X = post ⊗ attn(attn_norm(c)) + combᵀX`, then the same with
//! `ffn_hc`, `ffn_norm` and `MoE(·) = Σ w_k E_k + shared`; logits = `head(norm(hc_head(X)))`.
//! Reference: transformers `DeepseekV4Model`, `DeepseekV4DecoderLayer`.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use super::attention::{AttnTrace, V4Attention};
use super::cache::{V4Cache, V4Mark};
use super::gate::V4Gate;
use super::hc::{self, HcHead, HyperConn};
use super::names::Names;
use super::rope::{RopeTable, V4Rope};
use super::{AttnLayerType, V4Config, experts};
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::gate::Routing;
use crate::kernels::{self, Linear};
use crate::mlp::Mlp;
use crate::model::{LogitsMode, check_sequence};
use crate::moe::{ExpertBackend, LocalExperts};
use crate::tensor::Matrix;

#[derive(Debug)]
struct V4Layer {
    attn_hc: HyperConn,
    attn_norm: Vec<f32>,
    attn: V4Attention,
    ffn_hc: HyperConn,
    ffn_norm: Vec<f32>,
    gate: V4Gate,
    shared: Mlp,
}

/// Intermediate values of a forward pass, for golden tests and debugging.
#[derive(Debug, Default)]
pub struct V4Trace {
    pub embed: Matrix,
    /// The `hc_mult` residual streams after each layer, `[tokens, hc_mult·hidden]`.
    pub layers: Vec<Matrix>,
    /// The streams collapsed by the HC head (before the final norm).
    pub hc_head: Matrix,
    pub final_norm: Matrix,
    /// Routing of each layer.
    pub routing: BTreeMap<usize, Routing>,
    /// Compressed KV entries of each CSA/HCA layer, `[entries, head_dim]`.
    pub compressed: BTreeMap<usize, Matrix>,
    /// CSA indexer picks per layer and query, in score order.
    pub picks: BTreeMap<usize, Vec<Vec<usize>>>,
}

/// Everything but the routed experts.
#[derive(Debug)]
pub struct V4Backbone {
    cfg: V4Config,
    embed: Vec<f32>,
    layers: Vec<V4Layer>,
    hc_head: HcHead,
    norm: Vec<f32>,
    head: Linear,
    main_rope: V4Rope,
    compress_rope: V4Rope,
}

/// Opens a V4 model directory: config plus checkpoint.
pub fn open(dir: &Path) -> Result<(V4Config, Checkpoint)> {
    let cfg = V4Config::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir, None)?;
    Ok((cfg, ckpt))
}

impl V4Backbone {
    /// Loads every non-routed-expert tensor of the `num_hidden_layers` layers.
    pub fn load(cfg: &V4Config, ckpt: &Checkpoint) -> Result<V4Backbone> {
        let names = Names::detect(ckpt)?;
        let (hid, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|l| -> Result<V4Layer> {
                Ok(V4Layer {
                    attn_hc: HyperConn::load(cfg, ckpt, &names, l, "attn")?,
                    attn_norm: ckpt.read_f32(&names.layer(l, "attn_norm.weight"), &[hid])?,
                    attn: V4Attention::load(cfg, ckpt, &names, l)?,
                    ffn_hc: HyperConn::load(cfg, ckpt, &names, l, "ffn")?,
                    ffn_norm: ckpt.read_f32(&names.layer(l, "ffn_norm.weight"), &[hid])?,
                    gate: V4Gate::load(cfg, ckpt, &names, l)?,
                    shared: Mlp::load_clamped(
                        ckpt,
                        &names.layer(l, "ffn.shared_experts"),
                        hid,
                        cfg.moe_intermediate_size,
                        cfg.swiglu_limit as f32,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_name = names.global("embed.weight");
        let head_name = if cfg.tie_word_embeddings {
            embed_name.clone()
        } else {
            names.global("head.weight")
        };
        let rd = cfg.qk_rope_head_dim;
        Ok(V4Backbone {
            cfg: cfg.clone(),
            embed: ckpt.read_f32(&embed_name, &[vocab, hid])?,
            layers,
            hc_head: HcHead::load(cfg, ckpt, &names)?,
            norm: ckpt.read_f32(&names.global("norm.weight"), &[hid])?,
            head: Linear::new(ckpt.read_weight(&head_name, &[vocab, hid])?, vocab, hid),
            main_rope: V4Rope::new(&cfg.rope_parameters.main, rd),
            compress_rope: V4Rope::new(&cfg.rope_parameters.compress, rd),
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &V4Config {
        &self.cfg
    }

    fn check(&self, seqs: &[V4SeqInput<'_>]) -> Result<()> {
        for (i, s) in seqs.iter().enumerate() {
            check_sequence(
                i,
                s.tokens,
                s.cache.len(),
                self.cfg.vocab_size,
                self.cfg.max_position_embeddings,
            )?;
            if s.cache.layers.len() != self.layers.len() {
                return Err(ModelError::InvalidInput(format!(
                    "sequence {i}'s cache has {} layers, the model {}",
                    s.cache.layers.len(),
                    self.layers.len()
                )));
            }
        }
        Ok(())
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> V4Cache {
        V4Cache::new(&self.cfg)
    }

    /// Runs the new tokens of every sequence (positions continue from each cache), extending
    /// the caches, and returns each sequence's logits. Every row is computed independently of
    /// the others except inside its own sequence's attention, so results do not depend on the
    /// batch. On error every cache is left as it was.
    pub fn forward(
        &self,
        seqs: &mut [V4SeqInput<'_>],
        experts: &dyn ExpertBackend,
        mode: LogitsMode,
        trace: Option<&mut V4Trace>,
    ) -> Result<Vec<Matrix>> {
        self.check(seqs)?;
        let marks: Vec<V4Mark> = seqs.iter().map(|s| s.cache.mark()).collect();
        let result = self.run(seqs, experts, mode, trace);
        match result {
            Ok(out) => {
                let (window, row) = (self.cfg.sliding_window.saturating_sub(1), self.cfg.head_dim);
                for s in seqs.iter_mut() {
                    s.cache.commit(s.tokens.len(), window, row);
                }
                Ok(out)
            }
            Err(e) => {
                for (s, mark) in seqs.iter_mut().zip(&marks) {
                    s.cache.rollback(mark);
                }
                Err(e)
            }
        }
    }

    /// One whole sequence from an empty cache, logits at every position.
    pub fn forward_full(
        &self,
        tokens: &[u32],
        experts: &dyn ExpertBackend,
        trace: Option<&mut V4Trace>,
    ) -> Result<Matrix> {
        let mut cache = self.new_cache();
        let mut seqs = [V4SeqInput {
            tokens,
            cache: &mut cache,
        }];
        let mut out = self.forward(&mut seqs, experts, LogitsMode::All, trace)?;
        Ok(out.remove(0))
    }

    fn run(
        &self,
        seqs: &mut [V4SeqInput<'_>],
        experts: &dyn ExpertBackend,
        mode: LogitsMode,
        mut trace: Option<&mut V4Trace>,
    ) -> Result<Vec<Matrix>> {
        experts.begin_step();
        let (hid, n) = (self.cfg.hidden_size, self.cfg.hc_mult);
        let eps = self.cfg.rms_norm_eps as f32;
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let t = tokens.len();
        // [t, n·hidden]: the embedding repeated into every stream.
        let mut x = Vec::with_capacity(t * n * hid);
        for &tok in &tokens {
            let row = &self.embed[tok as usize * hid..][..hid];
            for _ in 0..n {
                x.extend_from_slice(row);
            }
        }
        if let Some(tr) = trace.as_deref_mut() {
            let e: Vec<f32> = tokens
                .iter()
                .flat_map(|&tok| self.embed[tok as usize * hid..][..hid].iter().copied())
                .collect();
            tr.embed = Matrix::from_vec(t, hid, e);
        }
        // Per sequence: (first row, rows, first position, main rope, compress rope).
        let mut start = 0;
        let spans: Vec<(usize, usize, usize, RopeTable, RopeTable)> = seqs
            .iter()
            .map(|s| {
                let (p0, len) = (s.cache.len(), s.tokens.len());
                let span = (
                    start,
                    len,
                    p0,
                    self.main_rope.table(p0..p0 + len),
                    self.compress_rope.table(p0..p0 + len),
                );
                start += len;
                span
            })
            .collect();
        // Compressed entries and indexer picks are traced for single-sequence passes only.
        let record_attn = trace.is_some() && spans.len() == 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let (mut a_in, mix) = layer.attn_hc.pre(&x, t);
            kernels::rms_norm_rows(&mut a_in, &layer.attn_norm, eps);
            let mut a = Vec::with_capacity(t * hid);
            let mut at = AttnTrace::default();
            for (s, (first, len, p0, main, compress)) in seqs.iter_mut().zip(&spans) {
                let rope = match layer.attn.kind {
                    AttnLayerType::Sliding => main,
                    _ => compress,
                };
                let tr = record_attn.then_some(&mut at);
                a.extend(layer.attn.forward(
                    &a_in[first * hid..(first + len) * hid],
                    (*len, *p0),
                    &mut s.cache.layers[l],
                    rope,
                    compress,
                    &self.compress_rope,
                    tr,
                ));
            }
            x = hc::expand(&mix, &a, &x, n);

            let (mut f_in, mix) = layer.ffn_hc.pre(&x, t);
            kernels::rms_norm_rows(&mut f_in, &layer.ffn_norm, eps);
            let routing = layer.gate.route(&f_in, &tokens)?;
            let xm = Matrix::from_vec(t, hid, f_in);
            let pending = experts.dispatch(l, &xm, &routing)?;
            // The shared expert runs while the routed ones are in flight; the wait comes after
            // it, on this thread (see `PendingExperts::wait`).
            let shared = layer.shared.forward(&xm.data, t);
            let mut m = pending.wait()?;
            if (m.rows, m.cols) != (t, hid) {
                return Err(ModelError::Experts {
                    layer: l,
                    reason: format!(
                        "backend returned [{}, {}], expected [{t}, {hid}]",
                        m.rows, m.cols
                    ),
                });
            }
            for (r, s) in m.data.iter_mut().zip(&shared) {
                *r += s;
            }
            x = hc::expand(&mix, &m.data, &x, n);
            if let Some(tr) = trace.as_deref_mut() {
                tr.layers.push(Matrix::from_vec(t, n * hid, x.clone()));
                tr.routing.insert(l, routing);
                if let Some(e) = at.compressed {
                    let rows = e.len() / self.cfg.head_dim;
                    tr.compressed
                        .insert(l, Matrix::from_vec(rows, self.cfg.head_dim, e));
                }
                if let Some(p) = at.picks {
                    tr.picks.insert(l, p);
                }
            }
        }
        // HC head, final norm and LM head on the rows that need logits.
        let rows: Vec<usize> = spans
            .iter()
            .flat_map(|(first, len, ..)| match mode {
                LogitsMode::All => *first..first + len,
                LogitsMode::Last => first + len - 1..first + len,
            })
            .collect();
        let mut y = self.hc_head.forward(&x, t);
        if let Some(tr) = trace.as_deref_mut() {
            tr.hc_head = Matrix::from_vec(t, hid, y.clone());
        }
        kernels::rms_norm_rows(&mut y, &self.norm, eps);
        if let Some(tr) = trace {
            tr.final_norm = Matrix::from_vec(t, hid, y.clone());
        }
        let picked = Matrix::from_vec(t, hid, y).gather_rows(&rows);
        let logits = self.head.forward(&picked.data, rows.len());
        let vocab = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(seqs.len());
        let mut offset = 0;
        for (_, len, ..) in &spans {
            let k = if mode == LogitsMode::All { *len } else { 1 };
            out.push(Matrix::from_vec(
                k,
                vocab,
                logits[offset * vocab..(offset + k) * vocab].to_vec(),
            ));
            offset += k;
        }
        Ok(out)
    }
}

/// One sequence in a batch: its new tokens and its cache (positions continue from the cache).
#[derive(Debug)]
pub struct V4SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut V4Cache,
}

/// The single-process V4 engine: backbone plus every routed expert held locally.
#[derive(Debug)]
pub struct V4Model {
    pub backbone: V4Backbone,
    pub experts: LocalExperts,
}

impl V4Model {
    /// Loads everything from a model directory.
    pub fn load(dir: &Path) -> Result<V4Model> {
        let (cfg, ckpt) = open(dir)?;
        let backbone = V4Backbone::load(&cfg, &ckpt)?;
        let store = experts::load_experts(&cfg, &ckpt, &cfg.all_expert_pairs())?;
        Ok(V4Model {
            backbone,
            experts: LocalExperts { store },
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &V4Config {
        self.backbone.config()
    }

    /// [`V4Backbone::forward`] with the local experts.
    pub fn forward(
        &self,
        seqs: &mut [V4SeqInput<'_>],
        mode: LogitsMode,
        trace: Option<&mut V4Trace>,
    ) -> Result<Vec<Matrix>> {
        self.backbone.forward(seqs, &self.experts, mode, trace)
    }

    /// [`V4Backbone::forward_full`] with the local experts.
    pub fn forward_full(&self, tokens: &[u32], trace: Option<&mut V4Trace>) -> Result<Matrix> {
        self.backbone.forward_full(tokens, &self.experts, trace)
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> V4Cache {
        self.backbone.new_cache()
    }
}
