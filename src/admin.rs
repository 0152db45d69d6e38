//! The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, and the
//! operator's views: `/admin/lookup?ip=`.

use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::Shared;
use crate::upstream;

struct AdminState {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
}

pub async fn serve(
    listener: TcpListener,
    config: Arc<Config>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let metrics = shared.metrics.clone();
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/admin/lookup", get(lookup))
        .with_state(Arc::new(AdminState {
            config,
            metrics,
            shared,
        }));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

async fn metrics_text(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Ready when an upstream accepts a connection now.
async fn ready(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    if upstream::probe(&state.config.upstream, Duration::from_secs(1)).await {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no upstream reachable\n")
    }
}

#[derive(serde::Deserialize)]
struct LookupQuery {
    ip: String,
}

/// What the live lists say about one address, and its open sessions.
async fn lookup(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<LookupQuery>,
) -> impl IntoResponse {
    let Ok(ip) = q.ip.trim().parse::<IpAddr>() else {
        return (
            StatusCode::BAD_REQUEST,
            "ip= must be an IPv4 or IPv6 address\n".to_string(),
        );
    };
    let lists = state.shared.blocklist.load();
    let sessions = state
        .shared
        .registry
        .by_ip()
        .get(&ip.to_canonical())
        .copied()
        .unwrap_or(0);
    let mut text = format!("{ip}\n");
    for line in lists.explain(ip) {
        text.push_str(&format!("  {line}\n"));
    }
    text.push_str(&format!("  open sessions: {sessions}\n"));
    (StatusCode::OK, text)
}
