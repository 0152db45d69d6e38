//! Listening sockets and the accept loop, which spends the SMTP side's
//! descriptor budget ([`crate::descriptors`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ListenerSettings};
use crate::descriptors::Budget;
use crate::proxy_protocol::canonical;
use crate::reload::Live;
use crate::session::{self, Door, Shared};

/// Deep enough to absorb a connection flood while admission refuses it.
const BACKLOG: i32 = 4096;

/// Binds `addr`. An IPv6 address binds IPv6 only, so `0.0.0.0:25` and
/// `[::]:25` can both be listed, as they mean on every other MTA.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it (Linux): no setsockopt per client.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until `stop`, each client in its own task on `tracker` (on the
/// runtime this loop runs on: a session worker's), while
/// the descriptor budget has a slot for it: when it has none the loop
/// waits (clients queue in the backlog) instead of failing on EMFILE.
/// The socket is shared by every worker's loop, and by a restarted loop:
/// each registers its own duplicate of it with its runtime.
///
/// Each client gets the [`Live`] generation current at its accept, and
/// keeps it: a reload changes what later clients get, not open sessions.
pub async fn accept_loop(
    configured: SocketAddr,
    socket: Arc<std::net::TcpListener>,
    live: Arc<ArcSwap<Live>>,
    budget: Budget,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    // Both conditions last an episode; say so once at its start and once
    // at its end, not once per client.
    // Readiness without tokio's `TcpListener`, whose accept registers each
    // client with the reactor, refused or not. `AsyncFd::new` is deprecated
    // for taking any raw descriptor, even one it does not own; here it owns
    // its listener, the sound use (its replacement is `unsafe`).
    #[allow(deprecated)]
    let listener = match socket
        .try_clone()
        .map(mio::net::TcpListener::from_std)
        .and_then(AsyncFd::new)
    {
        Ok(listener) => listener,
        Err(e) => {
            // Returning is a failure the supervisor retries with backoff.
            tracing::error!(listener = %configured, error = %e, "cannot register the listening socket");
            return;
        }
    };
    let bound = clients_local_address(&socket);
    let mut budget_spent = false;
    let mut accept_failing = false;
    // One wait for the whole loop: a fresh one per accept took a lock to
    // register and another to drop, for every client.
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        let slot = match budget.try_session() {
            Some(slot) => {
                if std::mem::take(&mut budget_spent) {
                    tracing::info!("descriptor budget has room again");
                }
                slot
            }
            None => {
                if !budget_spent {
                    budget_spent = true;
                    tracing::warn!(
                        budget = budget.size(),
                        "descriptor budget spent: not accepting until sessions close"
                    );
                }
                tokio::select! {
                    () = &mut stopped => return,
                    slot = budget.session() => slot,
                }
            }
        };
        let accepted = tokio::select! {
            biased;
            () = &mut stopped => return,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok((stream, addr)) => {
                if std::mem::take(&mut accept_failing) {
                    tracing::info!("accepting clients again");
                }
                let live = live.load();
                // A reload that removed this listener stops the loop soon;
                // a client accepted meanwhile is closed, never served under
                // settings it was not configured with.
                let Some(settings) = live.config.listener_at(configured) else {
                    tracing::debug!(listener = %configured, "listener removed by a reload; closing a client it accepted");
                    continue;
                };
                live.shared.metrics.connections.inc();
                let remote = canonical(addr);
                let door = session::door(remote, &live.config, &live.shared);
                if let Door::Refused(refusal) = door {
                    if session::finishes_at_accept(refusal, &live.config) {
                        session::refuse_at_accept(
                            &stream,
                            remote.ip(),
                            refusal,
                            &settings,
                            &live.config,
                            &live.shared,
                        );
                        continue;
                    }
                }
                let local = match bound {
                    Some(local) => local,
                    None => match stream.local_addr() {
                        Ok(local) => canonical(local),
                        Err(_) => continue,
                    },
                };
                let (config, shared) = (live.config.clone(), live.shared.clone());
                let door_task = handle(
                    stream,
                    remote,
                    local,
                    door,
                    settings,
                    config,
                    shared,
                    slot,
                    tracker.clone(),
                );
                tracker.spawn(door_task);
            }
            Err(e) => {
                // Out of descriptors or a reset before accept: back off
                // briefly rather than spin on the same error.
                if !accept_failing {
                    accept_failing = true;
                    tracing::warn!(error = %e, "accept failed; retrying every 50ms");
                } else {
                    tracing::debug!(error = %e, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The address every client of `socket` arrives at, when it is bound to
/// one: no getsockname per client. `None` for a wildcard listener.
fn clients_local_address(socket: &std::net::TcpListener) -> Option<SocketAddr> {
    let local = canonical(socket.local_addr().ok()?);
    (!local.ip().is_unspecified()).then_some(local)
}

/// Accepts one client, not yet registered with the runtime: a client
/// refused at the door never is.
async fn accept(
    listener: &AsyncFd<mio::net::TcpListener>,
) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        // mio accepts with SOCK_NONBLOCK: no second syscall per client to
        // make it so.
        if let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) {
            return accepted.map(|(stream, addr)| (stream.into(), addr));
        }
    }
}

/// The door's task: the client's socket joins the runtime and goes
/// through the door; an admitted client's relay then runs in a task of its
/// own, sized by the relay alone (the door's task ends), which holds the
/// descriptor budget's `slot` to the session's end.
#[allow(clippy::too_many_arguments)]
async fn handle(
    stream: std::net::TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    door: Door,
    listener: ListenerSettings,
    config: Arc<Config>,
    shared: Arc<Shared>,
    slot: tokio::sync::OwnedSemaphorePermit,
    tracker: TaskTracker,
) {
    // Non-blocking since its accept.
    let stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(client = %remote, error = %e, "cannot register an accepted client");
            return;
        }
    };
    let entered = session::enter(stream, remote, local, door, &listener, &config, &shared).await;
    if let Ok(mut entered) = entered {
        tracker.spawn(async move {
            session::relay(&mut entered, &listener, &config, &shared).await;
            drop(entered);
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clients_arrive_at_the_bound_address_with_nodelay_set() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let socket = listener.into_std().expect("std listener");
        let addr = socket.local_addr().expect("bound");
        assert_eq!(clients_local_address(&socket), Some(addr));
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        socket.set_nonblocking(false).expect("blocking accept");
        let (accepted, _) = socket.accept().expect("accept");
        assert_eq!(accepted.local_addr().ok(), Some(addr));
        assert!(
            accepted.nodelay().expect("nodelay"),
            "inherited from the listener"
        );
    }

    #[tokio::test]
    async fn a_wildcard_listener_asks_each_client_where_it_arrived() {
        let listener = bind("0.0.0.0:0".parse().unwrap()).expect("bind");
        let socket = listener.into_std().expect("std listener");
        assert_eq!(clients_local_address(&socket), None);
    }
}
