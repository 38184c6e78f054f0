//! Model versions: what a model's state looks like outside the process, the store that
//! keeps snapshots of it, and the lease that makes one replica the learner.
//!
//! A snapshot names items by [`ItemId`] (item indices are per process), so any replica
//! can load any other's snapshot.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::catalog::ItemIdx;
use crate::error::Result;
use crate::quality::VersionQuality;
use crate::types::{ItemId, Seq, TimestampMs, UserId};

/// One item's learnt state, as a model exports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemState {
    /// The item, by this process's index.
    pub item: ItemIdx,
    /// Its factor vector.
    pub vector: Vec<f32>,
    /// Its time-decayed popularity in the model's own representation.
    pub popularity: f64,
}

/// A model's whole learnt state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelState {
    /// Dimensions of every vector.
    pub factors: usize,
    /// Every learnt item.
    pub items: Vec<ItemState>,
    /// The learner's own user vectors.
    pub users: Vec<(UserId, Vec<f32>)>,
    /// Events learnt so far.
    pub events: u64,
    /// Latest event time learnt.
    pub latest_ms: TimestampMs,
    /// The batch model its vectors started from (e.g. `als`), kept through every later
    /// snapshot; `None` for a model learnt online from scratch. An online model learns
    /// at its warm-start rate on such a state, so it refines the batch fit instead of
    /// overwriting it.
    pub batch_origin: Option<String>,
}

/// [`ModelState`] with items named by id: what a model store keeps.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredModel {
    /// The model kind that wrote it (e.g. `online-mf`).
    pub kind: String,
    /// Dimensions of every vector.
    pub factors: u32,
    /// Item id, vector, popularity.
    pub items: Vec<(ItemId, Vec<f32>, f64)>,
    /// The learner's own user vectors.
    pub users: Vec<(UserId, Vec<f32>)>,
    /// Events learnt so far.
    pub events: u64,
    /// Latest event time learnt.
    pub latest_ms: TimestampMs,
    /// See [`ModelState::batch_origin`]. Added after the first release, so it is the last
    /// field and decodes leniently (see [`ModelVersion::quality`]); a snapshot written
    /// before it reads as `None`, and one whose `kind` is a batch model's is its own
    /// origin (see [`StoredModel::origin`]).
    #[serde(default, deserialize_with = "lenient_last_field")]
    pub batch_origin: Option<String>,
    /// The behaviour signals ([`crate::SignalModel::export`]), when the engine has them.
    /// Added after `batch_origin`, decoded as leniently: older snapshots read as `None`
    /// and leave the running signals as they are when installed.
    #[serde(default, deserialize_with = "lenient_last_field")]
    pub signals: Option<Vec<u8>>,
}

impl StoredModel {
    /// The batch model this state descends from: the recorded origin, or the snapshot's
    /// own kind when that is not `online_kind` (a batch fit published as a version).
    pub fn origin(&self, online_kind: &str) -> Option<String> {
        self.batch_origin
            .clone()
            .or_else(|| (self.kind != online_kind).then(|| self.kind.clone()))
    }

    /// Encodes for a model store.
    pub fn encode(&self) -> Result<Vec<u8>> {
        postcard::to_allocvec(self).map_err(|e| crate::Error::storage("encoding a model", e))
    }

    /// Decodes what [`encode`](Self::encode) wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        postcard::from_bytes(bytes).map_err(|e| crate::Error::storage("decoding a model", e))
    }
}

/// What a model store knows about one snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Assigned by the store, increasing from 1.
    pub id: u64,
    /// Wall-clock time it was taken.
    pub created_ms: TimestampMs,
    /// Every log record up to this position is in it; replay continues after it.
    pub log_seq: Seq,
    /// Events the model had learnt.
    pub events: u64,
    /// Items it holds.
    pub items: u64,
    /// Size of the encoded snapshot in bytes.
    pub bytes: u64,
    /// Why it was taken: `scheduled`, `on-demand`, `rollback to N`, `shutdown`, …
    pub reason: String,
    /// Which replica took it.
    pub taken_by: String,
    /// Prequential quality when it was taken (for a rollback, the quality of the version
    /// it installs); `None` when nothing had been scored.
    ///
    /// Added after the first release. Stores encode versions with postcard, which is not
    /// self-describing, so the field is the last one and decodes leniently: a record
    /// written before it existed ends where this field would start, and reads as `None`.
    /// New fields must keep going at the end the same way.
    #[serde(default, deserialize_with = "lenient_last_field")]
    pub quality: Option<VersionQuality>,
}

/// Decodes an optional last field, reading a missing one (the input ends) as `None`.
fn lenient_last_field<'de, D, T>(deserializer: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer).unwrap_or(None))
}

