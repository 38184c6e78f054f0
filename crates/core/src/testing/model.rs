//! [`CountingModel`] and [`ScanRetriever`]: the smallest model and retriever the engine
//! can run on, so what it learns can be read back exactly.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::catalog::{ItemIdx, ItemIndex};
use crate::error::{Error, Result};
use crate::model_store::{ItemState, ModelState};
use crate::traits::{HistoryEntry, ImportUsers, Observation, OnlineModel, Retriever, Scored};
use crate::types::{TimestampMs, UserId};

/// A test double for [`OnlineModel`]: an item's vector has one dimension, the summed
/// weight of the events learnt on it, which is also its popularity; a user whose history
/// holds any learnt item folds in to `[1.0]`, so searches rank items by that sum. It
/// keeps per user the summed weight of their events, which [`OnlineModel::forget_user`]
/// drops, and exports and imports its whole state, so snapshots and rollbacks round-trip.
#[derive(Default)]
pub struct CountingModel {
    state: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    items: BTreeMap<ItemIdx, f32>,
    users: HashMap<UserId, f32>,
    events: u64,
    latest_ms: TimestampMs,
    batch_origin: Option<String>,
}

impl CountingModel {
    /// The version label it reports.
    pub const KIND: &'static str = "counting";

    /// A model that has learnt nothing.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Events learnt (observed, or carried in an imported state).
    pub fn events(&self) -> u64 {
        self.state.lock().events
    }

    /// The summed weight learnt on `item`; `None` when it learnt nothing on it.
    pub fn item_weight(&self, item: ItemIdx) -> Option<f32> {
        self.state.lock().items.get(&item).copied()
    }

    /// The summed weight of `user`'s events; `None` for a user it keeps nothing about.
    pub fn user_weight(&self, user: &UserId) -> Option<f32> {
        self.state.lock().users.get(user).copied()
    }
}

impl OnlineModel for CountingModel {
    fn version(&self) -> String {
        Self::KIND.to_owned()
    }

    fn observe(&self, obs: &Observation<'_>) {
        let mut state = self.state.lock();
        *state.items.entry(obs.item).or_default() += obs.weight;
        *state.users.entry(obs.user.clone()).or_default() += obs.weight;
        state.events += 1;
        state.latest_ms = state.latest_ms.max(obs.timestamp_ms);
    }

    fn forget_user(&self, user: &UserId) {
        self.state.lock().users.remove(user);
    }

    fn user_vector(&self, history: &[HistoryEntry]) -> Option<Vec<f32>> {
        let state = self.state.lock();
        history
            .iter()
            .any(|h| state.items.contains_key(&h.item))
            .then(|| vec![1.0])
    }

    fn item_vector(&self, item: ItemIdx) -> Option<Vec<f32>> {
        self.item_weight(item).map(|w| vec![w])
    }

    fn popular(&self, k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        let candidates: Vec<Scored> = self
            .state
            .lock()
            .items
            .iter()
            .map(|(item, score)| Scored {
                item: *item,
                score: *score,
            })
            .collect();
        best(candidates.into_iter().filter(|s| filter(s.item)), k)
    }

    fn export(&self) -> Option<ModelState> {
        let state = self.state.lock();
        Some(ModelState {
            factors: 1,
            items: state
                .items
                .iter()
                .map(|(item, w)| ItemState {
                    item: *item,
                    vector: vec![*w],
                    popularity: f64::from(*w),
                })
                .collect(),
            users: state
                .users
                .iter()
                .map(|(user, w)| (user.clone(), vec![*w]))
                .collect(),
            events: state.events,
            latest_ms: state.latest_ms,
            batch_origin: state.batch_origin.clone(),
        })
    }

    fn import(&self, imported: &ModelState, keep: ImportUsers) -> Result<()> {
        let one = |v: &[f32]| match v {
            [w] => Ok(*w),
            other => Err(Error::Internal(format!(
                "the counting model takes vectors of 1 value, not {}",
                other.len()
            ))),
        };
        let items = imported
            .items
            .iter()
            .map(|i| Ok((i.item, one(&i.vector)?)))
            .collect::<Result<Vec<_>>>()?;
        let users = imported
            .users
            .iter()
            .map(|(u, v)| Ok((u.clone(), one(v)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut state = self.state.lock();
        state.items.extend(items);
        if keep == ImportUsers::Restore {
            state.users.clear();
            state.users.extend(users);
        }
        state.events = imported.events;
        state.latest_ms = imported.latest_ms;
        state.batch_origin.clone_from(&imported.batch_origin);
        Ok(())
    }
}

/// A test double for [`Retriever`]: an exact scan that scores every item of the index
/// with the model's [`OnlineModel::score`] (items it has not learnt are skipped).
pub struct ScanRetriever {
    model: Arc<dyn OnlineModel>,
    items: Arc<ItemIndex>,
}

impl ScanRetriever {
    /// A scan over `items` scored by `model`.
    pub fn new(model: Arc<dyn OnlineModel>, items: Arc<ItemIndex>) -> Arc<Self> {
        Arc::new(Self { model, items })
    }
}

impl Retriever for ScanRetriever {
    fn search(&self, query: &[f32], k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        let found = (0..self.items.len() as ItemIdx).filter_map(|item| {
            let score = self.model.score(item, query)?;
            filter(item).then_some(Scored { item, score })
        });
        best(found, k)
    }

    fn len(&self) -> usize {
        (0..self.items.len() as ItemIdx)
            .filter(|item| self.model.item_vector(*item).is_some())
            .count()
    }
}

/// The `k` highest scores, best first (ties by item index, so answers are stable).
fn best(scored: impl Iterator<Item = Scored>, k: usize) -> Vec<Scored> {
    let mut all: Vec<Scored> = scored.collect();
    all.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
    all.truncate(k);
    all
}
