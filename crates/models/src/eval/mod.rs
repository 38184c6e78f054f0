//! Offline evaluation: MovieLens readers, a prequential streaming evaluation, and a
//! leave-last-out evaluation of the batch baseline ([`crate::als`]) with online learning
//! continuing from it.
//!
//! The streaming evaluation replays interactions in time order (stable, so ties keep file
//! order) and, for each event, first asks for the user's top `k` the way the server
//! would — fold-in from their most recent `history_window` interactions, retrieval with
//! the user's already-seen items excluded, popular fill-in when fold-in gives nothing —
//! and records a hit when the event's item is among them; then the model learns from
//! the event. Pure time-decayed popularity (the same model's, same exclusions) is scored
//! on the same events for comparison.
//!
//! The leave-last-out evaluation ([`baseline_eval`]) holds out each user's latest
//! interaction (ties by file order: the later row), trains on the rest with every
//! interaction a positive, and ranks the whole catalog for each user with their training
//! items removed: HR@10, NDCG@10, recall@20 (one held-out item, so the hit rate at 20)
//! and the catalog coverage of the top-10 lists, for ALS (`user · item`) and training-set
//! popularity. Then "online after the baseline": an [`crate::OnlineMf`] starts from the
//! ALS item (and user) factors and training-set popularity, and the held-out events stream
//! through it in time order, prequentially — predict from fold-in over the user's recent
//! history, then learn — scored against its popularity and the frozen ALS model.
//!
//! Layout:
//! - [`data`]: the ratings reader (one parser for every ratings file) and where the
//!   MovieLens files are
//! - [`streaming`]: the prequential streaming evaluation and the learning throughput
//! - [`offline`]: the leave-last-out split and the offline figures of ALS and popularity
//! - [`baseline`]: the whole baseline evaluation, and online learning continuing from it
//! - [`protocol`]: next-item and next-basket splits, their figures (repeat and new items
//!   apart) and the popularity and "buy it again" baselines

pub mod baseline;
pub mod data;
pub mod offline;
pub mod protocol;
pub mod streaming;

pub use baseline::{
    BaselineOptions, BaselineReport, OnlineAfterBaselineReport, baseline_eval,
    online_after_baseline,
};
pub use data::{
    Dataset, Rating, Weighting, data_dir, read_movielens, read_movielens_1m, read_movielens_100k,
    read_ratings_file, read_ratings_tsv,
};
pub use offline::{
    LeaveLastOut, OfflineReport, RECALL_K, TOP_K, evaluate_als, evaluate_popularity,
    leave_last_out, train_matrix,
};
pub use streaming::{EvalOptions, LearnReport, StreamingReport, learn_throughput, streaming_eval};
pub(crate) use streaming::{UserState, rate};

/// The online model's step size after a batch fit; see
/// [`crate::config::WARM_START_LEARNING_RATE`] (re-exported where it was first defined).
pub use crate::config::WARM_START_LEARNING_RATE;
