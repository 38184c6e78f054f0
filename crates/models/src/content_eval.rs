//! Streaming evaluation of the content model, alone and blended with MF, on MovieLens
//! with content embeddings made from each movie's genres and release decade.
//!
//! The protocol is [`crate::eval::streaming_eval`]'s (time order, predict then learn,
//! seen items excluded, popular fill-in), with the catalog known from the start as on
//! the server: every movie has its embedding before anyone rates it, while MF only knows
//! a movie once it has been rated. Events whose movie nobody rated before (*cold* events)
//! are reported apart: MF and popularity cannot hit them, the content model can. Blends
//! rank exactly as the engine does ([`reflex_core::blend`]): each model proposes `2k`
//! candidates, every candidate is scored by both, and the best `k` are kept.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::time::Instant;

use reflex_core::Scored;
use reflex_core::blend::{Candidate, blend};
use reflex_core::{ContentModel, HistoryEntry, ItemIdx, Observation, OnlineModel, Retriever};

use crate::ann::AnnConfig;
use crate::content::{ContentConfig, ContentEmbeddings};
use crate::error::ModelError;
use crate::eval::{Dataset, EvalOptions, UserState, rate};
use crate::{ExactRetriever, MfConfig, OnlineMf};

/// How the ratings file names a movie of the item file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemKey {
    /// By the item file's first column (MovieLens 100K's `ml-100k.item`).
    Id,
    /// By 1-based row number after the header (MovieLens 1M's `ratings_numeric.tsv.gz`
    /// against `ml-1m.item`).
    Row,
}

/// Content embeddings of `data`'s items (by dense item number) from a MovieLens item file
/// (tab-separated, a header line, then id, title, release year, space-separated genres):
/// a multi-hot genre vector next to a one-hot release decade at half weight. Returns the
/// dimension and the embeddings; an item missing from the file gets an empty one.
pub fn movielens_genre_embeddings(
    item_file: &Path,
    data: &Dataset,
    key: ItemKey,
) -> io::Result<(usize, Vec<Vec<f32>>)> {
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", item_file.display()));
    let file = std::fs::File::open(item_file).map_err(context)?;
    // (genres, decade) per item key.
    let mut movies: HashMap<String, (Vec<String>, Option<i32>)> = HashMap::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(context)?;
        let line = line.trim_end_matches('\r');
        if n == 0 || line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        let (Some(id), Some(year), Some(genres)) = (cols.first(), cols.get(2), cols.get(3)) else {
            continue;
        };
        let decade = year
            .trim()
            .parse::<f64>()
            .ok()
            .map(|y| (y as i32).div_euclid(10));
        let genres = genres.split_whitespace().map(str::to_owned).collect();
        let key = match key {
            ItemKey::Id => id.trim().to_owned(),
            ItemKey::Row => n.to_string(),
        };
        movies.insert(key, (genres, decade));
    }
    let mut genre_vocab: Vec<&String> = movies.values().flat_map(|(g, _)| g).collect();
    genre_vocab.sort();
    genre_vocab.dedup();
    let mut decades: Vec<i32> = movies.values().filter_map(|(_, d)| *d).collect();
    decades.sort_unstable();
    decades.dedup();
    let dim = genre_vocab.len() + decades.len();
    let embeddings = data
        .item_ids
        .iter()
        .map(|id| {
            let Some((genres, decade)) = movies.get(id) else {
                return Vec::new();
            };
            let mut e = vec![0.0f32; dim];
            for g in genres {
                if let Ok(i) = genre_vocab.binary_search(&g) {
                    e[i] = 1.0;
                }
            }
            if let Some(i) = decade.and_then(|d| decades.binary_search(&d).ok()) {
                e[genre_vocab.len() + i] = 0.5;
            }
            e
        })
        .collect();
    Ok((dim, embeddings))
}

/// Figures of [`content_streaming_eval`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContentEvalReport {
    /// Events scored.
    pub events: u64,
    /// Events whose movie nobody had rated before.
    pub cold_events: u64,
    /// HR@k of MF alone (fold-in, popular fill-in).
    pub hr_mf: f64,
    /// HR@k of time-decayed popularity.
    pub hr_popularity: f64,
    /// HR@k of the content model alone.
    pub hr_content: f64,
    /// HR@k of each blend weight.
    pub hr_blend: Vec<(f32, f64)>,
    /// HR@k of the content model alone on cold events.
    pub hr_content_cold: f64,
    /// HR@k of each blend weight on cold events (MF and popularity score 0 there).
    pub hr_blend_cold: Vec<(f32, f64)>,
    /// Wall time, in seconds.
    pub wall_secs: f64,
}

impl std::fmt::Display for ContentEvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "events {} (cold {}), wall {:.1} s",
            self.events, self.cold_events, self.wall_secs
        )?;
        writeln!(f, "| ranking | HR@10 | HR@10 on cold events |")?;
        writeln!(f, "| --- | --- | --- |")?;
        writeln!(f, "| popularity | {:.4} | 0 |", self.hr_popularity)?;
        writeln!(f, "| MF | {:.4} | 0 |", self.hr_mf)?;
        writeln!(
            f,
            "| content | {:.4} | {:.4} |",
            self.hr_content, self.hr_content_cold
        )?;
        for ((w, hr), (_, cold)) in self.hr_blend.iter().zip(&self.hr_blend_cold) {
            writeln!(f, "| blend w={w} | {hr:.4} | {cold:.4} |")?;
        }
        Ok(())
    }
}

