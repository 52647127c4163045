//! Waiting for one layer's dispatch: every node's answer is checked as it arrives, and a node
//! that fails (gRPC error, in-band error, wrong size, non-finite values, no answer before its
//! deadline) has its work re-planned onto other replicas in the same step; a node that answers
//! badly is also quarantined ([`super::health`]). A node still silent after its usual p99 × the
//! hedge margin has its work sent again to another replica, and the first complete answer wins.
//!
//! The unit of work is a *slot*: the (token, expert) entries first planned onto one node. A slot
//! is answered by one *group* of node requests (the first plan, a re-plan or a hedge, possibly
//! spread over several nodes); it is done when every request of some group answered well. Once
//! every slot is done the accepted answers are summed in slot order (deterministic, whichever
//! node answered first); a non-finite value found while summing fails that node and re-plans its
//! slot, and the sum is redone.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use moe_model::{Matrix, PendingExperts};
use moe_proto::pb::DispatchResponse;
use moe_proto::tensor;
use tonic::{Code, Status};

use super::{DispatchError, ExpertClient, InFlight, RemoteExperts, plan::NodeWork};

/// A layer's dispatch in flight.
pub(super) struct Pending<'a> {
    pub(super) experts: &'a RemoteExperts,
    pub(super) layer: usize,
    pub(super) x: &'a Matrix,
    pub(super) inflight: Vec<InFlight>,
    pub(super) span: tracing::Span,
}

/// Codes that say the request itself is wrong: another replica will likely say the same.
fn rejects_request(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::OutOfRange | Code::Unimplemented
    )
}

enum PartState {
    Waiting,
    Done(DispatchResponse),
    Failed,
}

/// One request to one node.
struct Part {
    group: usize,
    work: NodeWork,
    client: ExpertClient,
    sent: Instant,
    deadline: Instant,
    hedge_at: Option<Instant>,
    span: tracing::Span,
    state: PartState,
}

struct Group {
    slot: usize,
    parts: Vec<usize>,
    dead: bool,
}

struct Slot {
    entries: Vec<(usize, u32, f32)>,
    groups: Vec<usize>,
    done: bool,
    hedged: bool,
    /// The group whose answers are summed.
    answered_by: Option<usize>,
    /// The last failure's code, when it said the request itself was wrong.
    rejected: Option<(String, Code, String)>,
}

type Answer = (usize, Result<DispatchResponse, Status>);

struct State<'a> {
    p: &'a RemoteExperts,
    layer: usize,
    x: &'a Matrix,
    span: tracing::Span,
    out: Matrix,
    parts: Vec<Part>,
    groups: Vec<Group>,
    slots: Vec<Slot>,
    excluded: BTreeSet<String>,
    stale: HashMap<String, usize>,
    last: String,
    futures: FuturesUnordered<futures::future::BoxFuture<'static, Answer>>,
}

impl<'a> State<'a> {
    fn add_group(&mut self, slot: usize, inflight: Vec<InFlight>) {
        let g = self.groups.len();
        let step_deadline = self.p.step_deadline();
        let mut parts = Vec::with_capacity(inflight.len());
        for f in inflight {
            let i = self.parts.len();
            let addr = f.client.addr().to_string();
            let rx = f.rx;
            self.futures.push(Box::pin(async move {
                let r = match rx.await {
                    Ok(r) => r,
                    Err(_) => Err(Status::unavailable("client actor stopped")),
                };
                (i, r)
            }));
            self.parts.push(Part {
                group: g,
                deadline: (f.sent + self.p.opts.timeout).min(step_deadline),
                hedge_at: self.p.health.hedge_at(&addr, f.sent),
                work: f.work,
                client: f.client,
                sent: f.sent,
                span: f.span,
                state: PartState::Waiting,
            });
            parts.push(i);
        }
        self.groups.push(Group {
            slot,
            parts,
            dead: false,
        });
        self.slots[slot].groups.push(g);
    }

    /// Ends a part's round trip in the metrics and its span (once per part).
    fn settle(&mut self, i: usize, ok: bool) {
        let part = &mut self.parts[i];
        let node = part.client.addr().to_string();
        metrics::histogram!(crate::metrics::DISPATCH_LATENCY, "node" => node.clone())
            .record(part.sent.elapsed().as_secs_f64());
        metrics::gauge!(crate::metrics::DISPATCH_IN_FLIGHT, "node" => node).decrement(1.0);
        if !ok {
            part.span.record("otel.status_code", "error");
        }
        part.span = tracing::Span::none();
    }

