//! The remote expert backend: for each MoE layer, plan which node computes each (token, expert)
//! ([`plan`]), send every node its tokens once on its stream, concurrently ([`client`]), let the
//! engine compute the shared expert meanwhile, then combine the partial sums. A node that fails,
//! answers with a retryable code, or misses the deadline has its entries re-planned onto other
//! replicas. When no live replica is left, the step waits (bounded by `replacement_wait`) for a
//! new placement from the coordinator ([`crate::cluster::membership`]) and re-plans; only then does it fail, naming
//! the layer, token and expert.

pub mod client;
pub mod load;
pub mod plan;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use moe_meta::Placement;
use moe_model::gate::Routing;
use moe_model::{ExpertBackend, Matrix, ModelError, PendingExperts};
use moe_proto::pb::{DispatchRequest, DispatchResponse, Dtype};
use moe_proto::tensor;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use tonic::{Code, Status};

pub use client::ExpertClient;
pub use load::LoadWindow;
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
    /// How long a step whose experts have no live replica waits for a new placement.
    pub replacement_wait: Duration,
    /// Fewest tokens of one expert in one step that are split over its replicas (fewer go to
    /// one replica, so its weights are read once).
    pub split_min_tokens: usize,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            wire: Dtype::Bf16,
            timeout: Duration::from_secs(30),
            max_message_bytes: moe_proto::DEFAULT_MAX_MESSAGE_BYTES,
            replacement_wait: Duration::from_secs(30),
            split_min_tokens: plan::DEFAULT_SPLIT_MIN_TOKENS,
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
    #[error("no placement yet (waited {0:?} for the coordinator)")]
    NoPlacement(Duration),
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
    #[error("node {addr} returned a non-finite partial sum for token {token} at layer {layer}")]
    NonFinite {
        addr: String,
        layer: usize,
        token: usize,
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

/// A placement with a client per node (index = placement node index).
#[derive(Debug)]
pub struct Routes {
    pub placement: Option<Placement>,
    pub clients: Vec<ExpertClient>,
}

impl Routes {
    /// Addresses of the nodes whose stream is down.
    pub fn down(&self) -> Vec<&str> {
        self.clients
            .iter()
            .filter(|c| !c.is_up())
            .map(|c| c.addr())
            .collect()
    }
}

/// Routed experts on expert nodes.
#[derive(Debug)]
pub struct RemoteExperts {
    handle: Handle,
    hidden: usize,
    opts: DispatchOptions,
    routes: RwLock<Arc<Routes>>,
    by_addr: Mutex<HashMap<String, ExpertClient>>,
    version: watch::Sender<u64>,
    /// Tokens routed per (layer, expert), for load-driven placement.
    pub loads: LoadWindow,
    steps: AtomicU64,
    /// Whether node clients dial their nodes (false: a router with no data plane).
    connect: bool,
}

struct InFlight {
    work: NodeWork,
    rx: oneshot::Receiver<Result<DispatchResponse, Status>>,
    sent: std::time::Instant,
    client: ExpertClient,
    /// The client span of this node's round trip (`moe.dispatch.node`), ended on its answer.
    span: tracing::Span,
}

impl RemoteExperts {
    /// Routes by a static `placement` to the nodes at `addrs` (index = node index).
    pub fn new(
        placement: Placement,
        addrs: Vec<String>,
        hidden: usize,
        opts: DispatchOptions,
        handle: Handle,
    ) -> RemoteExperts {
        let r = RemoteExperts::empty(hidden, opts, handle);
        r.install(Some(placement), addrs);
        r
    }

    /// No placement yet: dispatches wait until [`RemoteExperts::update`] brings one.
    pub fn empty(hidden: usize, opts: DispatchOptions, handle: Handle) -> RemoteExperts {
        RemoteExperts {
            handle,
            hidden,
            opts,
            routes: RwLock::new(Arc::new(Routes {
                placement: None,
                clients: Vec::new(),
            })),
            by_addr: Mutex::new(HashMap::new()),
            version: watch::channel(0).0,
            loads: LoadWindow::new(Duration::from_secs(60), 12),
            steps: AtomicU64::new(0),
            connect: true,
        }
    }

    /// Like [`RemoteExperts::empty`], but node clients never dial their nodes: the control
    /// plane of a router (following placements, publishing loads) without its data plane, for
    /// the fleet simulator. Every dispatch finds every node down.
    pub fn unconnected(hidden: usize, opts: DispatchOptions, handle: Handle) -> RemoteExperts {
        RemoteExperts {
            connect: false,
            ..RemoteExperts::empty(hidden, opts, handle)
        }
    }

    fn install(&self, placement: Option<Placement>, addrs: Vec<String>) {
        let _guard = self.handle.enter();
        let clients: Vec<ExpertClient> = {
            let mut cache = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
            addrs
                .iter()
                .map(|a| {
                    cache
                        .entry(a.clone())
                        .or_insert_with(|| {
                            crate::metrics::new_node(a);
                            match self.connect {
                                true => ExpertClient::spawn(a.clone(), self.opts.max_message_bytes),
                                false => ExpertClient::unconnected(
                                    a.clone(),
                                    self.opts.max_message_bytes,
                                ),
                            }
                        })
                        .clone()
                })
                .collect()
        };
        let v = placement.as_ref().map_or(0, |p| p.version);
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Routes { placement, clients });
        metrics::gauge!(crate::metrics::PLACEMENT_VERSION).set(v as f64);
        self.version.send_replace(v);
    }

    /// Switches to a new placement; node addresses come from the placement's entries.
    pub fn update(&self, placement: Placement) {
        let addrs = placement
            .nodes
            .iter()
            .map(|n| n.address.clone().unwrap_or_default())
            .collect();
        tracing::info!(
            version = placement.version,
            nodes = placement.nodes.len(),
            "placement switched"
        );
        self.install(Some(placement), addrs);
    }

    /// The current routes.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The placement version routed with (0: none or static).
    pub fn placement_version(&self) -> u64 {
        *self.version.borrow()
    }

    /// The current node clients, by node index.
    pub fn clients(&self) -> Vec<ExpertClient> {
        self.routes().clients.clone()
    }

    /// Waits until the routes change from version `seen`, up to `within`.
    fn wait_for_new_routes(&self, seen: u64, within: Duration) -> bool {
        let mut rx = self.version.subscribe();
        self.handle.block_on(async {
            tokio::time::timeout(within, rx.wait_for(|v| *v != seen))
                .await
                .is_ok_and(|r| r.is_ok())
        })
    }

    /// Waits until every node's stream is up and each node hosts what the placement says.
    pub async fn ready(
        &self,
        within: Duration,
        fingerprint: Option<&str>,
    ) -> Result<(), DispatchError> {
        let deadline = tokio::time::Instant::now() + within;
        let routes = self.routes();
        while routes.clients.iter().any(|c| !c.is_up()) {
            if tokio::time::Instant::now() >= deadline {
                return Err(DispatchError::NotReady(
                    within,
                    format!("down: {}", routes.down().join(", ")),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Some(placement) = &routes.placement else {
            return Ok(());
        };
        for (n, c) in routes.clients.iter().enumerate() {
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
                    if placement.replicas(layer as usize, expert).contains(&n)
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

    fn send(
        &self,
        routes: &Routes,
        layer: usize,
        x: &Matrix,
        work: NodeWork,
        parent: &tracing::Span,
    ) -> InFlight {
        let client = routes.clients[work.node].clone();
        let hidden =
            tensor::encode_rows(&x.data, x.cols, work.tokens.iter().copied(), self.opts.wire);
        let span = if moe_meta::telemetry::is_sampled(parent) {
            tracing::debug_span!(parent: parent, "moe.dispatch.node", otel.kind = "client",
                otel.status_code = tracing::field::Empty, rpc.system = "grpc",
                rpc.method = "moe.ExpertService/Dispatch", server.address = client.addr(),
                moe.node = client.addr(), moe.layer = layer, moe.tokens = work.tokens.len(),
                moe.experts = work.experts.len(), moe.bytes = hidden.len())
        } else {
            tracing::Span::none()
        };
        let req = DispatchRequest {
            request_id: 0,
            layer: layer as u32,
            placement_version: routes.placement.as_ref().map_or(0, |p| p.version),
            num_tokens: work.tokens.len() as u32,
            dtype: self.opts.wire as i32,
            hidden,
            offsets: work.offsets.clone(),
            expert_ids: work.experts.clone(),
            weights: tensor::encode(&work.weights, Dtype::F32),
            traceparent: moe_meta::telemetry::traceparent(&span),
        };
        let node = client.addr().to_string();
        metrics::counter!(crate::metrics::DISPATCH_PAIRS, "node" => node.clone())
            .increment(work.experts.len() as u64);
        metrics::counter!(crate::metrics::DISPATCH_BYTES, "node" => node.clone(), "direction" => "sent")
            .increment(req.hidden.len() as u64);
        metrics::gauge!(crate::metrics::DISPATCH_IN_FLIGHT, "node" => node).increment(1.0);
        InFlight {
            rx: client.send(req),
            work,
            sent: std::time::Instant::now(),
            client,
            span,
        }
    }

    /// Plans `entries` on the current routes, waiting for a new placement (bounded) while some
    /// expert has no usable replica, then sends.
    fn plan_and_send(
        &self,
        layer: usize,
        x: &Matrix,
        entries: &[(usize, u32, f32)],
        excluded: &BTreeSet<String>,
        last: &str,
        span: &tracing::Span,
    ) -> Result<Vec<InFlight>, DispatchError> {
        let deadline = std::time::Instant::now() + self.opts.replacement_wait;
        let seed = self.steps.fetch_add(1, Ordering::Relaxed);
        let mut warned = false;
        loop {
            let routes = self.routes();
            let seen = routes.placement.as_ref().map_or(0, |p| p.version);
            let outcome = match &routes.placement {
                None => Err(DispatchError::NoPlacement(self.opts.replacement_wait)),
                Some(p) => plan::plan(p, layer, entries, seed, self.opts.split_min_tokens, |n| {
                    routes.clients[n].is_up() && !excluded.contains(routes.clients[n].addr())
                })
                .map_err(|u| DispatchError::NoReplica {
                    layer,
                    token: u.token,
                    expert: u.expert,
                    last: if last.is_empty() {
                        "every replica is down".into()
                    } else {
                        last.to_string()
                    },
                }),
            };
            match outcome {
                Ok(works) => {
                    return Ok(works
                        .into_iter()
                        .map(|w| self.send(&routes, layer, x, w, span))
                        .collect());
                }
                Err(e) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(e);
                    }
                    if !warned {
                        tracing::warn!(layer, error = %e, "waiting for a replica to come up or a new placement");
                        warned = true;
                    }
                    // Wake on a new placement, or re-check soon: a replica's stream may reconnect.
                    self.wait_for_new_routes(seen, left.min(Duration::from_millis(50)));
                }
            }
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
        let span = tracing::debug_span!("moe.dispatch", moe.layer = layer, moe.tokens = x.rows);
        let entries = plan::entries(routing);
        self.loads.record(layer, &entries);
        let inflight = self
            .plan_and_send(layer, x, &entries, &BTreeSet::new(), "", &span)
            .map_err(|e| e.into_model(layer))?;
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
        let answer = tensor::answer_dtype(experts.opts.wire);
        let size = tensor::dtype_size(answer);
        let mut out = Matrix::zeros(x.rows, hidden);
        let mut excluded: BTreeSet<String> = BTreeSet::new();
        let mut stale: HashMap<String, usize> = HashMap::new();
        let mut last = String::new();
        loop {
            let timeout = experts.opts.timeout;
            let mut results: Vec<(NodeWork, ExpertClient, Result<DispatchResponse, Status>)> = experts.handle.block_on(async {
                let waits = inflight.drain(..).map(|f| async move {
                    let r = match tokio::time::timeout(timeout, f.rx).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => Err(Status::unavailable("client actor stopped")),
                        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {timeout:?}"))),
                    };
                    let node = f.client.addr().to_string();
                    metrics::histogram!(crate::metrics::DISPATCH_LATENCY, "node" => node.clone())
                        .record(f.sent.elapsed().as_secs_f64());
                    metrics::gauge!(crate::metrics::DISPATCH_IN_FLIGHT, "node" => node.clone()).decrement(1.0);
                    if let Ok(resp) = &r {
                        metrics::counter!(crate::metrics::DISPATCH_BYTES, "node" => node, "direction" => "received")
                            .increment(resp.output.len() as u64);
                    }
                    if !matches!(&r, Ok(resp) if resp.code == 0) {
                        f.span.record("otel.status_code", "error");
                    }
                    drop(f.span);
                    (f.work, f.client, r)
                });
                futures::future::join_all(waits).await
            });
            results.sort_by(|a, b| a.1.addr().cmp(b.1.addr()));
            let mut retry: Vec<(usize, u32, f32)> = Vec::new();
            for (work, client, res) in results {
                let addr = client.addr().to_string();
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
                        // One pass: a non-finite value fails the whole step, so `out` (partly
                        // summed by then) is never used.
                        for (i, &tok) in work.tokens.iter().enumerate() {
                            let row = &resp.output[i * hidden * size..(i + 1) * hidden * size];
                            if tensor::accumulate(out.row_mut(tok), row, answer).is_err() {
                                return Err(DispatchError::NonFinite {
                                    addr,
                                    layer,
                                    token: tok,
                                }
                                .into_model(layer));
                            }
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
                // A node that is down or failing is avoided for the rest of the step. One that
                // disagrees with our placement (FailedPrecondition: a switch in progress) is
                // retried on the current routes, and avoided only if it keeps disagreeing.
                let disagreements = stale.entry(addr.clone()).or_default();
                *disagreements += 1;
                if status.code() != Code::FailedPrecondition || *disagreements > 3 {
                    excluded.insert(addr);
                }
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
            inflight = experts
                .plan_and_send(layer, x, &retry, &excluded, &last, &span)
                .map_err(|e| e.into_model(layer))?;
        }
    }
}
