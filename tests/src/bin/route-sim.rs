//! `route-sim`: the routing simulation (`meridian::simulate`) from the command line, until the CLI
//! has `meridian regions simulate`.
//!
//! `route-sim [--requests N] [--regions N] [--seed S] [--fresh-instances] [--plugins DIR]`
//!
//! Defaults: 1,000,000 requests, 3 regions, seed 1, the components `scripts/build-plugins` built.
//! Prints the report's tables, then the wall time. `--fresh-instances` runs every Wasm router
//! call on a fresh instance, as the edge does, instead of one reused instance per router.

use std::path::PathBuf;
use std::time::Instant;

use meridian::simulate::{self, InstanceMode, Scenario};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).map(|i| args.get(i + 1).cloned());
    let number = |flag: &str, default: u64| -> u64 {
        match value(flag) {
            None => default,
            Some(Some(v)) => v.parse().unwrap_or_else(|_| fail(&format!("{flag} takes a number, got {v}"))),
            Some(None) => fail(&format!("{flag} takes a number")),
        }
    };
    for a in &args {
        if a.starts_with("--")
            && !["--requests", "--regions", "--seed", "--fresh-instances", "--plugins"].contains(&a.as_str())
        {
            fail(&format!("unknown option {a}"));
        }
    }
    let regions = number("--regions", 3);
    if regions == 0 {
        fail("--regions must be at least 1");
    }
    let mut scenario = Scenario::new(number("--requests", 1_000_000) as usize, regions as usize, number("--seed", 1));
    if args.iter().any(|a| a == "--fresh-instances") {
        scenario.instances = InstanceMode::Fresh;
    }
    match value("--plugins") {
        Some(Some(dir)) => scenario.plugin_dir = PathBuf::from(dir),
        Some(None) => fail("--plugins takes a directory"),
        None => {}
    }
    let started = Instant::now();
    match simulate::run(&scenario) {
        Ok(report) => {
            println!("{report}");
            println!("wall time: {:.1} s", started.elapsed().as_secs_f64());
        }
        Err(e) => fail(&format!("{e} (are the components built? run scripts/build-plugins)")),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("route-sim: {message}");
    std::process::exit(2);
}
