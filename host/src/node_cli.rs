//! `meridian engine`, `meridian certs` and `meridian up`: running an engine node, making the
//! cluster's development certificates, and the one-machine stack (engine + edge) in one process.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use meridian::config::Config;
use meridian::server::Server;
use meridian_engine::certs;
use meridian_engine::node::{Node, NodeConfig};

/// `meridian certs …`.
#[derive(Subcommand)]
pub enum CertsCommand {
    /// Make a development cluster CA (`ca.pem`, `ca.key`).
    Ca {
        /// Folder to write into.
        #[arg(long, default_value = ".meridian/certs")]
        dir: PathBuf,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Make a node certificate signed by the cluster CA in the same folder (`NAME.pem`,
    /// `NAME.key`); it serves both as QUIC server and client identity.
    Node {
        /// The node's name; also its first DNS name.
        name: String,
        /// Folder holding the CA, written into.
        #[arg(long, default_value = ".meridian/certs")]
        dir: PathBuf,
        /// More DNS names for the certificate.
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// IP addresses for the certificate.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
}

/// `meridian up`'s options.
#[derive(Args)]
pub struct UpArgs {
    /// The engine node's config.
    #[arg(long, default_value = "regions/local/engine.toml")]
    engine: PathBuf,
    /// The edge node's config.
    #[arg(long, default_value = "regions/local/edge.toml")]
    edge: PathBuf,
    /// Where the development certificates live (made if missing).
    #[arg(long, default_value = ".meridian/certs")]
    certs: PathBuf,
}

/// Runs `meridian certs`.
pub fn certs(command: CertsCommand) -> ExitCode {
    let result = match command {
        CertsCommand::Ca { dir, force } => certs::write_ca(&dir, force),
        CertsCommand::Node { name, dir, mut dns, ips, force } => {
            dns.insert(0, name.clone());
            certs::write_node(&dir, &name, &dns, &ips, force)
        }
    };
    match result {
        Ok((cert, key)) => {
            println!("wrote {}\nwrote {}", cert.display(), key.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `meridian engine -c FILE`.
pub fn engine(path: &Path) -> ExitCode {
    let config = match NodeConfig::load(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    crate::init_logging(&config.log.level, config.log.format == meridian_engine::node::LogFormat::Json);
    crate::runtime(Some(config.node.io_threads), async move {
        let node = match Node::start(config).await {
            Ok(n) => n,
            Err(e) => return fail(e),
        };
        node.run(crate::shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Runs `meridian up`: development certificates if missing, then the engine node and the edge
/// in this process, until Ctrl-C.
pub fn up(args: &UpArgs) -> ExitCode {
    if let Err(e) = dev_certs(&args.certs) {
        return fail(e);
    }
    let engine = match NodeConfig::load(&args.engine) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let edge = match Config::load(&args.edge) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    crate::init_logging(&edge.log.level, edge.log.format == meridian::config::LogFormat::Json);
    // The engine node's workers: the edge beside it relays what the model's threads compute.
    crate::runtime(Some(engine.node.io_threads), async move {
        let node = match Node::start(engine).await {
            Ok(n) => n,
            Err(e) => return fail(e),
        };
        let server = match Server::bind(edge).await {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        tracing::info!(engine = %node.local_addr(), edge = %server.local_addr(), "meridian up: ready");
        eprintln!(
            "\nmeridian up: ready. Try:\n  curl http://{}/v1/chat/completions -H 'authorization: Bearer sk-meridian-local' \\\n    -H 'content-type: application/json' \\\n    -d '{{\"model\":\"smollm2-135m-instruct\",\"messages\":[{{\"role\":\"user\",\"content\":\"What is the capital of France?\"}}]}}'\n",
            server.local_addr()
        );
        let (stop, stopped) = tokio::sync::watch::channel(());
        let engine = tokio::spawn(node.run({
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.changed().await;
            }
        }));
        server.run(crate::shutdown_signal()).await;
        drop(stop);
        let _ = engine.await;
        ExitCode::SUCCESS
    })
}

/// The local stack's CA and node certificates (`engine-local`, `edge-local`, both valid for
/// localhost), made once.
fn dev_certs(dir: &Path) -> Result<(), certs::CertError> {
    if !dir.join("ca.pem").exists() {
        certs::write_ca(dir, false)?;
    }
    let loopback: [IpAddr; 2] = [[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
    for name in ["engine-local", "edge-local"] {
        if !dir.join(format!("{name}.pem")).exists() {
            certs::write_node(dir, name, &[name.to_string(), "localhost".to_string()], &loopback, false)?;
        }
    }
    Ok(())
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}
