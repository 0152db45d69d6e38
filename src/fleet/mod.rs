//! The fleet: bans and per-IP rate counters shared through Redis (or
//! Valkey), while every node keeps enforcing from its own state.
//!
//! Nothing on a client's path waits for Redis. A ban made here is applied
//! locally first and then written to the store and announced; a ban from
//! another node arrives by pub/sub and is applied like a local one. A
//! shared rate is decided from local state (this node's full bucket, and
//! what the store last said about the client) and the take is sent to the
//! store's GCRA script in the background. When the store is slow or gone
//! a breaker opens and each node enforces its share of every shared rate.
