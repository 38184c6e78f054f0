//! Recommend: fold-in, retrieval with the request's filters, the content blend and the
//! popular fill-in; similar items; and the answer cache.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use super::{
    Engine, PurchasedPolicy, Recommendation, RequestFilter, ScoredItem, SimilarSpace, Source,
};
use crate::blend::{Candidate, Credit, blend};
use crate::catalog::ItemIdx;
use crate::error::{Error, Result};
use crate::profile::Profile;
use crate::traits::{ContentModel, HistoryEntry, Scored, SignalSource};
use crate::types::{ItemId, UserId};

/// With the content model on, up to one slot in this many of a personal list goes to
/// items nobody has interacted with yet that match the user's content taste, whatever
/// the signals propose: a product rule, not a fitted constant, so new items reach active
/// users too (cold start). Without content nothing is reserved: reserving slots for the
/// model's picks in general cost ML-1M 0.268 → 0.252 HR@10 (measured).
const MODEL_SLOTS_PER: usize = 5;

/// What a cached recommend answer depends on: an answer is reused only for the same
/// user at the same profile version (so never across one of their events), model
/// version, catalog generation and request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct CacheKey {
    user: UserId,
    profile_version: u64,
    model_version: u64,
    rollbacks: u64,
    catalog: u64,
    count: usize,
    filter: RequestFilter,
}

