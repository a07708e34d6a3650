//! Network namespaces for multi-region tests: a client namespace joined to one namespace per region
//! by veth pairs, with a one-way delay on each link, engines run as `meridian engine` processes
//! inside the region namespaces, and everything torn down on drop (also when a test panics).
//!
//! The delay: `tc netem` is the obvious tool, but many kernels (minimal VM kernels among them) are
//! built without `sch_netem`, and a test that only runs where netem exists would mostly skip. So
//! each link gets a UDP delay relay instead, running in the client namespace on the link's client
//! address: every datagram (QUIC is UDP) waits the link's one-way delay before it is sent on across
//! the veth, in both directions. Packets still cross real veths between namespaces; a partition is
//! the link itself going down (`ip link set … down`), so the kernel drops them.
//!
//! Needs root and `ip` (iproute2). [`Netns::check`] says why it cannot run.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;

use crate::engine::{meridian_home, Cluster, CHAT_MODEL};
use crate::TempDir;

extern "C" {
    fn setns(fd: i32, nstype: i32) -> i32;
    fn geteuid() -> u32;
}
const CLONE_NEWNET: i32 = 0x4000_0000;

/// One region: its namespace and link from the client namespace.
#[derive(Debug, Clone)]
pub struct Region {
    /// Its name (`us`, `eu`, `ap`).
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// The client namespace's end of the link (the relay listens here).
    pub client_ip: Ipv4Addr,
    /// The region namespace's end of the link (engines listen here).
    pub region_ip: Ipv4Addr,
    /// One-way delay on the link.
    pub delay: Duration,
    /// The client namespace.
    pub client_ns: String,
    /// The link's device name in the client namespace.
    dev: String,
}

impl Region {
    /// Cuts (`false`) or heals (`true`) the link to this region: packets are dropped while down.
    pub fn set_link(&self, up: bool) {
        ip(&["-n", &self.client_ns, "link", "set", &self.dev, if up { "up" } else { "down" }]).expect("link set");
    }
}

/// The namespaces and links; deleted when dropped.
pub struct Netns {
    /// The client namespace (edges and the test's clients run here).
    pub client_ns: String,
    /// The regions, in the order given.
    pub regions: Vec<Region>,
    created: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// Why these tests cannot run here (not root, no `ip`), or `None`.
    pub fn check() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { geteuid() } != 0 {
            return Some("not root: network namespaces need root".into());
        }
        match Command::new("ip").arg("-V").output() {
            Ok(o) if o.status.success() => None,
            _ => Some("`ip` (iproute2) is missing".into()),
        }
    }

    /// Creates the client namespace and one namespace per `(region, one-way delay)`, region `i`
    /// on 10.77.(i+1).0/24 (client end .1, region end .2).
    pub fn create(regions: &[(&str, Duration)]) -> Result<Netns, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let tag = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let client_ns = format!("mer-cli-{tag}");
        let mut net = Netns { client_ns: client_ns.clone(), regions: Vec::new(), created: Vec::new() };
        ip(&["netns", "add", &client_ns])?;
        net.created.push(client_ns.clone());
        ip(&["-n", &client_ns, "link", "set", "lo", "up"])?;
        for (i, (name, delay)) in regions.iter().enumerate() {
            let ns = format!("mer-{name}-{tag}");
            ip(&["netns", "add", &ns])?;
            net.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let dev = format!("to-{name}");
            ip(&["-n", &client_ns, "link", "add", &dev, "type", "veth", "peer", "name", "to-client", "netns", &ns])?;
            let (client_ip, region_ip) = (Ipv4Addr::new(10, 77, i as u8 + 1, 1), Ipv4Addr::new(10, 77, i as u8 + 1, 2));
            ip(&["-n", &client_ns, "addr", "add", &format!("{client_ip}/24"), "dev", &dev])?;
            ip(&["-n", &ns, "addr", "add", &format!("{region_ip}/24"), "dev", "to-client"])?;
            ip(&["-n", &client_ns, "link", "set", &dev, "up"])?;
            ip(&["-n", &ns, "link", "set", "to-client", "up"])?;
            net.regions.push(Region {
                name: name.to_string(),
                ns,
                client_ip,
                region_ip,
                delay: *delay,
                client_ns: client_ns.clone(),
                dev,
            });
        }
        Ok(net)
    }

    /// Runs `body` on a thread inside the client namespace, on a runtime of its own (2 workers):
    /// every socket it and its tasks open is in that namespace. A panic in `body` is re-raised.
    pub fn run_in_client<F, Fut>(&self, body: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let ns = self.client_ns.clone();
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(body());
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Moves the calling thread into namespace `ns` (threads it spawns afterwards are in it too).
fn enter(ns: &str) {
    let file = File::open(Path::new("/var/run/netns").join(ns)).unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
    // SAFETY: a valid namespace fd; only this thread's network namespace changes.
    let rc = unsafe { setns(file.as_raw_fd(), CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth, and with it the pair.
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("netns cleanup: {e}");
            }
        }
    }
}

