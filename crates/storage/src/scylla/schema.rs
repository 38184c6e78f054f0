//! The schema at connect: the keyspace and tables created (or checked) and every
//! statement prepared.

use std::time::Duration;

use reflex_core::types::now_ms;
use reflex_core::{Error, Result};
use scylla::client::session::Session;
use scylla::statement::Statement;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlValue;
use tracing::info;

use super::ScyllaConfig;
use super::cql::{self, SCHEMA_VERSION};
use super::store::{Lwt, Prepared, ScyllaStoreError, exec_error, prepare_error};

/// How long schema changes at start-up may take.
const DDL_TIMEOUT: Duration = Duration::from_secs(60);

/// Creates the keyspace and tables when missing and records (or checks) the schema
/// version.
pub(super) async fn migrate(session: &Session, config: &ScyllaConfig) -> Result<()> {
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

pub(super) async fn prepare_all(session: &Session, config: &ScyllaConfig) -> Result<Prepared> {
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
