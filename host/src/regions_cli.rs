//! `meridian regions …`: deployment topologies (`regions/*/topology.toml`, format in
//! [`meridian::topology`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use meridian::simulate::{self, InstanceMode, Scenario};
use meridian::topology::Topology;

/// `meridian regions …`.
#[derive(Subcommand)]
pub enum RegionsCommand {
    /// Validate a topology, the node configs it names and the cluster certificates: unknown
    /// names, duplicate names and addresses, missing or foreign certificates, unreachable
    /// references. One line per problem; exit status 1 if there is any.
    Check {
        /// The topology file.
        file: PathBuf,
        /// Check the certificates in this folder instead of the topology's `certs`.
        #[arg(long, value_name = "DIR")]
        certs: Option<PathBuf>,
    },
    /// Route synthetic requests across N regions with the shipped Wasm routers and a
    /// round-robin baseline (no I/O), and print latency, errors, cost and residency per router.
    Simulate {
        /// Requests per router.
        #[arg(long, default_value_t = 1_000_000)]
        requests: usize,
        /// Regions (3: us-east, eu-west, ap-south; more are generated).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
        regions: u64,
        /// Seed: the same seed gives the same report.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Call every Wasm router on a fresh instance, as the edge does (about 4× slower),
        /// instead of one reused instance per router.
        #[arg(long)]
        fresh_instances: bool,
        /// Folder of the router components (default: what scripts/build-plugins built).
        #[arg(long, value_name = "DIR")]
        plugins: Option<PathBuf>,
        /// The conversation scenario instead: multi-turn conversations with long system prompts
        /// over four engines with prefix caches in one region (`--regions` is ignored), comparing
        /// round-robin, the latency router and the prefix router.
        #[arg(long)]
        conversations: bool,
    },
}

/// Runs `meridian regions …`.
pub fn run(command: RegionsCommand) -> ExitCode {
    match command {
        RegionsCommand::Check { file, certs } => check(&file, certs.as_deref()),
        RegionsCommand::Simulate { requests, regions, seed, fresh_instances, plugins, conversations } => {
            let mut scenario = if conversations {
                Scenario::conversations(requests, seed)
            } else {
                Scenario::new(requests, regions as usize, seed)
            };
            if fresh_instances {
                scenario.instances = InstanceMode::Fresh;
            }
            if let Some(dir) = plugins {
                scenario.plugin_dir = dir;
            }
            let started = std::time::Instant::now();
            match simulate::run(&scenario) {
                Ok(report) => {
                    println!("{report}");
                    println!("wall time: {:.1} s", started.elapsed().as_secs_f64());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e} (are the components built? run scripts/build-plugins)");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(file: &Path, certs: Option<&Path>) -> ExitCode {
    let topology = match Topology::load(file) {
        Ok(t) => t,
        Err(e) => {
            println!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let problems = topology.check(certs);
    if problems.is_empty() {
        println!("{}: ok ({})", file.display(), topology.summary());
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        match p.file {
            // Keys of the topology itself are named with its file.
            None => println!("{}: {p}", file.display()),
            Some(_) => println!("{p}"),
        }
    }
    eprintln!("{}: {} problem(s)", file.display(), problems.len());
    ExitCode::FAILURE
}
