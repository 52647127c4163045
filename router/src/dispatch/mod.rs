//! The remote expert backend: for each MoE layer, plan which node computes each (token, expert)
//! ([`plan`]), send every node its tokens once on its stream, concurrently ([`client`]), let the
//! engine compute the shared expert meanwhile, then combine the partial sums. A node that fails,
//! answers with a retryable code, or misses the deadline has its entries re-planned onto other
//! replicas; when none is left the step fails with an error naming the layer, token and expert.

pub mod client;
pub mod plan;

use std::collections::BTreeSet;
use std::time::Duration;

use moe_meta::Placement;
use moe_model::gate::Routing;
use moe_model::{ExpertBackend, Matrix, ModelError, PendingExperts};
use moe_proto::pb::{DispatchRequest, DispatchResponse, Dtype};
use moe_proto::tensor;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tonic::{Code, Status};

pub use client::ExpertClient;
use plan::NodeWork;

/// Dispatch settings.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// Wire dtype of hidden states and partial sums.
    pub wire: Dtype,
    /// Deadline of one node's answer.
    pub timeout: Duration,
    /// Largest gRPC message.
    pub max_message_bytes: usize,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            wire: Dtype::Bf16,
            timeout: Duration::from_secs(30),
            max_message_bytes: moe_proto::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Why a dispatch failed.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(
        "no live replica of expert {expert} (layer {layer}, token {token}); last failure: {last}"
    )]
    NoReplica {
        layer: usize,
        token: usize,
        expert: usize,
        last: String,
    },
    #[error("node {addr} rejected layer {layer}: {code:?}: {message}")]
    Rejected {
        addr: String,
        layer: usize,
        code: Code,
        message: String,
    },
    #[error("node {addr} returned {got} bytes for {tokens} tokens at layer {layer}")]
    BadReply {
        addr: String,
        layer: usize,
        tokens: usize,
        got: usize,
    },
    #[error("not every node connected within {0:?}: {1}")]
    NotReady(Duration, String),
    #[error("node {addr} does not match the placement: {why}")]
    Mismatch { addr: String, why: String },
}

impl DispatchError {
    fn into_model(self, layer: usize) -> ModelError {
        ModelError::Experts {
            layer,
            reason: self.to_string(),
        }
    }
}

/// Routed experts on expert nodes.
#[derive(Debug)]
pub struct RemoteExperts {
    handle: Handle,
    clients: Vec<ExpertClient>,
    placement: Placement,
    hidden: usize,
    opts: DispatchOptions,
}

struct InFlight {
    work: NodeWork,
    rx: oneshot::Receiver<Result<DispatchResponse, Status>>,
    sent: std::time::Instant,
}

impl RemoteExperts {
    /// Connects to the placement's nodes at `addrs` (index = node index) on `handle`'s runtime.
    pub fn new(
        placement: Placement,
        addrs: Vec<String>,
        hidden: usize,
        opts: DispatchOptions,
        handle: Handle,
    ) -> RemoteExperts {
        let _guard = handle.enter();
        let clients = addrs
            .into_iter()
            .map(|a| ExpertClient::spawn(a, opts.max_message_bytes))
            .collect();
        RemoteExperts {
            handle,
            clients,
            placement,
            hidden,
            opts,
        }
    }

    /// The node clients, by node index.
    pub fn clients(&self) -> &[ExpertClient] {
        &self.clients
    }

