//! `mock-upstream --listen 127.0.0.1:9100 [--no-record] [--api-key K]`
//!
//! Runs the Meridian mock managed API until killed (Ctrl-C / SIGTERM).

use std::net::SocketAddr;
use std::process::ExitCode;

use meridian_mock::{MockOptions, MockUpstream};

const USAGE: &str = "usage: mock-upstream [--listen ADDR] [--no-record] [--api-key K]";

fn parse_args() -> Result<MockOptions, String> {
    let mut opts = MockOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value =
            |name: &str| inline.clone().or_else(|| args.next()).ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                let addr: SocketAddr = v.parse().map_err(|e| format!("bad --listen {v}: {e}"))?;
                opts.listen = Some(addr);
            }
            "--api-key" => opts.api_key = Some(value("--api-key")?),
            "--no-record" => opts.record = false,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(opts)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mock-upstream: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let mock = match MockUpstream::start_with(opts).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("mock-upstream: cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        };
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {}", mock.addr());
            let _ = out.flush();
        }
        shutdown_signal().await;
        drop(mock);
        ExitCode::SUCCESS
    })
}
