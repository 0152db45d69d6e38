//! POP3 as the proxy needs to understand it before a login: client command
//! lines, the receiver's status lines and multi-line replies (RFC 1939,
//! RFC 2449 CAPA, RFC 3206 response codes) and the SASL responses of
//! `AUTH PLAIN` and `AUTH LOGIN` (RFC 5034). Pure functions over bytes, no
//! I/O, so each is unit-tested and fuzzed on its own. The session module
//! that uses them is `session::pop3`.

pub mod command;
pub mod reply;
pub mod sasl;

pub use command::{Command, Verb};
pub use reply::{Reply, ReplyError, ReplyReader, Status};