    /// Settles every part still waiting (the layer is over, one way or the other).
    fn abandon_all(&mut self) {
        for i in 0..self.parts.len() {
            if matches!(self.parts[i].state, PartState::Waiting) {
                self.parts[i].state = PartState::Failed;
                self.settle(i, false);
            }
        }
    }

    fn slot_rows(&self, slot: usize) -> Vec<usize> {
        let mut rows: Vec<usize> = self.slots[slot].entries.iter().map(|e| e.0).collect();
        rows.dedup();
        rows
    }

    /// A part failed with `status`; `quarantine` says whether the node answered badly (rather
    /// than being down). Returns the slot if it has no live group left.
    fn fail(&mut self, i: usize, status: &Status, quarantine: bool) -> Option<usize> {
        if matches!(self.parts[i].state, PartState::Waiting) {
            self.settle(i, false);
        }
        self.parts[i].state = PartState::Failed;
        let addr = self.parts[i].client.addr().to_string();
        let (code, message) = (status.code(), status.message());
        tracing::warn!(node = %addr, layer = self.layer, ?code, message, "re-routing a node's tokens");
        metrics::counter!(crate::metrics::DISPATCH_FAILOVERS, "node" => addr.clone()).increment(1);
        self.last = format!("node {addr}: {code:?}: {message}");
        // A node that disagrees with our placement (FailedPrecondition: a switch in progress)
        // is retried on the current routes, and avoided only if it keeps disagreeing.
        let disagreements = self.stale.entry(addr.clone()).or_default();
        *disagreements += 1;
        let keeps_disagreeing = code == Code::FailedPrecondition && *disagreements > 3;
        if code != Code::FailedPrecondition || keeps_disagreeing {
            self.excluded.insert(addr.clone());
        }
        // A node that keeps disagreeing (restarted with fewer experts, say) is quarantined
        // too, so later steps do not ask it again; when the quarantine ends it is re-checked
        // by the next dispatch it gets.
        if quarantine || keeps_disagreeing {
            self.p.health.quarantine(&addr, &self.last);
        }
        let g = self.parts[i].group;
        let slot = self.groups[g].slot;
        if rejects_request(code) {
            self.slots[slot].rejected = Some((addr, code, message.to_string()));
        }
        self.kill_group(g);
        let s = &self.slots[slot];
        (!s.done && s.groups.iter().all(|&g| self.groups[g].dead)).then_some(slot)
    }

    fn kill_group(&mut self, g: usize) {
        self.groups[g].dead = true;
        for k in 0..self.groups[g].parts.len() {
            let i = self.groups[g].parts[k];
            if matches!(self.parts[i].state, PartState::Waiting) {
                self.parts[i].state = PartState::Failed;
                self.settle(i, false);
            }
        }
    }

    /// Sends a slot's entries again, avoiding the nodes that failed in this step.
    fn replan(&mut self, slot: usize) -> Result<(), DispatchError> {
        let entries = self.slots[slot].entries.clone();
        let sent = self.p.plan_and_send(
            self.layer,
            self.x,
            &entries,
            &self.excluded,
            &self.last,
            &self.span,
            2,
            true,
        );
        match sent {
            Ok(inflight) => {
                self.add_group(slot, inflight);
                Ok(())
            }
            Err(e) => Err(match self.slots[slot].rejected.take() {
                // Every replica left refused the request itself: our bug, or a node's.
                Some((addr, code, message)) if matches!(e, DispatchError::NoReplica { .. }) => {
                    DispatchError::Rejected {
                        addr,
                        layer: self.layer,
                        code,
                        message,
                    }
                }
                _ => e,
            }),
        }
    }

    /// Hedges the slot of a late part to other, healthy replicas.
    fn hedge(&mut self, i: usize) {
        let g = self.parts[i].group;
        let slot = self.groups[g].slot;
        self.slots[slot].hedged = true;
        let late = self.parts[i].client.addr().to_string();
        let mut avoid = self.excluded.clone();
        avoid.insert(late.clone());
        let entries = self.slots[slot].entries.clone();
        if let Ok(inflight) = self.p.plan_and_send(
            self.layer, self.x, &entries, &avoid, &self.last, &self.span, 0, false,
        ) {
            tracing::debug!(node = %late, layer = self.layer, "hedging a late node's tokens");
            self.p.health.hedged(&late);
            self.add_group(slot, inflight);
        }
    }

