//! What an opened backend hands the engine: one trait object per storage role
//! ([`Stores`]), and the optional capability of closing its connections
//! ([`Connections`]).

use std::sync::Arc;

use async_trait::async_trait;
use reflex_core::{CatalogStore, EventSink, ModelStore, ProfileStore};

/// A backend whose network connections outlive the trait objects it hands out (a pool
/// with background tasks): closed through this when the caller gives up on the backend,
/// so a retried start-up does not leave the failed attempt's connections open.
#[async_trait]
pub trait Connections: Send + Sync + 'static {
    /// Closes every connection; later calls through the store's handles fail.
    async fn close(&self);
}

/// The storage half of the engine's backends; one backend fills every role.
#[derive(Clone)]
pub struct Stores {
    /// The event log.
    pub sink: Arc<dyn EventSink>,
    /// User profiles.
    pub profiles: Arc<dyn ProfileStore>,
    /// Catalog items.
    pub catalog: Arc<dyn CatalogStore>,
    /// Model versions and the learner lease.
    pub models: Arc<dyn ModelStore>,
    /// The backend's connections, when it has some to close (see [`Stores::close`]).
    pub connections: Option<Arc<dyn Connections>>,
}

impl Stores {
    /// Every storage role filled by `store`, which has no connections to close.
    pub fn all_in<S>(store: Arc<S>) -> Self
    where
        S: EventSink + ProfileStore + CatalogStore + ModelStore,
    {
        Self {
            sink: store.clone(),
            profiles: store.clone(),
            catalog: store.clone(),
            models: store,
            connections: None,
        }
    }

    /// Every storage role filled by `store`, whose connections [`close`](Self::close)
    /// closes.
    pub fn connected<S>(store: Arc<S>) -> Self
    where
        S: EventSink + ProfileStore + CatalogStore + ModelStore + Connections,
    {
        Self {
            connections: Some(store.clone()),
            ..Self::all_in(store)
        }
    }

    /// Closes the backend's connections, if it has any (a failed start-up calls it before
    /// trying again).
    pub async fn close(&self) {
        if let Some(connections) = &self.connections {
            connections.close().await;
        }
    }
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("connections", &self.connections.is_some())
            .finish_non_exhaustive()
    }
}