/// Appends popular items passing `filter` and not already in `top` until it has `k`.
fn fill(model: &OnlineMf, top: &mut Vec<ItemIdx>, k: usize, filter: &dyn Fn(ItemIdx) -> bool) {
    if top.len() < k {
        let chosen: Vec<ItemIdx> = top.clone();
        let more = model.popular(k - top.len(), &|i| !chosen.contains(&i) && filter(i));
        top.extend(more.iter().map(|s| s.item));
    }
}

/// Streams `data` in time order through a fresh MF model and a content model over
/// `embeddings` (`dim` long, by dense item number; empty for none), scoring MF, content
/// and each blend weight of `weights` prequentially. Refuses an `mf_config` that
/// [`MfConfig::validate`] refuses.
pub fn content_streaming_eval(
    data: &Dataset,
    dim: usize,
    embeddings: &[Vec<f32>],
    mf_config: &MfConfig,
    content_config: &ContentConfig,
    weights: &[f32],
    options: &EvalOptions,
) -> Result<ContentEvalReport, ModelError> {
    let start = Instant::now();
    let k = options.k.max(1);
    let order = options.replay_order(data);
    let model = OnlineMf::new(mf_config.clone())?;
    let retriever = ExactRetriever::for_model(&model);
    let content = match ContentEmbeddings::new(
        ContentConfig {
            dim,
            ..content_config.clone()
        },
        // Exact below a million items: the evaluation measures the model, not the index.
        AnnConfig {
            threshold_items: 1 << 20,
            ..AnnConfig::default()
        },
    ) {
        Ok(c) => c,
        Err(_) => return Ok(ContentEvalReport::default()),
    };
    for (item, e) in embeddings.iter().enumerate() {
        if e.len() == dim {
            content.set_item(item as ItemIdx, e);
        }
    }
    let mut users: Vec<Option<UserState>> = (0..data.users).map(|_| None).collect();
    let mut hits_mf = 0u64;
    let mut hits_pop = 0u64;
    let mut hits_content = 0u64;
    let mut hits_content_cold = 0u64;
    let mut hits_blend = vec![0u64; weights.len()];
    let mut hits_blend_cold = vec![0u64; weights.len()];
    let mut cold_events = 0u64;
    let mut history: Vec<HistoryEntry> = Vec::with_capacity(options.history_window);
    for &i in &order {
        let r = data.ratings[i];
        let item = r.item as ItemIdx;
        let Some(user) = UserState::get(&mut users, r.user) else {
            continue;
        };
        history.clear();
        history.extend(user.history.iter().copied());
        let seen = &user.seen;
        let filter = |idx: ItemIdx| !seen.contains(&idx);
        let cold = model.item_vector(item).is_none();
        cold_events += u64::from(cold);

        let mf_vector = model.user_vector(&history);
        let content_vector = content.user_vector(&history);
        let mf_found: Vec<Scored> = mf_vector
            .as_ref()
            .map(|v| retriever.search(v, 2 * k, &filter))
            .unwrap_or_default();
        let content_found: Vec<Scored> = content_vector
            .as_ref()
            .map(|v| content.search(v, 2 * k, &filter))
            .unwrap_or_default();
        let hit = |top: &[ItemIdx]| top.contains(&item);

        let mut mf_top: Vec<ItemIdx> = mf_found.iter().take(k).map(|s| s.item).collect();
        fill(&model, &mut mf_top, k, &filter);
        hits_mf += u64::from(hit(&mf_top));
        let popular: Vec<ItemIdx> = model.popular(k, &filter).iter().map(|s| s.item).collect();
        hits_pop += u64::from(hit(&popular));
        let mut content_top: Vec<ItemIdx> = content_found.iter().take(k).map(|s| s.item).collect();
        fill(&model, &mut content_top, k, &filter);
        let content_hit = u64::from(hit(&content_top));
        hits_content += content_hit;
        if cold {
            hits_content_cold += content_hit;
        }

        let mut candidates: Vec<Candidate> = Vec::with_capacity(4 * k);
        for s in &mf_found {
            candidates.push(Candidate {
                item: s.item,
                mf: Some(s.score),
                content: content_vector
                    .as_ref()
                    .and_then(|v| content.score(s.item, v)),
            });
        }
        for s in &content_found {
            if !mf_found.iter().any(|m| m.item == s.item) {
                candidates.push(Candidate {
                    item: s.item,
                    mf: mf_vector.as_ref().and_then(|v| model.score(s.item, v)),
                    content: Some(s.score),
                });
            }
        }
        for (n, &w) in weights.iter().enumerate() {
            let mut top: Vec<ItemIdx> = blend(&candidates, w, k).iter().map(|b| b.item).collect();
            fill(&model, &mut top, k, &filter);
            let h = u64::from(hit(&top));
            hits_blend[n] += h;
            if cold {
                hits_blend_cold[n] += h;
            }
        }

        let weight = options.weighting.weight(r.rating);
        model.observe(&Observation {
            user: &user.id,
            item,
            weight,
            timestamp_ms: r.timestamp_ms,
        });
        user.record(item, weight, r.timestamp_ms, options.history_window);
    }
    let events = order.len() as u64;
    Ok(ContentEvalReport {
        events,
        cold_events,
        hr_mf: rate(hits_mf, events),
        hr_popularity: rate(hits_pop, events),
        hr_content: rate(hits_content, events),
        hr_blend: weights
            .iter()
            .zip(&hits_blend)
            .map(|(w, h)| (*w, rate(*h, events)))
            .collect(),
        hr_content_cold: rate(hits_content_cold, cold_events),
        hr_blend_cold: weights
            .iter()
            .zip(&hits_blend_cold)
            .map(|(w, h)| (*w, rate(*h, cold_events)))
            .collect(),
        wall_secs: start.elapsed().as_secs_f64(),
    })
}
