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

use crate::als_args::AlsArgs;

/// Flags of `reflex eval`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct EvalArgs {
    /// Ratings file: tab-separated `user item rating timestamp(seconds)` after a header
    /// line, plain or gzip (a RecBole `.inter` file, or MovieLens 1M's
    /// `ratings_numeric.tsv.gz`).
    #[arg(long)]
    pub data: PathBuf,
    /// The ALS settings.
    #[command(flatten)]
    #[serde(flatten)]
    pub als: AlsArgs,
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
    let als = args.als.to_config(AlsConfig::default().factors)?;
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
