//! [`MemoryStore`]: every storage trait in memory, behind one mutex.
//!
//! The semantics are the embedded backend's (`reflex-storage`'s `embedded/`): gap-free
//! log positions from 1, event ids deduplicated within a window (in the call and across
//! calls, erase records never), profiles applied in memory and made durable only by
//! checkpoints that carry the log position they are consistent with, expiry by the
//! profile policy's TTL. Two things go beyond it, as the shared backends do: the catalog
//! version counts changes, and leases are exclusive until released or expired.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::catalog::Item;
use crate::error::{Error, Result};
use crate::model_store::{ModelStore, ModelVersion, Rollbacks};
use crate::profile::{Profile, ProfilePolicy};
use crate::traits::{
    Appended, BoxFuture, CatalogStore, EventSink, LogRecord, ProfileStore, ProfileUpdate,
};
use crate::types::{EventId, ItemId, Seq, TimestampMs, UserId, now_ms};

/// How long an event id stays a duplicate by default: a week, as in the embedded backend.
pub const DEFAULT_DEDUPE_WINDOW_MS: i64 = 7 * 24 * 3600 * 1000;

/// An in-memory backend implementing [`EventSink`], [`ProfileStore`], [`CatalogStore`]
/// and [`ModelStore`], so one `Arc` fills every storage slot of the engine's backends.
///
/// "Durable" here means: kept by [`MemoryStore::reopen`], which plays a restart after a
/// crash. The log, dedupe keys, catalog, model versions, leases and the last profile
/// checkpoint survive it; profiles applied since that checkpoint do not.
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    policy: ProfilePolicy,
    dedupe_window_ms: i64,
    state: Mutex<State>,
}

struct State {
    durable: Durable,
    /// Profiles as applied, checkpointed or not (expired ones until evicted).
    live: HashMap<UserId, Profile>,
    /// Users changed, erased or evicted since the last checkpoint captured them.
    dirty: HashSet<UserId>,
}

/// What survives [`MemoryStore::reopen`].
#[derive(Clone, Default)]
struct Durable {
    /// The record at position `n` is `log[n - 1]`.
    log: Vec<LogRecord>,
    /// Event id → when it was recorded.
    dedupe: HashMap<EventId, TimestampMs>,
    /// Profiles as of the last checkpoint.
    checkpoint: HashMap<UserId, Profile>,
    /// The log position `checkpoint` is consistent with.
    checkpoint_seq: Seq,
    items: BTreeMap<ItemId, Item>,
    catalog_version: u64,
    /// Version id → its metadata and snapshot.
    versions: BTreeMap<u64, (ModelVersion, Vec<u8>)>,
    /// The last id handed out, so ids keep increasing across pruning.
    last_version: u64,
    rollbacks: Rollbacks,
    /// Lease name → holder and when the lease runs out.
    leases: HashMap<String, (String, Instant)>,
}

impl MemoryStore {
    /// An empty store with the default profile policy and a dedupe window of a week.
    pub fn new() -> Arc<Self> {
        Self::with(ProfilePolicy::default(), DEFAULT_DEDUPE_WINDOW_MS)
    }

    /// An empty store with `policy` for profiles and a dedupe window of
    /// `dedupe_window_ms`.
    pub fn with(policy: ProfilePolicy, dedupe_window_ms: i64) -> Arc<Self> {
        Self::from_durable(policy, dedupe_window_ms, Durable::default())
    }

    fn from_durable(policy: ProfilePolicy, dedupe_window_ms: i64, durable: Durable) -> Arc<Self> {
        // As the embedded backend loads them: expired ones too, replay judges those.
        let live = durable.checkpoint.clone();
        Arc::new(Self {
            inner: Arc::new(Inner {
                policy,
                dedupe_window_ms,
                state: Mutex::new(State {
                    durable,
                    live,
                    dirty: HashSet::new(),
                }),
            }),
        })
    }

    /// A new store holding what this one made durable, as a process restarting after a
    /// crash finds it: the log, dedupe keys, catalog, model versions, leases and the last
    /// profile checkpoint. Profiles applied since that checkpoint are lost (the engine's
    /// recovery replays them from the log). The two stores share nothing afterwards.
    pub fn reopen(&self) -> Arc<Self> {
        let durable = self.inner.state.lock().durable.clone();
        Self::from_durable(
            self.inner.policy.clone(),
            self.inner.dedupe_window_ms,
            durable,
        )
    }

