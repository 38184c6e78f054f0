//! Streaming HR@10 of MF, the content model (MovieLens genres and release decade as
//! embeddings) and their blends, with cold-start events (a movie's first rating) apart.
//!
//! `cargo run --release -p reflex-models --example content_eval -- [100k|1m] [max_events]`,
//! with the data folder from `REFLEX_DATA_DIR` (default `../shared/data` relative to the
//! workspace).

use reflex_models::content_eval::{ItemKey, content_streaming_eval, movielens_genre_embeddings};
use reflex_models::eval::{EvalOptions, read_movielens_1m, read_movielens_100k};
use reflex_models::{ContentConfig, MfConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = reflex_models::eval::data_dir();
    let which = args.first().map_or("100k", String::as_str);
    let (data, items, key) = match which {
        "1m" => (
            read_movielens_1m(&dir.join("movielens-1m/ratings_numeric.tsv.gz"))?,
            dir.join("movielens-1m/ml-1m.item"),
            ItemKey::Row,
        ),
        _ => (
            read_movielens_100k(&dir.join("movielens-100k/ml-100k.inter"))?,
            dir.join("movielens-100k/ml-100k.item"),
            ItemKey::Id,
        ),
    };
    let (dim, embeddings) = movielens_genre_embeddings(&items, &data, key)?;
    let options = EvalOptions {
        max_events: args.get(1).and_then(|a| a.parse().ok()),
        ..EvalOptions::default()
    };
    let report = content_streaming_eval(
        &data,
        dim,
        &embeddings,
        &MfConfig::default(),
        &ContentConfig::default(),
        &[0.0, 0.1, 0.3, 0.5],
        &options,
    )?;
    println!("MovieLens {which}, embeddings of {dim} values\n{report}");
    Ok(())
}
