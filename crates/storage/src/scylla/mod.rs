//! The ScyllaDB backend: profiles, the event log with its dedupe window, and the catalog
//! in one keyspace of a Scylla (or Cassandra) cluster, shared by every replica.
//!
//! # Data model
//!
//! The keyspace and its tables are created at start-up when missing (`CREATE … IF NOT
//! EXISTS`, replication from [`ScyllaConfig`]); `schema_version` records the schema the
//! tables follow, so a later release can migrate them and an older binary refuses a newer
//! schema. The statements are in `cql.rs`:
//!
//! - `profiles` — one row per user (partition key `user_id`): version, last-seen and
//!   touched times, built-in counters as a frozen list, custom counters, the recent list and
//!   the purchases as frozen lists (of tuples), the session as a frozen tuple, and the
//!   write `stamp` (plus the last 32 stamps). The row is written whole, `USING TTL` of the
//!   time left until `touched + ttl`, so the TTL is refreshed on every write and an idle
//!   profile disappears by itself; reads also drop a profile past its TTL.
//! - `log` — the event log, partitioned by `bucket = seq / 10 000`, clustered by `seq`,
//!   each row the postcard-encoded [`LogRecord`] and its ingest time.
//! - `sequences` — the rows `log` and `models` holding the last number handed out.
//! - `dedupe` — one row per event id (claim time and a random claim token), `USING TTL`
//!   of the dedupe window.
//! - `catalog` — one row per item; `catalog_version` — a counter bumped on every change.
//! - `model_versions`, `model_chunks`, `rollbacks`, `leases` — model snapshots, the
//!   rollback record and the learner lease ([`ModelStore`](reflex_core::ModelStore), see
//!   `models.rs`).
//!
//! # Sequence numbers: a lightweight-transaction counter
//!
//! An append reserves a block of sequence numbers for its new records with one
//! compare-and-set on `sequences` (`UPDATE … SET value = ? IF value = ?`, retried with the
//! value the failed attempt returns), then writes the records in one `LOGGED` batch. This
//! keeps the [`EventSink`] contract (positions strictly increase, `read(after, …)`
//! pages by position, `last_seq` is one read) and costs one Paxos round per append call,
//! not per event. A time-based scheme would avoid the Paxos round but gives no dense,
//! totally ordered positions across replicas whose clocks differ, which replicas that
//! follow the log by position depend on.
//!
//! A block can be reserved and then never written (the writer fails or dies in between),
//! and a block reserved later can land before an earlier one. So `read` returns records
//! only up to the first gap while the record after the gap is young (written less than
//! `4 × request_timeout_ms + 10 s` ago by the server's clock): a follower waits instead of
//! skipping records still in flight. An older gap is a lost reservation and is skipped.
//!
//! # Dedupe: lightweight transactions per event id
//!
//! Each new event id is claimed with `INSERT INTO dedupe … IF NOT EXISTS USING TTL
//! window`: exactly one of any number of concurrent appenders, on any replica, wins an
//! id, which an idempotent (blind) write cannot decide. The row's claim time makes the
//! window exact to the millisecond (the TTL, in whole seconds and rounded up, only
//! collects it): a claim older than the window is taken over by a compare-and-set on its
//! claim time. Duplicates within one call are found in memory; erase records are never
//! deduped.
//!
//! What Scylla cannot guarantee: claims, the sequence counter and the log are different
//! partitions, and there are no transactions across partitions. The append therefore
//! runs claim → reserve → write, and when a step fails for certain it releases its claims
//! (`DELETE … IF claim = ?`), so a retry is not taken for a duplicate. When the outcome of
//! the log write is unknown (a timeout) the claims stay: a retry answers `DUPLICATE`,
//! which is right if the batch landed (a logged batch is replayed from the batch log)
//! and loses the events if it did not. A crash between claiming and writing loses the
//! events the same way. All-or-nothing therefore holds for the records of one call (one
//! logged batch) but only best-effort between claims and records.
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
//!
//! Requests are token-aware (the driver's default policy) and prefer `local_datacenter`;
//! every statement is prepared once at connect.

mod config;
mod cql;
mod models;
mod rows;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{TryStreamExt, future};
use reflex_core::types::now_ms;
use reflex_core::{
    Appended, CatalogStore, Error, EventSink, Item, ItemId, LogRecord, Profile, ProfilePolicy,
    ProfileStore, ProfileUpdate, Result, Seq, UserId,
};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{
    DbError, ExecutionError, NewSessionError, NextPageError, NextRowError, PagerExecutionError,
    PrepareError, RequestAttemptError, RequestError,
};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::Statement;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{Counter, CqlValue, Row};
use tracing::{info, warn};

pub use config::{ConsistencyLevel, ReplicationClass, ScyllaConfig, SerialConsistencyLevel};
pub use rows::RowError;