    /// The profile policy the store applies with.
    pub fn policy(&self) -> &ProfilePolicy {
        &self.inner.policy
    }
}

impl Inner {
    fn expired(&self, profile: &Profile, now: TimestampMs) -> bool {
        profile.is_expired(&self.policy, now)
    }
}

#[async_trait]
impl EventSink for MemoryStore {
    async fn append(&self, records: &[LogRecord]) -> Result<Vec<Appended>> {
        let now = now_ms();
        let window = self.inner.dedupe_window_ms;
        let mut state = self.inner.state.lock();
        let durable = &mut state.durable;
        let mut in_call: HashSet<&EventId> = HashSet::new();
        let mut outcomes = Vec::with_capacity(records.len());
        for record in records {
            if let LogRecord::Event { event, .. } = record {
                let id = &event.event_id;
                let recorded = durable
                    .dedupe
                    .get(id)
                    .is_some_and(|at| now.saturating_sub(*at) <= window);
                if !in_call.insert(id) || recorded {
                    outcomes.push(Appended::Duplicate);
                    continue;
                }
                durable.dedupe.insert(id.clone(), now);
            }
            durable.log.push(record.clone());
            outcomes.push(Appended::At(durable.log.len() as Seq));
        }
        Ok(outcomes)
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<(Seq, LogRecord)>> {
        let state = self.inner.state.lock();
        let skip = usize::try_from(after).unwrap_or(usize::MAX);
        Ok(state
            .durable
            .log
            .iter()
            .enumerate()
            .skip(skip)
            .take(limit)
            .map(|(i, record)| (i as Seq + 1, record.clone()))
            .collect())
    }

    async fn last_seq(&self) -> Result<Seq> {
        Ok(self.inner.state.lock().durable.log.len() as Seq)
    }

    /// Drops dedupe keys older than the window and evicts expired profiles (marked for
    /// deletion by the next checkpoint).
    async fn maintain(&self) -> Result<()> {
        let now = now_ms();
        let window = self.inner.dedupe_window_ms;
        let mut state = self.inner.state.lock();
        let State {
            durable,
            live,
            dirty,
        } = &mut *state;
        durable
            .dedupe
            .retain(|_, at| now.saturating_sub(*at) <= window);
        live.retain(|user, profile| {
            let keep = !self.inner.expired(profile, now);
            if !keep {
                dirty.insert(user.clone());
            }
            keep
        });
        Ok(())
    }
}

#[async_trait]
impl ProfileStore for MemoryStore {
    async fn get(&self, user: &UserId) -> Result<Option<Profile>> {
        let now = now_ms();
        let state = self.inner.state.lock();
        Ok(state
            .live
            .get(user)
            .filter(|p| !self.inner.expired(p, now))
            .cloned())
    }

    /// Applies in order; an expired profile (judged at the update's ingest time) is
    /// replaced by a fresh one first. Not idempotent per position: like the embedded
    /// store, this one relies on replay after the checkpoint, never on re-applies.
    async fn apply(&self, updates: &[ProfileUpdate<'_>]) -> Result<()> {
        let mut state = self.inner.state.lock();
        let State { live, dirty, .. } = &mut *state;
        for update in updates {
            let user = &update.event.user_id;
            let profile = live
                .entry(user.clone())
                .or_insert_with(|| Profile::new(user.clone()));
            if profile.version > 0 && self.inner.expired(profile, update.now_ms) {
                *profile = Profile::new(user.clone());
            }
            profile.apply(
                update.event,
                update.weight,
                &self.inner.policy,
                update.now_ms,
            );
            dirty.insert(user.clone());
        }
        Ok(())
    }

    async fn erase(&self, user: &UserId) -> Result<bool> {
        let now = now_ms();
        let mut state = self.inner.state.lock();
        match state.live.remove(user) {
            None => Ok(false),
            Some(profile) => {
                state.dirty.insert(user.clone());
                Ok(!self.inner.expired(&profile, now))
            }
        }
    }

    async fn durable_seq(&self) -> Result<Option<Seq>> {
        Ok(Some(self.inner.state.lock().durable.checkpoint_seq))
    }

    /// Captures copies of the profiles changed since the last checkpoint (expired ones
    /// as deletions); the returned work stores them with `seq`. If that work fails or
    /// is dropped unfinished, the users stay dirty for the next checkpoint.
    fn capture_checkpoint(&self, seq: Seq) -> Option<BoxFuture<'static, Result<()>>> {
        let now = now_ms();
        let mut state = self.inner.state.lock();
        if state.dirty.is_empty() && seq == state.durable.checkpoint_seq {
            return None;
        }
        let users: Vec<UserId> = state.dirty.drain().collect();
        let mut changes = Vec::with_capacity(users.len());
        for user in &users {
            if state
                .live
                .get(user)
                .is_some_and(|p| self.inner.expired(p, now))
            {
                state.live.remove(user);
            }
            changes.push((user.clone(), state.live.get(user).cloned()));
        }
        let pending = PendingCheckpoint {
            inner: Arc::clone(&self.inner),
            users,
            written: false,
        };
        let inner = Arc::clone(&self.inner);
        Some(Box::pin(async move {
            {
                let mut state = inner.state.lock();
                let durable = &mut state.durable;
                if seq < durable.checkpoint_seq {
                    return Err(Error::storage(
                        "writing a profile checkpoint",
                        format!(
                            "checkpoint at log position {seq} is older than the durable one at {}",
                            durable.checkpoint_seq
                        ),
                    ));
                }
                for (user, profile) in changes {
                    match profile {
                        Some(profile) => durable.checkpoint.insert(user, profile),
                        None => durable.checkpoint.remove(&user),
                    };
                }
                durable.checkpoint_seq = seq;
            }
            pending.written();
            Ok(())
        }))
    }

