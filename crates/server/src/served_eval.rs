//! The served ranking under an evaluation protocol: a real engine ([`build_engine`], the
//! configuration `reflex serve` would run with, on a fresh embedded store in a scratch
//! directory) learns the training part of a split through [`Engine::ingest`], in time
//! order, every event with its own timestamp; then `Recommend(count = 10)` with the
//! default filter is asked for every held-out user. Nothing here re-implements a ranking:
//! what it scores is what a client of the server gets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use reflex_core::engine::{EventOutcome, RequestFilter};
use reflex_core::{Engine, ItemId, RawEvent, RawKind, UserId};
use reflex_models::eval::Dataset;
use reflex_models::eval::protocol::{CUTOFF, Split};
use reflex_storage::Backend;

use crate::app::build_engine;
use crate::config::Config;
use crate::metrics::Metrics;

/// What the replay did, beside the rankings.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReplayStats {
    /// Events sent.
    pub events: u64,
    /// Events answered ACCEPTED.
    pub accepted: u64,
    /// Events answered otherwise (rejected, filtered, duplicate).
    pub not_accepted: u64,
    /// Seconds spent ingesting.
    pub ingest_secs: f64,
    /// Seconds spent asking for recommendations.
    pub recommend_secs: f64,
    /// The refit run between the replay and the questions (`reflex eval --refit`).
    pub refit: Option<crate::refit::RefitReport>,
}

/// The id a dense user number is sent with.
pub fn user_id(user: u32) -> String {
    format!("u{user}")
}

/// The id a dense item number is sent with: its id in the file.
fn item_id(data: &Dataset, item: u32) -> String {
    data.item_ids
        .get(item as usize)
        .cloned()
        .unwrap_or_else(|| format!("i{item}"))
}

/// Replays `split`'s training part into an engine configured by `config` (its store is
/// replaced by a scratch embedded one, its metrics endpoint and the bot filter's
/// wall-clock rate limit are turned off, as for `reflex import`), every event of `kind`,
/// and returns each target's ten, as dense item numbers.
pub async fn served_rankings(
    data: &Dataset,
    split: &Split,
    mut config: Config,
    kind: RawKind,
    refit: bool,
) -> anyhow::Result<(Vec<Vec<u32>>, ReplayStats)> {
    let scratch = tempfile::tempdir().context("creating a scratch data directory")?;
    config.store.backend = Backend::Embedded;
    config.store.embedded.data_dir = scratch.path().to_owned();
    config.metrics.enabled = false;
    config.engine.bot_filter.max_events_per_user_per_sec = 0;
    let metrics = Metrics::new()?;
    let engine = build_engine(&config, &metrics).await?;
    let refitter = refit.then(|| {
        crate::refit::Refitter::new(
            engine.clone(),
            config.refit.clone(),
            config.model.clone(),
            config.engine.weights.clone(),
        )
    });
    let result = replay(&engine, data, split, kind, refitter.as_ref()).await;
    drop(refitter);
    drop(engine);
    result
}

async fn replay(
    engine: &Arc<Engine>,
    data: &Dataset,
    split: &Split,
    kind: RawKind,
    refitter: Option<&crate::refit::Refitter>,
) -> anyhow::Result<(Vec<Vec<u32>>, ReplayStats)> {
    let mut stats = ReplayStats::default();
    let catalog: Vec<reflex_core::Item> = (0..data.items as u32)
        .map(|i| {
            let id = item_id(data, i);
            Ok(reflex_core::Item {
                item_id: ItemId::parse(&id, "item_id")
                    .with_context(|| format!("item {id:?} is not a valid item id"))?,
                title: String::new(),
                categories: Vec::new(),
                available: true,
                embedding: Vec::new(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    for chunk in catalog.chunks(1000) {
        engine
            .upsert_items(chunk.to_vec())
            .await
            .context("upserting the catalog")?;
    }

    let started = Instant::now();
    for chunk in split.train.chunks(engine.config().max_batch.max(1)) {
        let batch: Vec<RawEvent> = chunk
            .iter()
            .map(|&i| {
                let r = data.ratings[i];
                RawEvent {
                    event_id: format!("ev-{i}"),
                    user_id: user_id(r.user),
                    item_id: item_id(data, r.item),
                    kind: Some(kind),
                    timestamp_ms: Some(r.timestamp_ms),
                    ..RawEvent::default()
                }
            })
            .collect();
        stats.events += batch.len() as u64;
        for outcome in engine.ingest(batch).await.context("ingesting")? {
            if outcome == EventOutcome::Accepted {
                stats.accepted += 1;
            } else {
                stats.not_accepted += 1;
            }
        }
    }
    stats.ingest_secs = started.elapsed().as_secs_f64();
    if let Some(refitter) = refitter {
        stats.refit = Some(
            refitter
                .run(true, false, "reflex eval")
                .await
                .context("refitting")?,
        );
    }

    let by_id: HashMap<String, u32> = (0..data.items as u32)
        .map(|i| (item_id(data, i), i))
        .collect();
    let started = Instant::now();
    let filter = RequestFilter::default();
    let mut lists = Vec::with_capacity(split.targets.len());
    for target in &split.targets {
        let user = UserId::parse(&user_id(target.user), "user_id")?;
        let answer = engine
            .recommend(&user, CUTOFF, &filter)
            .await
            .with_context(|| format!("recommending for {user}"))?;
        lists.push(
            answer
                .items
                .iter()
                .filter_map(|s| by_id.get(s.item_id.as_str()).copied())
                .collect(),
        );
    }
    stats.recommend_secs = started.elapsed().as_secs_f64();
    Ok((lists, stats))
}