impl Engine {
    /// Personal recommendations for `user`.
    pub async fn recommend(
        &self,
        user: &UserId,
        count: usize,
        filter: &RequestFilter,
    ) -> Result<Recommendation> {
        let count = self.check_count(count)?;
        let (profile, degraded) = match self.backends.profiles.get(user).await {
            Ok(p) => (p, false),
            Err(err) => {
                tracing::warn!(%user, error = %err, "profile unavailable, serving popular items");
                (None, true)
            }
        };
        let key = self.cache.as_ref().filter(|_| !degraded).map(|_| CacheKey {
            user: user.clone(),
            profile_version: profile.as_ref().map_or(0, |p| p.version),
            model_version: self.base_version.load(Ordering::Relaxed),
            rollbacks: self.rollback_generation.load(Ordering::Relaxed),
            catalog: self.catalog_generation.load(Ordering::Relaxed),
            count,
            filter: filter.clone(),
        });
        if let (Some(cache), Some(key)) = (&self.cache, &key)
            && let Some(items) = cache.get(key)
        {
            return Ok(Recommendation {
                items: items.to_vec(),
                model_version: self.model_version(),
                profile_version: key.profile_version,
                degraded: false,
                cached: true,
            });
        }
        let excluded = self.excluded(profile.as_ref(), filter);
        let pass = |idx: ItemIdx| self.passes(idx, &excluded, filter);
        let model = &self.backends.model;

        let history: Vec<HistoryEntry> = profile
            .as_ref()
            .map(|p| {
                p.recent
                    .iter()
                    .filter_map(|i| {
                        Some(HistoryEntry {
                            item: self.backends.items.get(i.item_id.as_str())?,
                            weight: i.weight,
                            timestamp_ms: i.timestamp_ms,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut items = Vec::with_capacity(count);
        // Repeat and next-item candidates first: their probabilities are estimated from
        // counts, and where they know something they beat the model's guesses (see
        // BENCHMARKS.md, "What shoppers do next"). With the content model on, a share of
        // the list stays the model's ([`MODEL_SLOTS_PER`]) so what the signals cannot
        // know yet (a new item, found by its content) still surfaces; signals left over
        // fill in after it.
        let mut signalled: Vec<ScoredItem> = Vec::new();
        // Every item the signals or the cold slots propose, which the model must not
        // propose again.
        let mut proposed: HashSet<ItemIdx> = HashSet::new();
        if let (Some(signals), Some(_)) = (&self.signals, &profile) {
            // Negative feedback (a removal from the cart) proposes nothing.
            let recent: Vec<ItemIdx> = history
                .iter()
                .filter(|h| h.weight > 0.0)
                .map(|h| h.item)
                .collect();
            for c in signals.candidates(user, &recent, count, &pass) {
                if let Some(id) = self.backends.items.id(c.item) {
                    proposed.insert(c.item);
                    signalled.push(ScoredItem {
                        item_id: id.clone(),
                        score: c.probability,
                        source: match c.source {
                            SignalSource::Repeat => Source::Repeat,
                            SignalSource::Sequence => Source::Sequence,
                        },
                    });
                }
            }
        }
        // A blend weight of 0 leaves content out of recommendations (it still serves
        // `SimilarItems`), so its search is not even run.
        let content = self
            .content
            .as_ref()
            .filter(|(_, w)| *w > 0.0)
            .and_then(|(c, w)| Some((c.as_ref(), *w, c.user_vector(&history)?)));
        // New items nobody has touched yet, found by their content, keep one slot in
        // [`MODEL_SLOTS_PER`]: the signals cannot know them.
        let mut cold = Vec::new();
        if let Some((content, _, vector)) = &content
            && !signalled.is_empty()
        {
            let found = content.search(vector, count / MODEL_SLOTS_PER, &|idx| {
                !proposed.contains(&idx)
                    && self
                        .backends
                        .items
                        .meta(idx)
                        .is_some_and(|m| m.has_embedding)
                    && pass(idx)
                    && model.item_vector(idx).is_none()
            });
            proposed.extend(found.iter().map(|s| s.item));
            self.push_scored(&mut cold, &found, Source::Content);
        }
        let first = signalled.len().min(count - cold.len());
        let mut leftover = signalled.split_off(first);
        items.append(&mut signalled);
        items.append(&mut cold);
        let pass = |idx: ItemIdx| !proposed.contains(&idx) && pass(idx);
        let wanted = count - items.len();
        // No fold-in when the signals filled the list.
        let mf_vector = if wanted > 0 {
            model.user_vector(&history)
        } else {
            None
        };
        match (mf_vector, content) {
            _ if wanted == 0 => {}
            (mf_vector, Some((content, weight, content_vector))) => {
                let found = self.blended(
                    content,
                    weight,
                    mf_vector.as_deref(),
                    &content_vector,
                    wanted,
                    &pass,
                );
                items.extend(found);
            }
            (Some(vector), None) => {
                let found = self.backends.retriever.search(&vector, wanted, &pass);
                self.push_scored(&mut items, &found, Source::Mf);
            }
            (None, None) => {}
        }
        leftover.truncate(count.saturating_sub(items.len()));
        items.append(&mut leftover);
        if items.len() < count {
            let chosen: HashSet<ItemIdx> = items
                .iter()
                .filter_map(|s: &ScoredItem| self.backends.items.get(s.item_id.as_str()))
                .collect();
            let fill = model.popular(count - items.len(), &|idx| {
                !chosen.contains(&idx) && pass(idx)
            });
            self.push_scored(&mut items, &fill, Source::Popular);
        }
        descending(&mut items);
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.insert(key, items.as_slice().into());
        }
        Ok(Recommendation {
            items,
            model_version: self.model_version(),
            profile_version: profile.map_or(0, |p| p.version),
            degraded,
            cached: false,
        })
    }

    /// MF and content candidates for one user, blended ([`crate::blend`]): each model
    /// proposes twice `count` items passing `pass`, every candidate is scored by both
    /// models where they can, and the best `count` come back credited to the model that
    /// contributed most. Items nobody has interacted with yet come only from content.
    fn blended(
        &self,
        content: &dyn ContentModel,
        weight: f32,
        mf_vector: Option<&[f32]>,
        content_vector: &[f32],
        count: usize,
        pass: &dyn Fn(ItemIdx) -> bool,
    ) -> Vec<ScoredItem> {
        let items = &self.backends.items;
        let has_embedding = |idx: ItemIdx| items.meta(idx).is_some_and(|m| m.has_embedding);
        let content_score = |idx: ItemIdx| {
            has_embedding(idx)
                .then(|| content.score(idx, content_vector))
                .flatten()
        };
        let fetch = count.saturating_mul(2);
        let mut candidates: Vec<Candidate> = Vec::with_capacity(2 * fetch);
        if let Some(v) = mf_vector {
            for s in self.backends.retriever.search(v, fetch, pass) {
                candidates.push(Candidate {
                    item: s.item,
                    mf: Some(s.score),
                    content: content_score(s.item),
                });
            }
        }
        let from_mf: HashSet<ItemIdx> = candidates.iter().map(|c| c.item).collect();
        let content_pass = |idx: ItemIdx| has_embedding(idx) && pass(idx);
        for s in content.search(content_vector, fetch, &content_pass) {
            if !from_mf.contains(&s.item) {
                candidates.push(Candidate {
                    item: s.item,
                    mf: mf_vector.and_then(|v| self.backends.model.score(s.item, v)),
                    content: Some(s.score),
                });
            }
        }
        blend(&candidates, weight, count)
            .into_iter()
            .filter_map(|b| {
                Some(ScoredItem {
                    item_id: items.id(b.item)?.clone(),
                    score: b.score,
                    source: match b.credit {
                        Credit::Mf => Source::Mf,
                        Credit::Content => Source::Content,
                    },
                })
            })
            .collect()
    }

    /// Items whose vectors are nearest to `item`'s in `space`. NOT_FOUND when the item
    /// has no vector there (never interacted with, for MF; no embedding, for content).
    pub async fn similar_items(
        &self,
        item: &ItemId,
        count: usize,
        filter: &RequestFilter,
        space: SimilarSpace,
    ) -> Result<Recommendation> {
        let count = self.check_count(count)?;
        // A space this server cannot answer is the request's fault whatever the item.
        if let Some(off) = self.space_off(space) {
            return Err(off);
        }
        let not_found = || Error::NotFound(format!("item {item:?}"));
        let idx = self
            .backends
            .items
            .get(item.as_str())
            .ok_or_else(not_found)?;
        let content = self.content.as_ref().map(|(c, _)| c.as_ref());
        let has_embedding = || {
            self.backends
                .items
                .meta(idx)
                .is_some_and(|m| m.has_embedding)
        };
        let content_vector = || {
            content
                .filter(|_| has_embedding())
                .and_then(|c| c.item_vector(idx))
        };
        if space == SimilarSpace::Sequence {
            let Some(signals) = &self.signals else {
                return Err(self.space_off(space).unwrap_or_else(not_found));
            };
            let mut excluded = self.excluded(None, filter);
            excluded.insert(idx);
            let pass = |i: ItemIdx| self.passes(i, &excluded, filter);
            let found = signals.related(idx, count, &pass);
            if found.is_empty() {
                return Err(not_found());
            }
            let mut items = Vec::with_capacity(found.len());
            self.push_scored(&mut items, &found, Source::Sequence);
            return Ok(Recommendation {
                items,
                model_version: self.model_version(),
                profile_version: 0,
                degraded: false,
                cached: false,
            });
        }
        let (vector, use_content) = match space {
            SimilarSpace::Mf => (self.backends.model.item_vector(idx), false),
            SimilarSpace::Content => (content_vector(), true),
            SimilarSpace::Auto => match self.backends.model.item_vector(idx) {
                Some(v) => (Some(v), false),
                None => (content_vector(), true),
            },
            // Answered above.
            SimilarSpace::Sequence => (None, false),
        };
        let vector = vector.ok_or_else(not_found)?;
        let mut excluded = self.excluded(None, filter);
        excluded.insert(idx);
        let pass = |i: ItemIdx| self.passes(i, &excluded, filter);
        let mut items = Vec::with_capacity(count);
        match content {
            Some(content) if use_content => {
                let found = content.search(&vector, count, &|i| {
                    self.backends.items.meta(i).is_some_and(|m| m.has_embedding) && pass(i)
                });
                self.push_scored(&mut items, &found, Source::Content);
            }
            _ => {
                let found = self.backends.retriever.search(&vector, count, &pass);
                self.push_scored(&mut items, &found, Source::Similar);
            }
        }
        Ok(Recommendation {
            items,
            model_version: self.model_version(),
            profile_version: 0,
            degraded: false,
            cached: false,
        })
    }

    /// The error for a similarity space whose model is off, `None` when it is on.
    fn space_off(&self, space: SimilarSpace) -> Option<Error> {
        match space {
            SimilarSpace::Content if self.content.is_none() => Some(Error::invalid(
                "space",
                "the content model is not configured (set content.dim)",
            )),
            SimilarSpace::Sequence if self.signals.is_none() => Some(Error::invalid(
                "space",
                "the signals are off (set signals.enabled)",
            )),
            _ => None,
        }
    }

    fn check_count(&self, count: usize) -> Result<usize> {
        match count {
            0 => Ok(10.min(self.config.max_count)),
            n if n > self.config.max_count => Err(Error::invalid(
                "count",
                format!("is {n}, at most {} allowed", self.config.max_count),
            )),
            n => Ok(n),
        }
    }

    fn excluded(&self, profile: Option<&Profile>, filter: &RequestFilter) -> HashSet<ItemIdx> {
        let items = &self.backends.items;
        let mut out: HashSet<ItemIdx> = filter
            .exclude_items
            .iter()
            .filter_map(|i| items.get(i.as_str()))
            .collect();
        if let Some(p) = profile {
            let policy = filter
                .exclude_purchased
                .map_or(self.config.exclude_purchased, PurchasedPolicy::from);
            let bought = p.purchased.iter().filter_map(|i| items.get(i.as_str()));
            match (policy, &self.signals) {
                (PurchasedPolicy::None, _) => {}
                // What people buy again stays; without signals nothing says what that is.
                (PurchasedPolicy::Auto, Some(signals)) => {
                    out.extend(bought.filter(|&idx| !signals.rebought(idx)));
                }
                (PurchasedPolicy::All | PurchasedPolicy::Auto, _) => out.extend(bought),
            }
            if filter.exclude_seen.unwrap_or(self.config.exclude_seen) {
                out.extend(
                    p.recent
                        .iter()
                        .filter_map(|i| items.get(i.item_id.as_str())),
                );
            }
        }
        out
    }

    pub(super) fn passes(
        &self,
        idx: ItemIdx,
        excluded: &HashSet<ItemIdx>,
        filter: &RequestFilter,
    ) -> bool {
        if excluded.contains(&idx) {
            return false;
        }
        let Some(meta) = self.backends.items.meta(idx) else {
            return false;
        };
        if !meta.available {
            return false;
        }
        if !filter.include_categories.is_empty()
            && !meta
                .categories
                .iter()
                .any(|c| filter.include_categories.contains(c))
        {
            return false;
        }
        !meta
            .categories
            .iter()
            .any(|c| filter.exclude_categories.contains(c))
    }

    fn push_scored(&self, out: &mut Vec<ScoredItem>, found: &[Scored], source: Source) {
        out.extend(found.iter().filter_map(|s| {
            Some(ScoredItem {
                item_id: self.backends.items.id(s.item)?.clone(),
                score: s.score,
                source,
            })
        }));
    }
}

/// Makes the scores of a list ranked from several sources non-increasing, as the API
/// promises (higher is better): each score is at most just below the one before it, so
/// an item ranked after a more probable one never shows a higher score.
fn descending(items: &mut [ScoredItem]) {
    let mut prev = f32::INFINITY;
    for item in items {
        let in_order = item.score.partial_cmp(&prev) == Some(std::cmp::Ordering::Less);
        if !in_order {
            item.score = if prev.is_finite() {
                prev.next_down()
            } else {
                prev
            };
        }
        prev = item.score;
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{Harness, ids, item, item_id, raw, views};
    use super::{RequestFilter, SimilarSpace, Source};
    use crate::types::{RawKind, UserId};

    /// A catalog of four items, `d` unavailable, learnt by another user so that the
    /// model ranks them `a` > `b` > `c` > `d`.
    async fn shop() -> Harness {
        let h = Harness::new().await;
        h.engine
            .upsert_items(vec![
                item("a", true, &["shoes"]),
                item("b", true, &["shoes", "sale"]),
                item("c", true, &["hats"]),
                item("d", false, &["hats"]),
            ])
            .await
            .unwrap();
        h.accept(views("pa", "bob", "a", 4)).await;
        h.accept(views("pb", "bob", "b", 3)).await;
        h.accept(views("pc", "bob", "c", 2)).await;
        h.accept(views("pd", "bob", "d", 1)).await;
        h
    }

    fn who(name: &str) -> UserId {
        super::super::fixtures::user(name)
    }

    #[tokio::test]
    async fn a_space_whose_model_is_off_is_an_invalid_argument_even_for_an_unknown_item() {
        let h = shop().await;
        let filter = RequestFilter::default();
        for space in [SimilarSpace::Content, SimilarSpace::Sequence] {
            for name in ["a", "never-seen"] {
                let err = h
                    .engine
                    .similar_items(&item_id(name), 3, &filter, space)
                    .await
                    .unwrap_err();
                assert!(
                    matches!(err, crate::Error::InvalidArgument { .. }),
                    "{space:?} for {name}: {err:?}"
                );
            }
        }
        let err = h
            .engine
            .similar_items(&item_id("never-seen"), 3, &filter, SimilarSpace::Mf)
            .await
            .unwrap_err();
        assert!(matches!(err, crate::Error::NotFound(_)), "{err:?}");
    }

    #[tokio::test]
    async fn purchased_items_are_left_out_unless_the_filter_asks_for_them() {
        let h = shop().await;
        // The purchase makes `c` the model's best item.
        h.accept(vec![raw("buy", "alice", "c", RawKind::Purchase)])
            .await;
        let answer = h
            .engine
            .recommend(&who("alice"), 10, &RequestFilter::default())
            .await
            .unwrap();
        assert_eq!(ids(&answer), ["a", "b"]);
        assert!(answer.items.iter().all(|i| i.source == Source::Mf));
        assert_eq!(answer.profile_version, 1);

        let with_purchases = RequestFilter {
            exclude_purchased: Some(false),
            ..RequestFilter::default()
        };
        let answer = h
            .engine
            .recommend(&who("alice"), 10, &with_purchases)
            .await
            .unwrap();
        assert_eq!(ids(&answer), ["c", "a", "b"], "unavailable `d` never comes");
    }

    #[tokio::test]
    async fn categories_exclusions_and_deletes_narrow_the_popular_fill_too() {
        let h = shop().await;
        let filtered = |filter: RequestFilter| {
            let engine = &h.engine;
            async move {
                let answer = engine.recommend(&who("zed"), 10, &filter).await.unwrap();
                assert!(answer.items.iter().all(|i| i.source == Source::Popular));
                assert_eq!(answer.profile_version, 0);
                ids(&answer)
                    .into_iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(filtered(RequestFilter::default()).await, ["a", "b", "c"]);
        let no_sale = RequestFilter {
            exclude_categories: vec!["sale".into()],
            ..RequestFilter::default()
        };
        assert_eq!(filtered(no_sale).await, ["a", "c"]);
        let hats = RequestFilter {
            include_categories: vec!["hats".into()],
            ..RequestFilter::default()
        };
        assert_eq!(filtered(hats).await, ["c"]);
        let not_a = RequestFilter {
            exclude_items: vec![item_id("a")],
            ..RequestFilter::default()
        };
        assert_eq!(filtered(not_a).await, ["b", "c"]);

        assert!(h.engine.delete_item(&item_id("b")).await.unwrap());
        assert_eq!(filtered(RequestFilter::default()).await, ["a", "c"]);
    }

    #[tokio::test]
    async fn a_cached_answer_never_outlives_the_users_event_or_a_catalog_change() {
        let h = shop().await;
        h.accept(vec![raw("v1", "alice", "a", RawKind::View)]).await;
        let (alice, any) = (who("alice"), RequestFilter::default());
        let ask = || h.engine.recommend(&alice, 2, &any);
        let first = ask().await.unwrap();
        assert!(!first.cached);
        let second = ask().await.unwrap();
        assert!(second.cached);
        assert_eq!(second.items, first.items);

        h.accept(vec![raw("v2", "alice", "b", RawKind::Purchase)])
            .await;
        let after_event = ask().await.unwrap();
        assert!(!after_event.cached);
        assert_eq!(after_event.profile_version, 2);
        assert_eq!(
            ids(&after_event),
            ["a", "c"],
            "the purchase is left out at once"
        );

        h.engine
            .upsert_items(vec![item("c", false, &["hats"])])
            .await
            .unwrap();
        let after_catalog = ask().await.unwrap();
        assert!(!after_catalog.cached);
        assert_eq!(ids(&after_catalog), ["a"]);
    }

    /// The signals learn repurchase rates per category too: the catalog tells them each
    /// item's first category, and a later upsert without one takes it back.
    #[tokio::test]
    async fn the_catalog_gives_the_signals_each_items_first_category() {
        let (h, signals) = shop().await.with_signals(&[]);
        h.engine
            .upsert_items(vec![
                item("milk", true, &["dairy", "sale"]),
                item("sofa", true, &[]),
            ])
            .await
            .unwrap();
        let idx = |id: &str| h.engine.items().get(id).unwrap();
        assert_eq!(signals.category(idx("milk")), Some(Some("dairy".into())));
        assert_eq!(signals.category(idx("sofa")), Some(None));
        h.engine
            .upsert_items(vec![item("milk", true, &[])])
            .await
            .unwrap();
        assert_eq!(signals.category(idx("milk")), Some(None));
    }

    #[tokio::test]
    async fn signals_rank_first_the_model_fills_and_auto_keeps_what_is_bought_again() {
        let (h, _signals) = shop().await.with_signals(&["milk"]);
        h.engine
            .upsert_items(vec![item("milk", true, &[]), item("sofa", true, &[])])
            .await
            .unwrap();
        h.accept(vec![
            raw("s", "alice", "sofa", RawKind::Purchase),
            raw("m", "alice", "milk", RawKind::Purchase),
        ])
        .await;
        let ask = |filter: RequestFilter| {
            let engine = &h.engine;
            async move { engine.recommend(&who("alice"), 10, &filter).await.unwrap() }
        };

        // Auto: the milk comes back (first, from the signals), the sofa does not.
        let answer = ask(RequestFilter::default()).await;
        assert_eq!(ids(&answer), ["milk", "a", "b", "c"]);
        let sources: Vec<Source> = answer.items.iter().map(|i| i.source).collect();
        assert_eq!(
            sources,
            [Source::Repeat, Source::Mf, Source::Mf, Source::Mf]
        );
        assert!(
            answer.items.windows(2).all(|w| w[0].score > w[1].score),
            "scores fall along the list: {:?}",
            answer.items
        );

        // `true` leaves every purchase out; `false` lets the signals rank both.
        let all = RequestFilter {
            exclude_purchased: Some(true),
            ..RequestFilter::default()
        };
        assert_eq!(ids(&ask(all).await), ["a", "b", "c"]);
        let none = RequestFilter {
            exclude_purchased: Some(false),
            ..RequestFilter::default()
        };
        assert_eq!(ids(&ask(none).await), ["milk", "sofa", "a", "b", "c"]);

        // Erasing the profile erases what the signals kept: nothing comes back.
        assert!(h.engine.erase_profile(&who("alice")).await.unwrap());
        let after = ask(RequestFilter::default()).await;
        assert!(after.items.iter().all(|i| i.source != Source::Repeat));
    }
}
