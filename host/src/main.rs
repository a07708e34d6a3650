//! The `meridian` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meridian::config::{hash_key, Config, LogFormat};
use meridian::server::Server;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

mod cost_cli;
mod node_cli;
mod plugin_cli;
mod regions_cli;

// glibc malloc showed up as ~8% of the edge's CPU under load; mimalloc's per-thread heaps are
// cheaper for the many small, short-lived allocations of request handling.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Meridian: a programmable inference edge for LLM APIs.
///
/// An edge node speaks the OpenAI and Anthropic APIs to applications, caches answers, accounts
/// every request's tokens and cost, and calls managed APIs with fallback.
#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    after_help = "Examples:\n  meridian up\n  meridian edge -c regions/local/edge.toml\n  meridian engine -c regions/local/engine.toml\n  meridian certs node edge-eu --ip 10.0.0.2\n  meridian config check regions/local/edge.toml\n  meridian regions check regions/three-regions/topology.toml\n  meridian key new\n  meridian plugin new my-router --kind router"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an edge node: an OpenAI- and Anthropic-compatible HTTP gateway.
    Edge {
        /// The node's TOML config.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Make and hash tenant API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Write, check and try plugins (routers and privacy filters).
    #[command(subcommand)]
    Plugin(plugin_cli::PluginCommand),
    /// Run an engine node: ONNX Runtime models served to edges over QUIC with mutual TLS.
    Engine {
        /// The engine node's TOML config.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Make the cluster's development CA and node certificates (for QUIC mutual TLS).
    #[command(subcommand)]
    Certs(node_cli::CertsCommand),
    /// Run the one-machine stack: an engine node on the local model and an edge in front of it.
    Up(node_cli::UpArgs),
    /// Work with deployment topologies (regions, their edges, engines and managed targets).
    #[command(subcommand)]
    Regions(regions_cli::RegionsCommand),
    /// Which way to buy inference: the break-even report from the ledger, the worked example,
    /// and a month replayed under each way of buying capacity.
    #[command(subcommand)]
    Cost(cost_cli::CostCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file, environment variables included, and summarize it.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print the `sha256:` hash of a key, for a tenant's `keys` list.
    Hash {
        /// The key.
        key: String,
    },
    /// Generate a new random key and print it with its hash.
    New,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Edge { config } => run_edge(&config),
        Command::Config(ConfigCommand::Check { file }) => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} tenants, {} targets, {} models; listens on {})",
                    file.display(),
                    c.tenants.len(),
                    c.targets.len(),
                    c.models.len(),
                    c.node.listen
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Key(KeyCommand::Hash { key }) => {
            println!("{}", hash_key(&key));
            ExitCode::SUCCESS
        }
        Command::Plugin(command) => plugin_cli::run(command),
        Command::Engine { config } => node_cli::engine(&config),
        Command::Certs(command) => node_cli::certs(command),
        Command::Up(args) => node_cli::up(&args),
        Command::Regions(command) => regions_cli::run(command),
        Command::Cost(command) => cost_cli::run(command),
        Command::Key(KeyCommand::New) => {
            let key = format!("mk-{}", uuid::Uuid::new_v4().simple());
            println!("key:  {key}\nhash: {}", hash_key(&key));
            ExitCode::SUCCESS
        }
    }
}

fn run_edge(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config.log.level, config.log.format == LogFormat::Json);
    runtime(None, async {
        let server = match Server::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        server
            .run(async {
                shutdown_signal().await;
                info!("shutting down: draining (a second signal stops at once)");
                // An operator who cannot wait out the grace period stops the node with a second
                // signal; what the ledger still holds then is lost, as with SIGKILL.
                tokio::spawn(async {
                    shutdown_signal().await;
                    warn!("second signal: stopping now, without draining");
                    std::process::exit(1);
                });
            })
            .await;
        info!("shut down");
        ExitCode::SUCCESS
    })
}

/// Logs to stderr; `RUST_LOG` wins over the configured level.
fn init_logging(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
}

/// Runs a node's future on a multi-threaded Tokio runtime with `workers` threads (default: one
/// per CPU).
fn runtime(workers: Option<usize>, node: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    match builder.enable_all().build() {
        Ok(rt) => rt.block_on(node),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
