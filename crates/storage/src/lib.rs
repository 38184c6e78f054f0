//! Reflex storage backends: implementations of the core's [`EventSink`], [`ProfileStore`]
//! and [`CatalogStore`]. The embedded backend (fjall, in a local directory) is the durable
//! default; Redis and ScyllaDB backends for scale-out come as sibling modules behind cargo
//! features, and every backend runs the same conformance suite.
//!
//! Layout:
//! - [`embedded`]: the embedded backend, [`EmbeddedStore`] and its [`EmbeddedConfig`]
//! - `conformance` (tests, or the `conformance` feature): backend-agnostic cases every
//!   backend must pass
//!
//! [`EventSink`]: reflex_core::EventSink
//! [`ProfileStore`]: reflex_core::ProfileStore
//! [`CatalogStore`]: reflex_core::CatalogStore

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod embedded;

pub use embedded::{Durability, EmbeddedConfig, EmbeddedStore};
