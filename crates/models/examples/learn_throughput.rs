//! Model updates alone: how many events per second a fresh online MF model learns on one
//! thread, replaying a MovieLens file in time order (the issue's "streaming learning
//! throughput"; river's `learn_one` loop is the usual comparison).
//!
//! `cargo run --release -p reflex-models --example learn_throughput -- [100k|1m]
//! [CONFIG_JSON] [repeats] [SIGNALS_CONFIG_JSON]`, with the data folder from `REFLEX_DATA_DIR` (default
//! `../shared/data` relative to the workspace). Each repeat learns a fresh model, first
//! alone, then together with the behaviour signals (every online update of an event).

use reflex_models::eval::{EvalOptions, learn_throughput};
use reflex_models::{MfConfig, SignalsConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map_or("100k", String::as_str);
    let data = reflex_models::eval::read_movielens(which)?;
    let config: MfConfig = match args.get(1) {
        Some(json) if !json.is_empty() => serde_json::from_str(json)?,
        _ => MfConfig::default(),
    };
    let repeats: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let signals: SignalsConfig = match args.get(3) {
        Some(json) if !json.is_empty() => serde_json::from_str(json)?,
        _ => SignalsConfig::default(),
    };
    for run in 1..=repeats.max(1) {
        let r = learn_throughput(&data, &config, None, &EvalOptions::default())?;
        let all = learn_throughput(&data, &config, Some(&signals), &EvalOptions::default())?;
        println!(
            "{which} run {run}: {} events; MF alone {:.3} s, {:.0} events/s; MF and signals {:.3} s, {:.0} events/s (one thread)",
            r.events, r.secs, r.events_per_sec, all.secs, all.events_per_sec
        );
    }
    Ok(())
}
