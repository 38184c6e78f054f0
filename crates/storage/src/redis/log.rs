//! The event log in Redis: [`EventSink`] for [`RedisStore`], a stream trimmed by length
//! at append and by age at maintenance; on a standalone Redis ingest appends and applies
//! to profiles in one script call.

use std::collections::HashMap;

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::{ClientLike, KeysInterface, StreamsInterface, Value};
use reflex_core::types::now_ms;
use reflex_core::{Appended, Error, EventSink, LogRecord, Result, Seq, SinkHealth, UserId};

use super::store::{RedisStore, decode, encode, redis_error, reply_error};

impl RedisStore {
    /// Drops log records ingested longer ago than `log_max_age_ms`: finds the first young
    /// record by binary search over sequence numbers, then trims everything before it.
    async fn trim_by_age(&self) -> Result<()> {
        let context = "trimming the redis event log";
        let cutoff = now_ms() - self.config.log_max_age_ms;
        let client = self.pool.next();
        let first: Vec<(String, Vec<(String, Bytes)>)> = client
            .xrange(&self.log_key, "-", "+", Some(1))
            .await
            .map_err(|e| redis_error(context, e))?;
        let Some((first_id, _)) = first.first() else {
            return Ok(());
        };
        let mut lo =
            parse_stream_id(first_id).ok_or_else(|| reply_error(context, first_id.clone()))?;
        let mut hi = self.last_seq().await? + 1;
        // Invariant: every record before `lo` is old; the one at `hi` (or the end) is young.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let page: Vec<(String, Vec<(String, Bytes)>)> = client
                .xrange(&self.log_key, format!("{mid}-0"), "+", Some(1))
                .await
                .map_err(|e| redis_error(context, e))?;
            let Some((id, fields)) = page.first() else {
                hi = mid;
                continue;
            };
            let seq = parse_stream_id(id).ok_or_else(|| reply_error(context, id.clone()))?;
            let ingested = fields
                .iter()
                .find(|(f, _)| f == "t")
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
                .ok_or_else(|| reply_error(context, "log entry without its time"))?;
            if ingested < cutoff {
                lo = seq + 1;
            } else {
                hi = mid.min(seq);
            }
        }
        let _: Value = client
            .custom(
                fred::cmd!("XTRIM"),
                vec![
                    Value::from(self.log_key.as_str()),
                    Value::from("MINID"),
                    Value::from(format!("{lo}-0")),
                ],
            )
            .await
            .map_err(|e| redis_error(context, e))?;
        Ok(())
    }
}

fn parse_stream_id(id: &str) -> Option<Seq> {
    id.split_once('-')?.0.parse().ok()
}

/// The part of an append call's keys and arguments that describes the records: their
/// dedupe keys and, per record, the triple the append scripts read.
fn push_records(
    store: &RedisStore,
    records: &[LogRecord],
    keys: &mut Vec<String>,
    args: &mut Vec<Value>,
    context: &str,
) -> Result<()> {
    for record in records {
        match record {
            LogRecord::Event {
                event,
                ingested_ms,
                filtered,
            } => {
                keys.push(store.dedupe_key(event.event_id.as_str()));
                // Filtered events are never applied to profiles: not pending.
                args.push(Value::from(if *filtered { "2" } else { "1" }));
                args.push(Value::from(*ingested_ms));
            }
            LogRecord::Erase { erased_ms, .. } => {
                args.push(Value::from("0"));
                args.push(Value::from(*erased_ms));
            }
        }
        args.push(Value::Bytes(Bytes::from(encode(record, context)?)));
    }
    Ok(())
}

/// Reads an append script's reply: one position (or 0, a duplicate) per record.
fn appended_from_reply(reply: Value, records: usize, context: &str) -> Result<Vec<Appended>> {
    let Value::Array(seqs) = reply else {
        return Err(reply_error(context, format!("{reply:?}")));
    };
    if seqs.len() != records {
        return Err(reply_error(
            context,
            format!("{} results for {records} records", seqs.len()),
        ));
    }
    seqs.into_iter()
        .map(|v| match v.as_u64() {
            Some(0) => Ok(Appended::Duplicate),
            Some(seq) => Ok(Appended::At(seq)),
            None => Err(reply_error(context, format!("{v:?}"))),
        })
        .collect()
}