/// A UDP delay relay on `listen` forwarding to `upstream` (from `local_ip`), each datagram held
/// back `delay` in each direction. Runs until the runtime it was spawned on stops. Errors (a dead
/// engine's ICMP port unreachable, a downed link) drop the datagram, as the network would.
pub async fn spawn_relay(listen: SocketAddr, upstream: SocketAddr, local_ip: IpAddr, delay: Duration) {
    let sock = Arc::new(UdpSocket::bind(listen).await.unwrap_or_else(|e| panic!("relay binds {listen}: {e}")));
    tokio::spawn(async move {
        let mut peers: HashMap<SocketAddr, mpsc::UnboundedSender<(Instant, Vec<u8>)>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, src)) = sock.recv_from(&mut buf).await else { continue };
            let tx = match peers.get(&src) {
                Some(tx) => tx.clone(),
                None => {
                    let Ok(up) = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await else { continue };
                    if up.connect(upstream).await.is_err() {
                        continue;
                    }
                    let up = Arc::new(up);
                    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                    // Forward, delayed (a constant delay keeps the order).
                    let fwd = Arc::clone(&up);
                    tokio::spawn(async move {
                        while let Some((at, data)) = rx.recv().await {
                            tokio::time::sleep_until(at.into()).await;
                            let _ = fwd.send(&data).await;
                        }
                    });
                    // Back, delayed.
                    let (back_tx, mut back_rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                    let back_sock = Arc::clone(&sock);
                    tokio::spawn(async move {
                        while let Some((at, data)) = back_rx.recv().await {
                            tokio::time::sleep_until(at.into()).await;
                            let _ = back_sock.send_to(&data, src).await;
                        }
                    });
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            match up.recv(&mut buf).await {
                                Ok(n) => {
                                    if back_tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                                        return;
                                    }
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                            }
                        }
                    });
                    peers.insert(src, tx.clone());
                    tx
                }
            };
            let _ = tx.send((Instant::now() + delay, buf[..n].to_vec()));
        }
    });
}

/// A TCP delay relay on `listen` forwarding each connection to `upstream` (from `local_ip`),
/// every chunk held back `delay` in each direction (in order): the same link as
/// [`spawn_relay`]'s, for a protocol over TCP. TCP's own handshake crosses it too: the client's
/// `connect` returns at once (the relay accepted it), so the relay reads nothing from it for a
/// round trip (the SYN and the SYN-ACK), as a client 2 × `delay` away could send nothing sooner.
pub async fn spawn_tcp_relay(listen: SocketAddr, upstream: SocketAddr, local_ip: IpAddr, delay: Duration) {
    let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| panic!("TCP relay binds {listen}: {e}"));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The SYN's way there and the SYN-ACK's way back; what the client wrote meanwhile
                // waits in the socket and is read (and held another `delay`) after.
                tokio::time::sleep(2 * delay).await;
                let Ok(socket) = tokio::net::TcpSocket::new_v4() else { return };
                if socket.bind(SocketAddr::new(local_ip, 0)).is_err() {
                    return;
                }
                let Ok(server) = socket.connect(upstream).await else { return };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(delayed_copy(client_read, server_write, delay));
                tokio::spawn(delayed_copy(server_read, client_write, delay));
            });
        }
    });
}

