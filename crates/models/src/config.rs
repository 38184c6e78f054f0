//! Configuration of the online matrix factorisation model.

use serde::{Deserialize, Serialize};

/// Most latent factors accepted.
pub const MAX_FACTORS: usize = 1024;

/// SGD step size of the online model when it continues from ALS factors (the default of
/// [`MfConfig::warm_start_learning_rate`]). The from-scratch rate (then 0.1) overwrites
/// what ALS learnt: prequential HR@10 over the held-out events of ML-1M was 0.098 with it
/// when negatives stepped their items too (0.165 since they shape only the user's step),
/// 0.196–0.203 with no learning at all (fold-in alone) and 0.205 to 0.212 from 0.01 to
/// 0.03 (0.2086 at 0.02 with Gram negatives).
pub const WARM_START_LEARNING_RATE: f32 = 0.02;

/// How negative items are drawn for each positive event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativeSampling {
    /// Uniformly over every item the model knows.
    Uniform,
    /// In proportion to recent popularity: drawn from a ring of recent positive events.
    Popularity,
    /// None drawn: every known item is a negative of weight `negatives · negative_weight /
    /// items`, summed exactly through the Gram matrix of the item factors (the expected
    /// user step of uniform sampling, without its noise). One `k × k` product per event
    /// instead of `negatives` scattered item reads; the negatives' own vectors never
    /// step ([`MfConfig::negative_item_steps`] must be off).
    #[default]
    Gram,
}

