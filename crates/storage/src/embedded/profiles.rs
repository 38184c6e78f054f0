//! Profiles: [`ProfileStore`] for [`EmbeddedStore`].
//!
//! Hot state lives in memory (a `DashMap`, so applies lock one user, never the store) and
//! reaches the disk only through checkpoints: each writes the profiles changed since the
//! last one, plus the log position they are consistent with, in one fsynced batch. After a
//! crash the engine replays the log after that position, so an acked event is applied
//! exactly once.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use async_trait::async_trait;
use dashmap::DashMap;
use fjall::{Keyspace, PersistMode};
use parking_lot::Mutex;
use reflex_core::traits::BoxFuture;
use reflex_core::types::{IdHashState, TimestampMs, now_ms};
use reflex_core::{
    ItemId, Profile, ProfilePolicy, ProfileStore, ProfileUpdate, Result, Seq, UserId,
};
use tracing::debug;

use super::{
    EmbeddedStore, Handles, PROFILES_SEQ_KEY, Shared, StoreError, append_encoded, be_u64, decode,
    run_blocking,
};

/// Updates applied between two yields of the worker thread.
const APPLY_SLICE: usize = 128;

/// Profiles in memory and what the next checkpoint must write.
pub(super) struct ProfileState {
    policy: ProfilePolicy,
    pub(super) live: DashMap<UserId, Slot, IdHashState>,
    /// Users changed, erased or evicted since the last checkpoint captured them. A user
    /// is pushed when its slot turns dirty (once per checkpoint however many events it
    /// gets) and on every erase or eviction, so it may appear more than once.
    dirty: Mutex<Vec<UserId>>,
    /// Log position the `profiles` keyspace is consistent with.
    durable_seq: AtomicU64,
    /// Wall-clock time the last checkpoint was captured (the store's opening before any).
    captured_ms: AtomicI64,
    /// Keeps checkpoint writes one at a time, so an older one never lands after a newer.
    checkpoint_writer: Mutex<()>,
}

/// One user's profile in memory.
///
/// The profile is shared copy-on-write: a checkpoint captures it by reference (under the
/// engine's apply gate, so that must be quick) and encodes it later; an event that
/// arrives for the user meanwhile copies it once ([`Arc::make_mut`]).
pub(super) struct Slot {
    pub(super) profile: Arc<Profile>,
    /// Changed since the last checkpoint captured it.
    dirty: bool,
}

/// One user's entry in a checkpoint: the profile to store, or `None` to delete it.
type Change = (UserId, Option<Arc<Profile>>);

impl ProfileState {
    /// Loads the last checkpoint. Expired profiles are loaded too: replay decides with
    /// each event's own ingest time whether they had expired, as the live apply did.
    pub(super) fn load(
        profiles: &Keyspace,
        meta: &Keyspace,
        policy: ProfilePolicy,
    ) -> Result<Self, StoreError> {
        let live = DashMap::with_hasher(IdHashState::default());
        // Decoding gives every entry a string of its own; the loaded profiles share one
        // per item instead (a profile's recent items then cost a pointer each).
        let mut items: HashSet<ItemId> = HashSet::new();
        for guard in profiles.iter() {
            let (key, value) = guard.into_inner()?;
            let mut profile: Profile = decode(&value, "profile", &key)?;
            share_item_ids(&mut profile, &mut items);
            let slot = Slot {
                profile: Arc::new(profile),
                dirty: false,
            };
            live.insert(slot.profile.user_id.clone(), slot);
        }
        Ok(Self {
            policy,
            live,
            dirty: Mutex::new(Vec::new()),
            durable_seq: AtomicU64::new(checkpoint_seq(meta)?),
            captured_ms: AtomicI64::new(now_ms()),
            checkpoint_writer: Mutex::new(()),
        })
    }

    /// After the database was reopened: takes the checkpoint position on disk if it is
    /// newer than the one known, as it is when a checkpoint's commit failed yet reached
    /// the journal (its profiles stayed dirty and are written again). Profiles in memory
    /// stay as they are: they hold every acked event, the disk only a checkpoint.
    pub(super) fn reload_durable_seq(&self, meta: &Keyspace) -> Result<(), StoreError> {
        self.durable_seq
            .fetch_max(checkpoint_seq(meta)?, Ordering::AcqRel);
        Ok(())
    }

    pub(super) fn len(&self) -> usize {
        self.live.len()
    }

    /// Entries waiting for the next checkpoint (a user may count more than once).
    pub(super) fn pending(&self) -> usize {
        self.dirty.lock().len()
    }

    pub(super) fn durable_seq(&self) -> Seq {
        self.durable_seq.load(Ordering::Acquire)
    }

    /// The user's profile as it is now, expired or not.
    #[cfg(test)]
    pub(super) fn current(&self, user: &UserId) -> Option<Profile> {
        self.live
            .get(user)
            .map(|slot| Profile::clone(&slot.profile))
    }

