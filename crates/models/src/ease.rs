//! Item-to-item weights fitted in batch: EASE (Steck, "Embarrassingly Shallow
//! Autoencoders for Sparse Data", WWW 2019) over the most popular items.
//!
//! With `X` the binary user × item matrix restricted to the `N` items the most users
//! touched, `G = XᵀX + λI` and `P = G⁻¹`, the weights are `B[i][j] = −P[i][j] / P[j][j]`
//! (zero diagonal): the closed-form ridge regression of every item on all the others.
//! A user's score for `j` is `Σ_i x_i·B[i][j]` over the items `i` they touched. Each
//! source row keeps only its heaviest positive weights, so what is served and stored is
//! a sparse list per item, like the signals' followers, that the signals blend with
//! their co-occurrence counts ([`crate::signals`]).
//!
//! The fit is `O(N³)` (a dense `N × N` inverse in `f64`: 2,000 items take about 32 MB
//! and seconds on one core), which is why it runs in the background refit, never per
//! event. Measured on MovieLens (BENCHMARKS.md, "What shoppers do next").

use serde::{Deserialize, Serialize};

use crate::als::Csr;
use crate::error::ModelError;
use crate::linalg;

/// Settings of the fit.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EaseConfig {
    /// Whether the refit fits the item-to-item weights at all.
    pub enabled: bool,
    /// Most items fitted (the most popular by distinct users); the fit's time grows
    /// with the cube and its memory with the square of this.
    pub items: usize,
    /// Ridge penalty λ added to the diagonal of the Gram matrix.
    pub lambda: f64,
    /// Heaviest positive weights kept per source item.
    pub keep: usize,
    /// Fewest distinct users an item needs to be fitted.
    pub min_users: u32,
}

impl Default for EaseConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            items: 2_000,
            lambda: 500.0,
            keep: 100,
            min_users: 2,
        }
    }
}

impl EaseConfig {
    /// Checks every setting; the message names the first one out of range.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=20_000).contains(&self.items) {
            return Err("items must be between 1 and 20000 (the fit is cubic in it)".into());
        }
        if !self.lambda.is_finite() || self.lambda <= 0.0 {
            return Err("lambda must be a number above 0".into());
        }
        if self.keep == 0 {
            return Err("keep must be at least 1".into());
        }
        Ok(())
    }
}

/// The fitted weights: per source item (a column of the fitted matrix), its targets and
/// their positive weights, heaviest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ItemItemFit {
    /// `(source column, [(target column, weight)])`, sources in column order.
    pub rows: Vec<(u32, Vec<(u32, f32)>)>,
}

