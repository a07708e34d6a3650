//! Engine nodes for end-to-end tests: the real model files (made by `scripts/setup-engine`), real
//! certificates from `meridian_engine::certs`, real QUIC. An engine runs in this process, or as a
//! `meridian engine` child process when a test must kill it the hard way.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian::config::{Config, QuicConfig, RelayConfig, TargetApi, TargetConfig, TargetKind};
use meridian_engine::client::{ClientOptions, EngineClient};
use meridian_engine::node::{Node, NodeConfig};
use meridian_engine::tls::Identity;
use tokio::sync::oneshot;

use crate::TempDir;

/// The chat model the tests serve (int4: fastest on CPU).
pub const CHAT_MODEL: &str = "smollm2-135m-instruct/int4";
/// The embedding model.
pub const EMBED_MODEL: &str = "all-minilm-l6-v2";

/// `$MERIDIAN_HOME`, else the repository's `.meridian`. Fails (never skips) without the models.
pub fn meridian_home() -> PathBuf {
    let home = std::env::var_os("MERIDIAN_HOME")
        .filter(|h| !h.is_empty())
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.meridian"), PathBuf::from);
    assert!(
        home.join("models").join(CHAT_MODEL).is_dir() && home.join("models").join(EMBED_MODEL).is_dir(),
        "the engine tests need the real models under {}/models: run scripts/setup-engine",
        home.display()
    );
    meridian_engine::runtime::set_meridian_home(home.clone());
    home
}

/// A cluster CA with certificates for engines and edges, in a temp dir.
pub struct Cluster {
    dir: TempDir,
}

impl Cluster {
    /// A new CA.
    pub fn new(label: &str) -> Cluster {
        let dir = TempDir::new(label);
        meridian_engine::certs::write_ca(dir.path(), false).expect("CA is written");
        Cluster { dir }
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Makes node `name`'s certificate (valid for `localhost` and 127.0.0.1) once; returns its
    /// (cert, key) paths.
    pub fn node(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = meridian_engine::certs::node_paths(self.dir(), name);
        if !cert.exists() {
            let dns = [name.to_string(), "localhost".to_string()];
            meridian_engine::certs::write_node(self.dir(), name, &dns, &["127.0.0.1".parse().unwrap()], false)
                .expect("node certificate is written");
        }
        (cert, key)
    }

    /// Node `name`'s identity.
    pub fn identity(&self, name: &str) -> Identity {
        let (cert, key) = self.node(name);
        Identity::from_pem_files(&self.dir().join("ca.pem"), &cert, &key).expect("identity loads")
    }

    /// An engine node config for `name` on `listen`, serving the chat model as `smol` and the
    /// embedding model as `minilm`.
    pub fn engine_config(&self, name: &str, listen: SocketAddr, max_batch: u32) -> String {
        self.engine_config_queued(name, listen, max_batch, 64)
    }

    /// [`Cluster::engine_config`] with a scheduler queue of `queue_capacity` requests, beyond
    /// which the engine refuses as overloaded.
    pub fn engine_config_queued(&self, name: &str, listen: SocketAddr, max_batch: u32, queue_capacity: u32) -> String {
        let (cert, key) = self.node(name);
        let models = meridian_home().join("models");
        format!(
            "[node]\nname = \"{name}\"\nlisten = \"{listen}\"\n\
             [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [log]\nlevel = \"warn\"\n\
             [runtime]\nprovider = \"cpu\"\n\
             [scheduler]\nmax_batch = {max_batch}\nqueue_capacity = {queue_capacity}\n\
             [[models]]\nname = \"smol\"\npath = {chat:?}\n\
             [[models]]\nname = \"minilm\"\npath = {embed:?}\n",
            ca = self.dir().join("ca.pem"),
            chat = models.join(CHAT_MODEL),
            embed = models.join(EMBED_MODEL),
        )
    }

    /// Points `config` at this cluster as node `edge_name` and adds engine target `target` at
    /// `addr` (certificate name `engine_name`).
    pub fn add_engine_target(
        &self,
        config: &mut Config,
        edge_name: &str,
        target: &str,
        engine_name: &str,
        addr: SocketAddr,
    ) {
        self.join(config, edge_name);
        let mut tc: TargetConfig = toml::from_str(&format!(
            "api = \"engine\"\nbase_url = \"quic://{addr}\"\nserver_name = \"{engine_name}\"\n\
             kind = \"dedicated\"\nown_infrastructure = true\nprice = {{ per = \"hour\", usd_per_hour = 2.0, capacity = 8 }}\n"
        ))
        .expect("target config parses");
        debug_assert_eq!((tc.api, tc.kind), (TargetApi::Engine, TargetKind::Dedicated));
        tc.first_byte_timeout_ms = 60_000;
        config.targets.insert(target.to_string(), tc);
    }

    /// Gives `config` the cluster identity of node `edge_name`.
    pub fn join(&self, config: &mut Config, edge_name: &str) {
        let (cert, key) = self.node(edge_name);
        config.quic = Some(QuicConfig { ca: self.dir().join("ca.pem"), cert, key });
    }

    /// Makes `config` (node `edge_name`) take relayed requests on a free loopback UDP port, with
    /// hop limit `max_hops`; returns the port's address.
    pub fn accept_relays(&self, config: &mut Config, edge_name: &str, max_hops: u8) -> SocketAddr {
        self.join(config, edge_name);
        let listen = free_udp_addr();
        config.relay = Some(RelayConfig { listen, max_hops, peers: Vec::new() });
        listen
    }

    /// Adds target `target`: the peer edge `peer_name` of `region`, relaying to it at `addr`.
    pub fn add_edge_target(&self, config: &mut Config, target: &str, peer_name: &str, region: &str, addr: SocketAddr) {
        let tc: TargetConfig = toml::from_str(&format!(
            "api = \"edge\"\nkind = \"remote_edge\"\nbase_url = \"quic://{addr}\"\nserver_name = \"{peer_name}\"\n\
             region = \"{region}\"\nconnect_timeout_ms = 2000\nfirst_byte_timeout_ms = 10000\n"
        ))
        .expect("edge target config parses");
        config.targets.insert(target.to_string(), tc);
    }

    /// A QUIC client of the engine at `addr`, as node `client_name`.
    pub fn client(&self, client_name: &str, engine_name: &str, addr: SocketAddr) -> EngineClient {
        EngineClient::new(ClientOptions::new(addr.to_string(), engine_name), &self.identity(client_name))
            .expect("client is built")
    }
}

/// A free loopback UDP port, for a node that must be told its address up front.
pub fn free_udp_addr() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    socket.local_addr().expect("local addr")
}

