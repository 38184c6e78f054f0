//! Batch training from event history into a model snapshot: `reflex train` collects
//! events (from the event log or a file) into a [`TrainingSet`], fits implicit ALS
//! ([`crate::als`]) to it and turns the fit into a [`StoredModel`] that the online model
//! ([`crate::OnlineMf`]) loads like any snapshot and keeps learning from.
//!
//! - The matrix value of a user–item pair is the sum of its events' learning weights
//!   (the engine's kind weights, so a purchase counts more than a view); pairs summing to
//!   zero are left out, negative sums are dislikes (see [`crate::als::Confidence`]).
//! - Item popularity is the online model's time-decayed popularity
//!   (`log2 Σ w · 2^(t / half-life)` over positive events, the representation
//!   [`crate::OnlineMf`] exports), so trending after a load ranks as it would had the
//!   online model learnt the same events.
//! - [`TrainingSet::erase`] (a profile erase in the log) drops the user's earlier events
//!   from the matrix, as the online model forgets the user; popularity keeps them, as the
//!   online model's does.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::read::GzDecoder;

use reflex_core::model_store::StoredModel;
use reflex_core::{ItemId, ItemItemWeights, UserId};

use crate::als::{self, AlsConfig, AlsModel, Csr};
use crate::error::ModelError;
use crate::popularity::log_add_exp2;

/// Counts bytes read through it (progress over compressed input).
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A file opened for reading lines, gunzipped when it starts with the gzip magic bytes.
pub struct LinesFile {
    /// The (decompressed) text.
    pub reader: Box<dyn BufRead + Send>,
    /// Size of the file on disk, in bytes.
    pub size: u64,
    /// File bytes consumed so far (compressed bytes for a gzip file), for progress.
    pub consumed: Arc<AtomicU64>,
}

/// Opens `path` as a [`LinesFile`]; errors name the file.
pub fn open_lines(path: &Path) -> io::Result<LinesFile> {
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let file = File::open(path).map_err(context)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let consumed = Arc::new(AtomicU64::new(0));
    let mut reader = BufReader::with_capacity(
        1 << 16,
        Counting {
            inner: file,
            read: consumed.clone(),
        },
    );
    let gzip = reader
        .fill_buf()
        .map_err(context)?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn BufRead + Send> = if gzip {
        Box::new(BufReader::with_capacity(1 << 16, GzDecoder::new(reader)))
    } else {
        Box::new(reader)
    };
    Ok(LinesFile {
        reader,
        size,
        consumed,
    })
}

/// Events gathered for a batch fit: users and items numbered densely in order of first
/// appearance, each user's weighted interactions, and item popularity.
#[derive(Clone, Debug)]
pub struct TrainingSet {
    user_index: HashMap<UserId, u32>,
    users: Vec<UserId>,
    item_index: HashMap<ItemId, u32>,
    items: Vec<ItemId>,
    /// Per user: (item, weight) in arrival order.
    rows: Vec<Vec<(u32, f32)>>,
    /// Per item: popularity in the online model's `log2` form.
    popularity: Vec<f64>,
    half_life_ms: f64,
    events: u64,
    latest_ms: i64,
}

impl TrainingSet {
    /// An empty set whose popularity decays with `popularity_half_life_ms` (the online
    /// model's [`crate::MfConfig::popularity_half_life_ms`]).
    pub fn new(popularity_half_life_ms: i64) -> Self {
        Self {
            user_index: HashMap::new(),
            users: Vec::new(),
            item_index: HashMap::new(),
            items: Vec::new(),
            rows: Vec::new(),
            popularity: Vec::new(),
            half_life_ms: popularity_half_life_ms.max(1) as f64,
            events: 0,
            latest_ms: i64::MIN,
        }
    }

