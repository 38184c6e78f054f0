//! The ScyllaDB backend: profiles, the event log with its dedupe window, and the catalog
//! in one keyspace of a Scylla (or Cassandra) cluster, shared by every replica.
//!
//! # Data model
//!
//! The keyspace and its tables are created at start-up when missing (`CREATE … IF NOT
//! EXISTS`, replication from [`ScyllaConfig`]); `schema_version` records the schema the
//! tables follow, so a later release can migrate them and an older binary refuses a newer
//! schema. The statements are in `cql.rs`, run at connect by `schema.rs`:
//!
//! - `profiles` — one row per user (partition key `user_id`): version, last-seen and
//!   touched times, built-in counters as a frozen list, custom counters, the recent list and
//!   the purchases as frozen lists (of tuples), the session as a frozen tuple, and the
//!   write `stamp` (plus the last 32 stamps). The row is written whole, `USING TTL` of the
//!   time left until `touched + ttl`, so the TTL is refreshed on every write and an idle
//!   profile disappears by itself; reads also drop a profile past its TTL.
//! - `log` — the event log, partitioned by `bucket = seq / 10 000`, clustered by `seq`,
//!   each row the postcard-encoded [`LogRecord`] and its ingest time.
//! - `sequences` — the rows `log` and `models` holding the last number handed out.
//! - `dedupe` — one row per event id (claim time and a random claim token), `USING TTL`
//!   of the dedupe window.
//! - `catalog` — one row per item; `catalog_version` — a counter bumped on every change.
//! - `model_versions`, `model_chunks`, `rollbacks`, `leases` — model snapshots, the
//!   rollback record and the learner lease ([`ModelStore`](reflex_core::ModelStore), see
//!   `models.rs`).
//!
//! How appends take positions and claim event ids is described in `log.rs`; how profile
//! rows are updated in `profiles.rs`.
//!
//! Requests are token-aware (the driver's default policy) and prefer `local_datacenter`;
//! every statement is prepared once at connect.
//!
//! [`LogRecord`]: reflex_core::LogRecord
//!
//! Layout: `store.rs` holds [`ScyllaStore`], its session, the driver's error mapping and
//! the sequence counters; `log.rs`, `profiles.rs`, `catalog.rs` and `models.rs` implement
//! one trait each; `schema.rs` creates the tables and prepares the statements of `cql.rs`;
//! `rows.rs` converts rows. Everything but [`ScyllaConfig`] needs the cargo feature
//! `scylla`.

mod config;

#[cfg(feature = "scylla")]
mod catalog;
#[cfg(feature = "scylla")]
mod cql;
#[cfg(feature = "scylla")]
mod log;
#[cfg(feature = "scylla")]
mod models;
#[cfg(feature = "scylla")]
mod profiles;
#[cfg(feature = "scylla")]
mod rows;
#[cfg(feature = "scylla")]
mod schema;
#[cfg(feature = "scylla")]
mod store;
#[cfg(feature = "scylla")]
#[cfg(test)]
mod tests;

pub use config::{ConsistencyLevel, ReplicationClass, ScyllaConfig, SerialConsistencyLevel};
#[cfg(feature = "scylla")]
pub use rows::RowError;
#[cfg(feature = "scylla")]
pub use store::{ScyllaStore, ScyllaStoreError};
