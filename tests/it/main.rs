//! Integration tests: one binary, modules per capability.
mod harness;
mod relay;