    /// Handles an answer; returns a slot that needs a re-plan.
    fn answer(&mut self, i: usize, r: Result<DispatchResponse, Status>) -> Option<usize> {
        if !matches!(self.parts[i].state, PartState::Waiting) {
            return None; // timed out, or its slot was answered by another group
        }
        let addr = self.parts[i].client.addr().to_string();
        let resp = match r {
            Ok(resp) if resp.code == 0 => resp,
            Ok(resp) => {
                let status = Status::new(Code::from_i32(resp.code), resp.message);
                // An in-band error is a bad answer, except a placement disagreement or a node
                // at its in-flight limit (busy, not wrong: re-routed, not quarantined).
                let q = !matches!(
                    status.code(),
                    Code::FailedPrecondition | Code::ResourceExhausted
                );
                return self.fail(i, &status, q);
            }
            // Transport failures: the node is down (the client marks it), not misbehaving.
            Err(status) => return self.fail(i, &status, false),
        };
        metrics::counter!(crate::metrics::DISPATCH_BYTES, "node" => addr.clone(), "direction" => "received")
            .increment(resp.output.len() as u64);
        let hidden = self.p.hidden;
        let size = tensor::dtype_size(tensor::answer_dtype(self.p.opts.wire));
        let tokens = self.parts[i].work.tokens.len();
        if resp.output.len() != tokens * hidden * size {
            let e = DispatchError::BadReply {
                addr,
                layer: self.layer,
                tokens,
                got: resp.output.len(),
            };
            return self.fail(i, &Status::data_loss(e.to_string()), true);
        }
        self.p.health.record(&addr, self.parts[i].sent.elapsed());
        self.settle(i, true);
        self.parts[i].state = PartState::Done(resp);
        let g = self.parts[i].group;
        let complete = self.groups[g]
            .parts
            .iter()
            .all(|&k| matches!(self.parts[k].state, PartState::Done(_)));
        if complete { self.accept(g) } else { None }
    }

    /// A complete group answers its slot; the slot's other groups are dropped.
    fn accept(&mut self, g: usize) -> Option<usize> {
        let slot = self.groups[g].slot;
        self.slots[slot].done = true;
        self.slots[slot].answered_by = Some(g);
        for other in self.slots[slot].groups.clone() {
            if other != g {
                self.kill_group(other);
            }
        }
        None
    }

    /// Sums the accepted answers in slot order (so the float sums do not depend on which node
    /// answered first). A non-finite value fails its node and returns its slot for a re-plan.
    fn sum(&mut self) -> Option<usize> {
        let answer = tensor::answer_dtype(self.p.opts.wire);
        let row_bytes = self.p.hidden * tensor::dtype_size(answer);
        let mut out = std::mem::replace(&mut self.out, Matrix::zeros(0, 0));
        out.data.fill(0.0);
        for s in 0..self.slots.len() {
            let Some(g) = self.slots[s].answered_by else {
                continue;
            };
            for k in 0..self.groups[g].parts.len() {
                let i = self.groups[g].parts[k];
                if let Some(token) = add(&mut out, &self.parts[i], row_bytes, answer) {
                    self.out = out;
                    let e = DispatchError::NonFinite {
                        addr: self.parts[i].client.addr().to_string(),
                        layer: self.layer,
                        token,
                    };
                    self.slots[s].done = false;
                    self.slots[s].answered_by = None;
                    return self.fail(i, &Status::data_loss(e.to_string()), true);
                }
            }
        }
        self.out = out;
        None
    }

    /// The next instant something is due: a part's deadline or hedge.
    fn next_due(&self) -> Option<Instant> {
        self.parts
            .iter()
            .filter(|p| matches!(p.state, PartState::Waiting))
            .flat_map(|p| {
                let hedge = p
                    .hedge_at
                    .filter(|_| !self.slots[self.groups[p.group].slot].hedged);
                [Some(p.deadline), hedge]
            })
            .flatten()
            .min()
    }

