//! The `reflex` command: `serve`, `demo`, `config`, `bench`, `eval`, `import` and `train`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use reflex_server::app::Progress;
use reflex_server::config::{Config, FlagOverrides};

/// mimalloc instead of glibc malloc: profiling showed about a quarter of ingest CPU in
/// glibc's allocator, much of it waiting on its arena locks under concurrent streams.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Reflex: real-time personalization over gRPC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "REFLEX_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, global = true)]
    listen: Option<std::net::SocketAddr>,
    /// Data directory of the embedded store.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve,
    /// Run a server on a fresh embedded store and drive a synthetic shopping session;
    /// the web console is on while it runs.
    Demo {
        /// Keep the server (and its console) up after the session, until Ctrl-C.
        #[arg(long)]
        stay: bool,
    },
    /// Print the effective configuration.
    Config,
    /// Drive a server with synthetic shop traffic and report throughput and latency.
    Bench(Box<reflex_server::bench::BenchArgs>),
    /// Evaluate the batch baseline (implicit ALS) against popularity on a ratings file,
    /// leave-last-out, and online MF continuing from it.
    Eval(Box<reflex_server::eval_cmd::EvalArgs>),
    /// Load historical events from a CSV/TSV file (MovieLens `.inter`, ratings TSV or the
    /// generic `user_id,item_id,kind,timestamp` format) into the store through ingest.
    Import(Box<reflex_server::import_cmd::ImportArgs>),
    /// Fit implicit ALS to the store's event log (or a file) and publish it as a model
    /// version that servers start from.
    Train(Box<reflex_server::train_cmd::TrainArgs>),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut flags = FlagOverrides {
        listen: cli.listen,
        data_dir: cli.data_dir.clone(),
    };
    match cli.command {
        Command::Serve => {
            let config = Config::load(cli.config.as_deref(), &flags)?;
            let _telemetry = reflex_server::telemetry::init(&config.log, &config.telemetry, false)?;
            let console = config.console.enabled;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            reflex_server::app::serve(
                config,
                listener,
                reflex_server::app::shutdown_signal(),
                |progress, addr, metrics| {
                    match progress {
                        Progress::WaitingForStore => println!(
                            "reflex starting on {addr} (health NOT_SERVING until the store is \
                             reachable)"
                        ),
                        Progress::Ready => println!("reflex listening on {addr}"),
                    }
                    if let Some(metrics) = metrics {
                        println!("reflex metrics on http://{metrics}/metrics");
                        if console {
                            println!("reflex console on http://{metrics}/console/");
                        }
                    }
                },
            )
            .await
        }
        Command::Demo { stay } => {
            // A fresh store and a free port unless told otherwise, so the demo always
            // starts from nothing and never collides with a running server.
            let scratch = tempfile::tempdir().context("creating a scratch data directory")?;
            if flags.data_dir.is_none() {
                flags.data_dir = Some(scratch.path().to_owned());
            }
            if flags.listen.is_none() {
                flags.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
            }
            let mut config = Config::load(cli.config.as_deref(), &flags)?;
            // The demo's server is private to it: its HTTP listener (the console and
            // `/metrics`) takes a free port, never a real server's.
            config.metrics.enabled = true;
            config.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            config.console.enabled = true;
            let _telemetry = reflex_server::telemetry::init(&config.log, &config.telemetry, true)?;
            reflex_server::demo::run(config, stay).await
        }
        Command::Bench(args) => {
            reflex_server::bench::run(*args, cli.config.as_deref(), flags).await
        }
        Command::Eval(args) => {
            reflex_server::eval_cmd::run(*args, cli.config.as_deref(), &flags).await
        }
        Command::Import(args) => {
            let config = Config::load(cli.config.as_deref(), &flags)?;
            let _telemetry = reflex_server::telemetry::init(&config.log, &config.telemetry, true)?;
            reflex_server::import_cmd::run(*args, cli.config.as_deref(), flags).await
        }
        Command::Train(args) => {
            let config = Config::load(cli.config.as_deref(), &flags)?;
            let _telemetry = reflex_server::telemetry::init(&config.log, &config.telemetry, true)?;
            reflex_server::train_cmd::run(*args, cli.config.as_deref(), flags).await
        }
        Command::Config => {
            let config = Config::load(cli.config.as_deref(), &flags)?;
            print!(
                "{}",
                config
                    .to_toml_redacted()
                    .context("printing the configuration")?
            );
            Ok(())
        }
    }
}
