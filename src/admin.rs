//! The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, and the
//! operator's views: `/admin/lookup?ip=`, `/admin/top?n=`, `/admin/bans`
//! (GET exports; POST and DELETE need the bearer token from
//! `admin.token_file`, and are disabled without one; the token is checked
//! before any parameter is read).
//!
//! The listener is bounded like the SMTP side: at most [`MAX_CONNECTIONS`]
//! sockets, the oldest idle one closed to make room once [`KEEP_OPEN`] are
//! open (so a scrape gets in past slow or idle clients), request headers
//! within [`HEADER_TIMEOUT`], every connection closed by
//! [`CONNECTION_DEADLINE`], no request body.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use ipnet::IpNet;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bans::{Bans, Saved};
use crate::blocklist::Blocklist;
use crate::config::Config;
use crate::fleet::Fleet;
use crate::lookup::Lookup;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::session::registry::Registry;
use crate::shaping::Shaping;
use crate::supervisor::Supervisor;
use crate::upstream;

/// Most admin sockets open at once; one more is closed at accept. Counted
/// in `descriptors::RESERVE`.
pub const MAX_CONNECTIONS: usize = 64;
/// Past this many open connections, each new one makes the oldest close at
/// its next idle point (at once if it has not sent a whole request header).
pub const KEEP_OPEN: usize = 32;
/// How long a connection past [`MAX_CONNECTIONS`] waits for one told to
/// close to end.
const MAKE_ROOM: Duration = Duration::from_millis(200);
/// A request header must be complete this long after the connection opens
/// or the previous response.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Every connection closes by then (after the request in progress, if it
/// ends within [`CLOSE_GRACE`]), keep-alive or not.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The endpoints read no body; a request announcing more is refused.
pub const MAX_BODY: u64 = 1024;
/// hyper's read buffer, which bounds a request head (8 KiB at least).
const MAX_BUFFER: usize = 16 * 1024;

/// What the admin endpoints read: handed over explicitly by the server.
pub struct AdminState {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub blocklist: Arc<Blocklist>,
    pub registry: Arc<Registry>,
    pub shaping: Arc<Shaping>,
    pub bans: Arc<Bans>,
    /// Background tasks; one down makes `/readyz` unready.
    pub tasks: Arc<Supervisor>,
    /// The receiver check's latest verdict, for `/readyz`.
    pub upstream: Arc<upstream::Health>,
    /// `POST /admin/reload`; `None` where nothing can be reloaded.
    pub reloader: Option<Arc<Reloader>>,
    /// `/admin/fleet`; `None` without `[fleet]`.
    pub fleet: Option<Arc<Fleet>>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/admin/lookup", get(lookup))
        .route("/admin/top", get(top))
        .route("/admin/fleet", get(fleet))
        .route("/admin/reload", axum::routing::post(reload))
        .route(
            "/admin/bans",
            get(export_bans).post(add_ban).delete(lift_ban),
        )
        .layer(middleware::from_fn(refuse_bodies))
        .with_state(state)
}

