//! SMTP as the proxy needs to understand it: client command lines, receiver
//! replies and the DATA end-of-message marker. Pure functions over bytes, no
//! I/O, so each is unit-tested and fuzzed on its own.

pub mod command;
pub mod data;
pub mod reply;

pub use command::{Command, Verb};
pub use data::{DataEvent, DataScanner};
pub use reply::{Reply, ReplyAssembler, ReplyError};
