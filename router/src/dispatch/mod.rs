//! The remote expert backend: for each MoE layer, plan which node computes each (token, expert)
//! ([`plan`]), send every node its tokens once on its stream, concurrently ([`client`]), let the
//! engine compute the shared expert meanwhile, then combine the partial sums ([`wait`]). A node
//! that fails, answers badly or misses its deadline has its entries re-planned onto other
//! replicas within the same step, and is remembered across steps ([`health`]: quarantine, moving
//! p99, hedging, slow-node avoidance). Deadlines do not compound: every layer of a step shares one
//! budget, started by [`moe_model::ExpertBackend::begin_step`]. When no usable replica is left, a
//! router that follows a coordinator waits (bounded by `replacement_wait` and the step budget) for
//! a new placement ([`crate::cluster::membership`]); a router with static nodes fails at once.
//! Either way the error names the batch rows that needed the missing experts, so the scheduler
//! fails only their sequences.

pub mod client;
mod error;
pub mod health;
pub mod hosting;
pub mod load;
pub mod plan;
mod wait;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use moe_meta::Placement;
use moe_model::gate::Routing;
use moe_model::{ExpertBackend, Matrix, PendingExperts};
use moe_proto::pb::{DispatchRequest, DispatchResponse, Dtype};
use moe_proto::tensor;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use tonic::Status;

pub use client::ExpertClient;
pub use error::{DispatchError, DispatchOptions};
pub use health::{Health, HealthOptions};
pub use load::LoadWindow;
use plan::NodeWork;

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
    /// What is remembered about each node across steps.
    pub health: Health,
    /// When the current step (forward pass) started: its layers share one budget.
    step_started: Mutex<Instant>,
    /// Whether placements come from a coordinator (a replacement may arrive, so a step whose
    /// experts have no usable replica waits for one); static routes fail at once.
    coordinated: AtomicBool,
    /// Whether node clients dial their nodes (false: a router with no data plane).
    connect: bool,
}

