//! The Redis backend: profiles, the event log with its dedupe window, and the catalog in
//! one Redis (standalone or Cluster), shared by every replica.
//!
//! Key layout (`P` is [`RedisConfig::prefix`]):
//! - `{P}:log` — the event log, a stream whose entry ids are `<seq>-0`, each with fields
//!   `t` (ingested ms) and `r` (the postcard-encoded [`LogRecord`]);
//! - `{P}:seq` — the last sequence number handed out;
//! - `{P}:dd:<event id>` — a dedupe key, expiring after the dedupe window;
//! - `{P}:pending` — a sorted set of the positions appended but not yet applied to
//!   profiles, scored by ingest time (what maintenance repairs);
//! - `P:p:{<user>}`, `P:r:{<user>}`, `P:b:{<user>}` — a user's profile hash (counters,
//!   session, times, version), recent interactions and purchases, expiring with the TTL;
//! - `{P}:catalog` — a hash of item id to postcard-encoded [`Item`].
//!
//! The log, its counter and the dedupe keys share one hash slot (`{P}`) so the append
//! script can check dedupe keys and append atomically; each user's keys share the user's
//! slot so their update script is atomic. On Cluster the log therefore lives on one shard
//! and profiles spread over all of them.
//!
//! Every write is one Lua script ([`scripts`]), called with `EVALSHA`. On a standalone
//! Redis an ingested batch costs one call that appends it and applies it to every user's
//! profile at once (`EventSink::append_applying`): one round trip, nothing pending in
//! between. On Cluster it costs one append call plus one apply call per hash slot among
//! the batch's users, sent at once and pipelined on the client's connections. The apply
//! script, given the pending set (standalone), applies and confirms a position in one
//! step, so each event is applied exactly once; on Cluster (another slot) the store
//! confirms after the scripts.

//!
//! Layout: `store.rs` holds [`RedisStore`] and its connection; `log.rs`, `profiles.rs`,
//! `catalog.rs` and `models.rs` implement one trait each; `scripts.rs` holds the Lua.
//! Everything but [`RedisConfig`] needs the cargo feature `redis`.

mod config;

#[cfg(feature = "redis")]
mod catalog;
#[cfg(feature = "redis")]
mod log;
#[cfg(feature = "redis")]
mod models;
#[cfg(feature = "redis")]
mod profiles;
#[cfg(feature = "redis")]
mod scripts;
#[cfg(feature = "redis")]
mod store;
#[cfg(feature = "redis")]
#[cfg(test)]
mod tests;

pub use config::RedisConfig;
#[cfg(feature = "redis")]
pub use store::{RedisStore, RedisStoreError};