use config::MAX_TTL_SECONDS;
use cql::{LOG_BUCKET, LOG_SEQUENCE, SCHEMA_VERSION};
use rows::{ItemRow, ProfileRow, item_values};

/// Attempts of one compare-and-set before giving up with `UNAVAILABLE`.
const MAX_CAS_ATTEMPTS: u32 = 100;

/// How long schema changes at start-up may take.
const DDL_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the Scylla backend that are not the driver's own.
#[derive(Debug, thiserror::Error)]
pub enum ScyllaStoreError {
    /// The keyspace follows a schema newer than this binary knows.
    #[error("schema version {found} is newer than {known}, which this binary knows")]
    SchemaTooNew {
        /// Version found in `schema_version`.
        found: i32,
        /// Version this binary writes.
        known: i32,
    },
    /// A lightweight transaction answered without its `[applied]` column.
    #[error("conditional statement answered without [applied]")]
    NoApplied,
    /// Too many concurrent writers kept winning a compare-and-set.
    #[error("gave up after {0} conflicting attempts")]
    Contention(u32),
}

/// Profiles, event log, dedupe window and catalog in ScyllaDB. Cheap to share: the
/// driver's session multiplexes every caller over its connections.
pub struct ScyllaStore {
    session: Session,
    config: ScyllaConfig,
    policy: ProfilePolicy,
    st: Prepared,
    models: models::ModelPrepared,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore")
            .field("contact_points", &self.config.contact_points)
            .field("keyspace", &self.config.keyspace)
            .finish_non_exhaustive()
    }
}

/// The statements, prepared once at connect.
struct Prepared {
    select_sequence: PreparedStatement,
    select_sequence_serial: PreparedStatement,
    insert_sequence: PreparedStatement,
    advance_sequence: PreparedStatement,
    insert_log: PreparedStatement,
    select_log: PreparedStatement,
    claim_dedupe: PreparedStatement,
    reclaim_dedupe: PreparedStatement,
    release_dedupe: PreparedStatement,
    select_dedupe_serial: PreparedStatement,
    select_profile: PreparedStatement,
    select_profile_serial: PreparedStatement,
    insert_profile: PreparedStatement,
    update_profile: PreparedStatement,
    expire_profile: PreparedStatement,
    erase_profile: PreparedStatement,
    scan_profiles: PreparedStatement,
    upsert_item: PreparedStatement,
    select_item: PreparedStatement,
    delete_item: PreparedStatement,
    scan_items: PreparedStatement,
    bump_catalog_version: PreparedStatement,
    select_catalog_version: PreparedStatement,
}

/// Whether a driver error means the cluster (or the way to it) is in trouble, so that
/// retrying later may work.
fn attempt_unavailable(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => true,
        RequestAttemptError::DbError(db, _) => matches!(
            db,
            DbError::Unavailable { .. }
                | DbError::Overloaded
                | DbError::IsBootstrapping
                | DbError::ReadTimeout { .. }
                | DbError::WriteTimeout { .. }
                | DbError::ReadFailure { .. }
                | DbError::WriteFailure { .. }
                | DbError::RateLimitReached { .. }
        ),
        _ => false,
    }
}

fn execution_unavailable(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::EmptyPlan
        | ExecutionError::ConnectionPoolError(_)
        | ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(a) => attempt_unavailable(a),
        ExecutionError::PrepareError(p) => prepare_unavailable(p),
        _ => false,
    }
}

fn prepare_unavailable(e: &PrepareError) -> bool {
    match e {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_unavailable(first_attempt),
        _ => false,
    }
}

fn request_unavailable(e: &RequestError) -> bool {
    match e {
        RequestError::EmptyPlan
        | RequestError::ConnectionPoolError(_)
        | RequestError::RequestTimeout(_) => true,
        RequestError::LastAttemptError(a) => attempt_unavailable(a),
        _ => false,
    }
}

/// Whether a write that failed with `e` may nevertheless have been applied: timeouts and
/// connections lost after the request went out.
fn outcome_unknown(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(a) => matches!(
            a,
            RequestAttemptError::BrokenConnectionError(_)
                | RequestAttemptError::DbError(DbError::WriteTimeout { .. }, _)
        ),
        _ => false,
    }
}

/// Maps a statement's error: trouble reaching the cluster is `UNAVAILABLE`, anything
/// else a storage error.
fn exec_error(context: &str, e: ExecutionError) -> Error {
    if execution_unavailable(&e) {
        Error::unavailable(context, e)
    } else {
        Error::storage(context, e)
    }
}

fn prepare_error(context: &str, e: PrepareError) -> Error {
    if prepare_unavailable(&e) {
        Error::unavailable(context, e)
    } else {
        Error::storage(context, e)
    }
}

fn pager_error(context: &str, e: PagerExecutionError) -> Error {
    match &e {
        PagerExecutionError::PrepareError(p) if prepare_unavailable(p) => {
            Error::unavailable(context, e)
        }
        PagerExecutionError::NextPageError(NextPageError::RequestFailure(r))
            if request_unavailable(r) =>
        {
            Error::unavailable(context, e)
        }
        _ => Error::storage(context, e),
    }
}

