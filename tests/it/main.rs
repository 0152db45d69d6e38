//! Integration tests: one binary, modules per capability.