impl RedisStore {
    /// [`EventSink::append_applying`] on a standalone Redis: one script call appends the
    /// batch and applies its new events to their profiles.
    async fn append_and_apply(
        &self,
        records: &[LogRecord],
        weights: &[f32],
    ) -> Result<Vec<Appended>> {
        let context = "appending to the redis event log and applying to profiles";
        if records.is_empty() {
            return Ok(Vec::new());
        }
        if weights.len() != records.len() {
            return Err(Error::Internal(format!(
                "{} weights for {} records",
                weights.len(),
                records.len()
            )));
        }
        let mut keys = Vec::with_capacity(2 + records.len() * 4);
        keys.push(self.log_key.clone());
        keys.push(self.seq_key.clone());
        let mut args: Vec<Value> = Vec::with_capacity(7 + records.len() * 11);
        args.push(Value::from(self.config.dedupe_window_ms));
        args.push(Value::from(self.config.log_max_len as i64));
        args.push(Value::from(self.policy.max_recent as i64));
        args.push(Value::from(self.policy.max_purchased as i64));
        args.push(Value::from(self.policy.session_gap_ms));
        args.push(Value::from(self.policy.ttl_ms));
        args.push(Value::from(records.len() as i64));
        push_records(self, records, &mut keys, &mut args, context)?;
        // Each user's events in batch order, named by their record's index (from 1).
        let mut users: Vec<(&UserId, Vec<usize>)> = Vec::new();
        let mut slot_of: HashMap<&UserId, usize> = HashMap::new();
        for (i, record) in records.iter().enumerate() {
            if let LogRecord::Event {
                event,
                filtered: false,
                ..
            } = record
            {
                let slot = *slot_of.entry(&event.user_id).or_insert_with(|| {
                    users.push((&event.user_id, Vec::new()));
                    users.len() - 1
                });
                users[slot].1.push(i);
            }
        }
        for (user, indexes) in &users {
            keys.extend(self.user_keys(user));
            args.push(Value::from(indexes.len() as i64));
            for &i in indexes {
                let LogRecord::Event {
                    event: e,
                    ingested_ms,
                    ..
                } = &records[i]
                else {
                    continue; // only events were grouped
                };
                args.push(Value::from(i as i64 + 1));
                args.push(Value::from(e.timestamp_ms));
                args.push(Value::from(*ingested_ms));
                args.push(Value::from(weights[i].to_string()));
                args.push(Value::from(e.kind.label()));
                args.push(Value::from(e.item_id.as_str()));
                args.push(Value::from(e.session_id.as_deref().unwrap_or("")));
            }
        }
        let reply = self
            .run(&self.append_apply, keys, args)
            .await
            .map_err(|e| redis_error(context, e))?;
        appended_from_reply(reply, records.len(), context)
    }
}

#[async_trait]
impl EventSink for RedisStore {
    async fn append(&self, records: &[LogRecord]) -> Result<Vec<Appended>> {
        let context = "appending to the redis event log";
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys = Vec::with_capacity(3 + records.len());
        keys.push(self.log_key.clone());
        keys.push(self.seq_key.clone());
        keys.push(self.pending_key.clone());
        let mut args: Vec<Value> = Vec::with_capacity(2 + records.len() * 3);
        args.push(Value::from(self.config.dedupe_window_ms));
        args.push(Value::from(self.config.log_max_len as i64));
        push_records(self, records, &mut keys, &mut args, context)?;
        let reply = self
            .run(&self.append, keys, args)
            .await
            .map_err(|e| redis_error(context, e))?;
        appended_from_reply(reply, records.len(), context)
    }

    /// On a standalone Redis, one script appends and applies (see
    /// [`scripts::APPEND_APPLY`](super::scripts::APPEND_APPLY)); on Cluster the log and
    /// the profiles are in different slots: `None`, the engine appends then applies.
    async fn append_applying(
        &self,
        records: &[LogRecord],
        weights: &[f32],
    ) -> Option<Result<Vec<Appended>>> {
        if !self.confirms_in_apply() {
            return None;
        }
        Some(self.append_and_apply(records, weights).await)
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<(Seq, LogRecord)>> {
        let context = "reading the redis event log";
        if limit == 0 || after == Seq::MAX {
            return Ok(Vec::new());
        }
        let entries: Vec<(String, Vec<(String, Bytes)>)> = self
            .pool
            .next()
            .xrange(
                &self.log_key,
                format!("({after}-0"),
                "+",
                Some(limit as u64),
            )
            .await
            .map_err(|e| redis_error(context, e))?;
        entries
            .into_iter()
            .map(|(id, fields)| {
                let seq = parse_stream_id(&id).ok_or_else(|| reply_error(context, id.clone()))?;
                let payload = fields
                    .iter()
                    .find(|(f, _)| f == "r")
                    .ok_or_else(|| reply_error(context, format!("log entry {id} has no record")))?;
                Ok((seq, decode(&payload.1, context)?))
            })
            .collect()
    }

    async fn last_seq(&self) -> Result<Seq> {
        let seq: Option<u64> = self.pool.next().get(&self.seq_key).await.map_err(|e| {
            self.note_error(&e);
            redis_error("reading the redis log position", e)
        })?;
        self.note_answer();
        Ok(seq.unwrap_or(0))
    }

    /// Readiness: the log's position can be read (one `GET`), so Redis answers. A Redis
    /// that is down turns readiness NOT_SERVING, never liveness.
    async fn health(&self) -> SinkHealth {
        match self.last_seq().await {
            Ok(_) => SinkHealth::default(),
            Err(err) => SinkHealth {
                unwritable: Some(err.to_string()),
                disk: None,
            },
        }
    }

    async fn maintain(&self) -> Result<()> {
        // Dedupe keys expire by themselves; only age-bounded logs need work.
        if self.config.log_max_age_ms > 0 {
            self.trim_by_age().await?;
        }
        Ok(())
    }
}