    /// Profiles held, including expired ones not yet evicted by maintenance.
    async fn count(&self) -> Result<usize> {
        Ok(self.inner.state.lock().live.len())
    }
}

/// Puts a checkpoint's users back in the dirty set unless the checkpoint was written.
struct PendingCheckpoint {
    inner: Arc<Inner>,
    users: Vec<UserId>,
    written: bool,
}

impl PendingCheckpoint {
    fn written(mut self) {
        self.written = true;
    }
}

impl Drop for PendingCheckpoint {
    fn drop(&mut self) {
        if !self.written {
            let users = std::mem::take(&mut self.users);
            self.inner.state.lock().dirty.extend(users);
        }
    }
}

#[async_trait]
impl CatalogStore for MemoryStore {
    async fn upsert(&self, items: &[Item]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut state = self.inner.state.lock();
        let durable = &mut state.durable;
        for item in items {
            durable.items.insert(item.item_id.clone(), item.clone());
        }
        durable.catalog_version += 1;
        Ok(())
    }

    async fn get(&self, item: &ItemId) -> Result<Option<Item>> {
        Ok(self.inner.state.lock().durable.items.get(item).cloned())
    }

    async fn delete(&self, item: &ItemId) -> Result<bool> {
        let mut state = self.inner.state.lock();
        let durable = &mut state.durable;
        let deleted = durable.items.remove(item).is_some();
        if deleted {
            durable.catalog_version += 1;
        }
        Ok(deleted)
    }

    async fn load_all(&self) -> Result<Vec<Item>> {
        Ok(self
            .inner
            .state
            .lock()
            .durable
            .items
            .values()
            .cloned()
            .collect())
    }

    async fn version(&self) -> Result<u64> {
        Ok(self.inner.state.lock().durable.catalog_version)
    }
}

#[async_trait]
impl ModelStore for MemoryStore {
    async fn save(&self, mut version: ModelVersion, snapshot: Vec<u8>) -> Result<ModelVersion> {
        let mut state = self.inner.state.lock();
        let durable = &mut state.durable;
        durable.last_version += 1;
        version.id = durable.last_version;
        version.bytes = snapshot.len() as u64;
        durable
            .versions
            .insert(version.id, (version.clone(), snapshot));
        Ok(version)
    }

    async fn list(&self) -> Result<Vec<ModelVersion>> {
        let state = self.inner.state.lock();
        Ok(state
            .durable
            .versions
            .values()
            .map(|(v, _)| v.clone())
            .collect())
    }

    async fn load(&self, id: u64) -> Result<Option<Vec<u8>>> {
        let state = self.inner.state.lock();
        Ok(state.durable.versions.get(&id).map(|(_, s)| s.clone()))
    }

    async fn prune(&self, keep: usize) -> Result<usize> {
        let mut state = self.inner.state.lock();
        let durable = &mut state.durable;
        let protected = durable.rollbacks.version;
        let excess = durable.versions.len().saturating_sub(keep);
        let doomed: Vec<u64> = durable
            .versions
            .keys()
            .take(excess)
            .filter(|id| **id != protected)
            .copied()
            .collect();
        for id in &doomed {
            durable.versions.remove(id);
        }
        Ok(doomed.len())
    }

