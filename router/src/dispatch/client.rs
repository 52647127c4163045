//! `ExpertClient`: one expert node, one long-lived bidirectional stream.
//!
//! An actor task owns the connection: it sends queued requests on the stream, matches responses
//! to waiters by request id, and when the stream breaks fails every waiter at once with
//! `Unavailable`, marks the node down, and reconnects with jittered exponential backoff
//! (50 ms doubling to 2 s). While the node is down, new requests fail immediately. A client of a
//! node that left the placement is stopped ([`ExpertClient::stop`]) and never reconnects.
//!
//! With cluster TLS ([`ClusterTls`]) the client dials `https://`, presents its certificate, and
//! verifies the node's certificate against the cluster CA and the host of the address it dials
//! (the address in the placement: the node's certificate must name it as a DNS or IP SAN). The
//! files are read on every connect, so a rotated client certificate needs no restart. A failed
//! handshake is reported as such (`TLS handshake with node … failed: …`), with rustls's reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use moe_meta::tls::ClusterTls;
use moe_proto::ExpertServiceClient;
use moe_proto::pb::{DispatchRequest, DispatchResponse, InfoRequest, InfoResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use super::hosting::{self, Hosting, Required};

type Reply = oneshot::Sender<Result<DispatchResponse, Status>>;

struct Outgoing {
    req: DispatchRequest,
    reply: Reply,
}

struct Shared {
    addr: String,
    up: AtomicBool,
    answered: AtomicU64,
    compute_micros: AtomicU64,
    next_id: AtomicU64,
    tls: Option<Arc<ClusterTls>>,
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Set by [`ExpertClient::stop`]: the actor fails what is queued and ends.
    stop: tokio::sync::watch::Sender<bool>,
    /// What the node must host and whether it does, checked on each connection.
    hosting: Hosting,
}

/// A handle to one expert node (cheap to clone).
#[derive(Clone)]
pub struct ExpertClient {
    shared: Arc<Shared>,
    max_message_bytes: usize,
}

impl std::fmt::Debug for ExpertClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertClient")
            .field("addr", &self.shared.addr)
            .field("up", &self.is_up())
            .finish()
    }
}