    /// Adds one event of learning weight `weight` at event time `timestamp_ms`. A weight
    /// of zero or one that is not finite is counted as an event but changes nothing.
    pub fn add(&mut self, user: &UserId, item: &ItemId, weight: f32, timestamp_ms: i64) {
        self.events += 1;
        self.latest_ms = self.latest_ms.max(timestamp_ms);
        if !weight.is_finite() || weight == 0.0 {
            return;
        }
        let u = match self.user_index.get(user) {
            Some(u) => *u,
            None => {
                let u = self.users.len() as u32;
                self.user_index.insert(user.clone(), u);
                self.users.push(user.clone());
                self.rows.push(Vec::new());
                u
            }
        };
        let i = match self.item_index.get(item) {
            Some(i) => *i,
            None => {
                let i = self.items.len() as u32;
                self.item_index.insert(item.clone(), i);
                self.items.push(item.clone());
                self.popularity.push(f64::NEG_INFINITY);
                i
            }
        };
        self.rows[u as usize].push((i, weight));
        if weight > 0.0 {
            let x = f64::from(weight).log2() + timestamp_ms as f64 / self.half_life_ms;
            let p = &mut self.popularity[i as usize];
            *p = log_add_exp2(*p, x);
        }
    }

    /// Drops every interaction of `user` added so far (a profile erase).
    pub fn erase(&mut self, user: &UserId) {
        if let Some(u) = self.user_index.get(user) {
            self.rows[*u as usize].clear();
        }
    }

    /// Events added (including erased ones and zero weights).
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Distinct users seen.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Distinct items seen.
    pub fn items(&self) -> usize {
        self.items.len()
    }

    /// Latest event time added (`i64::MIN` when none).
    pub fn latest_ms(&self) -> i64 {
        self.latest_ms
    }

    /// The user × item matrix of summed weights, without pairs that sum to zero.
    pub fn matrix(&self) -> Csr {
        let mut sums: HashMap<u32, f32> = HashMap::new();
        let mut triples = Vec::new();
        for (u, row) in self.rows.iter().enumerate() {
            sums.clear();
            for &(i, w) in row {
                *sums.entry(i).or_insert(0.0) += w;
            }
            let mut pairs: Vec<(u32, f32)> = sums
                .iter()
                .filter(|(_, w)| **w != 0.0 && w.is_finite())
                .map(|(i, w)| (*i, *w))
                .collect();
            pairs.sort_unstable_by_key(|(i, _)| *i);
            triples.extend(pairs.into_iter().map(|(i, w)| (u as u32, i, w)));
        }
        Csr::from_triples(self.users.len(), self.items.len(), &triples)
    }

    /// Fits the item-to-item weights ([`crate::ease`]) to [`Self::matrix`], items by id:
    /// per source item, its targets and weights, heaviest first.
    pub fn fit_item_item(
        &self,
        config: &crate::EaseConfig,
    ) -> Result<ItemItemWeights<ItemId>, ModelError> {
        let fit = crate::ease::fit(&self.matrix(), config)?;
        let id = |c: u32| self.items[c as usize].clone();
        Ok(fit
            .rows
            .into_iter()
            .map(|(source, row)| {
                (
                    id(source),
                    row.into_iter().map(|(j, w)| (id(j), w)).collect(),
                )
            })
            .collect())
    }

    /// Fits implicit ALS to [`Self::matrix`]; refuses a `config` that
    /// [`AlsConfig::validate`] refuses.
    pub fn fit(&self, config: &AlsConfig) -> Result<AlsModel, ModelError> {
        als::fit(&self.matrix(), config)
    }