fn row_stream_error(context: &str, e: NextRowError) -> Error {
    match &e {
        NextRowError::NextPageError(NextPageError::RequestFailure(r)) if request_unavailable(r) => {
            Error::unavailable(context, e)
        }
        _ => Error::storage(context, e),
    }
}

fn session_error(context: &str, e: NewSessionError) -> Error {
    match e {
        NewSessionError::IllegalConfig(_) | NewSessionError::EmptyKnownNodesList => {
            Error::invalid("store.scylla", e.to_string())
        }
        _ => Error::unavailable(context, e),
    }
}

/// A random 64-bit token: claim, write stamp or reservation owner. Unique in practice
/// across processes (randomly keyed hasher) and within one (a counter).
fn fresh_stamp() -> i64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as i64
}

/// Seconds of TTL covering `ms` milliseconds (rounded up, at least 1, at most Scylla's
/// 20-year limit).
fn ttl_seconds(ms: i64) -> i32 {
    let s = ms.saturating_add(999) / 1000;
    s.clamp(1, MAX_TTL_SECONDS) as i32
}

/// A short random pause before retrying a compare-and-set that lost, growing with the
/// attempt, so that contending writers spread out.
async fn backoff(attempt: u32) {
    if attempt < 2 {
        return;
    }
    let cap = u64::from(attempt.min(10)) * 2;
    let ms = (fresh_stamp() as u64) % cap + 1;
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Of the log rows `rows` (position, server write time in µs), read in order starting at
/// position `expected`, how many may be returned: all up to the first gap whose following
/// record was written less than `settle_us` before `now_us` (a reservation whose records
/// may still arrive); older gaps are lost reservations and skipped. The second value says
/// whether reading stopped at such a young gap.
fn readable_prefix(
    mut expected: Seq,
    rows: &[(Seq, Option<i64>)],
    now_us: i64,
    settle_us: i64,
) -> (usize, bool) {
    for (n, (seq, written_us)) in rows.iter().enumerate() {
        if *seq != expected && written_us.is_none_or(|w| w > now_us.saturating_sub(settle_us)) {
            return (n, true);
        }
        expected = seq + 1;
    }
    (rows.len(), false)
}

/// The answer of a conditional statement: whether it applied, and the row's current
/// columns (Scylla returns them either way; Cassandra only when it did not apply).
struct Lwt {
    applied: bool,
    columns: HashMap<String, CqlValue>,
}

impl Lwt {
    fn from_result(result: QueryResult, context: &str) -> Result<Self> {
        let rows = result
            .into_rows_result()
            .map_err(|e| Error::storage(context, e))?;
        let names: Vec<String> = rows
            .column_specs()
            .iter()
            .map(|c| c.name().to_owned())
            .collect();
        let row: Row = rows.first_row().map_err(|e| Error::storage(context, e))?;
        let mut columns = HashMap::new();
        for (name, value) in names.into_iter().zip(row.columns) {
            if let Some(value) = value {
                columns.insert(name, value);
            }
        }
        let applied = columns
            .get("[applied]")
            .and_then(CqlValue::as_boolean)
            .ok_or_else(|| Error::storage(context, ScyllaStoreError::NoApplied))?;
        Ok(Self { applied, columns })
    }

    fn bigint(&self, column: &str) -> Option<i64> {
        self.columns.get(column).and_then(CqlValue::as_bigint)
    }
}

impl ScyllaStore {
    /// Connects to the cluster as `config` says, creates or migrates the keyspace and its
    /// tables, and prepares every statement. Fails with `UNAVAILABLE` when no node can be
    /// reached within `connect_timeout_ms`.
    pub async fn connect(config: ScyllaConfig, policy: ProfilePolicy) -> Result<Arc<Self>> {
        config.validate()?;
        let context = "connecting to scylla";
        let mut balancing = DefaultPolicy::builder().token_aware(true);
        if let Some(dc) = &config.local_datacenter {
            balancing = balancing.prefer_datacenter(dc.clone());
        }
        let profile = ExecutionProfile::builder()
            .consistency(config.consistency.to_driver())
            .serial_consistency(Some(config.serial_consistency.to_driver()))
            .request_timeout(Some(Duration::from_millis(config.request_timeout_ms)))
            .load_balancing_policy(balancing.build())
            .build();
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.contact_points)
            .connection_timeout(connect_timeout)
            .default_execution_profile_handle(profile.into_handle());
        if let Some(dc) = &config.local_datacenter {
            builder = builder.prefer_datacenter(dc.clone());
        }
        if let (Some(user), Some(var)) = (&config.username, &config.password_env) {
            let password = std::env::var(var).map_err(|_| {
                Error::invalid(
                    "store.scylla.password_env",
                    format!("environment variable {var} is not set"),
                )
            })?;
            builder = builder.user(user.clone(), password);
        }
        let session = tokio::time::timeout(connect_timeout, builder.build())
            .await
            .map_err(|_| {
                Error::unavailable(
                    context,
                    format!("no connection within {} ms", config.connect_timeout_ms),
                )
            })?
            .map_err(|e| session_error(context, e))?;

        migrate(&session, &config).await?;
        let st = prepare_all(&session, &config).await?;
        let models =
            models::ModelPrepared::prepare(&session, &cql::Statements::new(&config.keyspace))
                .await?;
        info!(
            contact_points = ?config.contact_points,
            keyspace = %config.keyspace,
            local_datacenter = ?config.local_datacenter,
            "scylla store connected"
        );
        Ok(Arc::new(Self {
            session,
            config,
            policy,
            st,
            models,
        }))
    }

    /// The settings in force.
    pub fn config(&self) -> &ScyllaConfig {
        &self.config
    }

    async fn exec(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        context: &str,
    ) -> Result<QueryResult> {
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(|e| exec_error(context, e))
    }

    /// Runs a conditional statement; `Ok(None)` when its outcome is unknown (timeout).
    async fn lwt(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        context: &str,
    ) -> Result<Option<Lwt>> {
        match self.session.execute_unpaged(statement, values).await {
            Ok(result) => Lwt::from_result(result, context).map(Some),
            Err(e) if outcome_unknown(&e) => {
                warn!(error = %e, "{context}: outcome unknown, settling it");
                Ok(None)
            }
            Err(e) => Err(exec_error(context, e)),
        }
    }

    /// How long a gap in the log may be young: in-flight writes finish (or give up)
    /// within a few request timeouts; 10 s more absorb clock skew between nodes and us.
    fn gap_settle_us(&self) -> i64 {
        (4 * self.config.request_timeout_ms as i64 + 10_000) * 1000
    }

    // ---- dedupe ----

    /// Claims `event_id` for this append; `Some(claim token)` when it is new (or its
    /// earlier claim is older than the window), `None` for a duplicate.
    async fn claim(&self, event_id: &str, now: i64) -> Result<Option<i64>> {
        let context = "claiming an event id in scylla";
        let window = self.config.dedupe_window_ms;
        let ttl = ttl_seconds(window.saturating_add(1000));
        for _ in 0..MAX_CAS_ATTEMPTS {
            let claim = fresh_stamp();
            let Some(answer) = self
                .lwt(&self.st.claim_dedupe, (event_id, now, claim, ttl), context)
                .await?
            else {
                match self.settle_claim(event_id, claim, context).await? {
                    Some(won) => return Ok(won.then_some(claim)),
                    None => continue,
                }
            };
            if answer.applied {
                return Ok(Some(claim));
            }
            // Claimed before: still a duplicate within the window; past it, take it over.
            let mut claimed = answer.bigint("claimed_ms");
            loop {
                match claimed {
                    None => break, // gone meanwhile (TTL): claim afresh
                    Some(at) if at.saturating_add(window) > now => return Ok(None),
                    Some(at) => {
                        let claim = fresh_stamp();
                        let Some(answer) = self
                            .lwt(
                                &self.st.reclaim_dedupe,
                                (ttl, now, claim, event_id, at),
                                context,
                            )
                            .await?
                        else {
                            match self.settle_claim(event_id, claim, context).await? {
                                Some(won) => return Ok(won.then_some(claim)),
                                None => break,
                            }
                        };
                        if answer.applied {
                            return Ok(Some(claim));
                        }
                        claimed = answer.bigint("claimed_ms");
                    }
                }
            }
        }
        Err(Error::unavailable(
            context,
            ScyllaStoreError::Contention(MAX_CAS_ATTEMPTS),
        ))
    }

    /// After a claim's outcome was unknown: `Some(true)` when the claim `claim` holds,
    /// `Some(false)` when another holds the id, `None` when nobody does.
    async fn settle_claim(
        &self,
        event_id: &str,
        claim: i64,
        context: &str,
    ) -> Result<Option<bool>> {
        let result = self
            .exec(&self.st.select_dedupe_serial, (event_id,), context)
            .await?;
        let row: Option<(Option<i64>, Option<i64>)> = result
            .into_rows_result()
            .map_err(|e| Error::storage(context, e))?
            .maybe_first_row()
            .map_err(|e| Error::storage(context, e))?;
        Ok(row.map(|(_, holder)| holder == Some(claim)))
    }

    /// Gives claims back after an append failed for certain, so a retry is not taken for
    /// a duplicate. Best effort: a claim that cannot be released stays until the window
    /// ends.
    async fn release(&self, claims: &[(&str, i64)]) {
        let context = "releasing event id claims in scylla";
        let results = future::join_all(
            claims
                .iter()
                .map(|(id, claim)| self.lwt(&self.st.release_dedupe, (*id, *claim), context)),
        )
        .await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            warn!(
                failed,
                "{context}: some ids stay duplicates until the window ends"
            );
        }
    }

    // ---- sequence numbers ----

    /// Reserves `n` consecutive numbers of the sequence `name`; returns the first.
    async fn reserve(&self, name: &str, n: u64) -> Result<Seq> {
        let context = "reserving sequence numbers in scylla";
        let mut current = self
            .sequence_value(name, false, context)
            .await?
            .map(|(v, _)| v);
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let owner = fresh_stamp();
            let from = current.unwrap_or(0);
            let to = from + n as i64;
            let answer = match current {
                None => {
                    self.lwt(&self.st.insert_sequence, (name, to, owner), context)
                        .await?
                }
                Some(v) => {
                    self.lwt(&self.st.advance_sequence, (to, owner, name, v), context)
                        .await?
                }
            };
            match answer {
                Some(a) if a.applied => return Ok(from as Seq + 1),
                Some(a) => current = a.bigint("value"),
                None => {
                    // Settle with a serial read: ours if the counter still shows our
                    // reservation. Otherwise it either never landed or others moved on
                    // after it, and its positions stay a gap that readers skip.
                    let now = self.sequence_value(name, true, context).await?;
                    if now == Some((to, Some(owner))) {
                        return Ok(from as Seq + 1);
                    }
                    current = now.map(|(v, _)| v);
                }
            }
            backoff(attempt).await;
        }
        Err(Error::unavailable(
            context,
            ScyllaStoreError::Contention(MAX_CAS_ATTEMPTS),
        ))
    }

    /// The row of sequence `name`: (last number handed out, owner of that reservation).
    async fn sequence_value(
        &self,
        name: &str,
        serial: bool,
        context: &str,
    ) -> Result<Option<(i64, Option<i64>)>> {
        let statement = if serial {
            &self.st.select_sequence_serial
        } else {
            &self.st.select_sequence
        };
        let result = self.exec(statement, (name,), context).await?;
        let row: Option<(Option<i64>, Option<i64>)> = result
            .into_rows_result()
            .map_err(|e| Error::storage(context, e))?
            .maybe_first_row()
            .map_err(|e| Error::storage(context, e))?;
        Ok(row.and_then(|(value, owner)| value.map(|v| (v, owner))))
    }

    // ---- profiles ----

    async fn profile_row(&self, user: &UserId, serial: bool) -> Result<Option<ProfileRow>> {
        let context = "reading a profile from scylla";
        let statement = if serial {
            &self.st.select_profile_serial
        } else {
            &self.st.select_profile
        };
        let result = self.exec(statement, (user.as_str(),), context).await?;
        result
            .into_rows_result()
            .map_err(|e| Error::storage(context, e))?
            .maybe_first_row::<ProfileRow>()
            .map_err(|e| Error::storage(context, e))
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

    // ---- log ----

    async fn read_bucket(
        &self,
        bucket: u64,
        from: Seq,
        limit: usize,
        context: &str,
    ) -> Result<Vec<(Seq, Vec<u8>, Option<i64>)>> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let result = self
            .exec(
                &self.st.select_log,
                (bucket as i64, from as i64, limit),
                context,
            )
            .await?;
        let rows = result
            .into_rows_result()
            .map_err(|e| Error::storage(context, e))?;
        rows.rows::<(i64, Vec<u8>, Option<i64>)>()
            .map_err(|e| Error::storage(context, e))?
            .map(|row| {
                let (seq, record, written) = row.map_err(|e| Error::storage(context, e))?;
                Ok((seq as Seq, record, written))
            })
            .collect()
    }
}