struct InFlight {
    work: NodeWork,
    rx: oneshot::Receiver<Result<DispatchResponse, Status>>,
    sent: Instant,
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
        r.coordinated.store(false, Ordering::Relaxed);
        r.install(Some(placement), addrs);
        r
    }

    /// No placement yet: dispatches wait until [`RemoteExperts::update`] brings one (a
    /// coordinated router).
    pub fn empty(hidden: usize, opts: DispatchOptions, handle: Handle) -> RemoteExperts {
        RemoteExperts {
            handle,
            hidden,
            health: Health::new(opts.health),
            opts,
            routes: RwLock::new(Arc::new(Routes {
                placement: None,
                clients: Vec::new(),
            })),
            by_addr: Mutex::new(HashMap::new()),
            version: watch::channel(0).0,
            loads: LoadWindow::new(Duration::from_secs(60), 12),
            steps: AtomicU64::new(0),
            step_started: Mutex::new(Instant::now()),
            coordinated: AtomicBool::new(true),
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
            let clients: Vec<ExpertClient> = addrs
                .iter()
                .map(|a| {
                    cache
                        .entry(a.clone())
                        .or_insert_with(|| {
                            crate::metrics::new_node(a);
                            match self.connect {
                                true => ExpertClient::spawn(
                                    a.clone(),
                                    self.opts.max_message_bytes,
                                    self.opts.tls.clone(),
                                ),
                                false => ExpertClient::unconnected(
                                    a.clone(),
                                    self.opts.max_message_bytes,
                                ),
                            }
                        })
                        .clone()
                })
                .collect();
            // Nodes that left the placement: stop their clients (no reconnecting for ever) and
            // forget their health. A step still holding the old routes gets `Unavailable` from
            // a stopped client and re-plans on the new ones.
            let keep: BTreeSet<&String> = addrs.iter().collect();
            let gone: Vec<String> = cache
                .keys()
                .filter(|a| !keep.contains(a))
                .cloned()
                .collect();
            for a in gone {
                if let Some(c) = cache.remove(&a) {
                    tracing::info!(node = %a, "node left the placement: client stopped");
                    c.stop();
                }
                self.health.forget(&a);
            }
            if let Some(p) = &placement {
                for (c, r) in clients.iter().zip(hosting::required(p, clients.len())) {
                    c.set_required(r);
                }
            }
            clients
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

    /// Whether `n` may take work under `tier`: 0 skips quarantined, mismatched ([`hosting`]) and
    /// slow nodes, 1 allows slow ones, 2 also quarantined and mismatched ones (when nothing
    /// else is left). Down nodes and nodes that failed
    /// in this step (`excluded`) are never usable.
    fn usable(&self, routes: &Routes, excluded: &BTreeSet<String>, tier: u8, n: usize) -> bool {
        let c = &routes.clients[n];
        c.is_up()
            && !excluded.contains(c.addr())
            && (tier >= 2 || !self.health.quarantined(c.addr()))
            && (tier >= 2 || !c.mismatched())
            && (tier >= 1 || !self.health.slow(c.addr()))
    }

    /// The rows of `entries` whose expert has no usable replica at all.
    fn unplaceable_rows(
        &self,
        routes: &Routes,
        p: &Placement,
        layer: usize,
        entries: &[(usize, u32, f32)],
        excluded: &BTreeSet<String>,
    ) -> Vec<usize> {
        let ok: Vec<bool> = (0..routes.clients.len())
            .map(|n| self.usable(routes, excluded, 2, n))
            .collect();
        let mut rows: Vec<usize> = entries
            .iter()
            .filter(|&&(_, e, _)| {
                !p.replicas(layer, e as usize)
                    .iter()
                    .any(|&n| ok.get(n).copied().unwrap_or(false))
            })
            .map(|&(t, _, _)| t)
            .collect();
        rows.dedup();
        rows
    }

    /// The instant the current step's budget runs out.
    fn step_deadline(&self) -> Instant {
        *self.step_started.lock().unwrap_or_else(|p| p.into_inner()) + self.opts.step_budget
    }

    /// Plans `entries` on the current routes and sends. While some expert has no usable
    /// replica, a coordinated router waits for one or a new placement (bounded by
    /// `replacement_wait` and the step budget); a static one fails at once. `max_tier` bounds
    /// which nodes may be used (see [`RemoteExperts::usable`]; a hedge uses healthy ones only)
    /// and `wait: false` never waits.
    #[allow(clippy::too_many_arguments)]
    fn plan_and_send(
        &self,
        layer: usize,
        x: &Matrix,
        entries: &[(usize, u32, f32)],
        excluded: &BTreeSet<String>,
        last: &str,
        span: &tracing::Span,
        max_tier: u8,
        wait: bool,
    ) -> Result<Vec<InFlight>, DispatchError> {
        let mut deadline = Instant::now();
        if wait && self.coordinated.load(Ordering::Relaxed) {
            deadline = (deadline + self.opts.replacement_wait).min(self.step_deadline());
        }
        let seed = self.steps.fetch_add(1, Ordering::Relaxed);
        let mut warned = false;
        loop {
            let routes = self.routes();
            let seen = routes.placement.as_ref().map_or(0, |p| p.version);
            let outcome = match &routes.placement {
                None => Err(DispatchError::NoPlacement(self.opts.replacement_wait)),
                Some(p) => {
                    let mut planned = Err(plan::Unplaceable {
                        token: 0,
                        expert: 0,
                    });
                    for tier in 0..=max_tier {
                        // Once per node, not once per (token, expert, replica).
                        let ok: Vec<bool> = (0..routes.clients.len())
                            .map(|n| self.usable(&routes, excluded, tier, n))
                            .collect();
                        planned =
                            plan::plan(p, layer, entries, seed, self.opts.split_min_tokens, |n| {
                                ok.get(n).copied().unwrap_or(false)
                            });
                        if planned.is_ok() {
                            break;
                        }
                    }
                    planned.map_err(|u| DispatchError::NoReplica {
                        layer,
                        token: u.token,
                        expert: u.expert,
                        last: if last.is_empty() {
                            "every replica is down".into()
                        } else {
                            last.to_string()
                        },
                        rows: self.unplaceable_rows(&routes, p, layer, entries, excluded),
                    })
                }
            };
            match outcome {
                Ok(works) => {
                    return Ok(works
                        .into_iter()
                        .map(|w| self.send(&routes, layer, x, w, span))
                        .collect());
                }
                Err(e) => {
                    let left = deadline.saturating_duration_since(Instant::now());
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

impl ExpertBackend for RemoteExperts {
    fn begin_step(&self) {
        *self.step_started.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn is_remote(&self) -> bool {
        true
    }

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
            .plan_and_send(layer, x, &entries, &BTreeSet::new(), "", &span, 2, true)
            .map_err(|e| e.into_model(layer))?;
        Ok(Box::new(wait::Pending {
            experts: self,
            layer,
            x,
            inflight,
            span,
        }))
    }
}
