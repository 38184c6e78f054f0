//! Profiles in Scylla: [`ProfileStore`] for [`ScyllaStore`].
//!
//! # Profile updates: read, [`Profile::apply`], compare-and-set
//!
//! A user's events of one call are applied by reading the row, folding the events in with
//! [`Profile::apply`] in Rust and writing the row back with one conditional statement on
//! the user's partition (`UPDATE … USING TTL ? SET … IF stamp = ?`, or `INSERT … IF NOT
//! EXISTS` for a new user), retried from a fresh read on conflict. The stored profile is
//! therefore exactly what [`Profile::apply`] produces, whatever the events (late events,
//! sessions, custom kinds), with no second implementation to keep in step, as a Lua or
//! CQL-collection encoding would need. The whole update is one write to one partition, so
//! it is atomic and isolated without a batch; the per-partition batch of the design brief
//! collapses to this one statement. The condition is a random stamp rather than the
//! version so that an erase followed by a new profile cannot be mistaken for the row read
//! earlier (versions restart at 1; stamps do not repeat). When a write's outcome is
//! unknown, a `SERIAL` read settles it: the row remembers its last 32 stamps, so the
//! writer learns whether its write landed instead of applying the events twice.

use async_trait::async_trait;
use futures_util::{TryStreamExt, future};
use reflex_core::types::now_ms;
use reflex_core::{Error, Profile, ProfileStore, ProfileUpdate, Result, UserId};

use super::rows::ProfileRow;
use super::store::{
    MAX_CAS_ATTEMPTS, ScyllaStore, ScyllaStoreError, backoff, fresh_stamp, pager_error,
    row_stream_error, ttl_seconds,
};
use crate::remote::by_user;

impl ScyllaStore {
    async fn profile_row(&self, user: &UserId, serial: bool) -> Result<Option<ProfileRow>> {
        let context = "reading a profile from scylla";
        let statement = if serial {
            &self.st.select_profile_serial
        } else {
            &self.st.select_profile
        };
        self.first_row(statement, (user.as_str(),), context).await
    }

    async fn apply_user(&self, user: &UserId, updates: &[&ProfileUpdate<'_>]) -> Result<()> {
        let context = "applying events to a profile in scylla";
        let mut serial = false;
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let row = self.profile_row(user, serial).await?;
            let wall = now_ms();
            let (mut profile, expected, earlier) = match &row {
                Some(r) => {
                    let stored = r.to_profile().map_err(|e| Error::storage(context, e))?;
                    let stamp = r.stamp.unwrap_or(0);
                    if stored.is_expired(&self.policy, wall) {
                        (Profile::new(user.clone()), Some(stamp), Vec::new())
                    } else {
                        (stored, Some(stamp), r.stamps.clone().unwrap_or_default())
                    }
                }
                None => (Profile::new(user.clone()), None, Vec::new()),
            };
            for u in updates {
                profile.apply(u.event, u.weight, &self.policy, u.now_ms);
            }
            let left_ms = profile
                .touched_ms
                .saturating_add(self.policy.ttl_ms)
                .saturating_sub(wall);
            let stamp = fresh_stamp();
            let answer = if left_ms <= 0 {
                // Already past its TTL (events ingested long ago): nothing to keep.
                let Some(expected) = expected else {
                    return Ok(());
                };
                let answer = self
                    .lwt(&self.st.expire_profile, (user.as_str(), expected), context)
                    .await?;
                if answer.is_none() {
                    let now = self.profile_row(user, true).await?;
                    if now.is_none_or(|r| r.stamp != Some(expected)) {
                        return Ok(());
                    }
                }
                answer
            } else {
                let ttl = ttl_seconds(left_ms);
                let (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9) =
                    ProfileRow::from_profile(&profile, stamp, &earlier).values();
                let id = user.as_str();
                let answer = match expected {
                    None => {
                        self.lwt(
                            &self.st.insert_profile,
                            (id, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, ttl),
                            context,
                        )
                        .await?
                    }
                    Some(expected) => {
                        self.lwt(
                            &self.st.update_profile,
                            (ttl, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, id, expected),
                            context,
                        )
                        .await?
                    }
                };
                if answer.is_none()
                    && self
                        .profile_row(user, true)
                        .await?
                        .is_some_and(|r| r.remembers(stamp))
                {
                    return Ok(());
                }
                answer
            };
            match answer {
                Some(a) if a.applied => return Ok(()),
                // Lost the race (or the outcome settled as not applied): read again. After
                // an unknown outcome the next read is serial, so it sees what settled.
                Some(_) => serial = false,
                None => serial = true,
            }
            backoff(attempt).await;
        }
        Err(Error::unavailable(
            context,
            ScyllaStoreError::Contention(MAX_CAS_ATTEMPTS),
        ))
    }
}

#[async_trait]
impl ProfileStore for ScyllaStore {
    async fn get(&self, user: &UserId) -> Result<Option<Profile>> {
        let Some(row) = self.profile_row(user, false).await? else {
            return Ok(None);
        };
        let profile = row
            .to_profile()
            .map_err(|e| Error::storage("reading a profile from scylla", e))?;
        Ok((!profile.is_expired(&self.policy, now_ms())).then_some(profile))
    }

    async fn apply(&self, updates: &[ProfileUpdate<'_>]) -> Result<()> {
        // Each user's events in order; users go concurrently.
        let by_user = by_user(updates);
        future::try_join_all(by_user.iter().map(|(user, ups)| self.apply_user(user, ups))).await?;
        Ok(())
    }

    async fn erase(&self, user: &UserId) -> Result<bool> {
        let context = "erasing a profile in scylla";
        match self
            .lwt(&self.st.erase_profile, (user.as_str(),), context)
            .await?
        {
            Some(answer) => Ok(answer.applied),
            // Unknown outcome: settle it; either way the profile is gone now or was.
            None => Ok(self.profile_row(user, true).await?.is_none()),
        }
    }

    async fn count(&self) -> Result<usize> {
        let context = "counting profiles in scylla";
        self.session
            .execute_iter(self.st.scan_profiles.clone(), ())
            .await
            .map_err(|e| pager_error(context, e))?
            .rows_stream::<(String,)>()
            .map_err(|e| Error::storage(context, e))?
            .map_err(|e| row_stream_error(context, e))
            .try_fold(0usize, |n, _| future::ready(Ok(n + 1)))
            .await
    }
}