    /// Fails parts past their deadline and hedges late ones; returns slots to re-plan.
    fn on_timer(&mut self, now: Instant) -> Result<Vec<usize>, DispatchError> {
        let mut replan = Vec::new();
        let step_over = now >= self.p.step_deadline();
        for i in 0..self.parts.len() {
            if !matches!(self.parts[i].state, PartState::Waiting) {
                continue;
            }
            let part = &self.parts[i];
            if now >= part.deadline {
                if step_over {
                    let rows = (0..self.slots.len())
                        .filter(|&s| !self.slots[s].done)
                        .flat_map(|s| self.slot_rows(s))
                        .collect::<BTreeSet<_>>();
                    return Err(DispatchError::OutOfTime {
                        layer: self.layer,
                        budget: self.p.opts.step_budget,
                        rows: rows.into_iter().collect(),
                    });
                }
                let status = Status::deadline_exceeded(format!(
                    "no answer within {:?}",
                    self.p.opts.timeout
                ));
                replan.extend(self.fail(i, &status, true));
            } else if part.hedge_at.is_some_and(|t| now >= t)
                && !self.slots[self.groups[part.group].slot].hedged
            {
                self.hedge(i);
            }
        }
        Ok(replan)
    }
}

/// Adds one part's answer into `out`; `Some(token)` at the first non-finite row.
fn add(
    out: &mut Matrix,
    part: &Part,
    row_bytes: usize,
    answer: moe_proto::pb::Dtype,
) -> Option<usize> {
    let PartState::Done(resp) = &part.state else {
        return None;
    };
    for (r, &tok) in part.work.tokens.iter().enumerate() {
        let row = &resp.output[r * row_bytes..(r + 1) * row_bytes];
        if tensor::accumulate(out.row_mut(tok), row, answer).is_err() {
            return Some(tok);
        }
    }
    None
}

impl PendingExperts for Pending<'_> {
    fn wait(self: Box<Self>) -> moe_model::Result<Matrix> {
        let Pending {
            experts,
            layer,
            x,
            inflight,
            span,
        } = *self;
        let _enter = span.enter();
        let mut st = State {
            p: experts,
            layer,
            x,
            span: span.clone(),
            out: Matrix::zeros(x.rows, experts.hidden),
            parts: Vec::new(),
            groups: Vec::new(),
            slots: Vec::new(),
            excluded: BTreeSet::new(),
            stale: HashMap::new(),
            last: String::new(),
            futures: FuturesUnordered::new(),
        };
        for f in inflight {
            let mut entries = Vec::with_capacity(f.work.experts.len());
            for (t, &tok) in f.work.tokens.iter().enumerate() {
                for e in f.work.offsets[t] as usize..f.work.offsets[t + 1] as usize {
                    entries.push((tok, f.work.experts[e], f.work.weights[e]));
                }
            }
            st.slots.push(Slot {
                entries,
                groups: Vec::new(),
                done: false,
                hedged: false,
                answered_by: None,
                rejected: None,
            });
            st.add_group(st.slots.len() - 1, vec![f]);
        }
        let result = run(&mut st);
        st.abandon_all();
        result.map_err(|e| e.into_model(layer))?;
        Ok(st.out)
    }
}

fn run(st: &mut State<'_>) -> Result<(), DispatchError> {
    loop {
        collect(st)?;
        match st.sum() {
            None => return Ok(()),
            Some(slot) => st.replan(slot)?,
        }
    }
}

/// Waits until every slot is answered, re-planning and hedging as needed.
fn collect(st: &mut State<'_>) -> Result<(), DispatchError> {
    while st.slots.iter().any(|s| !s.done) {
        let due = st.next_due();
        if due.is_none() {
            // Unreachable by construction (a slot not done has a waiting request, which has a
            // deadline); never hang on the late answers of abandoned requests.
            return Err(DispatchError::OutOfTime {
                layer: st.layer,
                budget: st.p.opts.step_budget,
                rows: (0..st.x.rows).collect(),
            });
        }
        let futures = &mut st.futures;
        let event = st.p.handle.block_on(async {
            let sleep = async {
                match due {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(a) = futures.next() => Some(a),
                () = sleep => None,
            }
        });
        let mut replan = match event {
            Some((i, r)) => st.answer(i, r).into_iter().collect(),
            None => st.on_timer(Instant::now())?,
        };
        replan.sort_unstable();
        replan.dedup();
        for slot in replan {
            st.replan(slot)?;
        }
    }
    Ok(())
}