/// Creates the keyspace and tables when missing and records (or checks) the schema
/// version.
async fn migrate(session: &Session, config: &ScyllaConfig) -> Result<()> {
    let context = "creating the scylla schema";
    let ks = &config.keyspace;
    let mut ddl = vec![cql::create_keyspace(ks, &config.replication())];
    ddl.extend(cql::create_tables(ks).into_iter().map(|(_, cql)| cql));
    for text in ddl {
        let mut statement = Statement::new(text);
        statement.set_request_timeout(Some(DDL_TIMEOUT));
        session
            .query_unpaged(statement, ())
            .await
            .map_err(|e| exec_error(context, e))?;
    }
    let mut record = Statement::new(cql::insert_schema_version(ks));
    record.set_request_timeout(Some(DDL_TIMEOUT));
    let result = session
        .query_unpaged(record, (SCHEMA_VERSION, now_ms()))
        .await
        .map_err(|e| exec_error(context, e))?;
    let answer = Lwt::from_result(result, context)?;
    if answer.applied {
        info!(keyspace = %ks, version = SCHEMA_VERSION, "scylla schema created");
        return Ok(());
    }
    let found = match answer.columns.get("version").and_then(CqlValue::as_int) {
        Some(v) => v,
        None => {
            let result = session
                .query_unpaged(cql::select_schema_version(ks), ())
                .await
                .map_err(|e| exec_error(context, e))?;
            let row: Option<(Option<i32>,)> = result
                .into_rows_result()
                .map_err(|e| Error::storage(context, e))?
                .maybe_first_row()
                .map_err(|e| Error::storage(context, e))?;
            row.and_then(|(v,)| v).unwrap_or(SCHEMA_VERSION)
        }
    };
    if found > SCHEMA_VERSION {
        return Err(Error::storage(
            context,
            ScyllaStoreError::SchemaTooNew {
                found,
                known: SCHEMA_VERSION,
            },
        ));
    }
    if found < SCHEMA_VERSION {
        // Migrations from older versions go here, one step at a time; version 1 is the
        // first, so there are none yet.
        session
            .query_unpaged(
                cql::update_schema_version(ks),
                (SCHEMA_VERSION, now_ms(), found),
            )
            .await
            .map_err(|e| exec_error(context, e))?;
        info!(keyspace = %ks, from = found, to = SCHEMA_VERSION, "scylla schema migrated");
    }
    Ok(())
}

