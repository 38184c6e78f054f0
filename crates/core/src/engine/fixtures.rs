//! What the engine's tests share: an engine over the in-memory backend and the counting
//! model ([`crate::testing`]), and events and items to feed it.

use std::sync::Arc;

use super::{Backends, Engine, EngineConfig, Recommendation};
use crate::catalog::{Item, ItemIndex};
use crate::testing::{CountingModel, MemoryStore, RecallSignals, ScanRetriever};
use crate::types::{EventKind, ItemId, RawEvent, RawKind, UserId, now_ms};

/// One engine and the backends it runs on, kept so tests can look inside them.
pub(super) struct Harness {
    pub(super) engine: Engine,
    pub(super) store: Arc<MemoryStore>,
    pub(super) model: Arc<CountingModel>,
    pub(super) items: Arc<ItemIndex>,
}

impl Harness {
    /// An engine with the default configuration over an empty store, recovered.
    pub(super) async fn new() -> Self {
        Self::with(EngineConfig::default()).await
    }

    /// An engine with `config` over an empty store, recovered.
    pub(super) async fn with(config: EngineConfig) -> Self {
        Self::over(MemoryStore::new(), config).await
    }

    /// A fresh engine (new model, new item index) over `store`, recovered: what a
    /// process starting on that store runs.
    pub(super) async fn over(store: Arc<MemoryStore>, config: EngineConfig) -> Self {
        let harness = Self::unrecovered(store, config);
        harness.engine.recover().await.unwrap();
        harness
    }

    /// The engine a restart after a crash brings up: over what the store made durable
    /// ([`MemoryStore::reopen`]), with nothing in memory, not yet recovered.
    pub(super) fn after_crash(&self) -> Unrecovered {
        Unrecovered(Self::unrecovered(
            self.store.reopen(),
            self.engine.config().clone(),
        ))
    }

    fn unrecovered(store: Arc<MemoryStore>, config: EngineConfig) -> Self {
        let model = CountingModel::new();
        let items = Arc::new(ItemIndex::new());
        let backends = Backends {
            sink: store.clone(),
            profiles: store.clone(),
            catalog: store.clone(),
            model: model.clone(),
            retriever: ScanRetriever::new(model.clone(), items.clone()),
            items: items.clone(),
            models: store.clone(),
        };
        Self {
            engine: Engine::new(backends, config),
            store,
            model,
            items,
        }
    }

    /// The same engine with [`RecallSignals`] under which the items named in `rebought`
    /// are bought again.
    pub(super) fn with_signals(self, rebought: &[&str]) -> (Self, Arc<RecallSignals>) {
        let signals = RecallSignals::new(self.items.clone(), rebought);
        let Self {
            engine,
            store,
            model,
            items,
        } = self;
        let engine = engine.with_signals(signals.clone());
        (
            Self {
                engine,
                store,
                model,
                items,
            },
            signals,
        )
    }

    /// The same engine, its model following the store's log as replicas on a shared
    /// store do ([`Engine::following_the_log`]).
    pub(super) fn following(self) -> Self {
        Self {
            engine: self.engine.following_the_log(),
            ..self
        }
    }

    /// Ingests `events`, asserting every one is accepted.
    pub(super) async fn accept(&self, events: Vec<RawEvent>) {
        let count = events.len();
        let outcomes = self.engine.ingest(events).await.unwrap();
        assert_eq!(
            outcomes,
            vec![super::EventOutcome::Accepted; count],
            "every event is accepted"
        );
    }

    /// The summed weight the model learnt on item `id` (0 when none).
    pub(super) fn learnt(&self, id: &str) -> f32 {
        self.items
            .get(id)
            .and_then(|idx| self.model.item_weight(idx))
            .unwrap_or(0.0)
    }

    /// The version of `name`'s profile, 0 when there is none.
    pub(super) async fn profile_version(&self, name: &str) -> u64 {
        self.engine
            .profile(&user(name))
            .await
            .unwrap()
            .map_or(0, |p| p.version)
    }

    /// The learning weight of a built-in kind under the engine's configuration.
    pub(super) fn weight(&self, kind: &EventKind) -> f32 {
        self.engine.config().weights.weight(kind, None)
    }
}

/// A [`Harness`] whose engine has not run [`Engine::recover`] yet.
pub(super) struct Unrecovered(Harness);

impl Unrecovered {
    /// Recovers, returning the harness and the number of log records replayed.
    pub(super) async fn recover(self) -> (Harness, u64) {
        let replayed = self.0.engine.recover().await.unwrap();
        (self.0, replayed)
    }
}

/// An event of `kind` by `user` on `item`, now.
pub(super) fn raw(event_id: &str, user: &str, item: &str, kind: RawKind) -> RawEvent {
    RawEvent {
        event_id: event_id.into(),
        user_id: user.into(),
        item_id: item.into(),
        kind: Some(kind),
        timestamp_ms: Some(now_ms()),
        ..RawEvent::default()
    }
}

/// `count` views of `item` by `user`, with event ids `{prefix}-0`, `{prefix}-1`, ….
pub(super) fn views(prefix: &str, user: &str, item: &str, count: usize) -> Vec<RawEvent> {
    (0..count)
        .map(|i| raw(&format!("{prefix}-{i}"), user, item, RawKind::View))
        .collect()
}

/// A validated user id.
pub(super) fn user(name: &str) -> UserId {
    UserId::parse(name, "user_id").unwrap()
}

/// A validated item id.
pub(super) fn item_id(name: &str) -> ItemId {
    ItemId::parse(name, "item_id").unwrap()
}

/// A catalog item in `categories`, without an embedding.
pub(super) fn item(name: &str, available: bool, categories: &[&str]) -> Item {
    Item {
        item_id: item_id(name),
        title: name.to_uppercase(),
        categories: categories.iter().map(|c| (*c).to_owned()).collect(),
        available,
        embedding: Vec::new(),
    }
}

/// The ids of a recommendation's items, best first.
pub(super) fn ids(answer: &Recommendation) -> Vec<&str> {
    answer.items.iter().map(|i| i.item_id.as_str()).collect()
}
