//! Integration tests: one binary, modules per capability.
mod admin;
mod admission;
mod attack;
mod bans;
mod blocklist;
mod cli;
mod clients;
mod fuzz_corpus;
mod harness;
mod lists;
mod logs;
mod relay;
mod shaping;
mod shutdown;
mod timeouts;
mod upstream;
