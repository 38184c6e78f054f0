//! What the networked backends (Redis, Scylla) share: the password named by an
//! environment variable, a bound on the first connection, and a batch of profile updates
//! grouped by user.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use reflex_core::{Error, ProfileUpdate, Result, UserId};

/// The password in the environment variable `var`, which the setting `field` names.
pub(crate) fn password_from_env(var: &str, field: &str) -> Result<String> {
    std::env::var(var)
        .map_err(|_| Error::invalid(field, format!("environment variable {var} is not set")))
}

/// `connecting` (a first connection), failed with `UNAVAILABLE` when it takes longer
/// than `timeout_ms`.
pub(crate) async fn connect_within<T>(
    timeout_ms: u64,
    context: &str,
    connecting: impl Future<Output = T>,
) -> Result<T> {
    tokio::time::timeout(Duration::from_millis(timeout_ms), connecting)
        .await
        .map_err(|_| Error::unavailable(context, format!("no connection within {timeout_ms} ms")))
}

/// The updates of each user, users in order of first appearance and each user's updates
/// in their order in `updates`, so a backend can apply users concurrently.
pub(crate) fn by_user<'a, 'e>(
    updates: &'a [ProfileUpdate<'e>],
) -> Vec<(&'a UserId, Vec<&'a ProfileUpdate<'e>>)> {
    let mut by_user: Vec<(&UserId, Vec<&ProfileUpdate<'e>>)> = Vec::new();
    let mut index: HashMap<&UserId, usize> = HashMap::new();
    for u in updates {
        let slot = *index.entry(&u.event.user_id).or_insert_with(|| {
            by_user.push((&u.event.user_id, Vec::new()));
            by_user.len() - 1
        });
        by_user[slot].1.push(u);
    }
    by_user
}