/// Settings of [`crate::OnlineMf`]. Defaults were tuned for streaming HR@10 on
/// MovieLens 100K (see the crate documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MfConfig {
    /// Latent factors per item and user (1 to [`MAX_FACTORS`]).
    pub factors: usize,
    /// SGD step size when learning from scratch. Streaming HR@10 (MovieLens 100K / 1M)
    /// with Gram negatives: 0.1 → 0.1551 / 0.1671, 0.15 → 0.1657 / 0.1705, 0.2 → 0.1680 /
    /// 0.1698, 0.3 → 0.1660 / 0.1672.
    pub learning_rate: f32,
    /// SGD step size once the factors come from a batch fit (an ALS version installed, or
    /// [`crate::OnlineMf::load_item_factors`]), and for every snapshot descending from
    /// one. At `learning_rate` (tuned for learning from scratch) online updates overwrite
    /// what ALS learnt: prequential HR@10 over the held-out events of MovieLens 1M is
    /// 0.165 at 0.1, 0.203 with no learning at all (fold-in alone) and 0.208 at 0.02.
    pub warm_start_learning_rate: f32,
    /// L2 regularisation of the SGD steps, per step.
    pub regularisation: f32,
    /// Negative items sampled per positive event.
    pub negatives: usize,
    /// How negatives are drawn. The default, [`NegativeSampling::Gram`], against 16
    /// uniform samples, each at its best `learning_rate` (streaming HR@10, MovieLens 100K /
    /// 1M): 0.1657 / 0.1705 at 0.15 against 0.1746 / 0.1714 at 0.2, at 1.5M against 0.8M
    /// model updates a second (`learn_throughput`, ML-1M, one thread).
    pub negative_sampling: NegativeSampling,
    /// With [`NegativeSampling::Gram`], how many of the `negatives` are still drawn as
    /// uniform samples each event, beside the Gram term (which carries the other
    /// `negatives − gram_samples`). A few samples learn better on a small catalog, at
    /// some cost in update rate (streaming HR@10 MovieLens 100K / 1M, updates/s on 1M):
    /// 0 samples at `learning_rate` 0.15 (the defaults) 0.1657 / 0.1705, 1.3–1.6M;
    /// 2 at 0.2: 0.1703 / 0.1707, 1.0–1.2M; 4 at 0.2: 0.1721 / 0.1712, 1.1M; all 16
    /// sampled (`uniform`) at 0.2: 0.1746 / 0.1714, 0.8M.
    pub gram_samples: usize,
    /// Weight of each negative's squared error relative to a positive of weight 1.
    pub negative_weight: f32,
    /// Whether a sampled negative's own vector takes an SGD step down too (only with
    /// sampled negatives: [`NegativeSampling::Gram`] rejects it). Measured with 16
    /// uniform samples at `learning_rate` 0.1: off, the
    /// negatives only shape the user's step (their scores still fall, through the
    /// user's vector): model updates are a third faster (0.57M → 0.76M events/s on
    /// MovieLens 1M, `learn_throughput`) and streaming HR@10 is higher (100K: 0.1573
    /// against 0.1562; 1M: 0.1676 against 0.1631); online learning after the ALS
    /// baseline scores 0.2081 against 0.2118 over 6,040 held-out events (within their
    /// ±0.005 standard error). A random negative is often an item the user would like,
    /// and stepping it down for everyone was more noise than signal.
    pub negative_item_steps: bool,
    /// Largest confidence one event carries, whatever its weight.
    pub max_confidence: f32,
    /// Spread of the initial factor values (uniform in ±`init_scale / sqrt(factors)`).
    pub init_scale: f32,
    /// Ridge term λ of the fold-in least squares.
    pub fold_in_regularisation: f32,
    /// Scale of the Gram term in fold-in: β = `fold_in_gram_weight · negatives ·
    /// negative_weight · positives / items`, which at 1 is the expected weight uniform
    /// negatives gave each item while the user's `positives` history events were learnt.
    pub fold_in_gram_weight: f32,
    /// Half-life of a history entry's confidence in fold-in, counted back from the newest
    /// entry, in event-time ms; 0 turns recency decay off.
    pub fold_in_half_life_ms: i64,
    /// Events between recomputations of the Gram matrix of all item factors (at least the
    /// number of known items, so its cost stays under k² per event).
    pub gram_refresh_events: u64,
    /// Events per item added to the rolling sum of the Gram matrix: a pass over `n` items
    /// lasts `n × gram_stride` events. It trades the matrix's freshness for learning
    /// throughput (each added item costs k²/2 multiply-adds). With Gram negatives the
    /// matrix trains the users too, and must stay fresh: at 2 streaming HR@10 fell from
    /// 0.1551 to 0.1478 (MovieLens 100K) and from 0.1671 to 0.1610 (1M). With sampled
    /// negatives it only serves fold-in, and 2 or 4 cost under 0.6% of HR@10.
    pub gram_stride: u64,
    /// Half-life of time-decayed popularity, in event-time ms.
    pub popularity_half_life_ms: i64,
    /// Events between refreshes of the cached popular list (at least items / 16, so its
    /// cost stays under 16 items visited per event).
    pub popular_refresh_events: u64,
    /// Length of the cached popular list.
    pub popular_cache: usize,
    /// Recent positive events kept for popularity-proportional negative sampling.
    pub recent_ring: usize,
    /// Seed of initial factors and negative sampling; replay with the same seed gives
    /// the same model.
    pub seed: u64,
}

impl Default for MfConfig {
    fn default() -> Self {
        Self {
            factors: 64,
            learning_rate: 0.15,
            warm_start_learning_rate: WARM_START_LEARNING_RATE,
            regularisation: 0.01,
            negatives: 16,
            negative_sampling: NegativeSampling::Gram,
            gram_samples: 0,
            negative_weight: 1.0,
            negative_item_steps: false,
            max_confidence: 10.0,
            init_scale: 1.0,
            fold_in_regularisation: 1.0,
            fold_in_gram_weight: 1.0,
            fold_in_half_life_ms: 2 * 60 * 1000,
            gram_refresh_events: 1000,
            gram_stride: 1,
            popularity_half_life_ms: 30 * 24 * 3600 * 1000,
            popular_refresh_events: 100,
            popular_cache: 1000,
            recent_ring: 4096,
            seed: 0x5eed_0f4e_f1e8,
        }
    }
}

