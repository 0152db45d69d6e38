//! IMAP, as the relay reads it before login.

pub mod command;
pub mod reply;
pub mod sasl;
