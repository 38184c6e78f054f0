//! Profiles in Redis: [`ProfileStore`] for [`RedisStore`], a batch's users changed by
//! one Lua script call (one per hash slot on Cluster), which mirrors [`Profile::apply`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::prelude::{ClientLike, KeysInterface, SortedSetsInterface, Value};
use fred::util::redis_keyslot;
use futures_util::{TryStreamExt, future};
use reflex_core::profile::Session;
use reflex_core::types::now_ms;
use reflex_core::{
    Error, EventKind, ItemId, Profile, ProfileStore, ProfileUpdate, Result, Seq, UserId,
};

use super::store::{PROFILE_COUNT_MAX_AGE, RedisStore, redis_error, reply_error};
use crate::remote::by_user;

/// The users of one apply script call, each with its events in order.
type UserGroup<'u, 'e> = Vec<(&'u UserId, Vec<&'u ProfileUpdate<'e>>)>;

impl RedisStore {
    /// Applies the events of `users` with one script call: every user of a batch on a
    /// standalone Redis, the users of one hash slot on Cluster.
    async fn apply_users(&self, users: &[(&UserId, Vec<&ProfileUpdate<'_>>)]) -> Result<()> {
        let events: usize = users.iter().map(|(_, ups)| ups.len()).sum();
        let confirms = self.confirms_in_apply();
        let mut args: Vec<Value> = Vec::with_capacity(5 + users.len() + events * 7);
        args.push(Value::from(self.policy.max_recent as i64));
        args.push(Value::from(self.policy.max_purchased as i64));
        args.push(Value::from(self.policy.session_gap_ms));
        args.push(Value::from(self.policy.ttl_ms));
        args.push(Value::from(if confirms { "1" } else { "0" }));
        let mut keys: Vec<String> = Vec::with_capacity(2 + users.len() * 3);
        if confirms {
            keys.push(self.pending_key.clone());
            keys.push(self.seq_key.clone());
        }
        for (user, updates) in users {
            keys.extend(self.user_keys(user));
            args.push(Value::from(updates.len() as i64));
            for u in updates {
                let e = u.event;
                args.push(Value::from(u.seq as i64));
                args.push(Value::from(e.timestamp_ms));
                args.push(Value::from(u.now_ms));
                args.push(Value::from(u.weight.to_string()));
                args.push(Value::from(e.kind.label()));
                args.push(Value::from(e.item_id.as_str()));
                args.push(Value::from(e.session_id.as_deref().unwrap_or("")));
            }
        }
        self.run(&self.apply, keys, args)
            .await
            .map_err(|e| redis_error("applying events to profiles in redis", e))?;
        Ok(())
    }

    /// Splits a batch's users into groups whose keys one script call may touch together:
    /// one group on a standalone Redis, one per hash slot on Cluster. Each group goes out
    /// in calls of at most [`MAX_USERS_PER_CALL`] users.
    fn groups<'u, 'e>(&self, users: UserGroup<'u, 'e>) -> Vec<UserGroup<'u, 'e>> {
        let mut groups: Vec<UserGroup<'u, 'e>> = Vec::new();
        if self.clustered {
            let mut by_slot: HashMap<u16, usize> = HashMap::new();
            for entry in users {
                let slot = redis_keyslot(self.user_keys(entry.0)[0].as_bytes());
                let index = *by_slot.entry(slot).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[index].push(entry);
            }
        } else {
            groups.push(users);
        }
        groups
    }
}

/// The most users one apply script call covers: a batch of the default 500 events is one
/// call; the bound keeps one script from holding Redis (single-threaded) for long with
/// bigger batches.
const MAX_USERS_PER_CALL: usize = 1_000;

#[async_trait]
impl ProfileStore for RedisStore {
    async fn get(&self, user: &UserId) -> Result<Option<Profile>> {
        let context = "reading a profile from redis";
        // Recommend reads profiles and answers degraded without one: while Redis is
        // known to be down, at once; otherwise within `read_timeout_ms`.
        if self.is_down() {
            return Err(Error::unavailable(
                context,
                "redis is down (probing for its return)",
            ));
        }
        let timeout = Duration::from_millis(self.config.read_timeout_ms);
        let read = self.run(&self.get, self.user_keys(user).into(), Vec::new());
        let reply = match tokio::time::timeout(timeout, read).await {
            Ok(reply) => reply.map_err(|e| redis_error(context, e))?,
            Err(_) => {
                self.note_outage("a profile read took longer than read_timeout_ms");
                return Err(Error::unavailable(
                    context,
                    format!("no answer within {} ms", self.config.read_timeout_ms),
                ));
            }
        };
        match reply {
            Value::Null => Ok(None),
            Value::Array(parts) => profile_from_reply(user, parts)
                .map(Some)
                .map_err(|what| reply_error(context, what)),
            other => Err(reply_error(context, format!("{other:?}"))),
        }
    }

    async fn apply(&self, updates: &[ProfileUpdate<'_>]) -> Result<()> {
        // Each user's events in order; one script call for all users (per hash slot on
        // Cluster), the calls sent at once and pipelined.
        let groups = self.groups(by_user(updates));
        let calls = groups
            .iter()
            .flat_map(|group| group.chunks(MAX_USERS_PER_CALL));
        future::try_join_all(calls.map(|users| self.apply_users(users))).await?;
        if self.confirms_in_apply() {
            // The script confirmed its positions itself, atomically with applying them.
            return Ok(());
        }
        // On Cluster the pending set is in another slot: confirmed after the scripts.
        let seqs: Vec<Value> = updates.iter().map(|u| Value::from(u.seq as i64)).collect();
        if !seqs.is_empty() {
            let _: u64 = self
                .pool
                .next()
                .zrem(&self.pending_key, seqs)
                .await
                .map_err(|e| redis_error("confirming profile updates in redis", e))?;
        }
        Ok(())
    }

    async fn unapplied(&self, older_than_ms: i64, limit: usize) -> Result<Vec<Seq>> {
        let context = "reading unconfirmed profile updates in redis";
        let key = &self.pending_key;
        let client = self.pool.next();
        let now = now_ms();
        // Positions older than the dedupe window are beyond repair (and likely trimmed).
        let _: u64 = client
            .zremrangebyscore(key, "-inf", (now - self.config.dedupe_window_ms) as f64)
            .await
            .map_err(|e| redis_error(context, e))?;
        let seqs: Vec<u64> = client
            .zrangebyscore(
                key,
                "-inf",
                (now - older_than_ms) as f64,
                false,
                Some((0, limit as i64)),
            )
            .await
            .map_err(|e| redis_error(context, e))?;
        Ok(seqs)
    }

    async fn erase(&self, user: &UserId) -> Result<bool> {
        let removed: u64 = self
            .pool
            .next()
            .del(self.user_keys(user).to_vec())
            .await
            .map_err(|e| redis_error("erasing a profile in redis", e))?;
        Ok(removed > 0)
    }

    /// Counts by scanning the profile keys, at most every [`PROFILE_COUNT_MAX_AGE`]; in
    /// between the last count answers.
    async fn count(&self) -> Result<usize> {
        let cached = *self
            .profile_count
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((at, n)) = cached
            && at.elapsed() < PROFILE_COUNT_MAX_AGE
        {
            return Ok(n);
        }
        let pattern = format!("{}:p:*", self.config.prefix);
        let client = self.pool.next();
        let keys = if client.is_clustered() {
            client
                .scan_cluster_buffered(pattern, Some(1000), None)
                .try_fold(0usize, |n, _| future::ready(Ok(n + 1)))
                .await
        } else {
            client
                .scan_buffered(pattern, Some(1000), None)
                .try_fold(0usize, |n, _| future::ready(Ok(n + 1)))
                .await
        };
        let n = keys.map_err(|e| redis_error("counting profiles in redis", e))?;
        *self
            .profile_count
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((Instant::now(), n));
        Ok(n)
    }
}

/// Builds a profile from the GET script's reply; `Err` describes what was malformed.
fn profile_from_reply(user: &UserId, parts: Vec<Value>) -> std::result::Result<Profile, String> {
    let mut parts = parts.into_iter();
    let (Some(Value::Array(fields)), Some(recent), Some(purchased)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err("profile reply is not three arrays".into());
    };
    let text = |v: &Value| {
        v.as_str()
            .map(|s| s.into_owned())
            .ok_or_else(|| format!("{v:?} is not text"))
    };
    let int = |v: &Value| v.as_i64().ok_or_else(|| format!("{v:?} is not an integer"));
    let item = |s: &str| ItemId::parse(s, "item_id").map_err(|e| e.to_string());

    let mut p = Profile::new(user.clone());
    let (mut sid, mut sst, mut slt, mut sn) = (None, 0, 0, 0);
    for pair in fields.chunks_exact(2) {
        let name = text(&pair[0])?;
        let value = &pair[1];
        match name.as_str() {
            "v" => p.version = int(value)? as u64,
            "ls" => p.last_seen_ms = int(value)?,
            "t" => p.touched_ms = int(value)?,
            "sid" => sid = Some(text(value)?),
            "sst" => sst = int(value)?,
            "slt" => slt = int(value)?,
            "sn" => sn = int(value)?,
            "as" => {} // log positions applied lately, for idempotence
            counter => {
                let label = counter
                    .strip_prefix("c:")
                    .ok_or_else(|| format!("unknown profile field {counter}"))?;
                let kind =
                    EventKind::from_label(label).ok_or_else(|| format!("unknown kind {label}"))?;
                let n = int(value)? as u64;
                match (kind.builtin_index(), kind) {
                    (Some(i), _) => p.counts[i] = n,
                    (None, EventKind::Custom(name)) => p.custom_counts.push((name, n)),
                    (None, _) => {}
                }
            }
        }
    }
    p.custom_counts.sort();
    p.session = sid.map(|sid| Session {
        session_id: Arc::from(sid),
        started_ms: sst,
        last_event_ms: slt,
        events: sn as u32,
    });
    for entry in recent.into_array() {
        let entry = text(&entry)?;
        let mut f = entry.splitn(4, '\u{1f}');
        let (Some(ts), Some(weight), Some(kind), Some(id)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return Err(format!("malformed recent entry {entry:?}"));
        };
        let kind = EventKind::from_label(kind).ok_or_else(|| format!("unknown kind {kind}"))?;
        p.push_recent(
            item(id)?,
            &kind,
            ts.parse().map_err(|_| format!("bad time in {entry:?}"))?,
            weight
                .parse()
                .map_err(|_| format!("bad weight in {entry:?}"))?,
        );
    }
    for id in purchased.into_array() {
        p.purchased.push_back(item(&text(&id)?)?);
    }
    Ok(p)
}