async fn prepare_all(session: &Session, config: &ScyllaConfig) -> Result<Prepared> {
    let context = "preparing scylla statements";
    let text = cql::Statements::new(&config.keyspace);
    let prepare = |cql: String| async move {
        session
            .prepare(cql)
            .await
            .map_err(|e| prepare_error(context, e))
    };
    let serial = |mut statement: PreparedStatement| {
        statement.set_consistency(config.serial_consistency.to_read_consistency());
        statement
    };
    let mut scan_profiles = prepare(text.scan_profiles).await?;
    scan_profiles.set_page_size(5_000);
    let mut scan_items = prepare(text.scan_items).await?;
    scan_items.set_page_size(1_000);
    let mut prepared = Prepared {
        select_sequence_serial: serial(prepare(text.select_sequence.clone()).await?),
        select_sequence: prepare(text.select_sequence).await?,
        insert_sequence: prepare(text.insert_sequence).await?,
        advance_sequence: prepare(text.advance_sequence).await?,
        insert_log: prepare(text.insert_log).await?,
        select_log: prepare(text.select_log).await?,
        claim_dedupe: prepare(text.claim_dedupe).await?,
        reclaim_dedupe: prepare(text.reclaim_dedupe).await?,
        release_dedupe: prepare(text.release_dedupe).await?,
        select_dedupe_serial: serial(prepare(text.select_dedupe).await?),
        select_profile_serial: serial(prepare(text.select_profile.clone()).await?),
        select_profile: prepare(text.select_profile).await?,
        insert_profile: prepare(text.insert_profile).await?,
        update_profile: prepare(text.update_profile).await?,
        expire_profile: prepare(text.expire_profile).await?,
        erase_profile: prepare(text.erase_profile).await?,
        scan_profiles,
        upsert_item: prepare(text.upsert_item).await?,
        select_item: prepare(text.select_item).await?,
        delete_item: prepare(text.delete_item).await?,
        scan_items,
        bump_catalog_version: prepare(text.bump_catalog_version).await?,
        select_catalog_version: prepare(text.select_catalog_version).await?,
    };
    // Log and catalog rows are plain upserts of fixed values: safe to retry.
    prepared.insert_log.set_is_idempotent(true);
    prepared.upsert_item.set_is_idempotent(true);
    prepared.delete_item.set_is_idempotent(true);
    for read in [
        &mut prepared.select_sequence,
        &mut prepared.select_log,
        &mut prepared.select_profile,
        &mut prepared.select_item,
        &mut prepared.select_catalog_version,
        &mut prepared.scan_profiles,
        &mut prepared.scan_items,
    ] {
        read.set_is_idempotent(true);
    }
    Ok(prepared)
}

