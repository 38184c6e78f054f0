//! The event log in Scylla: [`EventSink`] for [`ScyllaStore`].
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

use std::collections::HashSet;

use async_trait::async_trait;
use futures_util::future;
use reflex_core::types::now_ms;
use reflex_core::{Appended, Error, EventSink, LogRecord, Result, Seq};
use scylla::statement::batch::{Batch, BatchType};
use tracing::warn;

use super::cql::{LOG_BUCKET, LOG_SEQUENCE};
use super::rows;
use super::store::{
    MAX_CAS_ATTEMPTS, ScyllaStore, ScyllaStoreError, exec_error, fresh_stamp, outcome_unknown,
    ttl_seconds,
};

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

impl ScyllaStore {
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
        let row: Option<(Option<i64>, Option<i64>)> = self
            .first_row(&self.st.select_dedupe_serial, (event_id,), context)
            .await?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