/// An engine node in this process, until dropped.
pub struct TestEngine {
    /// Its QUIC address.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    node: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl TestEngine {
    /// Starts engine `name` of `cluster` on a loopback port.
    pub async fn start(cluster: &Cluster, name: &str, max_batch: u32) -> TestEngine {
        TestEngine::start_queued(cluster, name, max_batch, 64).await
    }

    /// Starts engine `name` of `cluster` on a loopback port with a scheduler queue of
    /// `queue_capacity` requests (see [`Cluster::engine_config_queued`]).
    pub async fn start_queued(cluster: &Cluster, name: &str, max_batch: u32, queue_capacity: u32) -> TestEngine {
        TestEngine::launch(cluster, name, max_batch, queue_capacity, |_| {}).await
    }

    /// Starts engine `name` of `cluster` on a loopback port that, once it drains
    /// ([`TestEngine::drain`]), lets requests in flight run for up to `grace`.
    pub async fn start_with_grace(cluster: &Cluster, name: &str, max_batch: u32, grace: Duration) -> TestEngine {
        let grace_ms = u64::try_from(grace.as_millis()).expect("a grace period of a sane length");
        TestEngine::launch(cluster, name, max_batch, 64, |c| c.node.shutdown_grace_ms = grace_ms).await
    }

    /// Starts engine `name` of `cluster` on a loopback port with its node config changed by
    /// `tweak` first (its `[telemetry]`, say).
    pub async fn start_with(
        cluster: &Cluster,
        name: &str,
        max_batch: u32,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> TestEngine {
        TestEngine::launch(cluster, name, max_batch, 64, tweak).await
    }

    async fn launch(
        cluster: &Cluster,
        name: &str,
        max_batch: u32,
        queue_capacity: u32,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> TestEngine {
        let dir = TempDir::new(name);
        let path = dir.path().join("engine.toml");
        let listen = "127.0.0.1:0".parse().unwrap();
        std::fs::write(&path, cluster.engine_config_queued(name, listen, max_batch, queue_capacity)).unwrap();
        let mut config = NodeConfig::load(&path).unwrap_or_else(|e| panic!("engine config: {e}"));
        tweak(&mut config);
        let node = Node::start(config).await.unwrap_or_else(|e| panic!("engine starts: {e}"));
        let addr = node.local_addr();
        let (stop, stopped) = oneshot::channel();
        let node = tokio::spawn(node.run(async {
            let _ = stopped.await;
        }));
        TestEngine { addr, stop: Some(stop), node, _dir: dir }
    }

    /// Tells the engine to stop, as SIGTERM does: it drains (takes no new streams, lets requests
    /// in flight finish within its grace period) and then stops.
    pub fn drain(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Whether it has stopped: drained, or never started draining yet when false.
    pub fn stopped(&self) -> bool {
        self.node.is_finished()
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        self.drain();
    }
}

/// A `meridian engine` child process, killed (SIGKILL) when dropped.
pub struct EngineProcess {
    /// Its QUIC address.
    pub addr: SocketAddr,
    child: Child,
    _dir: TempDir,
}

impl EngineProcess {
    /// Starts engine `name` of `cluster` as a process and waits until it answers health checks.
    pub async fn start(cluster: &Cluster, name: &str, max_batch: u32) -> EngineProcess {
        let dir = TempDir::new(name);
        let addr = free_udp_addr();
        let path = dir.path().join("engine.toml");
        std::fs::write(&path, cluster.engine_config(name, addr, max_batch)).unwrap();
        let child = Command::new(crate::netns::meridian_bin())
            .args(["engine", "-c"])
            .arg(&path)
            .env("MERIDIAN_HOME", meridian_home())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("meridian engine starts");
        let process = EngineProcess { addr, child, _dir: dir };
        let client = cluster.client("probe", name, addr);
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.health().await.is_err() {
            assert!(Instant::now() < deadline, "engine {name} did not answer within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        process
    }

    /// Its resident memory now, in KiB: (`VmRSS`, `RssAnon`, `RssFile`). The file-backed part
    /// is mapped pages of the model files and libraries, shared with the page cache; how much of a
    /// file one touched page maps depends on how the kernel cached that file.
    pub fn rss_kib(&self) -> (u64, u64, u64) {
        let pid = self.child.id();
        let field = |name| crate::process::status_kib(pid, name);
        (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
    }

    /// Kills it the hard way: no goodbye reaches its peers.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