/// An HTTP/2 endpoint with the windows and timeouts tensor traffic needs; with `tls`, an
/// `https://` one that presents the cluster certificate.
pub fn endpoint(addr: &str, tls: Option<&ClusterTls>) -> Result<Endpoint, Status> {
    let bare = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{bare}"))
        .map_err(|e| Status::invalid_argument(format!("bad node address `{addr}`: {e}")))?;
    if let Some(tls) = tls {
        let config = tls
            .client()
            .map_err(|e| Status::failed_precondition(format!("cluster TLS: {e}")))?;
        ep = ep
            .tls_config(config)
            .map_err(|e| Status::failed_precondition(format!("cluster TLS for `{addr}`: {e}")))?;
    }
    Ok(ep
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(32 << 20)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// Whether a TLS failure (rustls's verdict, or the handshake cut short) is in `e`'s chain.
fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        // tokio-rustls wraps rustls's errors in io::Error, whose `source` skips the wrapped one.
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
                return true;
            }
            if io.kind() == std::io::ErrorKind::UnexpectedEof {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// `Unavailable` for a failed connect to the node at `addr`, naming TLS when TLS is in use.
fn connect_error(addr: &str, tls: bool, e: &tonic::transport::Error) -> Status {
    let why = moe_meta::error_chain(e);
    match (tls, is_tls_failure(e)) {
        (true, true) => {
            // A misconfiguration (or an impostor), not a node that is merely down: say so at
            // warn, once per reconnect attempt (at most every 2 s per node).
            tracing::warn!(node = %addr, error = %why, "TLS handshake with node failed");
            Status::unavailable(format!("TLS handshake with node {addr} failed: {why}"))
        }
        (true, false) => Status::unavailable(format!("node {addr} (TLS): {why}")),
        (false, _) => Status::unavailable(format!("node {addr}: {why}")),
    }
}

impl ExpertClient {
    /// A client for `addr` and its request queue, stopped or not.
    fn with_queue(
        addr: String,
        max_message_bytes: usize,
        tls: Option<Arc<ClusterTls>>,
        stopped: bool,
    ) -> (ExpertClient, mpsc::UnboundedReceiver<Outgoing>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            addr,
            up: AtomicBool::new(false),
            answered: AtomicU64::new(0),
            compute_micros: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            tls,
            tx,
            stop: tokio::sync::watch::channel(stopped).0,
            hosting: Hosting::default(),
        });
        let client = ExpertClient {
            shared,
            max_message_bytes,
        };
        (client, rx)
    }

    /// Starts the actor for the node at `addr` on the current tokio runtime (over mutual TLS
    /// with `tls`).
    pub fn spawn(
        addr: String,
        max_message_bytes: usize,
        tls: Option<Arc<ClusterTls>>,
    ) -> ExpertClient {
        let (client, rx) = ExpertClient::with_queue(addr, max_message_bytes, tls, false);
        tokio::spawn(run(client.shared.clone(), rx, max_message_bytes));
        client
    }

    /// A client that never dials `addr` (a router with no data plane, in the fleet simulator):
    /// the node stays down and every request fails at once with `Unavailable`.
    pub fn unconnected(addr: String, max_message_bytes: usize) -> ExpertClient {
        ExpertClient::with_queue(addr, max_message_bytes, None, true).0
    }

    /// The node's address.
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// Whether the stream is established.
    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::SeqCst)
    }

    /// Responses received from the node so far.
    pub fn answered(&self) -> u64 {
        self.shared.answered.load(Ordering::Relaxed)
    }

    /// Total compute time the node reported in its answers, microseconds.
    pub fn compute_micros(&self) -> u64 {
        self.shared.compute_micros.load(Ordering::Relaxed)
    }

    /// Stops the actor (the node left the placement): the stream is closed, waiters get
    /// `Unavailable`, and it never reconnects.
    pub fn stop(&self) {
        self.shared.stop.send_replace(true);
    }

    /// Queues `req` (its request id is assigned here) and returns the waiter.
    pub fn send(
        &self,
        mut req: DispatchRequest,
    ) -> oneshot::Receiver<Result<DispatchResponse, Status>> {
        let (reply, rx) = oneshot::channel();
        req.request_id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(o)) = self.shared.tx.send(Outgoing { req, reply }) {
            let _ = o.reply.send(Err(Status::unavailable(format!(
                "node {} client stopped",
                self.shared.addr
            ))));
        }
        rx
    }

    /// Sets the (layer, expert) pairs the placement gives this node ([`super::hosting`]).
    pub fn set_required(&self, required: Required) {
        self.shared.hosting.set_required(required);
        self.report_mismatch();
    }

    /// Whether the check on the current connection found the node lacking experts the
    /// placement gives it.
    pub fn mismatched(&self) -> bool {
        self.shared.hosting.is_mismatched()
    }

    fn report_mismatch(&self) {
        report_mismatch(&self.shared);
    }

    /// Asks the node what it hosts (a separate unary call).
    pub async fn info(&self) -> Result<InfoResponse, Status> {
        let tls = self.shared.tls.as_deref();
        let channel = endpoint(&self.shared.addr, tls)?
            .connect()
            .await
            .map_err(|e| connect_error(&self.shared.addr, tls.is_some(), &e))?;
        let mut client =
            ExpertServiceClient::new(channel).max_decoding_message_size(self.max_message_bytes);
        Ok(client.info(InfoRequest {}).await?.into_inner())
    }
}

async fn connect(
    shared: &Shared,
    max: usize,
) -> Result<
    (
        mpsc::Sender<DispatchRequest>,
        tonic::Streaming<DispatchResponse>,
        Channel,
    ),
    Status,
> {
    let tls = shared.tls.as_deref();
    let channel: Channel = endpoint(&shared.addr, tls)?
        .connect()
        .await
        .map_err(|e| connect_error(&shared.addr, tls.is_some(), &e))?;
    let mut client = ExpertServiceClient::new(channel.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let (req_tx, req_rx) = mpsc::channel(1024);
    let inbound = client
        .dispatch(ReceiverStream::new(req_rx))
        .await?
        .into_inner();
    Ok((req_tx, inbound, channel))
}

/// Sets `moe_dispatch_node_mismatched` for the node from its hosting verdict.
fn report_mismatch(shared: &Shared) {
    let v = if shared.hosting.is_mismatched() {
        1.0
    } else {
        0.0
    };
    metrics::gauge!(crate::metrics::DISPATCH_MISMATCHED, "node" => shared.addr.clone()).set(v);
}

/// Checks, over the connection `channel`, that the node hosts what it must; while it does not,
/// asks again every [`hosting::RECHECK`]. Ends when it does or the node stops answering (the
/// connection is then down and the next one is checked).
async fn check_hosting(shared: Arc<Shared>, channel: Channel, max: usize) {
    let mut client = ExpertServiceClient::new(channel).max_decoding_message_size(max);
    let mut reported = false;
    loop {
        let info = tokio::time::timeout(Duration::from_secs(10), client.info(InfoRequest {})).await;
        let info = match info {
            Ok(Ok(i)) => i.into_inner(),
            Ok(Err(status)) => {
                tracing::debug!(node = %shared.addr, %status, "hosting check failed");
                return;
            }
            Err(_) => {
                tracing::debug!(node = %shared.addr, "hosting check timed out");
                return;
            }
        };
        let verdict = shared.hosting.record(hosting::hosted(&info));
        report_mismatch(&shared);
        match verdict {
            None => {
                if reported {
                    tracing::info!(node = %shared.addr, "node now hosts its experts");
                }
                return;
            }
            Some(why) => {
                if !reported {
                    tracing::warn!(node = %shared.addr, reason = %why, "node skipped while another replica is usable");
                    reported = true;
                }
                tokio::time::sleep(hosting::RECHECK).await;
            }
        }
    }
}

fn fail_all(pending: &mut HashMap<u64, Reply>, why: &str) {
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(Status::unavailable(why.to_string())));
    }
}

