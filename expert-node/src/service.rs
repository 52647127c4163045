//! The tonic service. The data-plane stream reads messages as they come, computes each on the
//! blocking pool (the GEMMs use the rayon pool), and answers each with its request id as soon as
//! it is done, so many messages are in flight per stream. Validation failures are answered
//! in-band with their code and the stream goes on. When the node drains, streams stop reading,
//! finish what they took, and end.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use moe_proto::pb::{self, DispatchRequest, DispatchResponse};
use moe_proto::{ExpertService, tensor};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::node::ExpertNode;
use crate::validate::validate;

/// The service over one node.
#[derive(Debug, Clone)]
pub struct Service {
    node: Arc<ExpertNode>,
    drain: watch::Receiver<bool>,
}

impl Service {
    /// `drain` turning true makes streams stop taking messages and end after their in-flight work.
    pub fn new(node: Arc<ExpertNode>, drain: watch::Receiver<bool>) -> Service {
        Service { node, drain }
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
        let (tx, rx) = mpsc::channel::<Result<DispatchResponse, Status>>(256);
        let node = self.node.clone();
        let mut drain = self.drain.clone();
        tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => {
                            let (node, tx) = (node.clone(), tx.clone());
                            tasks.spawn(async move {
                                let id = req.request_id;
                                let resp = handle(node, req).await.unwrap_or_else(|s| error_response(id, &s));
                                // A closed receiver means the client left; nothing to answer.
                                let _ = tx.send(Ok(resp)).await;
                            });
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "dispatch stream ended by the client");
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
