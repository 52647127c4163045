//! The tonic service. The data-plane stream reads messages as they come, computes each on the
//! blocking pool (the GEMMs use the rayon pool), and answers each with its request id as soon as
//! it is done, so many messages are in flight per stream. Validation failures are answered
//! in-band with their code and the stream goes on. When the node drains, streams stop reading,
//! finish what they took, and end.
//!
//! Bounds: a stream holds at most `max_in_flight_per_stream` messages (read, answer not yet in
//! the send queue, whose capacity is the same number); with every slot taken it stops reading,
//! so HTTP/2 flow control pushes back on a client that writes without reading and the node's
//! memory for the stream stays bounded. Across streams and `Compute` calls the node holds at
//! most `max_in_flight` messages; one past that is answered `ResourceExhausted` (in-band on a
//! stream, which goes on). A message that does not parse ends its stream with
//! `InvalidArgument` (its request id is unknown, so it cannot be answered in-band), after the
//! answers to the messages before it; one larger than `--max-message-bytes` ends it with
//! `ResourceExhausted`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use moe_proto::pb::{self, DispatchRequest, DispatchResponse};
use moe_proto::{ExpertService, tensor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::node::ExpertNode;
use crate::validate::validate;

/// How much one stream and the whole node may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages one Dispatch stream holds before it stops reading (at least 1).
    pub per_stream: usize,
    /// Messages the node holds over all streams and Compute calls; more are `ResourceExhausted`.
    pub node: usize,
}

/// The service over one node.
#[derive(Debug, Clone)]
pub struct Service {
    node: Arc<ExpertNode>,
    drain: watch::Receiver<bool>,
    per_stream: usize,
    slots: Arc<Semaphore>,
}

impl Service {
    /// `drain` turning true makes streams stop taking messages and end after their in-flight work.
    pub fn new(node: Arc<ExpertNode>, drain: watch::Receiver<bool>, limits: Limits) -> Service {
        Service {
            node,
            drain,
            per_stream: limits.per_stream.max(1),
            slots: Arc::new(Semaphore::new(limits.node.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// A node-wide slot for one message, or `ResourceExhausted`.
    fn slot(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "node {} holds its limit of messages in flight; retry elsewhere or later",
                self.node.id
            ))
        })
    }
}

/// The status a Dispatch stream ends with when reading it failed, never OK: what the client
/// sent could not be read (a message that does not parse is `InvalidArgument` from
/// [`moe_proto::codec::StrictCodec`]; tonic's framing errors, such as an unknown compression
/// flag, are `Internal`), or was too large (tonic says `OutOfRange` for a declared length over
/// `max_decoding_message_size`). Anything else (the client reset the stream) keeps its code;
/// a client that is gone does not see it.
fn read_failure(status: &Status) -> Status {
    match status.code() {
        Code::InvalidArgument | Code::Internal => Status::invalid_argument(format!(
            "unreadable message on the dispatch stream: {}",
            status.message()
        )),
        Code::OutOfRange | Code::ResourceExhausted => Status::resource_exhausted(status.message()),
        _ => status.clone(),
    }
}

/// Validates and computes one request; errors become a status. The server span
/// (`expert.dispatch`) is a child of the router's client span named by the message's
/// `traceparent` (a stream's metadata is sent once; its messages belong to many requests), and
/// the compute itself is its child `expert.compute`. With tracing off both are disabled
/// callsites and the message's `traceparent` is passed back unchanged.
async fn handle(node: Arc<ExpertNode>, req: DispatchRequest) -> Result<DispatchResponse, Status> {
    let span = tracing::debug_span!(
        "expert.dispatch",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.method = "moe.ExpertService/Dispatch",
        moe.node = %node.id,
        moe.layer = req.layer,
        moe.tokens = req.num_tokens,
        moe.experts = req.expert_ids.len(),
        moe.bytes = req.hidden.len(),
        moe.request_id = req.request_id
    );
    let traceparent = if span.is_disabled() {
        req.traceparent.clone()
    } else {
        moe_meta::telemetry::set_parent(&span, &req.traceparent);
        moe_meta::telemetry::traceparent(&span)
    };
    let stats_node = node.clone();
    let result: Result<DispatchResponse, Status> = async move {
        let job = validate(&req, &node)?;
        let started = Instant::now();
        let n = node.clone();
        let compute = tracing::debug_span!("expert.compute", moe.experts = req.expert_ids.len());
        let (job, result) = tokio::task::spawn_blocking(move || {
            let _guard = n.track();
            let _enter = compute.enter();
            let out = n.compute(&job);
            (job, out)
        })
        .await
        .map_err(|e| Status::internal(format!("compute task failed: {e}")))?;
        // An expert unloaded between validation and compute (a placement switch) is the same
        // condition as one not hosted: the router re-routes.
        let out = result.map_err(|e| match e {
            moe_model::ModelError::Experts { .. } => Status::failed_precondition(e.to_string()),
            other => Status::internal(other.to_string()),
        })?;
        // Outputs are checked as strictly as inputs: a NaN must not reach a router's sum.
        if let Some(i) = out.data.iter().position(|v| !v.is_finite()) {
            return Err(Status::internal(format!(
                "expert output of token {} is not finite at feature {} ({})",
                i / out.cols.max(1),
                i % out.cols.max(1),
                out.data[i]
            )));
        }
        node.stats
            .record(job.layer, &req.expert_ids, started.elapsed());
        Ok(DispatchResponse {
            request_id: req.request_id,
            code: 0,
            message: String::new(),
            output: tensor::encode_vec(out.data, out.cols, tensor::answer_dtype(job.dtype)),
            num_tokens: req.num_tokens,
            compute_micros: started.elapsed().as_micros() as u64,
            traceparent,
        })
    }
    .instrument(span.clone())
    .await;
    if let Err(status) = &result {
        span.record("otel.status_code", "error");
        stats_node.stats.record_error(status.code());
    }
    result
}