    /// Waits until every node's stream is up and each node hosts what the placement says.
    pub async fn ready(
        &self,
        within: Duration,
        fingerprint: Option<&str>,
    ) -> Result<(), DispatchError> {
        let deadline = tokio::time::Instant::now() + within;
        while self.clients.iter().any(|c| !c.is_up()) {
            if tokio::time::Instant::now() >= deadline {
                let down: Vec<&str> = self
                    .clients
                    .iter()
                    .filter(|c| !c.is_up())
                    .map(|c| c.addr())
                    .collect();
                return Err(DispatchError::NotReady(
                    within,
                    format!("down: {}", down.join(", ")),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (n, c) in self.clients.iter().enumerate() {
            let info = c.info().await.map_err(|s| DispatchError::Mismatch {
                addr: c.addr().into(),
                why: s.to_string(),
            })?;
            let mismatch = |why: String| DispatchError::Mismatch {
                addr: c.addr().into(),
                why,
            };
            if let Some(fp) = fingerprint
                && info.model_fingerprint != fp
            {
                return Err(mismatch(format!(
                    "model fingerprint {} differs from {fp}",
                    info.model_fingerprint
                )));
            }
            if info.hidden_size as usize != self.hidden {
                return Err(mismatch(format!(
                    "hidden size {} differs from {}",
                    info.hidden_size, self.hidden
                )));
            }
            let hosted: BTreeSet<(usize, usize)> = info
                .hosted
                .iter()
                .flat_map(|r| {
                    r.experts
                        .iter()
                        .map(move |&e| (r.layer as usize, e as usize))
                })
                .collect();
            for &layer in &info.moe_layers {
                for expert in 0..info.n_routed_experts as usize {
                    if self.placement.replicas(layer as usize, expert).contains(&n)
                        && !hosted.contains(&(layer as usize, expert))
                    {
                        return Err(mismatch(format!(
                            "it does not host expert {expert} of layer {layer}"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn send(&self, layer: usize, x: &Matrix, work: NodeWork, parent: &tracing::Span) -> InFlight {
        let span = tracing::info_span!(parent: parent, "moe.dispatch.node", node = work.node, tokens = work.tokens.len());
        let rows = x.gather_rows(&work.tokens);
        let req = DispatchRequest {
            request_id: 0,
            layer: layer as u32,
            placement_version: self.placement.version,
            num_tokens: work.tokens.len() as u32,
            dtype: self.opts.wire as i32,
            hidden: tensor::encode(&rows.data, self.opts.wire),
            offsets: work.offsets.clone(),
            expert_ids: work.experts.clone(),
            weights: tensor::encode(&work.weights, Dtype::F32),
            traceparent: moe_meta::telemetry::traceparent(&span),
        };
        InFlight {
            rx: self.clients[work.node].send(req),
            work,
            sent: std::time::Instant::now(),
        }
    }
}

/// A layer's dispatch in flight.
struct Pending<'a> {
    experts: &'a RemoteExperts,
    layer: usize,
    x: &'a Matrix,
    inflight: Vec<InFlight>,
    span: tracing::Span,
}

fn retryable(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument | Code::OutOfRange | Code::Unimplemented
    )
}

impl ExpertBackend for RemoteExperts {
    fn dispatch<'a>(
        &'a self,
        layer: usize,
        x: &'a Matrix,
        routing: &'a Routing,
    ) -> moe_model::Result<Box<dyn PendingExperts + 'a>> {
        let span = tracing::info_span!("moe.dispatch", layer, tokens = x.rows);
        let entries = plan::entries(routing);
        let works = plan::plan(&self.placement, layer, &entries, |n| {
            self.clients[n].is_up()
        })
        .map_err(|u| {
            DispatchError::NoReplica {
                layer,
                token: u.token,
                expert: u.expert,
                last: "every replica is down".into(),
            }
            .into_model(layer)
        })?;
        let inflight = works
            .into_iter()
            .map(|w| self.send(layer, x, w, &span))
            .collect();
        Ok(Box::new(Pending {
            experts: self,
            layer,
            x,
            inflight,
            span,
        }))
    }
}

impl PendingExperts for Pending<'_> {
    fn wait(self: Box<Self>) -> moe_model::Result<Matrix> {
        let Pending {
            experts,
            layer,
            x,
            mut inflight,
            span,
        } = *self;
        let _enter = span.enter();
        let hidden = experts.hidden;
        let size = tensor::dtype_size(experts.opts.wire);
        let mut out = Matrix::zeros(x.rows, hidden);
        let mut excluded: BTreeSet<usize> = BTreeSet::new();
        let mut last = String::new();
        for _attempt in 0..=experts.clients.len() {
            let timeout = experts.opts.timeout;
            let mut results: Vec<(NodeWork, Result<DispatchResponse, Status>)> =
                experts.handle.block_on(async {
                    let waits = inflight.drain(..).map(|f| async move {
                        let r = match tokio::time::timeout(timeout, f.rx).await {
                            Ok(Ok(r)) => r,
                            Ok(Err(_)) => Err(Status::unavailable("client actor stopped")),
                            Err(_) => Err(Status::deadline_exceeded(format!(
                                "no answer within {timeout:?}"
                            ))),
                        };
                        let addr = experts.clients[f.work.node].addr().to_string();
                        metrics::histogram!(crate::metrics::DISPATCH_LATENCY, "node" => addr)
                            .record(f.sent.elapsed().as_secs_f64());
                        (f.work, r)
                    });
                    futures::future::join_all(waits).await
                });
            results.sort_by_key(|(w, _)| w.node);
            let mut retry: Vec<(usize, u32, f32)> = Vec::new();
            for (work, res) in results {
                let addr = experts.clients[work.node].addr().to_string();
                let status = match res {
                    Ok(resp) if resp.code == 0 => {
                        if resp.output.len() != work.tokens.len() * hidden * size {
                            return Err(DispatchError::BadReply {
                                addr,
                                layer,
                                tokens: work.tokens.len(),
                                got: resp.output.len(),
                            }
                            .into_model(layer));
                        }
                        for (i, &tok) in work.tokens.iter().enumerate() {
                            let row = &resp.output[i * hidden * size..(i + 1) * hidden * size];
                            tensor::accumulate(out.row_mut(tok), row, experts.opts.wire);
                        }
                        continue;
                    }
                    Ok(resp) => Status::new(Code::from_i32(resp.code), resp.message),
                    Err(status) => status,
                };
                if !retryable(status.code()) {
                    return Err(DispatchError::Rejected {
                        addr,
                        layer,
                        code: status.code(),
                        message: status.message().into(),
                    }
                    .into_model(layer));
                }
                tracing::warn!(node = %addr, layer, code = ?status.code(), message = status.message(), "re-routing a node's tokens");
                metrics::counter!(crate::metrics::DISPATCH_FAILOVERS, "node" => addr.clone())
                    .increment(1);
                last = format!("node {addr}: {:?}: {}", status.code(), status.message());
                excluded.insert(work.node);
                for (t, &tok) in work.tokens.iter().enumerate() {
                    for e in work.offsets[t] as usize..work.offsets[t + 1] as usize {
                        retry.push((tok, work.experts[e], work.weights[e]));
                    }
                }
            }
            if retry.is_empty() {
                return Ok(out);
            }
            retry.sort_by_key(|&(t, e, _)| (t, e));
            let works = plan::plan(&experts.placement, layer, &retry, |n| {
                !excluded.contains(&n) && experts.clients[n].is_up()
            })
            .map_err(|u| {
                DispatchError::NoReplica {
                    layer,
                    token: u.token,
                    expert: u.expert,
                    last: last.clone(),
                }
                .into_model(layer)
            })?;
            inflight = works
                .into_iter()
                .map(|w| experts.send(layer, x, w, &span))
                .collect();
        }
        Err(DispatchError::NoReplica {
            layer,
            token: 0,
            expert: 0,
            last,
        }
        .into_model(layer))
    }
}
