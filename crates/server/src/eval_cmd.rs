//! `reflex eval`: evaluation on a ratings file.
//!
//! Without `--protocol`: the offline evaluation of the batch baseline — leave-last-out
//! HR@10, NDCG@10, recall@20 and coverage of implicit ALS and of popularity, then online
//! MF continuing from the ALS factors over the held-out events (see
//! `reflex_models::eval::baseline_eval`).
//!
//! With `--protocol next-item|next-basket`: what a shop sees. Each user's latest
//! interaction (or latest basket: events no more than `profiles.session_gap_ms` apart) is
//! held out, and recall@10, HR@10 and NDCG@10, repeat and new items apart, are reported
//! for popularity, personal frequency ("buy it again"), ALS, and **the served ranking**:
//! a real engine with the configuration `reflex serve` would run with (`--config`,
//! `REFLEX_*`) learns the rest through its normal ingest and answers `Recommend` (see
//! [`crate::served_eval`]). The baselines filter the user's own items under `next-item`
//! (nothing comes back there) and nothing under `next-basket`; the served ranking filters
//! as the serving policy says.

use std::path::{Path, PathBuf};

use anyhow::Context;
use reflex_core::RawKind;
use reflex_models::AlsConfig;
use reflex_models::eval::protocol::{Baselines, Protocol, ProtocolReport, Split, score};
use reflex_models::eval::{
    BaselineOptions, Dataset, EvalOptions, Weighting, baseline_eval, read_ratings_file,
};
use serde::Serialize;

use crate::als_args::AlsArgs;
use crate::config::{Config, FlagOverrides};
use crate::served_eval::{ReplayStats, served_rankings};

/// `--protocol` of `reflex eval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtocolArg {
    /// Each user's latest interaction held out.
    NextItem,
    /// Each user's latest basket (session) held out.
    NextBasket,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::NextItem => Protocol::NextItem,
            ProtocolArg::NextBasket => Protocol::NextBasket,
        }
    }
}

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
    /// Evaluate under a protocol, the served ranking included (see the module help).
    #[arg(long, value_enum)]
    pub protocol: Option<ProtocolArg>,
    /// Kind every replayed interaction is sent as, with `--protocol`: `purchase`,
    /// `view`, `click` or `add_to_cart`.
    #[arg(long, default_value = "purchase")]
    pub kind: String,
    /// With `--protocol`: after the replay, run one refit of the batch baseline (as the
    /// learner does every `refit.interval_ms`) before asking for recommendations.
    #[arg(long)]
    pub refit: bool,
}

/// Runs `reflex eval`: reads the file, evaluates, prints. `config_file` and `flags`
/// configure the served engine of `--protocol`.
pub async fn run(
    args: EvalArgs,
    config_file: Option<&Path>,
    flags: &FlagOverrides,
) -> anyhow::Result<()> {
    let als = args.als.to_config(AlsConfig::default().factors)?;
    let data = read_ratings_file(&args.data).context("reading the ratings file")?;
    anyhow::ensure!(
        !data.ratings.is_empty(),
        "{} holds no ratings",
        args.data.display()
    );
    if let Some(protocol) = args.protocol {
        let config = Config::load(config_file, flags)?;
        let kind = match crate::import_cmd::parse_kind(&args.kind) {
            Ok((kind, custom)) if custom.is_empty() => kind,
            _ => anyhow::bail!(
                "--kind {:?}: expected purchase, view, click or add_to_cart",
                args.kind
            ),
        };
        return run_protocol(&args, &data, protocol.into(), &als, config, kind).await;
    }
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

/// Figures of `reflex eval --protocol`.
#[derive(Debug, Serialize)]
pub struct ProtocolOutcome {
    /// The protocol.
    pub protocol: Protocol,
    /// Users with a held-out part.
    pub users: usize,
    /// Interactions replayed (the training part).
    pub train: usize,
    /// One row per ranking; the served one is last.
    pub systems: Vec<ProtocolReport>,
    /// What the served engine's replay did.
    pub replay: ReplayStats,
}

/// The served ranking and the baselines under `protocol`.
pub async fn evaluate_protocol(
    data: &Dataset,
    protocol: Protocol,
    als: &AlsConfig,
    config: Config,
    kind: RawKind,
    refit: bool,
) -> anyhow::Result<ProtocolOutcome> {
    let split = Split::new(data, protocol, config.profiles.session_gap_ms);
    anyhow::ensure!(
        !split.targets.is_empty(),
        "no user has anything to hold out under {protocol:?}"
    );
    let history = split.history(data);
    let baselines = Baselines::new(data, &split, &history);
    // Nothing comes back in next-item data sets such as MovieLens: the baselines filter
    // the user's own items there, as the published figures do.
    let exclude_seen = protocol == Protocol::NextItem;
    let mut systems = vec![
        score(
            "popularity",
            &split,
            &history,
            &baselines.popularity(exclude_seen),
        ),
        score(
            "personal frequency",
            &split,
            &history,
            &baselines.personal_frequency(exclude_seen),
        ),
    ];
    let (als_lists, _) = baselines.als(als, exclude_seen)?;
    systems.push(score("ALS", &split, &history, &als_lists));
    let (served, replay) = served_rankings(data, &split, config, kind, refit).await?;
    systems.push(score("Reflex, served", &split, &history, &served));
    Ok(ProtocolOutcome {
        protocol,
        users: split.targets.len(),
        train: split.train.len(),
        systems,
        replay,
    })
}

async fn run_protocol(
    args: &EvalArgs,
    data: &Dataset,
    protocol: Protocol,
    als: &AlsConfig,
    config: Config,
    kind: RawKind,
) -> anyhow::Result<()> {
    let out = evaluate_protocol(data, protocol, als, config, kind, args.refit).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).context("printing the figures")?
        );
        return Ok(());
    }
    println!(
        "{}: {:?}, {} users held out, {} interactions replayed ({} accepted) in {:.1} s, {} recommends in {:.2} s",
        args.data.display(),
        out.protocol,
        out.users,
        out.train,
        out.replay.accepted,
        out.replay.ingest_secs,
        out.users,
        out.replay.recommend_secs
    );
    if let Some(r) = &out.replay.refit {
        println!(
            "refit: {} ({} events fitted in {:.1} s; holdout hr@10 {:.4} for the fit against \
             {:.4} for the running model, {} users); item-to-item weights for {} items in \
             {:.1} s",
            r.outcome.label(),
            r.events,
            r.fit_secs,
            r.candidate.hit_rate(),
            r.running.hit_rate(),
            r.holdout_cases,
            r.item_item_sources,
            r.item_item_secs
        );
    }
    println!(
        "{:<20} {:>9} {:>7} {:>8} {:>13} {:>10}",
        "system", "recall@10", "HR@10", "NDCG@10", "repeat recall", "new recall"
    );
    for r in &out.systems {
        println!(
            "{:<20} {:>9.4} {:>7.4} {:>8.4} {:>13.4} {:>10.4}",
            r.system, r.recall_at_10, r.hr_at_10, r.ndcg_at_10, r.repeat_recall, r.new_recall
        );
    }
    if let Some(r) = out.systems.first() {
        println!(
            "({:.1}% of the held-out items were the user's own before)",
            100.0 * r.repeat_share
        );
    }
    Ok(())
}
