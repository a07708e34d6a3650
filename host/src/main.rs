//! The `meridian` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meridian::config::{hash_key, Config, LogFormat};
use meridian::server::Server;
use tracing_subscriber::EnvFilter;

mod plugin_cli;

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
    after_help = "Examples:\n  meridian edge -c regions/local/edge.toml\n  meridian config check regions/local/edge.toml\n  meridian key new\n  meridian plugin new my-router --kind router"
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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let server = match Server::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        server.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

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