impl MfConfig {
    /// Checks every field's range, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        let finite_nonneg = |name: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be finite and >= 0, got {v}"))
            }
        };
        if self.factors == 0 || self.factors > MAX_FACTORS {
            return Err(format!(
                "factors must be 1 to {MAX_FACTORS}, got {}",
                self.factors
            ));
        }
        finite_nonneg("learning_rate", self.learning_rate)?;
        finite_nonneg("warm_start_learning_rate", self.warm_start_learning_rate)?;
        finite_nonneg("regularisation", self.regularisation)?;
        finite_nonneg("negative_weight", self.negative_weight)?;
        finite_nonneg("init_scale", self.init_scale)?;
        finite_nonneg("fold_in_gram_weight", self.fold_in_gram_weight)?;
        if self.gram_samples > self.negatives {
            return Err(format!(
                "gram_samples ({}) must be at most negatives ({})",
                self.gram_samples, self.negatives
            ));
        }
        if self.negative_item_steps && self.negative_sampling == NegativeSampling::Gram {
            return Err(
                "negative_item_steps needs sampled negatives: set negative_sampling \
                        to \"uniform\" or \"popularity\", or turn negative_item_steps off"
                    .into(),
            );
        }
        if !(self.max_confidence.is_finite() && self.max_confidence > 0.0) {
            return Err(format!(
                "max_confidence must be finite and > 0, got {}",
                self.max_confidence
            ));
        }
        if !(self.fold_in_regularisation.is_finite() && self.fold_in_regularisation > 0.0) {
            return Err(format!(
                "fold_in_regularisation must be finite and > 0, got {}",
                self.fold_in_regularisation
            ));
        }
        if self.fold_in_half_life_ms < 0 {
            return Err("fold_in_half_life_ms must be >= 0".into());
        }
        if self.gram_stride == 0 {
            return Err("gram_stride must be >= 1".into());
        }
        if self.popularity_half_life_ms <= 0 {
            return Err("popularity_half_life_ms must be > 0".into());
        }
        if self.popular_cache == 0 {
            return Err("popular_cache must be > 0".into());
        }
        if self.recent_ring == 0 {
            return Err("recent_ring must be > 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_fields_rejected() {
        MfConfig::default().validate().unwrap();
        assert!(crate::OnlineMf::new(MfConfig::default()).is_ok());
        let bad = MfConfig {
            factors: 0,
            learning_rate: f32::NAN,
            ..MfConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("factors"));
        let too_many = MfConfig {
            gram_samples: 17,
            ..MfConfig::default()
        };
        assert!(too_many.validate().unwrap_err().contains("gram_samples"));
        let steps_without_samples = MfConfig {
            negative_item_steps: true,
            ..MfConfig::default()
        };
        assert!(
            steps_without_samples
                .validate()
                .unwrap_err()
                .contains("negative_item_steps")
        );
        let no_stride = MfConfig {
            gram_stride: 0,
            ..MfConfig::default()
        };
        assert!(no_stride.validate().unwrap_err().contains("gram_stride"));
        // The model refuses what `validate` refuses, naming the field, instead of
        // running on defaults in its place.
        for (config, field) in [
            (bad, "factors"),
            (too_many, "gram_samples"),
            (no_stride, "gram_stride"),
        ] {
            let Err(e) = crate::OnlineMf::new(config) else {
                panic!("{field}: accepted");
            };
            assert!(
                matches!(&e, crate::ModelError::InvalidConfig { section: "model", reason } if reason.contains(field)),
                "{e}"
            );
        }
    }

    #[test]
    fn config_deserialises_with_defaults_and_rejects_unknown_fields() {
        let c: MfConfig =
            serde_json::from_str(r#"{"factors": 32, "negative_sampling": "popularity"}"#).unwrap();
        assert_eq!(c.factors, 32);
        assert_eq!(c.negative_sampling, NegativeSampling::Popularity);
        assert_eq!(c.learning_rate, MfConfig::default().learning_rate);
        let err = serde_json::from_str::<MfConfig>(r#"{"factor": 32}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
