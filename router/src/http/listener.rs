//! The API's accept loop, over hyper-util's HTTP/1 + HTTP/2 connection builder instead of
//! `axum::serve`, because the limits that protect a server live at the listener:
//!
//! - **TLS** ([`ListenerOptions::tls`]): rustls with a configuration that follows its files
//!   ([`moe_meta::tls::ServerTls`]), so a renewed certificate reaches the next connection without
//!   a restart. A client speaking plain HTTP to the HTTPS port gets a 400 that says so.
//! - **Header read timeout**: a client must send a request's whole head within it (slowloris).
//!   hyper starts it when it waits for a head, so on HTTP/1 it also closes a kept-alive
//!   connection that sends no next request in time.
//! - **Body timeout** ([`body`]): the whole body must arrive within it (408 otherwise).
//! - **Idle timeout**: a connection that moved no byte for that long is closed (gracefully: a
//!   request in progress finishes first).
//! - **Connections per client IP**: past the limit, a new connection is closed at once.
//! - **Half-close**: a client that shuts its write side after sending its request still gets
//!   its response (hyper's `half_close`).
//!
//! Shutdown is graceful: the listener stops, idle connections close, requests in flight finish.

pub mod body;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use moe_meta::tls::ServerTls;
use moe_meta::tls::accept::{HANDSHAKE_TIMEOUT, TLS_HANDSHAKE, handshake};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// Limits and TLS of the API listener.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// HTTPS; `None`: plain HTTP.
    pub tls: Option<Arc<ServerTls>>,
    /// Time a client has to send a request's head (request line and headers).
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's whole body, from the end of its head.
    pub body_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections one client IP may hold (0: no limit).
    pub max_connections_per_ip: usize,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            tls: None,
            header_read_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_connections_per_ip: 256,
        }
    }
}

/// Open connections per client IP; a [`Slot`] gives its place back when dropped.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct Slot(Arc<PerIp>, IpAddr);

impl PerIp {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Slot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// An IO that records when it last moved a byte (milliseconds since `epoch`).
struct Activity<T> {
    io: T,
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Activity<T> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The answer to plain HTTP on the HTTPS port (an OpenAI-style error body).
fn plaintext_answer() -> Vec<u8> {
    let body = serde_json::json!({"error": {
        "message": "this port speaks HTTPS: use https://",
        "type": "invalid_request_error", "param": null, "code": "https_required"}})
    .to_string();
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` with `opts` until `shutdown` resolves, then drains: no new
/// connections, idle ones closed, requests in flight finished.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    opts: ListenerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(tls) = &opts.tls {
        tls.watch();
    }
    let app = body::with_timeout(app, opts.body_timeout);
    let opts = Arc::new(opts);
    let per_ip = Arc::new(PerIp::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone; when all are dropped the drain is over.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer): (TcpStream, SocketAddr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = per_ip.take(peer.ip(), opts.max_connections_per_ip) else {
            crate::metrics::connection_refused("per_ip_limit");
            tracing::warn!(%peer, limit = opts.max_connections_per_ip, "too many connections from one client; closed");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (app, opts, stop, alive) =
            (app.clone(), opts.clone(), stop_rx.clone(), alive_tx.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _alive = alive;
            let Some(tls) = &opts.tls else {
                return connection(tcp, app, &opts, stop).await;
            };
            if is_plaintext(&tcp).await {
                crate::metrics::connection_refused("plaintext_on_https");
                let _ = answer_plaintext(tcp).await;
                return;
            }
            match handshake(tcp, tls.current(), HANDSHAKE_TIMEOUT).await {
                Ok(stream) => connection(stream, app, &opts, stop).await,
                Err(e) => {
                    crate::metrics::connection_refused("tls_handshake");
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(alive_tx);
    let _ = alive_rx.recv().await;
    Ok(())
}

/// Whether the client's first byte is not a TLS record's (it speaks plain HTTP).
async fn is_plaintext(tcp: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await,
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE
    )
}

/// Reads what the plaintext client sent (closing a socket with unread data resets it, and the
/// client would lose the answer), then answers 400 and closes.
async fn answer_plaintext(mut tcp: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 << 10];
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await;
    tcp.write_all(&plaintext_answer()).await?;
    tcp.shutdown().await
}

/// Serves one connection until it ends, its idle timeout passes, or the server stops.
async fn connection<T>(
    io: T,
    app: axum::Router,
    opts: &ListenerOptions,
    mut stop: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = Activity {
        io,
        epoch,
        last: last.clone(),
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .half_close(true);
    builder.http2().timer(TokioTimer::new());
    let svc = TowerToHyperService::new(app);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle = opts.idle_timeout;
    let mut closing = false;
    loop {
        let quiet_since = Duration::from_millis(last.load(Ordering::Relaxed));
        let wake = epoch + quiet_since + idle;
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake.into()), if !closing => {
                if epoch.elapsed() >= Duration::from_millis(last.load(Ordering::Relaxed)) + idle {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = stop.wait_for(|s| *s), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