/// Copies `from` to `to`, each chunk sent `delay` after it was read.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at.into()).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A `meridian engine` or `meridian edge` process inside a region's namespace, killed (SIGKILL)
/// when dropped.
pub struct NsNode {
    /// Its node name (certificate name).
    pub name: String,
    command: &'static str,
    config: PathBuf,
    ns: String,
    child: Option<Child>,
    _dir: TempDir,
}

impl NsNode {
    /// Writes engine `name`'s certificate (DNS `name`, IP SANs `ips`) and config (the int4 chat
    /// model as `smol`, on `listen`), and starts it in namespace `ns`. Does not wait for it.
    pub fn engine(cluster: &Cluster, name: &str, ns: &str, listen: SocketAddr, ips: &[IpAddr]) -> NsNode {
        let (cert, key) = NsNode::certificate(cluster, name, ips);
        let text = format!(
            "[node]\nname = \"{name}\"\nlisten = \"{listen}\"\n\
             [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [runtime]\nprovider = \"cpu\"\n\
             [scheduler]\nmax_batch = 2\nqueue_capacity = 64\n\
             [[models]]\nname = \"smol\"\npath = {chat:?}\n",
            ca = cluster.dir().join("ca.pem"),
            chat = meridian_home().join("models").join(CHAT_MODEL),
        );
        NsNode::spawn("engine", name, ns, &text)
    }

    /// Writes edge `name`'s certificate (DNS `name`, IP SANs `ips`) and starts `meridian edge` in
    /// namespace `ns` with `config` (TOML; `[quic]` is added, with this certificate). Does not wait
    /// for it.
    pub fn edge(cluster: &Cluster, name: &str, ns: &str, ips: &[IpAddr], config: &str) -> NsNode {
        let (cert, key) = NsNode::certificate(cluster, name, ips);
        let ca = cluster.dir().join("ca.pem");
        let text = format!("{config}\n[quic]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n");
        NsNode::spawn("edge", name, ns, &text)
    }

    fn certificate(cluster: &Cluster, name: &str, ips: &[IpAddr]) -> (PathBuf, PathBuf) {
        let (cert, key) = meridian_engine::certs::node_paths(cluster.dir(), name);
        if !cert.exists() {
            meridian_engine::certs::write_node(cluster.dir(), name, &[name.to_string()], ips, false)
                .expect("node certificate is written");
        }
        (cert, key)
    }

    fn spawn(command: &'static str, name: &str, ns: &str, text: &str) -> NsNode {
        let dir = TempDir::new(name);
        let config = dir.path().join(format!("{command}.toml"));
        // Every edge of the test runs from the same working directory: each keeps its ledger in
        // its own folder rather than all in `./.meridian`.
        let text = if command == "edge" {
            format!("{text}\n[ledger]\ndir = {:?}\n", dir.path().join("data"))
        } else {
            text.to_string()
        };
        std::fs::write(&config, text).unwrap();
        let mut node = NsNode { name: name.into(), command, config, ns: ns.into(), child: None, _dir: dir };
        node.start();
        node
    }

    /// (Re)starts the process with the same config (so on the same address).
    pub fn start(&mut self) {
        self.kill();
        let log = File::create(self.config.with_extension("log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(meridian_bin())
            .args([self.command, "-c"])
            .arg(&self.config)
            .env("MERIDIAN_HOME", meridian_home())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("ip netns exec meridian {} starts: {e}", self.command));
        self.child = Some(child);
    }

    /// Kills it the hard way: no goodbye reaches its peers. (`ip netns exec` execs the node, so
    /// the child is the node itself.)
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for NsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `meridian` binary next to the test executables (`target/<profile>/meridian`).
pub fn meridian_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // A test executable lives in `target/<profile>/deps/`, a benchmark's next to `meridian`.
    let dir = exe.parent().expect("the executable's folder");
    let bin = [dir, dir.parent().unwrap_or(dir)]
        .iter()
        .map(|d| d.join("meridian"))
        .find(|b| b.exists())
        .unwrap_or_else(|| dir.join("meridian"));
    assert!(bin.exists(), "{} is missing: build it with `cargo build -p meridian`", bin.display());
    bin
}