/// Serves `app` on `listener` until `stop`; the connections end with it.
pub async fn serve(listener: Arc<TcpListener>, app: Router, stop: CancellationToken) {
    let mut connections = JoinSet::new();
    // Open connections not yet told to close, oldest first.
    let mut open: VecDeque<(tokio::task::Id, CancellationToken)> = VecDeque::new();
    let mut accept_failing = false;
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            Some(ended) = connections.join_next_with_id() => {
                let id = ended.map_or_else(|e| e.id(), |(id, ())| id);
                open.retain(|(open_id, _)| *open_id != id);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                if std::mem::take(&mut accept_failing) {
                    tracing::info!("admin listener accepting again");
                }
                stream
            }
            Err(e) => {
                // Said once per episode, like the SMTP accept loop.
                if !std::mem::replace(&mut accept_failing, true) {
                    tracing::warn!(error = %e, "admin accept failed; retrying every 50ms");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if connections.len() >= MAX_CONNECTIONS {
            // Connections told to make room usually end at their next poll:
            // give one that long before refusing.
            let freed = if connections.len() > open.len() {
                tokio::time::timeout(MAKE_ROOM, connections.join_next_with_id()).await
            } else {
                Ok(None)
            };
            let Ok(Some(ended)) = freed else {
                tracing::debug!("admin connection refused: {MAX_CONNECTIONS} open");
                continue;
            };
            let id = ended.map_or_else(|e| e.id(), |(id, ())| id);
            open.retain(|(open_id, _)| *open_id != id);
        }
        if open.len() >= KEEP_OPEN {
            if let Some((_, oldest)) = open.pop_front() {
                oldest.cancel();
            }
        }
        let evict = CancellationToken::new();
        let task = connections.spawn(connection(stream, app.clone(), evict.clone()));
        open.push_back((task.id(), evict));
    }
}

/// One HTTP/1.1 connection, bounded in time. Told to make room, it closes
/// at once if no request has reached a handler yet (hyper's graceful
/// shutdown would wait for the first request head, however slow), else at
/// its next idle point.
async fn connection(stream: TcpStream, app: Router, evict: CancellationToken) {
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let (requested, app) = (requested.clone(), TowerToHyperService::new(app));
        hyper::service::service_fn(move |request| {
            requested.store(true, Ordering::Relaxed);
            app.call(request)
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUFFER);
    let conn = http.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let deadline = tokio::time::sleep(CONNECTION_DEADLINE);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = evict.cancelled() => {
            if !requested.load(Ordering::Relaxed) {
                return;
            }
        }
        () = deadline => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

/// No endpoint reads a body, so none may be sent: it would only sit in
/// buffers.
async fn refuse_bodies(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
    let too_big = match declared {
        Some(Some(length)) => length > MAX_BODY,
        Some(None) => true,
        None => request.headers().contains_key(header::TRANSFER_ENCODING),
    };
    if too_big {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "admin requests take no body\n",
        )
            .into_response();
    }
    next.run(request).await
}

async fn metrics_text(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Ready when every background task runs and the latest receiver check
/// (every `upstream::CHECK_INTERVAL`) found an upstream that greets and
/// agrees on the PROXY header. Answered from that check: a probe of
/// `/readyz` costs the receiver nothing.
async fn ready(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let down = state.tasks.down();
    if !down.is_empty() {
        let names: Vec<&str> = down.iter().map(|t| t.as_str()).collect();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("background task down: {}\n", names.join(", ")),
        );
    }
    // Only right after start is there no verdict yet; one check is bounded
    // by connect_timeout plus two reply timeouts per server.
    match state.upstream.verdict(FIRST_CHECK_WAIT).await {
        Some(v) if v.ready => (StatusCode::OK, "ready\n".to_string()),
        Some(v) => {
            let mut body = format!("no upstream ready in: {}\n", v.unready.join(", "));
            for (server, problem) in &v.problems {
                body.push_str(&format!("{server}: {problem}\n"));
            }
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "receiver check not done yet\n".to_string(),
        ),
    }
}

/// How long `/readyz` waits for the first receiver check after start.
const FIRST_CHECK_WAIT: Duration = Duration::from_secs(10);

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
        .registry
        .by_ip()
        .get(&ip.to_canonical())
        .copied()
        .unwrap_or(0);
    let mut answer = Lookup::new(&state.blocklist.load(), ip, Some(sessions));
    answer.origin = answer
        .ban_entry()
        .and_then(|net| state.bans.get(net)?.origin)
        .map(|node| node.to_string());
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

/// The fleet as this node sees it: the store's state and every node the
/// last heartbeat heard, with their ban counts (JSON).
async fn fleet(State(state): State<Arc<AdminState>>) -> axum::response::Response {
    match &state.fleet {
        Some(fleet) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&fleet.view()).unwrap_or_default(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "no fleet: this node has no [fleet] section, so it shares nothing\n",
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
    let mut sessions: Vec<(IpAddr, usize)> = state.registry.by_ip().into_iter().collect();
    sessions.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    sessions.truncate(n);
    let body = serde_json::json!({
        "sessions": sessions.iter().map(|(ip, count)| serde_json::json!({"ip": ip, "sessions": count})).collect::<Vec<_>>(),
        "refusals": state.shaping.top_refused(n).iter().map(|(ip, count)| serde_json::json!({"ip": ip, "refusals": count})).collect::<Vec<_>>(),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

/// Reloads the config file (as SIGHUP does) and says whether it took: 200
/// with the new config's hash and any change that waits for a restart, or
/// 422 with every error (the running config stays).
async fn reload(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> (StatusCode, String) {
    if let Err(refused) = authorize(&state.config, &headers) {
        return refused;
    }
    let Some(reloader) = &state.reloader else {
        return (
            StatusCode::CONFLICT,
            "this process cannot reload its config\n".into(),
        );
    };
    let outcome = reloader.reload().await;
    let mut body = if outcome.ok {
        format!("config reloaded: {}\n", outcome.hash)
    } else {
        format!(
            "config reload refused; the running config {} stays:\n",
            outcome.hash
        )
    };
    for e in &outcome.errors {
        body.push_str(&format!("  {e}\n"));
    }
    for key in &outcome.restart_needed {
        body.push_str(&format!(
            "  {key}: changed; takes effect at the next restart\n"
        ));
    }
    let status = if outcome.ok {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (status, body)
}

async fn export_bans(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    state.bans.export()
}

#[derive(serde::Deserialize)]
struct BanQuery {
    ip: String,
    ttl: Option<String>,
}

/// Bans `ip=` for `ttl=` (default `autoban.ttl`). A 200 means the ban is
/// in `autoban.state` on disk (or says that there is none to keep it).
async fn add_ban(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    uri: Uri,
) -> (StatusCode, String) {
    let (net, q) = match authorized_net(&state, &headers, &uri) {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let ttl = match q.ttl.as_deref().map(crate::config::units::parse_duration) {
        None => state.config.autoban.ttl,
        Some(Ok(ttl)) => ttl,
        Some(Err(e)) => {
            let max = humantime::format_duration(state.config.autoban.max_ttl);
            return (
                StatusCode::BAD_REQUEST,
                format!("ttl=: {e} (the longest ban is autoban.max_ttl = {max})\n"),
            );
        }
    };
    let bans = &state.bans;
    if let Err(e) = bans.ban(net, ttl, "manual") {
        return (StatusCode::BAD_REQUEST, format!("{e}\n"));
    }
    let ttl = humantime::format_duration(ttl);
    match bans.save().await {
        Ok(Saved::OnDisk) => (
            StatusCode::OK,
            format!("banned {net} for {ttl}; saved to autoban.state\n"),
        ),
        Ok(Saved::NotConfigured) => (
            StatusCode::OK,
            format!("banned {net} for {ttl}; not saved: autoban.state is not set, so the ban is lost at restart\n"),
        ),
        Err(e) => not_saved(&format!("banned {net} for {ttl}"), &e),
    }
}

async fn lift_ban(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    uri: Uri,
) -> (StatusCode, String) {
    let (net, _) = match authorized_net(&state, &headers, &uri) {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let bans = &state.bans;
    if !bans.lift(net) {
        return (StatusCode::NOT_FOUND, format!("no ban for {net}\n"));
    }
    match bans.save().await {
        Ok(_) => (StatusCode::OK, format!("lifted {net}\n")),
        Err(e) => not_saved(&format!("lifted {net}"), &e),
    }
}

/// A change in force but not on disk is not acknowledged as done.
fn not_saved(done: &str, error: &std::io::Error) -> (StatusCode, String) {
    tracing::error!(error = %error, "cannot persist bans (autoban.state)");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("{done} in memory, but saving autoban.state failed ({error}): the change is lost at restart\n"),
    )
}

/// The network a ban mutation names and its parameters, read only once
/// the caller is authorized: a stranger learns nothing from a 400.
fn authorized_net(
    state: &AdminState,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(IpNet, BanQuery), (StatusCode, String)> {
    authorize(&state.config, headers)?;
    let Query(q) = Query::<BanQuery>::try_from_uri(uri)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{}\n", e.body_text())))?;
    let net = crate::blocklist::parse_net(&q.ip).map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "ip= must be an IP or CIDR\n".to_string(),
        )
    })?;
    Ok((net, q))
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

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;
    use crate::state::Core;
    use crate::supervisor::Task;

    #[tokio::test(start_paused = true)]
    async fn readyz_names_a_background_task_that_is_down() {
        let config = Arc::new(Config::default());
        let metrics = Arc::new(Metrics::new());
        let upstreams = Arc::new(crate::upstream::Connector::new(&config).unwrap());
        let core = Core::build(&config, metrics.clone(), None, upstreams, None).await;
        let tasks = Arc::new(Supervisor::new(metrics.registry()));
        let stop = CancellationToken::new();
        tasks.spawn(Task::BanMaintenance, stop.clone(), || async {
            panic!("test: the ban maintenance dies")
        });
        let app = TowerToHyperService::new(router(Arc::new(AdminState {
            config,
            metrics,
            blocklist: core.blocklist.clone(),
            registry: core.registry.clone(),
            shaping: core.shaping.clone(),
            bans: core.bans.clone(),
            tasks: tasks.clone(),
            upstream: Default::default(),
            reloader: None,
            fleet: None,
        })));
        // Paused time: the task stays down through its first backoff.
        for _ in 0..10_000 {
            if !tasks.down().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let request = Request::get("/readyz").body(Body::empty()).unwrap();
        let response = app.call(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(&body[..], b"background task down: ban_maintenance\n");
        stop.cancel();
        tasks.wait().await;
    }
}
