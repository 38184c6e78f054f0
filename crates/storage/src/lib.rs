//! Reflex storage backends: implementations of the core's [`EventSink`], [`ProfileStore`],
//! [`CatalogStore`] and [`ModelStore`]. The embedded backend (fjall, in a local directory)
//! is the durable default for one machine; the Redis and ScyllaDB backends hold the shared
//! state of many replicas. [`StoreConfig::open`] builds the backend the configuration
//! chooses. Every backend runs the same conformance suite.
//!
//! Layout:
//! - [`config`]: the `store` configuration section, [`StoreConfig`] and [`Backend`], and
//!   opening the chosen backend
//! - [`stores`]: [`Stores`], the trait objects an opened backend hands the engine
//! - [`embedded`]: the embedded backend, [`EmbeddedStore`] and its [`EmbeddedConfig`]
//! - [`redis`]: the Redis backend (standalone or Cluster), `RedisStore` (cargo feature
//!   `redis`) and its [`RedisConfig`]
//! - [`scylla`]: the ScyllaDB backend (LWT dedupe and sequence numbers, compare-and-set
//!   profile rows), `ScyllaStore` (cargo feature `scylla`) and its [`ScyllaConfig`]
//! - `remote` (with either shared backend): what the Redis and Scylla backends share
//! - `conformance` (tests, or the `conformance` feature): backend-agnostic cases every
//!   backend must pass and the `conformance_suite!` macro that runs them; `testing`: a
//!   real `redis-server` on a free port for tests
//!
//! Each backend folder has the same files: `mod.rs`, `config.rs`, one file per trait
//! (`log.rs`, `profiles.rs`, `catalog.rs`, `models.rs`) and `tests.rs`, plus its own
//! extras.
//!
//! [`EventSink`]: reflex_core::EventSink
//! [`ProfileStore`]: reflex_core::ProfileStore
//! [`CatalogStore`]: reflex_core::CatalogStore
//! [`ModelStore`]: reflex_core::ModelStore

pub mod config;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod embedded;
pub mod redis;
#[cfg(any(feature = "redis", feature = "scylla"))]
mod remote;
pub mod scylla;
pub mod stores;
#[cfg(any(test, feature = "conformance"))]
pub mod testing;

pub use config::{Backend, StoreConfig};
pub use embedded::{Durability, EmbeddedConfig, EmbeddedStore};
pub use redis::RedisConfig;
#[cfg(feature = "redis")]
pub use redis::RedisStore;
/// The error and result types of every backend (the core's, which the traits return).
pub use reflex_core::{Error, Result};
pub use scylla::ScyllaConfig;
#[cfg(feature = "scylla")]
pub use scylla::ScyllaStore;
pub use stores::{Connections, Stores};
