//! The Scylla store itself: its session and prepared statements, how driver errors map
//! to Reflex's, lightweight-transaction answers, and the sequence counters that log
//! positions and model ids come from.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reflex_core::{Error, ProfilePolicy, Result, Seq};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{
    DbError, ExecutionError, NewSessionError, NextPageError, NextRowError, PagerExecutionError,
    PrepareError, RequestAttemptError, RequestError,
};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};
use tracing::{info, warn};

use super::config::MAX_TTL_SECONDS;
use super::{ScyllaConfig, cql, models, schema};
use crate::remote::{connect_within, password_from_env};

/// Attempts of one compare-and-set before giving up with `UNAVAILABLE`.
pub(super) const MAX_CAS_ATTEMPTS: u32 = 100;

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
    pub(super) session: Session,
    pub(super) config: ScyllaConfig,
    pub(super) policy: ProfilePolicy,
    pub(super) st: Prepared,
    pub(super) models: models::ModelPrepared,
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
pub(super) struct Prepared {
    pub(super) select_sequence: PreparedStatement,
    pub(super) select_sequence_serial: PreparedStatement,
    pub(super) insert_sequence: PreparedStatement,
    pub(super) advance_sequence: PreparedStatement,
    pub(super) insert_log: PreparedStatement,
    pub(super) select_log: PreparedStatement,
    pub(super) claim_dedupe: PreparedStatement,
    pub(super) reclaim_dedupe: PreparedStatement,
    pub(super) release_dedupe: PreparedStatement,
    pub(super) select_dedupe_serial: PreparedStatement,
    pub(super) select_profile: PreparedStatement,
    pub(super) select_profile_serial: PreparedStatement,
    pub(super) insert_profile: PreparedStatement,
    pub(super) update_profile: PreparedStatement,
    pub(super) expire_profile: PreparedStatement,
    pub(super) erase_profile: PreparedStatement,
    pub(super) scan_profiles: PreparedStatement,
    pub(super) upsert_item: PreparedStatement,
    pub(super) select_item: PreparedStatement,
    pub(super) delete_item: PreparedStatement,
    pub(super) scan_items: PreparedStatement,
    pub(super) bump_catalog_version: PreparedStatement,
    pub(super) select_catalog_version: PreparedStatement,
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
pub(super) fn outcome_unknown(e: &ExecutionError) -> bool {
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
pub(super) fn exec_error(context: &str, e: ExecutionError) -> Error {
    if execution_unavailable(&e) {
        Error::unavailable(context, e)
    } else {
        Error::storage(context, e)
    }
}

pub(super) fn prepare_error(context: &str, e: PrepareError) -> Error {
    if prepare_unavailable(&e) {
        Error::unavailable(context, e)
    } else {
        Error::storage(context, e)
    }
}

pub(super) fn pager_error(context: &str, e: PagerExecutionError) -> Error {
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

pub(super) fn row_stream_error(context: &str, e: NextRowError) -> Error {
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
pub(super) fn fresh_stamp() -> i64 {
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
pub(super) fn ttl_seconds(ms: i64) -> i32 {
    let s = ms.saturating_add(999) / 1000;
    s.clamp(1, MAX_TTL_SECONDS) as i32
}

/// A short random pause before retrying a compare-and-set that lost, growing with the
/// attempt, so that contending writers spread out.
pub(super) async fn backoff(attempt: u32) {
    if attempt < 2 {
        return;
    }
    let cap = u64::from(attempt.min(10)) * 2;
    let ms = (fresh_stamp() as u64) % cap + 1;
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The answer of a conditional statement: whether it applied, and the row's current
/// columns (Scylla returns them either way; Cassandra only when it did not apply).
pub(super) struct Lwt {
    pub(super) applied: bool,
    pub(super) columns: HashMap<String, CqlValue>,
}

impl Lwt {
    pub(super) fn from_result(result: QueryResult, context: &str) -> Result<Self> {
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

    pub(super) fn bigint(&self, column: &str) -> Option<i64> {
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
            let password = password_from_env(var, "store.scylla.password_env")?;
            builder = builder.user(user.clone(), password);
        }
        let session = connect_within(config.connect_timeout_ms, context, builder.build())
            .await?
            .map_err(|e| session_error(context, e))?;

        schema::migrate(&session, &config).await?;
        let st = schema::prepare_all(&session, &config).await?;
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

    pub(super) async fn exec(
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

    /// Runs `statement` and decodes the first row it returns, if any.
    pub(super) async fn first_row<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        context: &str,
    ) -> Result<Option<R>>
    where
        R: for<'frame> DeserializeRow<'frame, 'frame>,
    {
        self.exec(statement, values, context)
            .await?
            .into_rows_result()
            .map_err(|e| Error::storage(context, e))?
            .maybe_first_row()
            .map_err(|e| Error::storage(context, e))
    }

    /// Runs a conditional statement; `Ok(None)` when its outcome is unknown (timeout).
    pub(super) async fn lwt(
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

    // ---- sequence numbers ----

    /// Reserves `n` consecutive numbers of the sequence `name`; returns the first.
    pub(super) async fn reserve(&self, name: &str, n: u64) -> Result<Seq> {
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
    pub(super) async fn sequence_value(
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
        let row: Option<(Option<i64>, Option<i64>)> =
            self.first_row(statement, (name,), context).await?;
        Ok(row.and_then(|(value, owner)| value.map(|v| (v, owner))))
    }
}

#[cfg(test)]
mod unit_tests {
    use std::collections::HashSet;

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