    /// Drops profiles expired at `now` from memory and marks them for deletion on disk.
    /// Not for use during start-up replay, which judges expiry by each event's time.
    pub(super) fn evict_expired(&self, now: TimestampMs) -> usize {
        let mut evicted = Vec::new();
        self.live.retain(|user, slot| {
            let keep = !slot.profile.is_expired(&self.policy, now);
            if !keep {
                evicted.push(user.clone());
            }
            keep
        });
        let count = evicted.len();
        self.dirty.lock().extend(evicted);
        count
    }

    fn apply(&self, update: &ProfileUpdate<'_>) {
        let user = &update.event.user_id;
        let mut slot = match self.live.get_mut(user) {
            Some(slot) => slot,
            None => self.live.entry(user.clone()).or_insert_with(|| Slot {
                profile: Arc::new(Profile::new(user.clone())),
                dirty: false,
            }),
        };
        let profile = Arc::make_mut(&mut slot.profile);
        // A fresh profile has version 0 and is never stale; an expired one starts over.
        if profile.version > 0 && profile.is_expired(&self.policy, update.now_ms) {
            *profile = Profile::new(user.clone());
        }
        profile.apply(update.event, update.weight, &self.policy, update.now_ms);
        if !slot.dirty {
            slot.dirty = true;
            drop(slot);
            self.dirty.lock().push(user.clone());
        }
    }

    /// Takes the dirty users and the state each must be written with: a reference to
    /// the profile (copied only if an event changes it before the write), or a deletion.
    fn capture(&self, now: TimestampMs) -> Vec<Change> {
        self.captured_ms.store(now, Ordering::Relaxed);
        let users = std::mem::take(&mut *self.dirty.lock());
        let mut changes: Vec<Change> = Vec::with_capacity(users.len());
        for user in users {
            // An expired profile is as good as gone: delete it here and on disk.
            self.live
                .remove_if(&user, |_, slot| slot.profile.is_expired(&self.policy, now));
            match self.live.get_mut(&user) {
                // Captured already through an earlier entry of the same user.
                Some(slot) if !slot.dirty => {}
                Some(mut slot) => {
                    slot.dirty = false;
                    let profile = Arc::clone(&slot.profile);
                    drop(slot);
                    changes.push((user, Some(profile)));
                }
                None => changes.push((user, None)),
            }
        }
        changes
    }

    /// Marks `users` for the next checkpoint again (after a checkpoint was not written).
    fn mark_dirty(&self, users: impl IntoIterator<Item = UserId>) {
        let mut again = Vec::new();
        for user in users {
            if let Some(mut slot) = self.live.get_mut(&user) {
                if slot.dirty {
                    continue;
                }
                slot.dirty = true;
            }
            again.push(user);
        }
        self.dirty.lock().extend(again);
    }
}

/// Whether a scheduled checkpoint is worth writing: `events` logged since the last one,
/// `changed` profiles it would rewrite, `waited_ms` since the last capture.
fn checkpoint_due(
    events: u64,
    changed: u64,
    waited_ms: i64,
    events_per_profile: u64,
    max_interval_ms: i64,
) -> bool {
    changed == 0
        || events >= changed.saturating_mul(events_per_profile)
        || waited_ms >= max_interval_ms
}

/// The log position the `profiles` keyspace is consistent with, 0 before any checkpoint.
fn checkpoint_seq(meta: &Keyspace) -> Result<Seq, StoreError> {
    match meta.get(PROFILES_SEQ_KEY)? {
        Some(value) => be_u64(&value, "profiles_seq", PROFILES_SEQ_KEY),
        None => Ok(0),
    }
}

impl Shared {
    /// Writes one checkpoint in one fsynced batch: the changed profiles and `seq`.
    fn write_checkpoint(
        &self,
        h: &Handles,
        seq: Seq,
        changes: Vec<Change>,
    ) -> Result<(), StoreError> {
        let state = &self.profile_state;
        let _one_at_a_time = state.checkpoint_writer.lock();
        let durable = state.durable_seq();
        if seq < durable {
            return Err(StoreError::StaleCheckpoint { seq, durable });
        }
        let mut batch = h.db.batch().durability(Some(PersistMode::SyncAll));
        let mut buf = Vec::with_capacity(1024);
        for (user, profile) in &changes {
            let key = user.as_str().as_bytes();
            match profile {
                Some(profile) => {
                    buf.clear();
                    append_encoded(&**profile, &mut buf, "profile")?;
                    batch.insert(&h.profiles, key, &buf[..]);
                }
                None => batch.remove(&h.profiles, key),
            }
        }
        batch.insert(&h.meta, PROFILES_SEQ_KEY, &seq.to_be_bytes()[..]);
        self.commit(batch)?;
        state.durable_seq.store(seq, Ordering::Release);
        Ok(())
    }
}

