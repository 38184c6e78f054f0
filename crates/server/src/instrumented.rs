//! Backend decorators that record latency and failures of every storage call, so the
//! metrics cover whichever backend is configured without the backends knowing about them.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use reflex_core::traits::BoxFuture;
use reflex_core::{
    Appended, CatalogStore, EventSink, Item, ItemId, LogRecord, Profile, ProfileStore,
    ProfileUpdate, Result, Seq, SinkHealth, UserId,
};

use crate::metrics::Metrics;

/// Wraps a backend and times each call into `reflex_backend_duration_seconds{op}`,
/// counting failures in `reflex_backend_errors_total{op}`.
pub struct Instrumented<T: ?Sized> {
    inner: Arc<T>,
    metrics: Arc<Metrics>,
}

impl<T: ?Sized> Instrumented<T> {
    /// Decorates `inner`.
    pub fn new(inner: Arc<T>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { inner, metrics })
    }

    async fn timed<R>(&self, op: &'static str, call: impl Future<Output = Result<R>>) -> Result<R> {
        let started = Instant::now();
        let result = call.await;
        self.record(op, started, result.is_err());
        result
    }

    /// Records one call of `op` that began at `started`.
    fn record(&self, op: &'static str, started: Instant, failed: bool) {
        self.metrics
            .backend_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        if failed {
            self.metrics.backend_errors.with_label_values(&[op]).inc();
        }
    }
}

#[async_trait]
impl EventSink for Instrumented<dyn EventSink> {
    async fn append(&self, records: &[LogRecord]) -> Result<Vec<Appended>> {
        self.timed("append", self.inner.append(records)).await
    }

    async fn append_applying(
        &self,
        records: &[LogRecord],
        weights: &[f32],
    ) -> Option<Result<Vec<Appended>>> {
        let started = Instant::now();
        let result = self.inner.append_applying(records, weights).await?;
        self.record("append_apply", started, result.is_err());
        Some(result)
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<(Seq, LogRecord)>> {
        self.timed("read_log", self.inner.read(after, limit)).await
    }

    async fn last_seq(&self) -> Result<Seq> {
        self.inner.last_seq().await
    }

    async fn maintain(&self) -> Result<()> {
        self.timed("maintain", self.inner.maintain()).await
    }

    async fn trim(&self, through: Seq) -> Result<u64> {
        self.timed("trim_log", self.inner.trim(through)).await
    }

    async fn health(&self) -> SinkHealth {
        self.inner.health().await
    }
}

#[async_trait]
impl ProfileStore for Instrumented<dyn ProfileStore> {
    async fn get(&self, user: &UserId) -> Result<Option<Profile>> {
        self.timed("get_profile", self.inner.get(user)).await
    }

    async fn apply(&self, updates: &[ProfileUpdate<'_>]) -> Result<()> {
        self.timed("apply_profiles", self.inner.apply(updates))
            .await
    }

    async fn erase(&self, user: &UserId) -> Result<bool> {
        self.timed("erase_profile", self.inner.erase(user)).await
    }

    async fn durable_seq(&self) -> Result<Option<Seq>> {
        self.inner.durable_seq().await
    }

    fn capture_checkpoint(&self, seq: Seq) -> Option<BoxFuture<'static, Result<()>>> {
        let write = self.inner.capture_checkpoint(seq)?;
        let metrics = self.metrics.clone();
        Some(Box::pin(async move {
            let started = Instant::now();
            let result = write.await;
            metrics
                .backend_seconds
                .with_label_values(&["checkpoint"])
                .observe(started.elapsed().as_secs_f64());
            if result.is_err() {
                metrics
                    .backend_errors
                    .with_label_values(&["checkpoint"])
                    .inc();
            }
            result
        }))
    }

    fn checkpoint_due(&self, seq: Seq) -> bool {
        self.inner.checkpoint_due(seq)
    }

    async fn count(&self) -> Result<usize> {
        self.inner.count().await
    }

    async fn unapplied(&self, older_than_ms: i64, limit: usize) -> Result<Vec<Seq>> {
        self.timed("unapplied", self.inner.unapplied(older_than_ms, limit))
            .await
    }
}

#[async_trait]
impl CatalogStore for Instrumented<dyn CatalogStore> {
    async fn upsert(&self, items: &[Item]) -> Result<()> {
        self.timed("upsert_items", self.inner.upsert(items)).await
    }

    async fn get(&self, item: &ItemId) -> Result<Option<Item>> {
        self.timed("get_item", self.inner.get(item)).await
    }

    async fn delete(&self, item: &ItemId) -> Result<bool> {
        self.timed("delete_item", self.inner.delete(item)).await
    }

    async fn load_all(&self) -> Result<Vec<Item>> {
        self.timed("load_catalog", self.inner.load_all()).await
    }

    async fn version(&self) -> Result<u64> {
        self.timed("catalog_version", self.inner.version()).await
    }
}
