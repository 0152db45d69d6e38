//! mailmoat: an inbound SMTP abuse-shaping proxy.
//!
//! It listens where the mail receiver used to, and relays each client to
//! the real receiver (Postfix, Exim) while shaping it. The data path, top to
//! bottom:
//!
//! - [`listener`]: listening sockets and the accept loop.
//! - [`session`]: one client's lifecycle; [`session::relay`] is the
//!   SMTP-aware loop with every timeout.
//! - [`smtp`]: command, reply and DATA parsing, pure and fuzzable; [`pop3`]
//!   the same for POP3 before a login; [`sasl`] the SASL credentials both
//!   IMAP and POP3 read.
//! - [`upstream`]: connecting to the receiver, with failover and PROXY.
//!
//! Around it: [`config`] (file → validated settings), [`server`]
//! (wiring and graceful shutdown) over [`state`] (the shared state, built
//! once), [`supervisor`] (background tasks restarted when they die),
//! [`descriptors`] (the SMTP side's open-file budget), [`files`] (bounded
//! reads of operators' files), [`admin`] (HTTP
//! metrics and health), [`metrics`], [`tls`] (certificates and the
//! bounded handshake), [`watch`] (file watching for lists and
//! certificates), and [`sink`], a built-in receiver for the demo and tests
//! ([`redis_server`] runs a private Redis for the fleet's).
//! [`cli`] holds the operator's commands (`lookup`, `bans`), which talk to
//! the admin API and share [`lookup`] with it.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod bans;
pub mod blocklist;
pub mod cli;
pub mod config;
pub mod demo;
pub mod descriptors;
pub mod files;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod listener;
pub mod logins;
pub mod lookup;
pub mod metrics;
pub mod pop3;
pub mod proxy_protocol;
pub mod redis_server;
pub mod reload;
pub mod sasl;
pub mod server;
pub mod session;
pub mod shaping;
pub mod shutdown;
pub mod sink;
pub mod smtp;
pub mod state;
pub mod supervisor;
pub mod tls;
pub mod upstream;
pub mod watch;
pub mod workers;

pub use config::Config;
pub use server::Server;
