//! `meridian regions …`: deployment topologies (`regions/*/topology.toml`, format in
//! [`meridian::topology`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
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
}

/// Runs `meridian regions …`.
pub fn run(command: RegionsCommand) -> ExitCode {
    match command {
        RegionsCommand::Check { file, certs } => check(&file, certs.as_deref()),
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
