//! `moe delay-proxy` (hidden, for benchmarks): a TCP proxy that adds a fixed one-way delay to
//! every byte in both directions, as a network hop between a router and its expert nodes would
//! (`bench/overlap.sh`). Bytes are forwarded in order, each read's bytes `--delay-us` after they
//! were read; the delay does not limit bandwidth (reads go on while earlier bytes wait).
//! tokio's timer has millisecond resolution, so a 1 ms delay is 1-2 ms in practice.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to accept connections on.
    #[arg(long)]
    listen: SocketAddr,
    /// Address every accepted connection is forwarded to.
    #[arg(long)]
    to: SocketAddr,
    /// One-way delay added to each direction, microseconds.
    #[arg(long, default_value_t = 1000)]
    delay_us: u64,
}

/// Runs the proxy until the process is stopped.
pub fn run(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        println!(
            "delay proxy {} -> {} (+{} us each way)",
            a.listen, a.to, a.delay_us
        );
        let delay = Duration::from_micros(a.delay_us);
        loop {
            let (inbound, _) = listener.accept().await?;
            let to = a.to;
            tokio::spawn(async move {
                if let Err(e) = connection(inbound, to, delay).await {
                    tracing::debug!(error = %e, "proxied connection ended");
                }
            });
        }
    })
}

async fn connection(inbound: TcpStream, to: SocketAddr, delay: Duration) -> anyhow::Result<()> {
    let outbound = TcpStream::connect(to).await?;
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    tokio::try_join!(pipe(ri, wo, delay), pipe(ro, wi, delay))?;
    Ok(())
}

/// Copies `r` to `w`, each chunk `delay` after it was read.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        loop {
            let mut buf = vec![0u8; 256 << 10];
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            buf.truncate(n);
            if tx.send((Instant::now() + delay, buf)).is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            w.write_all(&buf).await?;
        }
        w.shutdown().await?;
        anyhow::Ok(())
    };
    tokio::try_join!(reader, writer)?;
    Ok(())
}
