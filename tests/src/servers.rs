//! Real servers for end-to-end tests: a `redis-server` and a PostgreSQL (Debian's packages, which
//! `scripts/test` installs), each started on a free loopback port in a directory of its own,
//! awaited by polling until it answers, and stopped when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::TempDir;

/// How long a server may take to answer after it was started.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How often a starting server is asked whether it is ready.
const POLL: Duration = Duration::from_millis(50);
/// Starts on another port when the one picked was taken in between.
const ATTEMPTS: usize = 3;

/// A port nothing listens on right now (the server may still lose it to another process: starts
/// are retried on another).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port is free");
    listener.local_addr().expect("a bound address").port()
}

/// Waits until `ready` says yes, or panics with what the server said if it exits first or takes
/// longer than [`READY_WITHIN`]. Returns false if the server exited (its port may have been
/// taken), true once it is ready.
async fn wait_ready<F, Fut>(child: &mut Child, what: &str, mut ready: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = child.try_wait().expect("the server's status reads") {
            eprintln!("{what} exited while starting: {status}");
            return false;
        }
        if ready().await {
            return true;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what} not ready within {READY_WITHIN:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// Runs a command to its end; panics with its output if it fails.
fn run(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what} cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `redis-server` on loopback, with no persistence, killed when dropped.
pub struct Redis {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Redis {
    /// Starts one and waits until it answers `PING`. Panics if `redis-server` is not installed.
    pub async fn start() -> Redis {
        for _ in 0..ATTEMPTS {
            let dir = TempDir::new("redis");
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("redis-server cannot start ({e}): install it (scripts/test does)"));
            if wait_ready(&mut child, "redis-server", || ping(port)).await {
                return Redis { child, port, _dir: dir };
            }
        }
        panic!("redis-server did not start in {ATTEMPTS} attempts");
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// Whether a Redis server on `port` answers `PING` with `PONG`.
async fn ping(port: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)).await else { return false };
    let mut reply = [0u8; 7];
    conn.write_all(b"PING\r\n").await.is_ok() && conn.read_exact(&mut reply).await.is_ok() && &reply == b"+PONG\r\n"
}

impl Drop for Redis {
    fn drop(&mut self) {
        // Nothing of it is kept: no need for a clean shutdown.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL server on loopback with trust authentication and a database `meridian`, shut
/// down when dropped. As root, it runs as the `postgres` user (PostgreSQL refuses root).
pub struct Postgres {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Postgres {
    /// Makes a cluster in a fresh directory, starts it and creates the database. Panics if
    /// PostgreSQL is not installed.
    pub async fn start() -> Postgres {
        let bin = postgres_bin();
        let user = run_as();
        for _ in 0..ATTEMPTS {
            let dir = TempDir::new("postgres");
            let data = dir.path().join("data");
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("the directory is given to postgres");
            }
            let as_user = |program: &str| {
                let mut c = Command::new(bin.join(program));
                if let Some((uid, gid)) = user {
                    std::os::unix::process::CommandExt::uid(&mut c, uid);
                    std::os::unix::process::CommandExt::gid(&mut c, gid);
                }
                c
            };
            run(as_user("initdb").arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "--no-sync"]), "initdb");
            let port = free_port();
            let mut child = as_user("postgres")
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
                .arg("-k")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("postgres cannot start: {e}"));
            let ready = || {
                let ok = as_user("pg_isready")
                    .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                    .status()
                    .is_ok_and(|s| s.success());
                std::future::ready(ok)
            };
            if wait_ready(&mut child, "postgres", ready).await {
                let server = Postgres { child, port, _dir: dir };
                run(
                    as_user("createdb").args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "-U",
                        "postgres",
                        "meridian",
                    ]),
                    "createdb",
                );
                return server;
            }
        }
        panic!("postgres did not start in {ATTEMPTS} attempts");
    }

    /// `postgres://postgres@127.0.0.1:PORT/meridian`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/meridian", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // A fast shutdown (SIGINT) ends its backends too; a server that does not go in time is
        // killed.
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        for _ in 0..200 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The newest installed PostgreSQL's programs (Debian: `/usr/lib/postgresql/VERSION/bin`).
fn postgres_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").is_file())
        .max_by_key(|(version, _)| *version);
    newest.map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!("PostgreSQL is not installed under {}: install `postgresql` (scripts/test does)", root.display())
    })
}

/// The `postgres` user's uid and gid when running as root (PostgreSQL will not run as root);
/// `None` when not root: the server runs as the current user.
fn run_as() -> Option<(u32, u32)> {
    let out = Command::new("id").arg("-u").output().expect("`id` runs");
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd reads");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("as root, the `postgres` user (made by Debian's postgresql package) runs the server");
    let fields: Vec<&str> = line.split(':').collect();
    let id = |i: usize| fields.get(i).and_then(|f| f.parse().ok()).expect("a numeric id in /etc/passwd");
    Some((id(2), id(3)))
}
