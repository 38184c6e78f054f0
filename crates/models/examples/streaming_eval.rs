//! Streaming (prequential) HR@10 of the online MF model against popularity.
//!
//! `cargo run --release -p reflex-models --example streaming_eval -- [100k|1m] [CONFIG_JSON]
//! [rating] [max_events]`, with the data folder from `REFLEX_DATA_DIR` (default
//! `../shared/data` relative to the workspace).

use reflex_models::MfConfig;
use reflex_models::eval::{EvalOptions, Weighting, streaming_eval};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map_or("100k", String::as_str);
    let data = reflex_models::eval::read_movielens(which)?;
    let config: MfConfig = match args.get(1) {
        Some(json) if !json.is_empty() => serde_json::from_str(json)?,
        _ => MfConfig::default(),
    };
    let options = EvalOptions {
        weighting: if args.get(2).is_some_and(|a| a == "rating") {
            Weighting::Rating
        } else {
            Weighting::Unit
        },
        max_events: args.get(3).and_then(|a| a.parse().ok()),
        ..EvalOptions::default()
    };
    let report = streaming_eval(&data, &config, &options)?;
    println!(
        "{which} {} {report}",
        args.get(1).map_or("{}", String::as_str)
    );
    Ok(())
}
