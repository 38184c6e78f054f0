//! Reflex storage backends: implementations of the core's [`EventSink`], [`ProfileStore`]
//! and [`CatalogStore`]. The embedded backend (fjall, in a local directory) is the durable
//! default for one machine; the Redis and ScyllaDB backends hold the shared state of many
//! replicas.
//! Every backend runs the same conformance suite.
//!
//! Layout:
//! - [`embedded`]: the embedded backend, [`EmbeddedStore`] and its [`EmbeddedConfig`]
//! - [`redis`]: the Redis backend (standalone or Cluster), [`RedisStore`] and its
//!   [`RedisConfig`]
//! - [`scylla`]: the ScyllaDB backend (LWT dedupe and sequence numbers, compare-and-set
//!   profile rows), [`ScyllaStore`] and its [`ScyllaConfig`]
//! - `conformance` (tests, or the `conformance` feature): backend-agnostic cases every
//!   backend must pass; `testing`: a real `redis-server` on a free port for tests
//!
//! [`EventSink`]: reflex_core::EventSink
//! [`ProfileStore`]: reflex_core::ProfileStore
//! [`CatalogStore`]: reflex_core::CatalogStore

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod embedded;
pub mod redis;
pub mod scylla;
#[cfg(any(test, feature = "conformance"))]
pub mod testing;

pub use embedded::{Durability, EmbeddedConfig, EmbeddedStore};
pub use redis::{RedisConfig, RedisStore};
pub use scylla::{ScyllaConfig, ScyllaStore};
