//! Profiles: [`ProfileStore`] for [`EmbeddedStore`].
//!
//! Hot state lives in memory (a `DashMap`, so applies lock one user, never the store) and
//! reaches the disk only through checkpoints: each writes the profiles changed since the
//! last one, plus the log position they are consistent with, in one fsynced batch. After a
//! crash the engine replays the log after that position, so an acked event is applied
//! exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use dashmap::{DashMap, DashSet};
use fjall::{Keyspace, PersistMode};
use parking_lot::Mutex;
use reflex_core::traits::BoxFuture;
use reflex_core::types::{TimestampMs, now_ms};
use reflex_core::{Profile, ProfilePolicy, ProfileStore, ProfileUpdate, Result, Seq, UserId};
use tracing::debug;

use super::{
    EmbeddedStore, PROFILES_SEQ_KEY, Shared, StoreError, append_encoded, be_u64, decode,
    run_blocking,
};

/// Profiles in memory and what the next checkpoint must write.
pub(super) struct ProfileState {
    policy: ProfilePolicy,
    pub(super) live: DashMap<UserId, Profile>,
    /// Users changed, erased or evicted since the last checkpoint captured them.
    pub(super) dirty: DashSet<UserId>,
    /// Log position the `profiles` keyspace is consistent with.
    durable_seq: AtomicU64,
    /// Keeps checkpoint writes one at a time, so an older one never lands after a newer.
    checkpoint_writer: Mutex<()>,
}

/// One user's entry in a checkpoint: the profile to store, or `None` to delete it.
type Change = (UserId, Option<Profile>);

impl ProfileState {
    /// Loads the last checkpoint. Expired profiles are loaded too: replay decides with
    /// each event's own ingest time whether they had expired, as the live apply did.
    pub(super) fn load(
        profiles: &Keyspace,
        meta: &Keyspace,
        policy: ProfilePolicy,
    ) -> Result<Self, StoreError> {
        let live = DashMap::new();
        for guard in profiles.iter() {
            let (key, value) = guard.into_inner()?;
            let profile: Profile = decode(&value, "profile", &key)?;
            live.insert(profile.user_id.clone(), profile);
        }
        let durable_seq = match meta.get(PROFILES_SEQ_KEY)? {
            Some(value) => be_u64(&value, "profiles_seq", PROFILES_SEQ_KEY)?,
            None => 0,
        };
        Ok(Self {
            policy,
            live,
            dirty: DashSet::new(),
            durable_seq: AtomicU64::new(durable_seq),
            checkpoint_writer: Mutex::new(()),
        })
    }

    pub(super) fn len(&self) -> usize {
        self.live.len()
    }

    pub(super) fn durable_seq(&self) -> Seq {
        self.durable_seq.load(Ordering::Acquire)
    }

    /// Drops profiles expired at `now` from memory and marks them for deletion on disk.
    /// Not for use during start-up replay, which judges expiry by each event's time.
    pub(super) fn evict_expired(&self, now: TimestampMs) -> usize {
        let mut evicted = Vec::new();
        self.live.retain(|user, profile| {
            let keep = !profile.is_expired(&self.policy, now);
            if !keep {
                evicted.push(user.clone());
            }
            keep
        });
        let count = evicted.len();
        for user in evicted {
            self.dirty.insert(user);
        }
        count
    }

    fn apply(&self, update: &ProfileUpdate<'_>) {
        let user = &update.event.user_id;
        let mut profile = self
            .live
            .entry(user.clone())
            .or_insert_with(|| Profile::new(user.clone()));
        // A fresh profile has version 0 and is never stale; an expired one starts over.
        if profile.version > 0 && profile.is_expired(&self.policy, update.now_ms) {
            *profile = Profile::new(user.clone());
        }
        profile.apply(update.event, update.weight, &self.policy, update.now_ms);
        drop(profile);
        self.dirty.insert(user.clone());
    }

    /// Takes the dirty set and the state each of its users must be written with.
    fn capture(&self, now: TimestampMs) -> Vec<Change> {
        let mut changes: Vec<Change> = Vec::with_capacity(self.dirty.len());
        self.dirty.retain(|user| {
            changes.push((user.clone(), None));
            false
        });
        for (user, slot) in &mut changes {
            // An expired profile is as good as gone: delete it here and on disk.
            self.live
                .remove_if(user, |_, p| p.is_expired(&self.policy, now));
            *slot = self.live.get(user).map(|p| p.clone());
        }
        changes
    }

    fn mark_dirty(&self, users: impl IntoIterator<Item = UserId>) {
        for user in users {
            self.dirty.insert(user);
        }
    }
}

impl Shared {
    /// Writes one checkpoint in one fsynced batch: the changed profiles and `seq`.
    fn write_checkpoint(&self, seq: Seq, changes: Vec<Change>) -> Result<(), StoreError> {
        let state = &self.profile_state;
        let _one_at_a_time = state.checkpoint_writer.lock();
        let durable = state.durable_seq();
        if seq < durable {
            return Err(StoreError::StaleCheckpoint { seq, durable });
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        let mut buf = Vec::with_capacity(1024);
        for (user, profile) in &changes {
            let key = user.as_str().as_bytes();
            match profile {
                Some(profile) => {
                    buf.clear();
                    append_encoded(profile, &mut buf, "profile")?;
                    batch.insert(&self.profiles, key, &buf[..]);
                }
                None => batch.remove(&self.profiles, key),
            }
        }
        batch.insert(&self.meta, PROFILES_SEQ_KEY, &seq.to_be_bytes()[..]);
        batch.commit()?;
        state.durable_seq.store(seq, Ordering::Release);
        Ok(())
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
            .filter(|p| !p.is_expired(&state.policy, now))
            .map(|p| p.clone()))
    }

    /// Applies in memory, one user locked at a time; an expired profile (judged at the
    /// update's ingest time) is replaced by a fresh one first.
    async fn apply(&self, updates: &[ProfileUpdate<'_>]) -> Result<()> {
        for update in updates {
            self.shared.profile_state.apply(update);
        }
        Ok(())
    }

    async fn erase(&self, user: &UserId) -> Result<bool> {
        let state = &self.shared.profile_state;
        match state.live.remove(user) {
            None => Ok(false),
            Some((user, profile)) => {
                let existed = !profile.is_expired(&state.policy, now_ms());
                state.dirty.insert(user);
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
        if state.dirty.is_empty() && seq == state.durable_seq() {
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
            run_blocking(shared, "writing a profile checkpoint", move |s| {
                s.write_checkpoint(seq, changes)
            })
            .await?;
            pending.written();
            debug!(seq, profiles = count, "profile checkpoint written");
            Ok(())
        }))
    }

    /// Profiles held in memory, including expired ones not yet evicted by maintenance.
    async fn count(&self) -> Result<usize> {
        Ok(self.shared.profile_state.len())
    }
}
