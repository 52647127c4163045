//! A minimal `/metrics` HTTP endpoint for roles without the router's API server (expert nodes,
//! coordinators): serves the Prometheus text a closure renders on each scrape.

use std::sync::Arc;

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], render()) }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

/// Binds `addr`, prints `metrics on ADDR` (tests and scripts read it) and serves `render`.
pub async fn start(
    addr: std::net::SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!("metrics on {}", l.local_addr()?);
    tokio::spawn(serve(l, render));
    Ok(())
}
