//! The TLS accept loop in front of a tonic server: each accepted connection's handshake runs on
//! its own task under [`HANDSHAKE_TIMEOUT`] (a client that connects and sends nothing holds no
//! slot of the listener), with the configuration [`ServerTls::current`] gives at that moment (so
//! rotated files apply to new connections). A client that speaks plaintext to the TLS port is
//! recognised by its first byte (a TLS record starts with 0x16), logged as such and closed; a
//! failed handshake (no client certificate, an unknown CA, a SAN not allowed) is logged with
//! rustls's reason. Only completed handshakes reach the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use super::ServerTls;

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS handshake record.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// Why a connection did not become a TLS stream.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("plaintext client on a TLS port")]
    Plaintext,
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
}

impl HandshakeError {
    /// The `reason` label of the refusal counters.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Plaintext => "plaintext",
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::Failed(_) => "handshake",
        }
    }
}

/// Connections a TLS listener refused, by [`HandshakeError::reason`]: what an operator
/// watches to see clients that cannot join (a certificate from another CA, an expired one, a
/// plaintext client) without reading logs.
#[derive(Debug, Default)]
pub struct Refusals([AtomicU64; 3]);

impl Refusals {
    const REASONS: [&'static str; 3] = ["plaintext", "timeout", "handshake"];

    /// Counts one refusal.
    pub fn count(&self, e: &HandshakeError) {
        let i = match e {
            HandshakeError::Plaintext => 0,
            HandshakeError::Timeout(_) => 1,
            HandshakeError::Failed(_) => 2,
        };
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Every reason with its count (zeros included, so the series exist from the start).
    pub fn counts(&self) -> [(&'static str, u64); 3] {
        std::array::from_fn(|i| (Self::REASONS[i], self.0[i].load(Ordering::Relaxed)))
    }
}

/// Completes the server side of a handshake on `tcp`.
pub async fn handshake(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, HandshakeError> {
    let work = async {
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(1) if first[0] != TLS_HANDSHAKE => return Err(HandshakeError::Plaintext),
            Ok(_) => {}
            Err(e) => return Err(HandshakeError::Failed(e)),
        }
        TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .map_err(HandshakeError::Failed)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
}

/// TLS streams for the connections accepted on `listener`, for
/// `tonic::transport::Server::serve_with_incoming*`. The accept loop ends when the stream is
/// dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer): (TcpStream, SocketAddr) = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep listening.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (tx, config, tls) = (tx.clone(), tls.current(), tls.clone());
            tokio::spawn(async move {
                match handshake(tcp, config, HANDSHAKE_TIMEOUT).await {
                    Ok(stream) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Err(e) => {
                        tls.refusals().count(&e);
                        tracing::warn!(%peer, error = %e, "connection refused");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
