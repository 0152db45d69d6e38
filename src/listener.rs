//! Listening sockets and the accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::proxy_protocol::canonical;
use crate::session::{self, Shared};

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
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until `stop`, each client in its own task on `tracker`.
pub async fn accept_loop(
    listener: TcpListener,
    config: Arc<Config>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, addr)) => {
                shared.metrics.connections_accepted.inc();
                tracker.spawn(handle(stream, addr, config.clone(), shared.clone()));
            }
            Err(e) => {
                // Out of descriptors or a reset before accept: back off
                // briefly rather than spin on the same error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(stream: TcpStream, remote: SocketAddr, config: Arc<Config>, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    session::serve(stream, canonical(remote), canonical(local), config, &shared).await;
}