    async fn rollbacks(&self) -> Result<Rollbacks> {
        Ok(self.inner.state.lock().durable.rollbacks)
    }

    async fn record_rollback(&self, version: u64) -> Result<Rollbacks> {
        let mut state = self.inner.state.lock();
        let rollbacks = &mut state.durable.rollbacks;
        rollbacks.generation += 1;
        rollbacks.version = version;
        Ok(*rollbacks)
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: u64) -> Result<bool> {
        let now = Instant::now();
        let mut state = self.inner.state.lock();
        let leases = &mut state.durable.leases;
        if let Some((current, until)) = leases.get(name)
            && current != holder
            && *until > now
        {
            return Ok(false);
        }
        leases.insert(
            name.to_owned(),
            (holder.to_owned(), now + Duration::from_millis(ttl_ms)),
        );
        Ok(true)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        let mut state = self.inner.state.lock();
        let leases = &mut state.durable.leases;
        if leases
            .get(name)
            .is_some_and(|(current, _)| current == holder)
        {
            leases.remove(name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Event, EventLimits};
    use crate::types::{EventKind, RawEvent, RawKind};

    fn event(id: &str, user: &str) -> Event {
        RawEvent {
            event_id: id.into(),
            user_id: user.into(),
            item_id: "item".into(),
            kind: Some(RawKind::View),
            timestamp_ms: Some(1_000),
            ..RawEvent::default()
        }
        .validate(&EventLimits::default(), now_ms())
        .unwrap()
    }

    fn record(event: &Event) -> LogRecord {
        LogRecord::Event {
            event: event.clone(),
            filtered: false,
            ingested_ms: now_ms(),
        }
    }

    fn update(seq: Seq, event: &Event) -> ProfileUpdate<'_> {
        ProfileUpdate {
            seq,
            event,
            weight: 1.0,
            now_ms: now_ms(),
        }
    }

    #[tokio::test]
    async fn reopen_keeps_the_log_and_the_checkpoint_but_not_later_applies() {
        let store = MemoryStore::new();
        let (a, b) = (event("a", "u"), event("b", "u"));
        store.append(&[record(&a), record(&b)]).await.unwrap();
        store.apply(&[update(1, &a)]).await.unwrap();
        let write = store.capture_checkpoint(1).unwrap();
        write.await.unwrap();
        store.apply(&[update(2, &b)]).await.unwrap();
        let user = UserId::parse("u", "user_id").unwrap();
        assert_eq!(
            ProfileStore::get(&*store, &user)
                .await
                .unwrap()
                .unwrap()
                .version,
            2
        );

        let reopened = store.reopen();
        assert_eq!(reopened.last_seq().await.unwrap(), 2);
        assert_eq!(reopened.durable_seq().await.unwrap(), Some(1));
        assert_eq!(
            ProfileStore::get(&*reopened, &user)
                .await
                .unwrap()
                .unwrap()
                .count(&EventKind::View),
            1
        );
        assert_eq!(
            reopened.append(&[record(&b)]).await.unwrap(),
            [Appended::Duplicate]
        );
    }

    #[tokio::test]
    async fn an_unwritten_checkpoint_leaves_its_users_for_the_next() {
        let store = MemoryStore::new();
        let a = event("a", "u");
        store.apply(&[update(1, &a)]).await.unwrap();
        drop(store.capture_checkpoint(1).unwrap());
        store.capture_checkpoint(1).unwrap().await.unwrap();
        let user = UserId::parse("u", "user_id").unwrap();
        assert!(
            ProfileStore::get(&*store.reopen(), &user)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            store.capture_checkpoint(1).is_none(),
            "nothing left to write"
        );
    }

    #[tokio::test]
    async fn a_lease_has_one_holder_until_released_or_expired() {
        let store = MemoryStore::new();
        assert!(store.acquire_lease("learner", "a", 60_000).await.unwrap());
        assert!(!store.acquire_lease("learner", "b", 60_000).await.unwrap());
        store.release_lease("learner", "b").await.unwrap();
        assert!(!store.acquire_lease("learner", "b", 60_000).await.unwrap());
        store.release_lease("learner", "a").await.unwrap();
        assert!(store.acquire_lease("learner", "b", 0).await.unwrap());
        assert!(
            store.acquire_lease("learner", "a", 60_000).await.unwrap(),
            "b's ran out"
        );
    }
}