/// Fits EASE to the items of `matrix` (users × items; an entry with a positive value
/// counts as one, whatever its weight) under `config`, which it validates.
pub fn fit(matrix: &Csr, config: &EaseConfig) -> Result<ItemItemFit, ModelError> {
    config
        .validate()
        .map_err(|e| ModelError::invalid_config("item_item", e))?;
    // Distinct users per item.
    let mut users = vec![0u32; matrix.cols()];
    for r in 0..matrix.rows() {
        let (cols, vals) = matrix.row(r);
        for (&c, &v) in cols.iter().zip(vals) {
            if v > 0.0 {
                users[c as usize] += 1;
            }
        }
    }
    let mut chosen: Vec<u32> = (0..matrix.cols() as u32)
        .filter(|&c| users[c as usize] >= config.min_users.max(1))
        .collect();
    chosen.sort_unstable_by(|&a, &b| users[b as usize].cmp(&users[a as usize]).then(a.cmp(&b)));
    chosen.truncate(config.items);
    chosen.sort_unstable();
    let n = chosen.len();
    if n < 2 {
        return Ok(ItemItemFit::default());
    }
    let mut dense = vec![u32::MAX; matrix.cols()];
    for (d, &c) in chosen.iter().enumerate() {
        dense[c as usize] = d as u32;
    }

    // The Gram matrix's lower triangle, then mirrored, plus λ on the diagonal.
    let mut g = vec![0.0f64; n * n];
    let mut touched: Vec<usize> = Vec::new();
    for r in 0..matrix.rows() {
        let (cols, vals) = matrix.row(r);
        touched.clear();
        touched.extend(
            cols.iter()
                .zip(vals)
                .filter(|&(_, &v)| v > 0.0)
                .map(|(&c, _)| dense[c as usize])
                .filter(|&d| d != u32::MAX)
                .map(|d| d as usize),
        );
        touched.sort_unstable();
        for (x, &a) in touched.iter().enumerate() {
            let row = &mut g[a * n..a * n + n];
            for &b in &touched[..=x] {
                row[b] += 1.0;
            }
        }
    }
    for a in 0..n {
        for b in 0..a {
            g[b * n + a] = g[a * n + b];
        }
        g[a * n + a] += config.lambda;
    }
    if !linalg::invert_spd(&mut g, n) {
        return Err(ModelError::Numerical {
            fit: "item_item",
            reason: format!("the {n} × {n} Gram matrix plus λ lost positive definiteness"),
        });
    }

    // B[i][j] = −P[i][j] / P[j][j]; row i lists what source i predicts.
    let diag: Vec<f64> = (0..n).map(|j| g[j * n + j]).collect();
    let mut rows = Vec::with_capacity(n);
    let mut weights: Vec<(u32, f32)> = Vec::with_capacity(n);
    for i in 0..n {
        weights.clear();
        let p = &g[i * n..i * n + n];
        weights.extend((0..n).filter(|&j| j != i).filter_map(|j| {
            let b = -p[j] / diag[j];
            (b > 0.0 && b.is_finite()).then_some((chosen[j], b as f32))
        }));
        if weights.len() > config.keep {
            weights.select_nth_unstable_by(config.keep - 1, |a, b| b.1.total_cmp(&a.1));
            weights.truncate(config.keep);
        }
        weights.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if !weights.is_empty() {
            rows.push((chosen[i], weights.clone()));
        }
    }
    Ok(ItemItemFit { rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(users: &[&[u32]]) -> Csr {
        let triples: Vec<(u32, u32, f32)> = users
            .iter()
            .enumerate()
            .flat_map(|(u, items)| items.iter().map(move |&i| (u as u32, i, 1.0)))
            .collect();
        Csr::from_triples(users.len(), 0, &triples)
    }

    fn weight(fit: &ItemItemFit, from: u32, to: u32) -> f32 {
        fit.rows
            .iter()
            .find(|(s, _)| *s == from)
            .and_then(|(_, row)| row.iter().find(|(t, _)| *t == to))
            .map_or(0.0, |(_, w)| *w)
    }

    #[test]
    fn items_bought_together_predict_each_other_and_strangers_do_not() {
        // 0 and 1 always together, 2 and 3 always together, 4 alone.
        let mut users: Vec<&[u32]> = Vec::new();
        for _ in 0..30 {
            users.push(&[0, 1]);
            users.push(&[2, 3]);
            users.push(&[4]);
        }
        let config = EaseConfig {
            lambda: 1.0,
            ..EaseConfig::default()
        };
        let fit = fit(&matrix(&users), &config).unwrap();
        assert!(weight(&fit, 0, 1) > 0.5, "{fit:?}");
        assert!(weight(&fit, 2, 3) > 0.5, "{fit:?}");
        assert_eq!(weight(&fit, 0, 2), 0.0);
        assert_eq!(weight(&fit, 0, 0), 0.0, "no item predicts itself");
        assert!(fit.rows.iter().all(|(s, _)| *s != 4), "4 predicts nothing");
    }

    #[test]
    fn only_the_most_popular_items_are_fitted_and_rows_are_cut_to_keep() {
        let users: Vec<Vec<u32>> = (0..40u32)
            .map(|u| (0..6).filter(|i| u % (i + 1) == 0).collect())
            .collect();
        let refs: Vec<&[u32]> = users.iter().map(Vec::as_slice).collect();
        let config = EaseConfig {
            items: 3,
            keep: 1,
            lambda: 1.0,
            ..EaseConfig::default()
        };
        let fit = fit(&matrix(&refs), &config).unwrap();
        // Item 0 has every user, then 1, then 2: only they take part.
        for (s, row) in &fit.rows {
            assert!(*s < 3, "{fit:?}");
            assert!(row.len() <= 1);
            assert!(row.iter().all(|(t, w)| *t < 3 && *w > 0.0));
        }
    }

    #[test]
    fn settings_out_of_range_are_refused_by_name() {
        for (config, name) in [
            (
                EaseConfig {
                    items: 0,
                    ..EaseConfig::default()
                },
                "items",
            ),
            (
                EaseConfig {
                    lambda: 0.0,
                    ..EaseConfig::default()
                },
                "lambda",
            ),
            (
                EaseConfig {
                    keep: 0,
                    ..EaseConfig::default()
                },
                "keep",
            ),
        ] {
            let err = config.validate().unwrap_err();
            assert!(err.starts_with(name), "{err}");
        }
    }
}
