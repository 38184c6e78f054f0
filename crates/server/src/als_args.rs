//! The ALS flags shared by `reflex eval` and `reflex train`, and their conversion to
//! [`AlsConfig`].

use reflex_models::AlsConfig;
use serde::Serialize;

/// Flags of implicit ALS, flattened into `reflex eval` and `reflex train`; the defaults
/// are [`AlsConfig::default`]'s.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct AlsArgs {
    /// Latent factors of ALS (and of the online model continuing from it). `reflex eval`
    /// defaults to 64; `reflex train` to the server's `model.factors`, which it must equal.
    #[arg(long)]
    pub factors: Option<usize>,
    /// ALS iterations.
    #[arg(long, default_value_t = AlsConfig::default().iterations)]
    pub iterations: usize,
    /// ALS regularization.
    #[arg(long, default_value_t = AlsConfig::default().regularization)]
    pub regularization: f32,
    /// ALS confidence scale (confidence = alpha × summed weight).
    #[arg(long, default_value_t = AlsConfig::default().alpha)]
    pub alpha: f32,
    /// Conjugate-gradient steps per row and half-iteration.
    #[arg(long, default_value_t = AlsConfig::default().cg_steps)]
    pub cg_steps: usize,
    /// Seed of the initial factors (default: the library's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = AlsConfig::default().threads)]
    pub threads: usize,
}

impl AlsArgs {
    /// The ALS settings these flags give, with `default_factors` when `--factors` is not
    /// given; out-of-range values are refused, naming the setting.
    pub fn to_config(&self, default_factors: usize) -> anyhow::Result<AlsConfig> {
        let defaults = AlsConfig::default();
        let als = AlsConfig {
            factors: self.factors.unwrap_or(default_factors),
            iterations: self.iterations,
            regularization: self.regularization,
            alpha: self.alpha,
            cg_steps: self.cg_steps,
            seed: self.seed.unwrap_or(defaults.seed),
            threads: self.threads,
            ..defaults
        };
        als.validate()
            .map_err(|e| anyhow::anyhow!("invalid ALS settings: {e}"))?;
        Ok(als)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        als: AlsArgs,
    }

    #[test]
    fn defaults_are_the_library_s_and_bad_values_are_refused() {
        let cli = Cli::parse_from(["x"]);
        let als = cli.als.to_config(64).unwrap();
        assert_eq!(als, AlsConfig::default());
        let cli = Cli::parse_from(["x", "--factors", "8", "--alpha", "0"]);
        let err = cli.als.to_config(64).unwrap_err().to_string();
        assert!(err.contains("alpha"), "{err}");
        let cli = Cli::parse_from(["x", "--factors", "8"]);
        assert_eq!(cli.als.to_config(64).unwrap().factors, 8);
    }
}
