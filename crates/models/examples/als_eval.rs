//! Leave-last-out evaluation of the batch baseline (implicit ALS) against popularity, and
//! of online MF continuing from it.
//!
//! `cargo run --release -p reflex-models --example als_eval -- [100k|1m|FILE] [ALS_JSON]
//! [MF_JSON]`, with the data folder from `eval::data_dir` (`REFLEX_DATA_DIR`, else `../shared/data`
//! beside the workspace, else `/work/shared/data`). `ALS_JSON` overrides [`AlsConfig`]
//! fields, e.g. `'{"alpha": 2.0, "iterations": 20}'`; `MF_JSON` replaces the online
//! model's [`MfConfig`] (default: `MfConfig::default()` with
//! `config::WARM_START_LEARNING_RATE`; `'{}'` is `MfConfig::default()` itself). Set
//! `ALS_EVAL_OFFLINE_ONLY=1` to skip the online part.

use std::path::PathBuf;

use reflex_models::eval::{BaselineOptions, baseline_eval, read_ratings_file};
use reflex_models::{AlsConfig, MfConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map_or("1m", String::as_str);
    let path = match which {
        "1m" => reflex_models::eval::data_dir().join("movielens-1m/ratings_numeric.tsv.gz"),
        "100k" => reflex_models::eval::data_dir().join("movielens-100k/ml-100k.inter"),
        other => PathBuf::from(other),
    };
    let data = read_ratings_file(&path)?;
    let als: AlsConfig = match args.get(1) {
        Some(json) if !json.is_empty() => serde_json::from_str(json)?,
        _ => AlsConfig::default(),
    };
    let mf: MfConfig = match args.get(2) {
        Some(json) if !json.is_empty() => serde_json::from_str(json)?,
        _ => BaselineOptions::default().mf,
    };
    let options = BaselineOptions {
        als: als.clone(),
        mf,
        online: std::env::var_os("ALS_EVAL_OFFLINE_ONLY").is_none(),
        ..BaselineOptions::default()
    };
    let (report, _) = baseline_eval(&data, &options)?;
    println!(
        "{} ({} ratings), ALS {}",
        path.display(),
        data.ratings.len(),
        serde_json::to_string(&als)?
    );
    print!("{report}");
    Ok(())
}