#[async_trait]
impl EventSink for ScyllaStore {
    async fn append(&self, records: &[LogRecord]) -> Result<Vec<Appended>> {
        let context = "appending to the scylla event log";
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        // Duplicates within the call, found in memory; every other event id is claimed.
        let mut seen: HashSet<&str> = HashSet::new();
        let mut fresh = vec![true; records.len()];
        let mut to_claim: Vec<(usize, &str)> = Vec::new();
        for (i, record) in records.iter().enumerate() {
            if let LogRecord::Event { event, .. } = record {
                let id = event.event_id.as_str();
                if seen.insert(id) {
                    to_claim.push((i, id));
                } else {
                    fresh[i] = false;
                }
            }
        }
        let outcomes = future::join_all(to_claim.iter().map(|(_, id)| self.claim(id, now))).await;
        let mut claims: Vec<(&str, i64)> = Vec::new();
        let mut failure = None;
        for ((i, id), outcome) in to_claim.iter().zip(outcomes) {
            match outcome {
                Ok(Some(claim)) => claims.push((id, claim)),
                Ok(None) => fresh[*i] = false,
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            self.release(&claims).await;
            return Err(e);
        }
        let count = fresh.iter().filter(|f| **f).count() as u64;
        if count == 0 {
            return Ok(vec![Appended::Duplicate; records.len()]);
        }
        let first = match self.reserve(LOG_SEQUENCE, count).await {
            Ok(first) => first,
            Err(e) => {
                self.release(&claims).await;
                return Err(e);
            }
        };

        let mut batch = Batch::new(BatchType::Logged);
        let mut values = Vec::with_capacity(count as usize);
        let mut appended = Vec::with_capacity(records.len());
        let mut seq = first;
        for (record, fresh) in records.iter().zip(&fresh) {
            if !fresh {
                appended.push(Appended::Duplicate);
                continue;
            }
            let blob = rows::encode_record(record).map_err(|e| Error::storage(context, e))?;
            batch.append_statement(self.st.insert_log.clone());
            values.push((
                (seq / LOG_BUCKET) as i64,
                seq as i64,
                rows::ingested_ms(record),
                blob,
            ));
            appended.push(Appended::At(seq));
            seq += 1;
        }
        match self.session.batch(&batch, values).await {
            Ok(_) => Ok(appended),
            Err(e) if outcome_unknown(&e) => {
                // The logged batch may still land (it is replayed from the batch log), so
                // the claims stay: a retry is a duplicate rather than a second copy.
                Err(Error::unavailable(context, e))
            }
            Err(e) => {
                self.release(&claims).await;
                Err(exec_error(context, e))
            }
        }
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<(Seq, LogRecord)>> {
        let context = "reading the scylla event log";
        if limit == 0 || after >= i64::MAX as Seq {
            return Ok(Vec::new());
        }
        let last = self.last_seq().await?;
        let now_us = now_ms().saturating_mul(1000);
        let settle_us = self.gap_settle_us();
        let mut out = Vec::new();
        let mut expected = after + 1;
        let mut next = after + 1;
        while out.len() < limit && next <= last {
            let bucket = next / LOG_BUCKET;
            let want = limit - out.len();
            let rows = self.read_bucket(bucket, next, want, context).await?;
            let positions: Vec<(Seq, Option<i64>)> = rows
                .iter()
                .map(|(seq, _, written)| (*seq, *written))
                .collect();
            let (take, stopped) = readable_prefix(expected, &positions, now_us, settle_us);
            for (seq, blob, _) in rows.iter().take(take) {
                let record = rows::decode_record(blob).map_err(|e| Error::storage(context, e))?;
                out.push((*seq, record));
                expected = seq + 1;
            }
            if stopped {
                break;
            }
            next = if rows.len() < want {
                (bucket + 1) * LOG_BUCKET
            } else {
                expected
            };
        }
        Ok(out)
    }

    async fn last_seq(&self) -> Result<Seq> {
        let value = self
            .sequence_value(LOG_SEQUENCE, false, "reading the scylla log position")
            .await?;
        Ok(value.map_or(0, |(v, _)| v.max(0) as Seq))
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
        // Group by user, keeping each user's events in order; users go concurrently.
        let mut by_user: Vec<(&UserId, Vec<&ProfileUpdate<'_>>)> = Vec::new();
        let mut index: HashMap<&UserId, usize> = HashMap::new();
        for u in updates {
            let slot = *index.entry(&u.event.user_id).or_insert_with(|| {
                by_user.push((&u.event.user_id, Vec::new()));
                by_user.len() - 1
            });
            by_user[slot].1.push(u);
        }
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

#[async_trait]
impl CatalogStore for ScyllaStore {
    async fn upsert(&self, items: &[Item]) -> Result<()> {
        let context = "writing catalog items to scylla";
        if items.is_empty() {
            return Ok(());
        }
        // One logged batch: every item lands or (after a failure the batch log cannot
        // repair) none does; then the version moves so other replicas reload.
        let mut batch = Batch::new(BatchType::Logged);
        let values: Vec<_> = items.iter().map(item_values).collect();
        for _ in items {
            batch.append_statement(self.st.upsert_item.clone());
        }
        batch.set_is_idempotent(true);
        self.session
            .batch(&batch, values)
            .await
            .map_err(|e| exec_error(context, e))?;
        self.exec(&self.st.bump_catalog_version, (), context)
            .await?;
        Ok(())
    }

    async fn get(&self, item: &ItemId) -> Result<Option<Item>> {
        let context = "reading a catalog item from scylla";
        let result = self
            .exec(&self.st.select_item, (item.as_str(),), context)
            .await?;
        let row: Option<ItemRow> = result
            .into_rows_result()
            .map_err(|e| Error::storage(context, e))?
            .maybe_first_row()
            .map_err(|e| Error::storage(context, e))?;
        row.map(|r| r.into_item().map_err(|e| Error::storage(context, e)))
            .transpose()
    }

    async fn delete(&self, item: &ItemId) -> Result<bool> {
        let context = "deleting a catalog item in scylla";
        // Read, then a plain delete: two concurrent deletes may both answer `true`, which
        // is harmless, and catalog rows stay free of lightweight transactions (mixing
        // them with plain upserts of the same rows is unsafe in Scylla).
        if CatalogStore::get(self, item).await?.is_none() {
            return Ok(false);
        }
        self.exec(&self.st.delete_item, (item.as_str(),), context)
            .await?;
        self.exec(&self.st.bump_catalog_version, (), context)
            .await?;
        Ok(true)
    }

    async fn load_all(&self) -> Result<Vec<Item>> {
        let context = "loading the catalog from scylla";
        let rows: Vec<ItemRow> = self
            .session
            .execute_iter(self.st.scan_items.clone(), ())
            .await
            .map_err(|e| pager_error(context, e))?
            .rows_stream::<ItemRow>()
            .map_err(|e| Error::storage(context, e))?
            .map_err(|e| row_stream_error(context, e))
            .try_collect()
            .await?;
        rows.into_iter()
            .map(|r| r.into_item().map_err(|e| Error::storage(context, e)))
            .collect()
    }

    async fn version(&self) -> Result<u64> {
        let context = "reading the scylla catalog version";
        let result = self
            .exec(&self.st.select_catalog_version, (), context)
            .await?;
        let row: Option<(Option<Counter>,)> = result
            .into_rows_result()
            .map_err(|e| Error::storage(context, e))?
            .maybe_first_row()
            .map_err(|e| Error::storage(context, e))?;
        Ok(row
            .and_then(|(v,)| v)
            .map_or(0, |Counter(v)| v.max(0) as u64))
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn ttls_round_up_and_stay_within_scylla_limits() {
        assert_eq!(ttl_seconds(1), 1);
        assert_eq!(ttl_seconds(1000), 1);
        assert_eq!(ttl_seconds(1001), 2);
        assert_eq!(ttl_seconds(-5), 1);
        assert_eq!(ttl_seconds(30 * 24 * 3600 * 1000), 30 * 24 * 3600);
        assert_eq!(ttl_seconds(i64::MAX), MAX_TTL_SECONDS as i32);
    }

    #[test]
    fn stamps_do_not_repeat() {
        let stamps: HashSet<i64> = (0..10_000).map(|_| fresh_stamp()).collect();
        assert_eq!(stamps.len(), 10_000);
    }

    #[test]
    fn reads_stop_at_young_gaps_and_skip_old_ones() {
        let now = 1_000_000_000;
        let settle = 10_000;
        let young = Some(now - 10);
        let old = Some(now - 2 * settle);
        // Contiguous: everything.
        assert_eq!(
            readable_prefix(5, &[(5, young), (6, young), (7, young)], now, settle),
            (3, false)
        );
        // A gap before a young record: stop there (the gap may still fill).
        assert_eq!(
            readable_prefix(5, &[(5, old), (6, old), (9, young)], now, settle),
            (2, true)
        );
        assert_eq!(readable_prefix(5, &[(7, young)], now, settle), (0, true));
        // A gap before an old record: a lost reservation, skipped.
        assert_eq!(
            readable_prefix(5, &[(5, old), (8, old), (9, young)], now, settle),
            (3, false)
        );
        // Unknown write time counts as young.
        assert_eq!(readable_prefix(5, &[(6, None)], now, settle), (0, true));
        assert_eq!(readable_prefix(5, &[], now, settle), (0, false));
    }

    #[test]
    fn timeouts_and_lost_connections_are_unavailable_and_uncertain() {
        let timeout = ExecutionError::RequestTimeout(Duration::from_millis(5));
        assert!(outcome_unknown(&timeout));
        let err = exec_error("ctx", timeout);
        assert_eq!(err.code(), reflex_core::ErrorCode::Unavailable, "{err}");
        assert!(err.to_string().contains("ctx"));

        let overloaded = ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::Overloaded,
            "busy".into(),
        ));
        assert!(!outcome_unknown(&overloaded), "refused, so not applied");
        assert_eq!(
            exec_error("ctx", overloaded).code(),
            reflex_core::ErrorCode::Unavailable
        );
        assert!(outcome_unknown(&ExecutionError::LastAttemptError(
            RequestAttemptError::DbError(
                DbError::WriteTimeout {
                    consistency: scylla::statement::Consistency::LocalQuorum,
                    received: 1,
                    required: 2,
                    write_type: scylla::errors::WriteType::Cas,
                },
                "cas".into(),
            )
        )));

        let syntax = ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::SyntaxError,
            "bad".into(),
        ));
        assert!(!outcome_unknown(&syntax));
        assert_eq!(
            exec_error("ctx", syntax).code(),
            reflex_core::ErrorCode::Internal
        );
        assert_eq!(
            exec_error("ctx", ExecutionError::EmptyPlan).code(),
            reflex_core::ErrorCode::Unavailable
        );
    }
}
