//! How the MF and content models' scores combine into one ranking.
//!
//! The two scores live on different scales: MF scores are inner products of any size,
//! content scores are cosines in [-1, 1]. Within one request the MF scores of the
//! candidates are divided by the largest of them, so the best MF candidate scores 1, and
//! then `score = (1 − w)·mf + w·content` with `w` the configured blend weight.
//!
//! A candidate only one model can score gets the candidates' mean score for the other
//! part. This is the new-item cold start: an item nobody has interacted with yet has no
//! MF vector, so it is ranked as an average item by MF and by its own content score, and
//! enters the list when its content matches the user clearly better than the MF
//! candidates' content does. With `w = 0` content takes no part (items without an MF
//! score are dropped), with `w = 1` MF takes none. Measured on MovieLens 100K with genre
//! embeddings (`content_eval` example): MF alone HR@10 0.158; blended at 0.3, 0.162
//! overall and 0.012 on events whose movie nobody had rated before (MF: 0); on
//! MovieLens 1M, 0.164 → 0.169, and 0.014 on first ratings.

use crate::catalog::ItemIdx;

/// One candidate item with what each model thinks of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// The item.
    pub item: ItemIdx,
    /// MF score (inner product with the folded-in user vector), when the item has an MF
    /// vector.
    pub mf: Option<f32>,
    /// Content score (cosine with the user's content embedding), when the item has an
    /// embedding.
    pub content: Option<f32>,
}

/// Which model a blended result is credited to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credit {
    /// The MF part of its score is the larger.
    Mf,
    /// The content part is the larger, or MF could not score it.
    Content,
}

/// A ranked result of [`blend`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Blended {
    /// The item.
    pub item: ItemIdx,
    /// Its blended score.
    pub score: f32,
    /// The model credited with it.
    pub credit: Credit,
}

/// Ranks `candidates` (each item once; ones neither model scored are dropped) by blended
/// score with content weight `weight` (clamped to [0, 1]) and returns the best `k`, best
/// first; ties go to the lower item index so the answer is deterministic.
pub fn blend(candidates: &[Candidate], weight: f32, k: usize) -> Vec<Blended> {
    let w = if weight.is_finite() {
        weight.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let finite = |s: Option<f32>| s.filter(|s| s.is_finite());
    let top_mf = candidates
        .iter()
        .filter_map(|c| finite(c.mf))
        .fold(f32::NEG_INFINITY, f32::max);
    // Divide by the best MF score; when every MF score is negative divide by its size, so
    // the order is kept and the scale is still about 1.
    let scale = if top_mf.is_finite() && top_mf.abs() > f32::EPSILON {
        top_mf.abs()
    } else {
        1.0
    };
    let mean = |part: &dyn Fn(&Candidate) -> Option<f32>| {
        let (sum, n) = candidates
            .iter()
            .filter_map(part)
            .fold((0.0f32, 0usize), |(s, n), x| (s + x, n + 1));
        (n > 0).then(|| sum / n as f32)
    };
    let mean_mf = mean(&|c| finite(c.mf).map(|s| s / scale));
    let mean_content = mean(&|c| finite(c.content));
    let mut out: Vec<Blended> = candidates
        .iter()
        .filter_map(|c| {
            let (mf, content) = match (finite(c.mf), finite(c.content)) {
                (None, None) => return None,
                (Some(_), None) if w >= 1.0 => return None,
                (None, Some(_)) if w <= 0.0 => return None,
                (Some(m), None) => (m / scale, mean_content.unwrap_or(0.0)),
                (None, Some(s)) => (mean_mf.unwrap_or(0.0), s),
                (Some(m), Some(s)) => (m / scale, s),
            };
            let credit = if finite(c.mf).is_none() || w * content > (1.0 - w) * mf {
                Credit::Content
            } else {
                Credit::Mf
            };
            Some(Blended {
                item: c.item,
                score: (1.0 - w) * mf + w * content,
                credit,
            })
        })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
    out.truncate(k);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(item: ItemIdx, mf: Option<f32>, content: Option<f32>) -> Candidate {
        Candidate { item, mf, content }
    }

    fn items(b: &[Blended]) -> Vec<ItemIdx> {
        b.iter().map(|x| x.item).collect()
    }

    #[test]
    fn weight_zero_keeps_the_mf_order_and_weight_one_the_content_order() {
        let cands = [
            c(1, Some(4.0), Some(0.1)),
            c(2, Some(3.0), Some(0.9)),
            c(3, Some(2.0), Some(0.5)),
        ];
        assert_eq!(items(&blend(&cands, 0.0, 3)), vec![1, 2, 3]);
        assert_eq!(items(&blend(&cands, 1.0, 3)), vec![2, 3, 1]);
        // Half and half: 1 → 0.5·1 + 0.5·0.1 = 0.55, 2 → 0.5·0.75 + 0.45 = 0.825,
        // 3 → 0.25 + 0.25 = 0.5.
        let half = blend(&cands, 0.5, 3);
        assert_eq!(items(&half), vec![2, 1, 3]);
        assert!((half[0].score - 0.825).abs() < 1e-6, "{half:?}");
        assert_eq!(half[0].credit, Credit::Content);
        assert_eq!(half[1].credit, Credit::Mf);
    }

    #[test]
    fn an_item_only_one_model_knows_gets_the_mean_of_the_other() {
        // Item 9 has no interactions yet (no MF vector) but matches the user's taste;
        // item 2 has no embedding.
        let cands = [
            c(1, Some(2.0), Some(0.2)),
            c(2, Some(1.0), None),
            c(9, None, Some(0.95)),
            c(7, None, None),
        ];
        // MF scaled: 1 → 1.0, 2 → 0.5, mean 0.75; content mean (0.2 + 0.95) / 2 = 0.575.
        // 9 → 0.7·0.75 + 0.3·0.95 = 0.81; 1 → 0.7 + 0.06 = 0.76; 2 → 0.35 + 0.1725.
        let out = blend(&cands, 0.3, 10);
        assert_eq!(items(&out), vec![9, 1, 2]);
        let scores: Vec<f32> = out.iter().map(|b| b.score).collect();
        for (got, want) in scores.iter().zip([0.81, 0.76, 0.5225]) {
            assert!((got - want).abs() < 1e-5, "{scores:?}");
        }
        assert_eq!(out[0].credit, Credit::Content);
        assert_eq!(out[1].credit, Credit::Mf);
        // A weight of 0 leaves content out, a weight of 1 leaves MF out.
        assert_eq!(items(&blend(&cands, 0.0, 10)), vec![1, 2]);
        assert_eq!(items(&blend(&cands, 1.0, 10)), vec![9, 1]);
        // When no candidate has an embedding the MF order stands.
        let plain = [c(3, Some(1.0), None), c(4, Some(3.0), None)];
        assert_eq!(items(&blend(&plain, 0.3, 10)), vec![4, 3]);
    }

    #[test]
    fn results_are_truncated_deterministic_and_survive_odd_inputs() {
        let cands = [
            c(5, Some(-2.0), None),
            c(4, Some(-1.0), None),
            c(3, Some(f32::NAN), Some(0.1)),
            c(2, Some(-1.0), None),
        ];
        // NaN weight counts as 0, so item 3 (its MF score NaN, so content only) drops out.
        let out = blend(&cands, f32::NAN, 3);
        assert_eq!(items(&out), vec![2, 4, 5], "ties by index");
        assert!(out.iter().all(|b| b.score.is_finite()));
        assert!(blend(&cands, 0.5, 0).is_empty());
        assert!(blend(&[], 0.5, 5).is_empty());
    }
}
