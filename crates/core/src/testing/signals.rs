//! [`RecallSignals`]: a [`SignalModel`] that proposes what each user bought, newest
//! first, for engine tests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::catalog::{ItemIdx, ItemIndex};
use crate::error::{Error, Result};
use crate::traits::{ImportUsers, Scored, SignalCandidate, SignalEvent, SignalModel, SignalSource};
use crate::types::{EventKind, ItemId, UserId};

/// Proposes every item a user bought, newest first, as [`SignalSource::Repeat`] with
/// probability `1 / (position + 2)`; says the items named at construction are bought
/// again and nothing else is. Exports to and imports from a plain list of item ids per
/// user. Remembers the category each item was given.
pub struct RecallSignals {
    rebought: HashSet<String>,
    items: Arc<ItemIndex>,
    bought: Mutex<HashMap<UserId, Vec<ItemIdx>>>,
    categories: Mutex<HashMap<ItemIdx, Option<String>>>,
}

impl RecallSignals {
    /// Signals under which the items in `rebought` are bought again; `items` names them.
    pub fn new(items: Arc<ItemIndex>, rebought: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            rebought: rebought.iter().map(|s| (*s).to_owned()).collect(),
            items,
            bought: Mutex::default(),
            categories: Mutex::default(),
        })
    }

    /// The category last given to `item`: `None` when never given, `Some(None)` when
    /// given none.
    pub fn category(&self, item: ItemIdx) -> Option<Option<String>> {
        self.categories.lock().get(&item).cloned()
    }
}

impl SignalModel for RecallSignals {
    fn observe(&self, event: &SignalEvent<'_>) {
        if *event.kind != EventKind::Purchase {
            return;
        }
        let mut bought = self.bought.lock();
        let mine = bought.entry(event.user.clone()).or_default();
        mine.retain(|&i| i != event.item);
        mine.push(event.item);
    }

    fn forget_user(&self, user: &UserId) {
        self.bought.lock().remove(user);
    }

    fn candidates(
        &self,
        user: &UserId,
        _recent: &[ItemIdx],
        k: usize,
        filter: &dyn Fn(ItemIdx) -> bool,
    ) -> Vec<SignalCandidate> {
        let bought = self.bought.lock();
        bought
            .get(user)
            .into_iter()
            .flat_map(|items| items.iter().rev())
            .filter(|&&i| filter(i))
            .take(k)
            .enumerate()
            .map(|(pos, &item)| SignalCandidate {
                item,
                probability: 1.0 / (pos as f32 + 2.0),
                source: SignalSource::Repeat,
            })
            .collect()
    }

    fn set_item_category(&self, item: ItemIdx, category: Option<&str>) {
        self.categories
            .lock()
            .insert(item, category.map(str::to_owned));
    }

    fn rebought(&self, item: ItemIdx) -> bool {
        self.items
            .id(item)
            .is_some_and(|id| self.rebought.contains(id.as_str()))
    }

    fn related(&self, _item: ItemIdx, _k: usize, _filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        Vec::new()
    }

    fn export(&self, id_of: &dyn Fn(ItemIdx) -> Option<ItemId>) -> Result<Vec<u8>> {
        let bought = self.bought.lock();
        let named: Vec<(UserId, Vec<ItemId>)> = bought
            .iter()
            .map(|(u, items)| (u.clone(), items.iter().filter_map(|&i| id_of(i)).collect()))
            .collect();
        postcard::to_allocvec(&named).map_err(|e| Error::storage("encoding test signals", e))
    }

    fn import(
        &self,
        bytes: &[u8],
        intern: &dyn Fn(&ItemId) -> ItemIdx,
        users: ImportUsers,
    ) -> Result<()> {
        let named: Vec<(UserId, Vec<ItemId>)> =
            postcard::from_bytes(bytes).map_err(|e| Error::storage("decoding test signals", e))?;
        // Everything this double keeps is per user.
        if users == ImportUsers::KeepLive {
            return Ok(());
        }
        let mut bought = self.bought.lock();
        bought.clear();
        for (user, items) in named {
            bought.insert(user, items.iter().map(intern).collect());
        }
        Ok(())
    }
}