    /// The snapshot of `model` (fitted to [`Self::matrix`]): every item with an
    /// interaction or a popularity, with its ALS vector and popularity; every user with
    /// an interaction, with their ALS vector (the online model's learner vector).
    pub fn to_stored(&self, model: &AlsModel, kind: &str) -> StoredModel {
        let matrix = self.matrix();
        let mut item_used = vec![false; self.items.len()];
        let mut users = Vec::new();
        for (u, id) in self.users.iter().enumerate() {
            let (cols, _) = matrix.row(u);
            for &c in cols {
                item_used[c as usize] = true;
            }
            if let (false, Some(v)) = (cols.is_empty(), model.user(u)) {
                users.push((id.clone(), v.to_vec()));
            }
        }
        let items = self
            .items
            .iter()
            .enumerate()
            .filter(|(i, _)| item_used[*i] || self.popularity[*i].is_finite())
            .filter_map(|(i, id)| Some((id.clone(), model.item(i)?.to_vec(), self.popularity[i])))
            .collect();
        StoredModel {
            kind: kind.to_owned(),
            factors: model.factors() as u32,
            items,
            users,
            events: self.events,
            latest_ms: self.latest_ms.max(0),
            batch_origin: None,
            // A batch fit carries no behaviour signals: installing it keeps the running
            // ones.
            signals: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::OnlineMf;
    use reflex_core::{ItemState, ModelState, Observation, OnlineModel};

    fn user(s: &str) -> UserId {
        UserId::parse(s, "user").unwrap()
    }
    fn item(s: &str) -> ItemId {
        ItemId::parse(s, "item").unwrap()
    }

    #[test]
    fn sums_weights_drops_zero_and_erased_pairs() {
        let mut set = TrainingSet::new(1000);
        set.add(&user("a"), &item("x"), 1.0, 10);
        set.add(&user("a"), &item("x"), 8.0, 20);
        set.add(&user("a"), &item("y"), 4.0, 30);
        set.add(&user("a"), &item("y"), -4.0, 40);
        set.add(&user("b"), &item("y"), 1.0, 50);
        set.add(&user("c"), &item("z"), 2.0, 60);
        set.erase(&user("c"));
        let m = set.matrix();
        assert_eq!((m.rows(), m.cols(), m.nnz()), (3, 3, 2));
        assert_eq!(m.row(0), (&[0u32][..], &[9.0f32][..]));
        assert_eq!(m.row(1), (&[1u32][..], &[1.0f32][..]));
        assert!(m.row(2).0.is_empty());
        assert_eq!(
            (set.events(), set.users(), set.items(), set.latest_ms()),
            (6, 3, 3, 60)
        );
    }

    #[test]
    fn popularity_matches_the_online_model() {
        let half_life = 1000;
        let mut set = TrainingSet::new(half_life);
        let online = OnlineMf::new(crate::MfConfig {
            factors: 4,
            popularity_half_life_ms: half_life,
            ..crate::MfConfig::default()
        })
        .unwrap();
        let events = [
            ("a", "x", 1.0, 100),
            ("b", "x", 8.0, 2500),
            ("a", "y", 2.0, 900),
        ];
        let ids = [item("x"), item("y")];
        for (u, i, w, t) in events {
            set.add(&user(u), &item(i), w, t);
            online.observe(&Observation {
                user: &user(u),
                item: if i == "x" { 0 } else { 1 },
                weight: w,
                timestamp_ms: t,
            });
        }
        let model = set
            .fit(&AlsConfig {
                factors: 4,
                iterations: 2,
                ..AlsConfig::default()
            })
            .unwrap();
        let stored = set.to_stored(&model, "als");
        let exported = online.export().unwrap();
        for ItemState {
            item: idx,
            popularity,
            ..
        } in exported.items
        {
            let (_, _, p) = stored
                .items
                .iter()
                .find(|(id, _, _)| *id == ids[idx as usize])
                .unwrap();
            assert!((p - popularity).abs() < 1e-9, "{p} vs {popularity}");
        }
        assert_eq!(stored.users.len(), 2);
        assert_eq!(stored.factors, 4);
        // The online model loads it.
        let fresh = OnlineMf::new(online.config().clone()).unwrap();
        let state = ModelState {
            factors: 4,
            items: stored
                .items
                .iter()
                .enumerate()
                .map(|(n, (_, v, p))| ItemState {
                    item: n as u32,
                    vector: v.clone(),
                    popularity: *p,
                })
                .collect(),
            users: stored.users.clone(),
            events: stored.events,
            latest_ms: stored.latest_ms,
            batch_origin: stored.origin(crate::mf::VERSION),
        };
        fresh
            .import(&state, reflex_core::ImportUsers::Restore)
            .unwrap();
        // A batch fit is a warm start: online learning continues at the slower rate.
        assert_eq!(stored.origin(crate::mf::VERSION).as_deref(), Some("als"));
        assert_eq!(
            fresh.learning_rate(),
            fresh.config().warm_start_learning_rate
        );
    }
}