fn error_response(request_id: u64, status: &Status) -> DispatchResponse {
    DispatchResponse {
        request_id,
        code: status.code() as i32,
        message: status.message().to_string(),
        ..Default::default()
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DispatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExpertService for Service {
    type DispatchStream = ResponseStream;

    async fn dispatch(
        &self,
        request: Request<Streaming<DispatchRequest>>,
    ) -> Result<Response<Self::DispatchStream>, Status> {
        if self.node.draining() {
            return Err(Status::unavailable(format!(
                "node {} is draining",
                self.node.id
            )));
        }
        let mut inbound = request.into_inner();
        let per_stream = self.per_stream;
        let (tx, rx) = mpsc::channel::<Result<DispatchResponse, Status>>(per_stream);
        let node = self.node.clone();
        let mut drain = self.drain.clone();
        let stream_slots = Arc::new(Semaphore::new(per_stream));
        let svc = self.clone();
        tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            let mut failure = None;
            loop {
                // Backpressure: with every slot of the stream taken, read nothing more.
                let stream_slot = tokio::select! {
                    slot = stream_slots.clone().acquire_owned() => match slot {
                        Ok(s) => s,
                        Err(_) => break,
                    },
                    changed = drain.changed() => {
                        if changed.is_err() || *drain.borrow() {
                            break;
                        }
                        continue;
                    }
                };
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => {
                            let (node, tx) = (node.clone(), tx.clone());
                            let node_slot = svc.slot();
                            tasks.spawn(async move {
                                let _held = node.hold();
                                let id = req.request_id;
                                // The node-wide slot is held until the answer is queued,
                                // as long as the message is held: an answer waiting on a
                                // client that does not read still takes memory.
                                let (resp, node_slot) = match node_slot {
                                    Ok(slot) => (handle(node.clone(), req).await, Some(slot)),
                                    Err(status) => {
                                        node.stats.record_error(status.code());
                                        (Err(status), None)
                                    }
                                };
                                let resp = resp.unwrap_or_else(|s| error_response(id, &s));
                                // A closed receiver means the client left; nothing to answer.
                                let _ = tx.send(Ok(resp)).await;
                                drop((node_slot, stream_slot));
                            });
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "reading the dispatch stream failed");
                            failure = Some(read_failure(&status));
                            break;
                        }
                    },
                    changed = drain.changed() => {
                        if changed.is_err() || *drain.borrow() {
                            break;
                        }
                    }
                }
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            if let Some(status) = failure {
                tracing::info!(node = %node.id, %status, "dispatch stream ended with an error");
                if matches!(
                    status.code(),
                    Code::InvalidArgument | Code::ResourceExhausted
                ) {
                    node.stats.record_error(status.code());
                }
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn compute(
        &self,
        request: Request<DispatchRequest>,
    ) -> Result<Response<DispatchResponse>, Status> {
        if self.node.draining() {
            return Err(Status::unavailable(format!(
                "node {} is draining",
                self.node.id
            )));
        }
        let _held = self.node.hold();
        let _slot = self
            .slot()
            .inspect_err(|s| self.node.stats.record_error(s.code()))?;
        handle(self.node.clone(), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(self.node.info()))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let status = if self.node.draining() {
            pb::health_response::Status::Draining
        } else {
            pb::health_response::Status::Serving
        };
        Ok(Response::new(pb::HealthResponse {
            status: status as i32,
            in_flight: self.node.in_flight(),
        }))
    }
}