/// A pseudo-random jitter in [0.5, 1.5) from the clock (no RNG dependency needed for this).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    0.5 + f64::from(nanos % 1000) / 1000.0
}

async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Outgoing>, max: usize) {
    let mut stop = shared.stop.subscribe();
    tokio::select! {
        () = serve(&shared, &mut rx, max) => {}
        _ = stop.wait_for(|s| *s) => tracing::debug!(node = %shared.addr, "client stopped"),
    }
    shared.up.store(false, Ordering::SeqCst);
    rx.close();
    while let Ok(o) = rx.try_recv() {
        let _ = o.reply.send(Err(Status::unavailable(format!(
            "node {} left the placement",
            shared.addr
        ))));
    }
}

async fn serve(shared: &Arc<Shared>, rx: &mut mpsc::UnboundedReceiver<Outgoing>, max: usize) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let (req_tx, mut inbound, channel) = match connect(shared, max).await {
            Ok(c) => c,
            Err(status) => {
                tracing::debug!(node = %shared.addr, %status, "connect failed");
                // Fail what is queued: callers route around a down node instead of waiting.
                let deadline = tokio::time::sleep(backoff.mul_f64(jitter()));
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        out = rx.recv() => match out {
                            Some(o) => { let _ = o.reply.send(Err(Status::unavailable(format!("node {} is down: {}", shared.addr, status.message())))); }
                            None => return,
                        },
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        shared.up.store(true, Ordering::SeqCst);
        let check = tokio::spawn(check_hosting(shared.clone(), channel, max));
        backoff = Duration::from_millis(50);
        tracing::info!(node = %shared.addr, "dispatch stream up");
        let mut pending: HashMap<u64, Reply> = HashMap::new();
        // A request waiting for room on the stream. The node stops reading when it holds its
        // per-stream limit; waiting for room must not stop us reading its answers, or neither
        // side moves.
        let mut blocked: Option<DispatchRequest> = None;
        let (clean, why) = loop {
            tokio::select! {
                out = rx.recv(), if blocked.is_none() => match out {
                    Some(Outgoing { req, reply }) => {
                        pending.insert(req.request_id, reply);
                        match req_tx.try_send(req) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(req)) => blocked = Some(req),
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                break (false, "request stream closed".to_string());
                            }
                        }
                    }
                    None => return,
                },
                room = req_tx.reserve(), if blocked.is_some() => match (room, blocked.take()) {
                    (Ok(permit), Some(req)) => permit.send(req),
                    _ => break (false, "request stream closed".to_string()),
                },
                msg = inbound.message() => match msg {
                    Ok(Some(resp)) => {
                        shared.answered.fetch_add(1, Ordering::Relaxed);
                        shared.compute_micros.fetch_add(resp.compute_micros, Ordering::Relaxed);
                        if let Some(reply) = pending.remove(&resp.request_id) {
                            let _ = reply.send(Ok(resp));
                        }
                    }
                    Ok(None) => break (true, "the node ended the stream".to_string()),
                    Err(status) => break (false, format!("stream failed: {status}")),
                },
            }
        };
        shared.up.store(false, Ordering::SeqCst);
        check.abort();
        shared.hosting.reset();
        if clean && pending.is_empty() {
            // A draining node (a restart, `moe up` stopping) ends its streams once idle.
            tracing::info!(node = %shared.addr, reason = %why, "dispatch stream closed");
        } else {
            tracing::warn!(node = %shared.addr, reason = %why, in_flight = pending.len(), "dispatch stream down");
        }
        fail_all(&mut pending, &format!("node {}: {why}", shared.addr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stopped_client_ends_its_actor_and_fails_new_requests() {
        // Nothing listens on port 1: the actor is in its reconnect loop, as for a node that
        // left the placement and is gone.
        let c = ExpertClient::spawn("127.0.0.1:1".into(), 1 << 20, None);
        c.stop();
        tokio::time::timeout(Duration::from_secs(10), c.shared.tx.closed())
            .await
            .expect("the actor ends (its queue closes) instead of reconnecting for ever");
        assert!(!c.is_up());
        let answer = c.send(DispatchRequest::default()).await.expect("an answer");
        let status = answer.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("client stopped"), "{status}");
    }
}