/// Makes `profile`'s item ids the strings in `seen` (adding those not there yet), so
/// profiles loaded together hold one string per item.
fn share_item_ids(profile: &mut Profile, seen: &mut HashSet<ItemId>) {
    let ids = profile
        .recent
        .iter_mut()
        .map(|entry| &mut entry.item_id)
        .chain(profile.purchased.iter_mut());
    for id in ids {
        match seen.get(id) {
            Some(shared) => *id = shared.clone(),
            None => {
                seen.insert(id.clone());
            }
        }
    }
}

/// Puts a checkpoint's users back in the dirty set unless the checkpoint was written, so
/// a failed, panicked or dropped write is redone by the next checkpoint.
struct PendingCheckpoint {
    shared: Arc<Shared>,
    users: Vec<UserId>,
    written: bool,
}

impl PendingCheckpoint {
    /// Records that the checkpoint is on disk (taking `self`, so the whole guard moves
    /// into the future that calls it).
    fn written(mut self) {
        self.written = true;
    }
}

impl Drop for PendingCheckpoint {
    fn drop(&mut self) {
        if !self.written {
            self.shared
                .profile_state
                .mark_dirty(std::mem::take(&mut self.users));
        }
    }
}

#[async_trait]
impl ProfileStore for EmbeddedStore {
    async fn get(&self, user: &UserId) -> Result<Option<Profile>> {
        let state = &self.shared.profile_state;
        let now = now_ms();
        Ok(state
            .live
            .get(user)
            .filter(|slot| !slot.profile.is_expired(&state.policy, now))
            .map(|slot| Profile::clone(&slot.profile)))
    }

    /// Applies in memory, one user locked at a time; an expired profile (judged at the
    /// update's ingest time) is replaced by a fresh one first.
    async fn apply(&self, updates: &[ProfileUpdate<'_>]) -> Result<()> {
        // In memory but not free (about a microsecond an event): a large batch yields the
        // worker thread between slices, so requests queued behind it wait for one slice.
        for (i, update) in updates.iter().enumerate() {
            if i > 0 && i % APPLY_SLICE == 0 {
                tokio::task::yield_now().await;
            }
            self.shared.profile_state.apply(update);
        }
        Ok(())
    }

    async fn erase(&self, user: &UserId) -> Result<bool> {
        let state = &self.shared.profile_state;
        match state.live.remove(user) {
            None => Ok(false),
            Some((user, slot)) => {
                let existed = !slot.profile.is_expired(&state.policy, now_ms());
                state.dirty.lock().push(user);
                Ok(existed)
            }
        }
    }

    async fn durable_seq(&self) -> Result<Option<Seq>> {
        Ok(Some(self.shared.profile_state.durable_seq()))
    }

    /// Captures the profiles changed since the last checkpoint (expired ones as deletions)
    /// and returns the fsynced write of them with `seq`. On failure they stay dirty.
    fn capture_checkpoint(&self, seq: Seq) -> Option<BoxFuture<'static, Result<()>>> {
        let state = &self.shared.profile_state;
        if state.pending() == 0 && seq == state.durable_seq() {
            return None;
        }
        let changes = state.capture(now_ms());
        let pending = PendingCheckpoint {
            shared: Arc::clone(&self.shared),
            users: changes.iter().map(|(user, _)| user.clone()).collect(),
            written: false,
        };
        let shared = Arc::clone(&self.shared);
        Some(Box::pin(async move {
            let count = changes.len();
            run_blocking(shared, "writing a profile checkpoint", move |s, h| {
                s.write_checkpoint(h, seq, changes)
            })
            .await?;
            pending.written();
            debug!(seq, profiles = count, "profile checkpoint written");
            Ok(())
        }))
    }

    /// Due when the log since the last checkpoint holds `checkpoint_events_per_profile`
    /// events per changed profile, when `checkpoint_max_interval_ms` passed since the last
    /// capture, or when only the position moved (nothing to rewrite: a cheap write that
    /// lets the log be trimmed).
    fn checkpoint_due(&self, seq: Seq) -> bool {
        let state = &self.shared.profile_state;
        let durable = state.durable_seq();
        let changed = state.pending() as u64;
        if seq <= durable && changed == 0 {
            return false;
        }
        checkpoint_due(
            seq.saturating_sub(durable),
            changed,
            now_ms().saturating_sub(state.captured_ms.load(Ordering::Relaxed)),
            self.shared.checkpoint_events_per_profile,
            self.shared.checkpoint_max_interval_ms,
        )
    }

    /// Profiles held in memory, including expired ones not yet evicted by maintenance.
    async fn count(&self) -> Result<usize> {
        Ok(self.shared.profile_state.len())
    }
}
