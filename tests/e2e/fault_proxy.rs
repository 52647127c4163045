//! A fault-injecting expert node for end-to-end tests: a gRPC server on 127.0.0.1:0 in the test
//! process that forwards every dispatch to a real `moe expert-node` (so correct answers are the
//! real node's) except those its [`Fault`] picks, which it answers with an in-band error or with
//! nothing at all (a stall: the stream stays open, the answer never comes), or late. It counts the
//! requests it sabotaged, so a test can tell the fault really happened.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::Stream;
use moe_proto::pb::{self, DispatchRequest, DispatchResponse};
use moe_proto::{ExpertService, ExpertServiceClient, ExpertServiceServer};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// What the proxy does to the dispatches of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Answers every dispatch of `layer` with an in-band `Internal` error.
    ErrorAt { layer: u32 },
    /// Answers every dispatch of `layer` in-band `ResourceExhausted` (a node at its limit).
    BusyAt { layer: u32 },
    /// Answers every dispatch of `layer` OK, with the real node's answer turned into NaNs.
    NanAt { layer: u32 },
    /// Never answers a dispatch of `layer` (the stream stays up).
    StallAt { layer: u32 },
    /// Answers correctly, but after its first `answers` answers every answer is `delay_ms` late
    /// (a node that turned slow).
    SlowAfter { answers: u64, delay_ms: u64 },
}

#[derive(Clone)]
struct Proxy {
    upstream: ExpertServiceClient<Channel>,
    fault: Fault,
    sabotaged: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
}

/// A running proxy.
pub struct FaultProxy {
    pub addr: String,
    sabotaged: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Dispatches the proxy answered with its fault (or swallowed).
    pub fn sabotaged(&self) -> u64 {
        self.sabotaged.load(Ordering::SeqCst)
    }
}

/// Starts a proxy in front of the node at `upstream` (host:port) on the current runtime.
pub async fn start(upstream: &str, fault: Fault) -> FaultProxy {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{upstream}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("upstream node");
    let sabotaged = Arc::new(AtomicU64::new(0));
    let proxy = Proxy {
        upstream: ExpertServiceClient::new(channel)
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30),
        fault,
        sabotaged: sabotaged.clone(),
        forwarded: Arc::new(AtomicU64::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(
                ExpertServiceServer::new(proxy)
                    .max_decoding_message_size(1 << 30)
                    .max_encoding_message_size(1 << 30),
            )
            .serve_with_incoming(incoming)
            .await;
    });
    FaultProxy {
        addr,
        sabotaged,
        _task: task,
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DispatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExpertService for Proxy {
    type DispatchStream = ResponseStream;

    async fn dispatch(
        &self,
        request: Request<Streaming<DispatchRequest>>,
    ) -> Result<Response<Self::DispatchStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let proxy = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(req)) = inbound.next().await {
                let id = req.request_id;
                match proxy.fault {
                    Fault::ErrorAt { layer } | Fault::BusyAt { layer } if req.layer == layer => {
                        proxy.sabotaged.fetch_add(1, Ordering::SeqCst);
                        let code = match proxy.fault {
                            Fault::BusyAt { .. } => tonic::Code::ResourceExhausted,
                            _ => tonic::Code::Internal,
                        };
                        let resp = DispatchResponse {
                            request_id: id,
                            code: code as i32,
                            message: "injected fault".into(),
                            ..Default::default()
                        };
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Fault::StallAt { layer } if req.layer == layer => {
                        proxy.sabotaged.fetch_add(1, Ordering::SeqCst);
                        continue; // never answered
                    }
                    _ => {}
                }
                let delay = match proxy.fault {
                    Fault::SlowAfter { answers, delay_ms }
                        if proxy.forwarded.fetch_add(1, Ordering::SeqCst) >= answers =>
                    {
                        proxy.sabotaged.fetch_add(1, Ordering::SeqCst);
                        Some(std::time::Duration::from_millis(delay_ms))
                    }
                    _ => None,
                };
                let poison = matches!(proxy.fault, Fault::NanAt { layer } if req.layer == layer);
                if poison {
                    proxy.sabotaged.fetch_add(1, Ordering::SeqCst);
                }
                let (mut up, tx) = (proxy.upstream.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(d) = delay {
                        tokio::time::sleep(d).await; // the injected slowness
                    }
                    let resp = match up.compute(req).await {
                        Ok(r) => {
                            let mut r = r.into_inner();
                            if poison {
                                // f32 quiet NaNs (every test with this fault uses --wire f32).
                                r.output = f32::NAN.to_le_bytes().repeat(r.output.len() / 4).into();
                            }
                            DispatchResponse {
                                request_id: id,
                                ..r
                            }
                        }
                        Err(s) => DispatchResponse {
                            request_id: id,
                            code: s.code() as i32,
                            message: s.message().to_string(),
                            ..Default::default()
                        },
                    };
                    let _ = tx.send(Ok(resp)).await;
                });
            }
            // Keep the response stream open after the router's side ends only as long as the
            // sender lives; it is dropped here.
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn compute(
        &self,
        request: Request<DispatchRequest>,
    ) -> Result<Response<DispatchResponse>, Status> {
        self.upstream.clone().compute(request.into_inner()).await
    }

    async fn info(
        &self,
        request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        self.upstream.clone().info(request.into_inner()).await
    }

    async fn health(
        &self,
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.upstream.clone().health(request.into_inner()).await
    }
}