/// Which version replicas should run, and a counter that grows on each rollback so
/// replicas notice one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollbacks {
    /// Rollbacks so far.
    pub generation: u64,
    /// The version the latest rollback installed.
    pub version: u64,
}

/// Where model snapshots live, with the learner lease.
#[async_trait]
pub trait ModelStore: Send + Sync + 'static {
    /// Stores a snapshot; the store assigns `version.id` and returns the stored metadata.
    async fn save(&self, version: ModelVersion, snapshot: Vec<u8>) -> Result<ModelVersion>;

    /// Every stored version, oldest first.
    async fn list(&self) -> Result<Vec<ModelVersion>>;

    /// A stored snapshot; `None` when the version does not exist (or was pruned).
    async fn load(&self, id: u64) -> Result<Option<Vec<u8>>>;

    /// Deletes all but the newest `keep` versions (never the one `Rollbacks` names).
    async fn prune(&self, keep: usize) -> Result<usize>;

    /// The rollback record (all zero before the first rollback).
    async fn rollbacks(&self) -> Result<Rollbacks>;

    /// Records a rollback to `version`, returning the new record.
    async fn record_rollback(&self, version: u64) -> Result<Rollbacks>;

    /// Takes or renews the lease `name` for `holder` for `ttl_ms`; `false` when someone
    /// else holds it. A store used by one process may always answer `true`.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: u64) -> Result<bool>;

    /// Gives the lease up if `holder` has it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ModelVersion` as it was before `quality`.
    #[derive(Serialize)]
    struct ModelVersionV1 {
        id: u64,
        created_ms: TimestampMs,
        log_seq: Seq,
        events: u64,
        items: u64,
        bytes: u64,
        reason: String,
        taken_by: String,
    }

    #[test]
    fn versions_written_before_quality_still_decode() {
        let old = ModelVersionV1 {
            id: 3,
            created_ms: 17,
            log_seq: 40,
            events: 39,
            items: 5,
            bytes: 900,
            reason: "scheduled".into(),
            taken_by: "r1".into(),
        };
        let bytes = postcard::to_allocvec(&old).unwrap();
        let v: ModelVersion = postcard::from_bytes(&bytes).unwrap();
        assert_eq!((v.id, v.log_seq, v.reason.as_str()), (3, 40, "scheduled"));
        assert_eq!(v.quality, None);

        let mut new = v.clone();
        new.quality = Some(VersionQuality {
            scored: 12,
            degraded: true,
            ..VersionQuality::default()
        });
        new.quality.as_mut().unwrap().all.hit_rate_at_10 = 0.25;
        let bytes = postcard::to_allocvec(&new).unwrap();
        assert_eq!(postcard::from_bytes::<ModelVersion>(&bytes).unwrap(), new);
        let none = ModelVersion {
            quality: None,
            ..new
        };
        let bytes = postcard::to_allocvec(&none).unwrap();
        assert_eq!(postcard::from_bytes::<ModelVersion>(&bytes).unwrap(), none);
    }

    /// `StoredModel` as it was before `batch_origin`.
    #[derive(Serialize)]
    struct StoredModelV1 {
        kind: String,
        factors: u32,
        items: Vec<(ItemId, Vec<f32>, f64)>,
        users: Vec<(UserId, Vec<f32>)>,
        events: u64,
        latest_ms: TimestampMs,
    }

    #[test]
    fn snapshots_written_before_their_origin_still_decode_and_infer_it() {
        let item = ItemId::parse("i1", "item_id").unwrap();
        let old = |kind: &str| StoredModelV1 {
            kind: kind.into(),
            factors: 2,
            items: vec![(item.clone(), vec![1.0, 0.5], 0.0)],
            users: Vec::new(),
            events: 7,
            latest_ms: 11,
        };
        let online =
            StoredModel::decode(&postcard::to_allocvec(&old("online-mf")).unwrap()).unwrap();
        assert_eq!((online.events, online.batch_origin.clone()), (7, None));
        assert_eq!(online.origin("online-mf"), None);
        let als = StoredModel::decode(&postcard::to_allocvec(&old("als")).unwrap()).unwrap();
        assert_eq!(als.origin("online-mf").as_deref(), Some("als"));
        // A snapshot the online model took after starting from ALS says so itself.
        let descendant = StoredModel {
            batch_origin: Some("als".into()),
            ..online
        };
        let decoded = StoredModel::decode(&descendant.encode().unwrap()).unwrap();
        assert_eq!(decoded, descendant);
        assert_eq!(decoded.origin("online-mf").as_deref(), Some("als"));
    }
}
