//! `reflex eval`: the offline evaluation of the batch baseline on a ratings file —
//! leave-last-out HR@10, NDCG@10, recall@20 and coverage of implicit ALS and of
//! popularity, then online MF continuing from the ALS factors over the held-out events
//! (see `reflex_models::eval::baseline_eval`).

use std::path::PathBuf;

use anyhow::Context;
use reflex_models::AlsConfig;
use reflex_models::eval::{
    BaselineOptions, EvalOptions, Weighting, baseline_eval, read_ratings_file,
};
use serde::Serialize;

/// Flags of `reflex eval`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct EvalArgs {
    /// Ratings file: tab-separated `user item rating timestamp(seconds)` after a header
    /// line, plain or gzip (a RecBole `.inter` file, or MovieLens 1M's
    /// `ratings_numeric.tsv.gz`).
    #[arg(long)]
    pub data: PathBuf,
    /// Latent factors of ALS (and of the online model continuing from it).
    #[arg(long, default_value_t = 64)]
    pub factors: usize,
    /// ALS iterations.
    #[arg(long, default_value_t = 15)]
    pub iterations: usize,
    /// ALS regularization.
    #[arg(long, default_value_t = 0.05)]
    pub regularization: f32,
    /// ALS confidence scale.
    #[arg(long, default_value_t = 2.0)]
    pub alpha: f32,
    /// Seed of the initial factors (default: the library's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Weight interactions by rating / 3 instead of counting every one as 1.
    #[arg(long)]
    pub rating_weights: bool,
    /// Skip the online part (online MF streaming the held-out events).
    #[arg(long)]
    pub offline_only: bool,
    /// Print the figures as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `reflex eval`: reads the file, evaluates, prints.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let defaults = AlsConfig::default();
    let als = AlsConfig {
        factors: args.factors,
        iterations: args.iterations,
        regularization: args.regularization,
        alpha: args.alpha,
        seed: args.seed.unwrap_or(defaults.seed),
        ..defaults
    };
    als.validate()
        .map_err(|e| anyhow::anyhow!("invalid ALS settings: {e}"))?;
    let data = read_ratings_file(&args.data).context("reading the ratings file")?;
    anyhow::ensure!(
        !data.ratings.is_empty(),
        "{} holds no ratings",
        args.data.display()
    );
    let options = BaselineOptions {
        als: als.clone(),
        stream: EvalOptions {
            weighting: if args.rating_weights {
                Weighting::Rating
            } else {
                Weighting::Unit
            },
            ..EvalOptions::default()
        },
        online: !args.offline_only,
        ..BaselineOptions::default()
    };
    let (report, _) = baseline_eval(&data, &options)?;
    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            data: &'a std::path::Path,
            ratings: usize,
            als_config: &'a AlsConfig,
            #[serde(flatten)]
            report: &'a reflex_models::eval::BaselineReport,
        }
        let out = Out {
            data: &args.data,
            ratings: data.ratings.len(),
            als_config: &als,
            report: &report,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&out).context("printing the figures")?
        );
    } else {
        println!(
            "{} ({} ratings); ALS {} factors, {} iterations, regularization {}, alpha {}",
            args.data.display(),
            data.ratings.len(),
            als.factors,
            als.iterations,
            als.regularization,
            als.alpha
        );
        print!("{report}");
    }
    Ok(())
}
