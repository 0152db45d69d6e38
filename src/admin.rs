//! The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, and the
//! operator's views: `/admin/lookup?ip=`, `/admin/top?n=`, `/admin/bans`
//! (GET exports; POST and DELETE need the bearer token from
//! `admin.token_file`, and are disabled without one).

use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use ipnet::IpNet;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::lookup::Lookup;
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
        .route("/admin/top", get(top))
        .route(
            "/admin/bans",
            get(export_bans).post(add_ban).delete(lift_ban),
        )
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
    /// `json` for [`Lookup`] as JSON (what `mailmoat lookup` reads).
    format: Option<String>,
}

/// What the live lists say about one address, and its open sessions.
async fn lookup(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<LookupQuery>,
) -> axum::response::Response {
    let Ok(ip) = q.ip.trim().parse::<IpAddr>() else {
        return (
            StatusCode::BAD_REQUEST,
            "ip= must be an IPv4 or IPv6 address\n",
        )
            .into_response();
    };
    let sessions = state
        .shared
        .registry
        .by_ip()
        .get(&ip.to_canonical())
        .copied()
        .unwrap_or(0);
    let answer = Lookup::new(&state.shared.blocklist.load(), ip, Some(sessions));
    match q.format.as_deref() {
        Some("json") => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&answer).unwrap_or_default(),
        )
            .into_response(),
        None | Some("text") => answer.to_text().into_response(),
        Some(_) => (
            StatusCode::BAD_REQUEST,
            "format= must be \"text\" or \"json\"\n",
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
struct TopQuery {
    n: Option<usize>,
}

/// The IPs with the most open sessions and the most recent refusals.
async fn top(State(state): State<Arc<AdminState>>, Query(q): Query<TopQuery>) -> impl IntoResponse {
    let n = q.n.unwrap_or(10).clamp(1, 1000);
    let mut sessions: Vec<(IpAddr, usize)> = state.shared.registry.by_ip().into_iter().collect();
    sessions.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    sessions.truncate(n);
    let body = serde_json::json!({
        "sessions": sessions.iter().map(|(ip, count)| serde_json::json!({"ip": ip, "sessions": count})).collect::<Vec<_>>(),
        "refusals": state.shared.shaping.top_refused(n).iter().map(|(ip, count)| serde_json::json!({"ip": ip, "refusals": count})).collect::<Vec<_>>(),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

async fn export_bans(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    state.shared.shaping.bans().export()
}

#[derive(serde::Deserialize)]
struct BanQuery {
    ip: String,
    ttl: Option<String>,
}

async fn add_ban(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(q): Query<BanQuery>,
) -> (StatusCode, String) {
    let net = match authorized_net(&state, &headers, &q) {
        Ok(net) => net,
        Err(refused) => return refused,
    };
    let ttl = match q.ttl.as_deref().map(crate::config::units::parse_duration) {
        None => state.config.autoban.ttl,
        Some(Ok(ttl)) => ttl,
        Some(Err(e)) => return (StatusCode::BAD_REQUEST, format!("ttl=: {e}\n")),
    };
    state.shared.shaping.bans().ban(net, ttl, "manual");
    let ttl = humantime::format_duration(ttl);
    (StatusCode::OK, format!("banned {net} for {ttl}\n"))
}

async fn lift_ban(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(q): Query<BanQuery>,
) -> (StatusCode, String) {
    let net = match authorized_net(&state, &headers, &q) {
        Ok(net) => net,
        Err(refused) => return refused,
    };
    if state.shared.shaping.bans().lift(net) {
        (StatusCode::OK, format!("lifted {net}\n"))
    } else {
        (StatusCode::NOT_FOUND, format!("no ban for {net}\n"))
    }
}

/// The network a ban mutation names, once the caller is authorized.
fn authorized_net(
    state: &AdminState,
    headers: &HeaderMap,
    q: &BanQuery,
) -> Result<IpNet, (StatusCode, String)> {
    authorize(&state.config, headers)?;
    crate::blocklist::parse_net(&q.ip).map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "ip= must be an IP or CIDR\n".into(),
        )
    })
}

/// Checks `Authorization: Bearer <token>` against `admin.token_file`, read
/// per request so a rotated token takes effect at once.
fn authorize(config: &Config, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
    let Some(path) = &config.admin.token_file else {
        return Err((
            StatusCode::FORBIDDEN,
            "mutations are disabled: set admin.token_file\n".into(),
        ));
    };
    let expected = std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| {
            tracing::warn!(path = %path.display(), error = %e, "cannot read admin.token_file");
            (
                StatusCode::FORBIDDEN,
                "admin token unavailable\n".to_string(),
            )
        })?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if expected.is_empty() || !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Err((
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token\n".into(),
        ));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
