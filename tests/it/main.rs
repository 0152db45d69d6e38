//! Integration tests: one binary, modules per capability.
mod admin;
mod cli;
mod harness;
mod relay;
mod shutdown;
mod timeouts;
mod upstream;
