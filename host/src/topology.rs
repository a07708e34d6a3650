//! The deployment topology: which regions exist, and in each its edges, engines and managed
//! targets; where the cluster certificates are; which regions each tenant's data may go to.
//!
//! ```toml
//! certs = "certs"                          # relative to this file: ca.pem, NAME.pem, NAME.key
//!
//! [[regions.eu-west.edges]]
//! name = "edge-eu-west"
//! listen = "127.0.0.1:8082"                # HTTP (the edge config's node.listen)
//! quic = "127.0.0.1:7462"                  # QUIC, for relay from peer edges
//! config = "eu-west/edge.toml"             # the node's own config
//!
//! [[regions.eu-west.engines]]
//! name = "engine-eu-west"
//! quic = "127.0.0.1:7452"
//! models = ["smollm2-135m-instruct"]
//! price = { per = "hour", usd_per_hour = 2.0, capacity = 8 }
//! config = "eu-west/engine.toml"           # optional
//!
//! [[regions.us-east.targets]]              # a managed API, where it runs
//! name = "openai"
//! api = "openai"
//! base_url = "https://api.openai.com/v1"
//! price = { per = "token", input_usd_per_mtok = 0.15, output_usd_per_mtok = 0.60 }
//!
//! [[tenants]]
//! name = "euro-bank"
//! allowed_regions = ["eu-west"]
//! ```
//!
//! Direction: the topology names each node's config file, and the configs are *validated against
//! the topology* ([`Topology::check`], `meridian regions check`): an edge config's region, listen
//! address, cluster identity, relay listener and the peers it takes relays from (`[[relay.peers]]`:
//! edges of the topology, in their regions), engine targets (name and address), peer-edge relay
//! targets (name, address, region, and that the peer has its tenants and models and takes relays
//! from this edge for those tenants), managed targets, the models it routes to engines and its
//! tenants' allowed regions must agree with the topology; an engine config's name, address and models likewise. Node configs are not (yet) derived from it.
//!
//! Parsing and the structural checks ([`Topology::check_structure`]) do no I/O; the file checks
//! (certificates, node configs) read only the files the topology names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::accounting::PriceModel;
use crate::config::{Config, RelayPeer, RelayPolicy, TargetApi, TargetKind};

/// A whole topology file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The cluster certificate folder, as `meridian certs` writes it (`ca.pem`, and `NAME.pem`
    /// with `NAME.key` per node). Relative to the topology file after [`Topology::load`].
    pub certs: PathBuf,
    /// Regions by name.
    #[serde(default)]
    pub regions: BTreeMap<String, Region>,
    /// Tenants and where their data may be processed.
    #[serde(default)]
    pub tenants: Vec<TenantEntry>,
}

/// `[regions.NAME]`: what runs in one region.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Edge nodes.
    #[serde(default)]
    pub edges: Vec<EdgeEntry>,
    /// Engine nodes.
    #[serde(default)]
    pub engines: Vec<EngineEntry>,
    /// Managed APIs that run in this region.
    #[serde(default)]
    pub targets: Vec<ManagedTarget>,
}

/// `[[regions.R.edges]]`: an edge node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeEntry {
    /// The node's name; its certificate is `NAME.pem` in the cert folder.
    pub name: String,
    /// Its HTTP address (the config's `node.listen`).
    pub listen: SocketAddr,
    /// Its QUIC address, where peer edges relay to it.
    pub quic: SocketAddr,
    /// Its edge config file; relative to the topology file after [`Topology::load`].
    pub config: PathBuf,
}

/// `[[regions.R.engines]]`: an engine node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineEntry {
    /// The node's name; edges reach it with `server_name = NAME`.
    pub name: String,
    /// Its QUIC address.
    pub quic: SocketAddr,
    /// The models it serves.
    pub models: Vec<String>,
    /// What it costs.
    pub price: PriceModel,
    /// Its engine config file, if it is managed from here.
    pub config: Option<PathBuf>,
}

/// `[[regions.R.targets]]`: a managed API (or serverless endpoint) reached over HTTPS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedTarget {
    /// The name edge configs use as their `[targets.NAME]` key.
    pub name: String,
    /// `openai` or `anthropic`.
    pub api: TargetApi,
    /// Its base URL (may use `${VAR}` as in edge configs).
    pub base_url: String,
    /// How its capacity is bought.
    #[serde(default)]
    pub kind: TargetKind,
    /// What it costs.
    pub price: PriceModel,
}

/// `[[tenants]]`: a tenant's residency.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantEntry {
    /// The tenant's name, as in edge configs.
    pub name: String,
    /// Regions its data may be processed in; empty means any.
    #[serde(default)]
    pub allowed_regions: Vec<String>,
}

/// One thing wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The node config file the problem is in; `None` for the topology file itself.
    pub file: Option<PathBuf>,
    /// Where in that file: a key such as `regions.eu-west.edges[0].listen` or `node.region`.
    pub place: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        write!(f, "{}: {}", self.place, self.message)
    }
}

fn problem(place: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem { file: None, place: place.into(), message: message.into() }
}

/// A node of the topology, by name.
#[derive(Debug, Clone, Copy)]
enum Node<'a> {
    Edge(&'a EdgeEntry),
    Engine(&'a EngineEntry),
    Target(&'a ManagedTarget),
}

impl Topology {
    /// Parses topology TOML (no I/O; paths are kept as written).
    pub fn parse(text: &str) -> Result<Topology, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads and parses a file, and makes its relative paths relative to the file's folder.
    pub fn load(path: &Path) -> Result<Topology, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut t = Topology::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut t.certs);
        for r in t.regions.values_mut() {
            r.edges.iter_mut().for_each(|e| fix(&mut e.config));
            r.engines.iter_mut().filter_map(|e| e.config.as_mut()).for_each(fix);
        }
        Ok(t)
    }

    /// Every problem found: [`Topology::check_structure`], then the certificates in `certs`
    /// (the topology's own folder when `None`), then the node configs.
    pub fn check(&self, certs: Option<&Path>) -> Vec<Problem> {
        let mut out = self.check_structure();
        out.extend(self.check_certs(certs.unwrap_or(&self.certs)));
        out.extend(self.check_configs());
        out
    }

    /// Checks that need no files: names (valid, unique, known), addresses (unique), prices.
    pub fn check_structure(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut names: HashMap<&str, String> = HashMap::new();
        let mut http: HashMap<SocketAddr, String> = HashMap::new();
        let mut quic: HashMap<SocketAddr, String> = HashMap::new();
        for (region, r) in &self.regions {
            if !valid_name(region) {
                out.push(problem(format!("regions.{region}"), "a region name is letters, digits, `-` and `_`"));
            }
            let places = r
                .edges
                .iter()
                .enumerate()
                .map(|(i, e)| (format!("regions.{region}.edges[{i}]"), &e.name))
                .chain(r.engines.iter().enumerate().map(|(i, e)| (format!("regions.{region}.engines[{i}]"), &e.name)))
                .chain(r.targets.iter().enumerate().map(|(i, t)| (format!("regions.{region}.targets[{i}]"), &t.name)));
            for (place, name) in places {
                if let Err(e) = meridian_engine::certs::check_node_name(name) {
                    out.push(problem(format!("{place}.name"), format!("`{name}` is not a usable node name: {e}")));
                }
                match names.get(name.as_str()) {
                    Some(first) => {
                        out.push(problem(format!("{place}.name"), format!("duplicate name `{name}` (also {first})")))
                    }
                    None => {
                        names.insert(name, place);
                    }
                }
            }
            for (i, e) in r.edges.iter().enumerate() {
                let place = format!("regions.{region}.edges[{i}]");
                claim(&mut out, &mut http, e.listen, &format!("{place}.listen"), "HTTP");
                claim(&mut out, &mut quic, e.quic, &format!("{place}.quic"), "QUIC");
            }
            for (i, e) in r.engines.iter().enumerate() {
                let place = format!("regions.{region}.engines[{i}]");
                claim(&mut out, &mut quic, e.quic, &format!("{place}.quic"), "QUIC");
                if e.models.is_empty() {
                    out.push(problem(format!("{place}.models"), format!("engine `{}` serves no model", e.name)));
                }
                if let Err(m) = e.price.validate() {
                    out.push(problem(format!("{place}.price"), m));
                }
            }
            for (i, t) in r.targets.iter().enumerate() {
                let place = format!("regions.{region}.targets[{i}]");
                if t.api == TargetApi::Engine {
                    out.push(problem(
                        format!("{place}.api"),
                        "engines are listed under [[regions.R.engines]], not as managed targets",
                    ));
                }
                if let Err(m) = t.price.validate() {
                    out.push(problem(format!("{place}.price"), m));
                }
            }
        }
        let mut tenants: HashMap<&str, usize> = HashMap::new();
        for (i, t) in self.tenants.iter().enumerate() {
            if let Some(first) = tenants.insert(&t.name, i) {
                out.push(problem(
                    format!("tenants[{i}].name"),
                    format!("duplicate tenant `{}` (also tenants[{first}])", t.name),
                ));
            }
            for (j, region) in t.allowed_regions.iter().enumerate() {
                if !self.regions.contains_key(region) {
                    out.push(problem(
                        format!("tenants[{i}].allowed_regions[{j}]"),
                        format!("unknown region `{region}` for tenant `{}` (known: {})", t.name, self.region_list()),
                    ));
                }
            }
        }
        out
    }

    /// Checks the certificate folder: the CA, and for every edge and engine `NAME.pem` and
    /// `NAME.key` that belong together, were signed by that CA and carry the node's name.
    pub fn check_certs(&self, dir: &Path) -> Vec<Problem> {
        let (ca_path, _) = meridian_engine::certs::ca_paths(dir);
        let place = "certs";
        if !dir.is_dir() {
            return vec![problem(
                place,
                format!("missing certificate folder {} (make it with `meridian certs ca --dir {0}`)", dir.display()),
            )];
        }
        let ca = match read_cert(&ca_path) {
            Ok(c) => c,
            Err(m) => {
                return vec![problem(
                    place,
                    format!("missing cluster CA: {m} (make it with `meridian certs ca --dir {}`)", dir.display()),
                )]
            }
        };
        let mut out = Vec::new();
        for (place, name) in
            self.nodes().filter(|(_, _, n)| !matches!(n, Node::Target(_))).map(|(p, _, n)| (p, n.name()))
        {
            let (cert, key) = meridian_engine::certs::node_paths(dir, name);
            let missing: Vec<_> = [&cert, &key].into_iter().filter(|p| !p.is_file()).collect();
            if !missing.is_empty() {
                let files: Vec<_> = missing.iter().map(|p| p.display().to_string()).collect();
                out.push(problem(
                    place,
                    format!(
                        "missing certificate for `{name}`: no {} (make it with `meridian certs node {name} --dir {}`)",
                        files.join(" or "),
                        dir.display()
                    ),
                ));
                continue;
            }
            if let Err(e) = meridian_engine::tls::Identity::from_pem_files(&ca_path, &cert, &key) {
                out.push(problem(place, format!("bad certificate for `{name}`: {e}")));
                continue;
            }
            let verified = read_cert(&cert).and_then(|leaf| verify_signed(&ca, &leaf, name));
            if let Err(m) = verified {
                out.push(problem(
                    place,
                    format!("certificate {} of `{name}`: {m} ({})", cert.display(), ca_path.display()),
                ));
            }
        }
        out
    }

    /// Loads every node config the topology names and checks it against the topology.
    pub fn check_configs(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        for (region, r) in &self.regions {
            for (i, e) in r.edges.iter().enumerate() {
                let place = format!("regions.{region}.edges[{i}].config");
                if !e.config.is_file() {
                    out.push(problem(place, format!("unreachable: config file {} does not exist", e.config.display())));
                    continue;
                }
                match Config::load(&e.config) {
                    Ok(c) => out.extend(self.check_edge_config(region, e, &c)),
                    Err(err) => out.push(problem(place, format!("cannot load the edge config: {err}"))),
                }
            }
            for (i, e) in r.engines.iter().enumerate() {
                let Some(path) = &e.config else { continue };
                let place = format!("regions.{region}.engines[{i}].config");
                if !path.is_file() {
                    out.push(problem(place, format!("unreachable: config file {} does not exist", path.display())));
                    continue;
                }
                match meridian_engine::node::NodeConfig::load(path) {
                    Ok(c) => out.extend(self.check_engine_config(region, e, path, &c)),
                    Err(err) => out.push(problem(place, format!("cannot load the engine config: {err}"))),
                }
            }
        }
        out
    }

    /// Checks an edge's loaded config against the topology that lists it in `region`.
    pub fn check_edge_config(&self, region: &str, edge: &EdgeEntry, c: &Config) -> Vec<Problem> {
        let at = |key: &str| key.to_string();
        let mut out = Vec::new();
        let own = &c.node.region;
        if !self.regions.contains_key(own) {
            out.push(problem(
                at("node.region"),
                format!("unknown region `{own}`: it is not in the topology (known: {})", self.region_list()),
            ));
        } else if own != region {
            out.push(problem(
                at("node.region"),
                format!("is `{own}`, but the topology lists `{}` in region `{region}`", edge.name),
            ));
        }
        if !same_bind(c.node.listen, edge.listen) {
            out.push(problem(
                at("node.listen"),
                format!("is {}, but the topology says `{}` listens on {}", c.node.listen, edge.name, edge.listen),
            ));
        }
        match &c.quic {
            None => out.push(problem(
                at("quic"),
                format!("missing: edge `{}` needs its cluster identity ({}.pem, {0}.key)", edge.name, edge.name),
            )),
            Some(q) => out.extend(identity_names(&edge.name, &q.cert, &q.key, &at("quic"))),
        }
        for (i, t) in c.tenants.iter().enumerate() {
            for (j, r) in t.allowed_regions.iter().enumerate() {
                if !self.regions.contains_key(r) {
                    out.push(problem(
                        at(&format!("tenants[{i}].allowed_regions[{j}]")),
                        format!("unknown region `{r}` for tenant `{}` (known: {})", t.name, self.region_list()),
                    ));
                }
            }
            if let Some(entry) = self.tenants.iter().find(|e| e.name == t.name) {
                let a: BTreeSet<_> = t.allowed_regions.iter().collect();
                let b: BTreeSet<_> = entry.allowed_regions.iter().collect();
                if a != b {
                    out.push(problem(
                        at(&format!("tenants[{i}].allowed_regions")),
                        format!(
                            "[{}] differs from the topology's [{}] for tenant `{}`",
                            join(&t.allowed_regions),
                            join(&entry.allowed_regions),
                            t.name
                        ),
                    ));
                }
            }
        }
        if let Some(r) = &c.relay {
            if !same_bind(r.listen, edge.quic) {
                out.push(problem(
                    at("relay.listen"),
                    format!(
                        "is {}, but the topology says peer edges relay to `{}` at {}",
                        r.listen, edge.name, edge.quic
                    ),
                ));
            }
            out.extend(self.check_relay_peers(&r.peers));
        }
        // Config target key -> the engine it reaches, for the model routes below.
        let mut engines: HashMap<&str, &EngineEntry> = HashMap::new();
        // Config target key -> the peer edge it relays to, and that edge's config if it loads.
        let mut peers: HashMap<&str, (&EdgeEntry, Option<Config>)> = HashMap::new();
        for (key, t) in &c.targets {
            let place = at(&format!("targets.{key}"));
            if !t.api.is_quic() {
                match self.find(key) {
                    Some((p, target_region, Node::Target(_))) => {
                        if let Some(r) = t.region.as_ref().filter(|r| *r != target_region) {
                            out.push(problem(
                                format!("{place}.region"),
                                format!("is `{r}`, but the topology lists `{key}` in region `{target_region}` ({p})"),
                            ));
                        }
                    }
                    Some((p, _, _)) => out.push(problem(
                        place,
                        format!("`{key}` is a managed target here but a node in the topology ({p})"),
                    )),
                    None => out.push(problem(
                        place,
                        format!(
                            "unknown target `{key}`: no managed target of that name in the topology (known: {})",
                            self.list(|n| matches!(n, Node::Target(_)))
                        ),
                    )),
                }
                continue;
            }
            let url = match c.target_env(key) {
                Ok(env) => env.base_url,
                Err(e) => {
                    out.push(problem(place, e.to_string()));
                    continue;
                }
            };
            let Some((host, port)) = host_port(&url) else {
                out.push(problem(format!("{place}.base_url"), format!("cannot read host and port of `{url}`")));
                continue;
            };
            let name = t.server_name.clone().unwrap_or_else(|| host.clone());
            let addr_ok = |listed: SocketAddr| match host.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, port) == listed,
                Err(_) => port == listed.port(),
            };
            if t.api == TargetApi::Edge {
                let (p, peer_region, peer) = match self.find(&name) {
                    Some((p, r, Node::Edge(peer))) => (p, r, peer),
                    found => {
                        let what = match found {
                            Some((p, _, n)) => {
                                let kind = if matches!(n, Node::Engine(_)) { "an engine" } else { "a managed target" };
                                format!("`{name}` is {kind} ({p}), not an edge")
                            }
                            None => format!("edge `{name}` is in no region of the topology"),
                        };
                        out.push(problem(
                            place,
                            format!("unreachable: {what} (edges: {})", self.list(|n| matches!(n, Node::Edge(_)))),
                        ));
                        continue;
                    }
                };
                if peer_region == region {
                    out.push(problem(
                        place,
                        format!("edge `{name}` is in this edge's own region `{region}`: relay is between regions"),
                    ));
                    continue;
                }
                if !addr_ok(peer.quic) {
                    out.push(problem(
                        format!("{place}.base_url"),
                        format!("is {url}, but edge `{name}` takes relayed requests at quic://{} ({p})", peer.quic),
                    ));
                }
                if let Some(r) = t.region.as_ref().filter(|r| *r != peer_region) {
                    out.push(problem(
                        format!("{place}.region"),
                        format!("is `{r}`, but edge `{name}` is in region `{peer_region}`"),
                    ));
                }
                // The peer's own config problems are reported when it is checked; here only
                // what makes this edge's relays fail there.
                let peer_config = Config::load(&peer.config).ok();
                if let Some(pc) = &peer_config {
                    if pc.relay.is_none() {
                        out.push(problem(
                            place.clone(),
                            format!(
                                "unreachable: edge `{name}` accepts no relayed requests: its config {} has no [relay] section (listen = \"{}\")",
                                peer.config.display(),
                                peer.quic
                            ),
                        ));
                    }
                    out.extend(peer_acceptance(&place, &edge.name, c, peer, pc));
                }
                peers.insert(key, (peer, peer_config));
                continue;
            }
            let Some((p, engine_region, Node::Engine(engine))) = self.find(&name) else {
                out.push(problem(
                    place,
                    format!(
                        "unreachable: engine `{name}` is in no region of the topology (engines: {})",
                        self.list(|n| matches!(n, Node::Engine(_)))
                    ),
                ));
                continue;
            };
            engines.insert(key, engine);
            if !addr_ok(engine.quic) {
                out.push(problem(
                    format!("{place}.base_url"),
                    format!("is {url}, but engine `{name}` is at quic://{} ({p})", engine.quic),
                ));
            }
            if let Some(r) = &t.region {
                if r != engine_region {
                    out.push(problem(
                        format!("{place}.region"),
                        format!("is `{r}`, but engine `{name}` is in region `{engine_region}`"),
                    ));
                }
            }
        }
        for (i, m) in c.models.iter().enumerate() {
            for (j, route) in m.targets.iter().enumerate() {
                let model = route.model.as_deref().unwrap_or(&m.name);
                if let Some((peer, Some(pc))) = peers.get(route.target.as_str()) {
                    if !pc.models.iter().any(|x| x.name == model) {
                        out.push(problem(
                            at(&format!("models[{i}].targets[{j}]")),
                            format!(
                                "relays model `{model}` to edge `{}`, which has no such model ({})",
                                peer.name,
                                peer.config.display()
                            ),
                        ));
                    }
                    continue;
                }
                let Some(engine) = engines.get(route.target.as_str()) else { continue };
                if !engine.models.iter().any(|x| x == model) {
                    out.push(problem(
                        at(&format!("models[{i}].targets[{j}]")),
                        format!(
                            "routes model `{model}` to engine `{}`, which does not serve it (it serves: {})",
                            engine.name,
                            join(&engine.models)
                        ),
                    ));
                }
            }
        }
        for p in &mut out {
            p.file = Some(edge.config.clone());
        }
        out
    }

    /// Checks an edge's `[[relay.peers]]`: each names an edge of the topology (an engine or a
    /// managed target never relays) and gives that edge's region, which its relays come from.
    fn check_relay_peers(&self, peers: &[RelayPeer]) -> Vec<Problem> {
        let mut out = Vec::new();
        for (i, p) in peers.iter().enumerate() {
            let place = format!("relay.peers[{i}]");
            match self.find(&p.name) {
                Some((at, region, Node::Edge(_))) => {
                    if p.region != region {
                        out.push(problem(
                            format!("{place}.region"),
                            format!("is `{}`, but edge `{}` is in region `{region}` ({at})", p.region, p.name),
                        ));
                    }
                }
                found => {
                    let what = match found {
                        Some((at, _, n)) => {
                            let kind = if matches!(n, Node::Engine(_)) { "an engine" } else { "a managed target" };
                            format!("`{}` is {kind} ({at}), not an edge: only edges relay", p.name)
                        }
                        None => format!("edge `{}` is in no region of the topology", p.name),
                    };
                    out.push(problem(
                        format!("{place}.name"),
                        format!("{what} (edges: {})", self.list(|n| matches!(n, Node::Edge(_)))),
                    ));
                }
            }
        }
        out
    }

    /// Checks an engine's loaded config (from `path`) against the topology.
    pub fn check_engine_config(
        &self,
        region: &str,
        engine: &EngineEntry,
        path: &Path,
        c: &meridian_engine::node::NodeConfig,
    ) -> Vec<Problem> {
        let _ = region;
        let at = |key: &str| key.to_string();
        let mut out = Vec::new();
        if c.node.name != engine.name {
            out.push(problem(
                at("node.name"),
                format!("is `{}`, but the topology names this engine `{}`", c.node.name, engine.name),
            ));
        }
        if !same_bind(c.node.listen, engine.quic) {
            out.push(problem(
                at("node.listen"),
                format!("is {}, but the topology says `{}` is at {}", c.node.listen, engine.name, engine.quic),
            ));
        }
        out.extend(identity_names(&engine.name, &c.tls.cert, &c.tls.key, &at("tls")));
        let served: BTreeSet<&str> = c.models.iter().map(|m| m.name.as_str()).collect();
        let listed: BTreeSet<&str> = engine.models.iter().map(String::as_str).collect();
        for m in listed.difference(&served) {
            out.push(problem(
                at("models"),
                format!("the topology says `{}` serves `{m}`, but this config has no such model", engine.name),
            ));
        }
        for m in served.difference(&listed) {
            out.push(problem(
                at("models"),
                format!("serves `{m}`, which the topology does not list for `{}`", engine.name),
            ));
        }
        for p in &mut out {
            p.file = Some(path.to_owned());
        }
        out
    }

    /// A one-line summary for `regions check`.
    pub fn summary(&self) -> String {
        let count = |f: fn(&Region) -> usize| self.regions.values().map(f).sum::<usize>();
        format!(
            "{} regions ({}), {} edges, {} engines, {} managed targets, {} tenants",
            self.regions.len(),
            self.region_list(),
            count(|r| r.edges.len()),
            count(|r| r.engines.len()),
            count(|r| r.targets.len()),
            self.tenants.len()
        )
    }

    /// Every edge, engine and managed target: (place, region, node), in file order.
    fn nodes(&self) -> impl Iterator<Item = (String, &str, Node<'_>)> {
        self.regions.iter().flat_map(|(region, r)| {
            let edges =
                r.edges.iter().enumerate().map(move |(i, e)| (format!("regions.{region}.edges[{i}]"), Node::Edge(e)));
            let engines = r
                .engines
                .iter()
                .enumerate()
                .map(move |(i, e)| (format!("regions.{region}.engines[{i}]"), Node::Engine(e)));
            let targets = r
                .targets
                .iter()
                .enumerate()
                .map(move |(i, t)| (format!("regions.{region}.targets[{i}]"), Node::Target(t)));
            edges.chain(engines).chain(targets).map(move |(p, n)| (p, region.as_str(), n))
        })
    }

    fn find(&self, name: &str) -> Option<(String, &str, Node<'_>)> {
        self.nodes().find(|(_, _, n)| n.name() == name)
    }

    fn list(&self, keep: fn(&Node<'_>) -> bool) -> String {
        let names: Vec<_> = self.nodes().filter(|(_, _, n)| keep(n)).map(|(_, _, n)| n.name().to_string()).collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    fn region_list(&self) -> String {
        if self.regions.is_empty() {
            "none".into()
        } else {
            self.regions.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }
}

impl<'a> Node<'a> {
    fn name(&self) -> &'a str {
        match self {
            Node::Edge(e) => &e.name,
            Node::Engine(e) => &e.name,
            Node::Target(t) => &t.name,
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

fn join(items: &[String]) -> String {
    items.join(", ")
}

/// Records `addr` for `place`, or a problem if another place has it.
fn claim(out: &mut Vec<Problem>, seen: &mut HashMap<SocketAddr, String>, addr: SocketAddr, place: &str, what: &str) {
    match seen.get(&addr) {
        Some(first) => out.push(problem(place, format!("duplicate {what} address {addr} (also {first})"))),
        None => {
            seen.insert(addr, place.to_string());
        }
    }
}

/// A node binds `bound`; the topology says it is reached at `listed`: the same address, or the
/// same port on an unspecified address (0.0.0.0 / ::).
fn same_bind(bound: SocketAddr, listed: SocketAddr) -> bool {
    bound == listed || (bound.ip().is_unspecified() && bound.port() == listed.port())
}

/// The node's config must use the node's own files from the cert folder (`NAME.pem`, `NAME.key`).
fn identity_names(name: &str, cert: &Path, key: &Path, place: &str) -> Vec<Problem> {
    let mut out = Vec::new();
    for (path, want, field) in [(cert, format!("{name}.pem"), "cert"), (key, format!("{name}.key"), "key")] {
        if path.file_name().and_then(|f| f.to_str()) != Some(want.as_str()) {
            out.push(problem(
                format!("{place}.{field}"),
                format!("is {}, but node `{name}`'s file is {want}", path.display()),
            ));
        }
    }
    out
}

/// What makes edge `sender` (config `c`) relaying to `peer` (config `pc`) fail there, reported on
/// the sender's target `place`: each tenant the sender may relay must be a tenant of the peer and,
/// when the peer takes relays (a missing `[relay]` is reported on its own), one its
/// `[[relay.peers]]` entry for the sender accepts.
fn peer_acceptance(place: &str, sender: &str, c: &Config, peer: &EdgeEntry, pc: &Config) -> Vec<Problem> {
    let file = peer.config.display();
    let mut out = Vec::new();
    let entry = pc.relay.as_ref().and_then(|r| r.peers.iter().enumerate().find(|(_, p)| p.name == sender));
    if pc.relay.is_some() && entry.is_none() {
        out.push(problem(
            place,
            format!(
                "edge `{}` refuses every request this edge relays: its config {file} lists no `[[relay.peers]]` named `{sender}`",
                peer.name
            ),
        ));
    }
    for tenant in c.tenants.iter().filter(|x| x.relay != RelayPolicy::Never) {
        let t = &tenant.name;
        let why = match entry {
            _ if !pc.tenants.iter().any(|x| x.name == *t) => {
                format!("edge `{}` has no tenant `{t}` ({file})", peer.name)
            }
            Some((k, e)) if !e.tenants.contains(t) => format!(
                "edge `{}` takes no relays of tenant `{t}` from `{sender}` ({file}: relay.peers[{k}].tenants)",
                peer.name
            ),
            _ => continue,
        };
        out.push(problem(
            place,
            format!(
                "{why}, so it refuses that tenant's relayed requests; add it there or set its `relay = \"never\"` here"
            ),
        ));
    }
    out
}

/// `quic://host:port` -> (host without brackets, port).
fn host_port(url: &str) -> Option<(String, u16)> {
    let uri: hyper::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_string();
    Some((host, uri.port_u16()?))
}

fn read_cert(path: &Path) -> Result<rustls_pki_types::CertificateDer<'static>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Checks that `leaf` chains to `ca` and carries `name` as a DNS name (as `meridian certs node
/// NAME` makes it).
fn verify_signed(
    ca: &rustls_pki_types::CertificateDer<'static>,
    leaf: &rustls_pki_types::CertificateDer<'static>,
    name: &str,
) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| format!("the CA certificate is unusable: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?;
    let server_name = rustls_pki_types::ServerName::try_from(name.to_string()).map_err(|e| format!("`{name}`: {e}"))?;
    verifier.verify_server_cert(leaf, &[], &server_name, &[], rustls_pki_types::UnixTime::now()).map(|_| ()).map_err(
        |e| match e {
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            | rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature) => {
                "not signed by the cluster CA".to_string()
            }
            other => other.to_string(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_engine::certs;

    const TOPOLOGY: &str = r#"
        certs = "certs"

        [[regions.eu-west.edges]]
        name = "edge-eu"
        listen = "127.0.0.1:8082"
        quic = "127.0.0.1:7462"
        config = "eu/edge.toml"

        [[regions.eu-west.engines]]
        name = "engine-eu"
        quic = "127.0.0.1:7452"
        models = ["m"]
        price = { per = "hour", usd_per_hour = 2.0, capacity = 8 }
        config = "eu/engine.toml"

        [[regions.us-east.targets]]
        name = "openai"
        api = "openai"
        base_url = "https://api.openai.com/v1"
        price = { per = "token", input_usd_per_mtok = 0.15, output_usd_per_mtok = 0.6 }

        [[tenants]]
        name = "acme"
        allowed_regions = ["eu-west"]
    "#;

    const EDGE: &str = r#"
        [node]
        listen = "127.0.0.1:8082"
        region = "eu-west"
        [[tenants]]
        name = "acme"
        keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
        allowed_regions = ["eu-west"]
        [quic]
        ca = "../certs/ca.pem"
        cert = "../certs/edge-eu.pem"
        key = "../certs/edge-eu.key"
        [targets.eu-engine]
        api = "engine"
        base_url = "quic://127.0.0.1:7452"
        server_name = "engine-eu"
        region = "eu-west"
        [targets.openai]
        api = "openai"
        base_url = "https://api.openai.com/v1"
        [[models]]
        name = "m"
        targets = [{ target = "eu-engine" }, { target = "openai", model = "gpt-4o-mini" }]
    "#;

    const ENGINE: &str = r#"
        [node]
        name = "engine-eu"
        listen = "0.0.0.0:7452"
        [tls]
        ca = "../certs/ca.pem"
        cert = "../certs/engine-eu.pem"
        key = "../certs/engine-eu.key"
        [[models]]
        name = "m"
        path = "models/m"
    "#;

    fn structure(text: &str) -> Vec<String> {
        Topology::parse(text).unwrap().check_structure().iter().map(Problem::to_string).collect()
    }

    fn tmp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let d = std::env::temp_dir().join(format!("meridian-topology-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Certificates for `names` signed by a fresh CA in `dir`.
    fn make_certs<'a>(dir: &Path, names: impl IntoIterator<Item = &'a str>) {
        certs::write_ca(dir, false).unwrap();
        for name in names {
            certs::write_node(dir, name, &[name.to_string()], &[], false).unwrap();
        }
    }

    /// The fixture written out with its certificates: (folder, topology file).
    fn deployment(tag: &str, edge: &str, engine: &str) -> (PathBuf, PathBuf) {
        let dir = tmp_dir(tag);
        std::fs::create_dir_all(dir.join("eu")).unwrap();
        std::fs::write(dir.join("topology.toml"), TOPOLOGY).unwrap();
        std::fs::write(dir.join("eu/edge.toml"), edge).unwrap();
        std::fs::write(dir.join("eu/engine.toml"), engine).unwrap();
        make_certs(&dir.join("certs"), ["edge-eu", "engine-eu"]);
        (dir.clone(), dir.join("topology.toml"))
    }

    fn check(path: &Path) -> Vec<String> {
        Topology::load(path).unwrap().check(None).iter().map(Problem::to_string).collect()
    }

    #[test]
    fn a_consistent_deployment_has_no_problems() {
        assert_eq!(structure(TOPOLOGY), Vec::<String>::new());
        let (dir, path) = deployment("ok", EDGE, ENGINE);
        assert_eq!(check(&path), Vec::<String>::new());
        let t = Topology::load(&path).unwrap();
        assert_eq!(t.summary(), "2 regions (eu-west, us-east), 1 edges, 1 engines, 1 managed targets, 1 tenants");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_tenant_region() {
        assert_eq!(
            structure(
                &TOPOLOGY.replace(r#"allowed_regions = ["eu-west"]"#, r#"allowed_regions = ["eu-west", "mars"]"#)
            ),
            ["tenants[0].allowed_regions[1]: unknown region `mars` for tenant `acme` (known: eu-west, us-east)"]
        );
    }

    #[test]
    fn duplicate_addresses() {
        let same_quic = TOPOLOGY.replace(r#"quic = "127.0.0.1:7452""#, r#"quic = "127.0.0.1:7462""#);
        assert_eq!(
            structure(&same_quic),
            ["regions.eu-west.engines[0].quic: duplicate QUIC address 127.0.0.1:7462 (also regions.eu-west.edges[0].quic)"]
        );
        let second_edge = format!(
            "{TOPOLOGY}\n[[regions.us-east.edges]]\nname = \"edge-us\"\nlisten = \"127.0.0.1:8082\"\nquic = \"127.0.0.1:7461\"\nconfig = \"us/edge.toml\"\n"
        );
        assert_eq!(
            structure(&second_edge),
            ["regions.us-east.edges[0].listen: duplicate HTTP address 127.0.0.1:8082 (also regions.eu-west.edges[0].listen)"]
        );
    }

    #[test]
    fn duplicate_names() {
        assert_eq!(
            structure(&TOPOLOGY.replace(r#"name = "openai""#, r#"name = "engine-eu""#)),
            ["regions.us-east.targets[0].name: duplicate name `engine-eu` (also regions.eu-west.engines[0])"]
        );
        let twice = format!("{TOPOLOGY}\n[[tenants]]\nname = \"acme\"\n");
        assert_eq!(structure(&twice), ["tenants[1].name: duplicate tenant `acme` (also tenants[0])"]);
    }

    #[test]
    fn missing_certificate() {
        let (dir, path) = deployment("missing-cert", EDGE, ENGINE);
        std::fs::remove_file(dir.join("certs/engine-eu.key")).unwrap();
        let key = dir.join("certs/engine-eu.key");
        assert_eq!(
            check(&path),
            [format!(
                "regions.eu-west.engines[0]: missing certificate for `engine-eu`: no {} (make it with `meridian certs node engine-eu --dir {}`)",
                key.display(),
                dir.join("certs").display()
            )]
        );
        std::fs::remove_dir_all(dir.join("certs")).unwrap();
        let problems = check(&path);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("certs: missing certificate folder"), "{problems:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn certificate_not_signed_by_the_cluster_ca() {
        let (dir, path) = deployment("foreign-cert", EDGE, ENGINE);
        let other = dir.join("other");
        make_certs(&other, ["edge-eu"]);
        for file in ["edge-eu.pem", "edge-eu.key"] {
            std::fs::copy(other.join(file), dir.join("certs").join(file)).unwrap();
        }
        let problems = check(&path);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0],
            format!(
                "regions.eu-west.edges[0]: certificate {} of `edge-eu`: not signed by the cluster CA ({})",
                dir.join("certs/edge-eu.pem").display(),
                dir.join("certs/ca.pem").display()
            )
        );
        // `--certs` points the check elsewhere: a folder made for the same names passes.
        let fresh = dir.join("fresh");
        make_certs(&fresh, ["edge-eu", "engine-eu"]);
        assert_eq!(Topology::load(&path).unwrap().check(Some(&fresh)), vec![]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn node_config_in_an_unknown_region() {
        let (dir, path) =
            deployment("region", &EDGE.replacen(r#"region = "eu-west""#, r#"region = "mars""#, 1), ENGINE);
        assert_eq!(
            check(&path),
            [format!(
                "{}: node.region: unknown region `mars`: it is not in the topology (known: eu-west, us-east)",
                dir.join("eu/edge.toml").display()
            )]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unreachable_config_file() {
        let (dir, path) = deployment("no-config", EDGE, ENGINE);
        std::fs::remove_file(dir.join("eu/engine.toml")).unwrap();
        assert_eq!(
            check(&path),
            [format!(
                "regions.eu-west.engines[0].config: unreachable: config file {} does not exist",
                dir.join("eu/engine.toml").display()
            )]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn edge_refers_to_an_engine_in_no_region() {
        let (dir, path) =
            deployment("engine", &EDGE.replace(r#"server_name = "engine-eu""#, r#"server_name = "engine-ap""#), ENGINE);
        assert_eq!(
            check(&path),
            [format!(
                "{}: targets.eu-engine: unreachable: engine `engine-ap` is in no region of the topology (engines: engine-eu)",
                dir.join("eu/edge.toml").display()
            )]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn model_routes_to_unknown_targets_or_models() {
        let edge = EDGE
            .replace("[targets.openai]", "[targets.mistral]")
            .replace(r#"target = "openai""#, r#"target = "mistral""#);
        let edge = format!("{edge}\n[targets.openai]\napi = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\nregion = \"eu-west\"\n");
        let edge = edge
            .replace(r#"targets = [{ target = "eu-engine" }"#, r#"targets = [{ target = "eu-engine", model = "m2" }"#);
        let (dir, path) = deployment("routes", &edge, ENGINE);
        let file = dir.join("eu/edge.toml");
        assert_eq!(
            check(&path),
            [
                format!(
                    "{}: targets.mistral: unknown target `mistral`: no managed target of that name in the topology (known: openai)",
                    file.display()
                ),
                format!(
                    "{}: targets.openai.region: is `eu-west`, but the topology lists `openai` in region `us-east` (regions.us-east.targets[0])",
                    file.display()
                ),
                format!(
                    "{}: models[0].targets[0]: routes model `m2` to engine `engine-eu`, which does not serve it (it serves: m)",
                    file.display()
                ),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn node_configs_disagreeing_with_the_topology() {
        let edge = EDGE.replace("quic://127.0.0.1:7452", "quic://127.0.0.1:7453").replace("8082", "8083");
        let engine = ENGINE.replace(r#"name = "m""#, r#"name = "m3""#).replace("engine-eu.key", "edge-eu.key");
        let (dir, path) = deployment("disagree", &edge, &engine);
        let (e, g) = (dir.join("eu/edge.toml"), dir.join("eu/engine.toml"));
        let (e, g) = (e.display(), g.display());
        assert_eq!(
            check(&path),
            [
                format!("{e}: node.listen: is 127.0.0.1:8083, but the topology says `edge-eu` listens on 127.0.0.1:8082"),
                format!("{e}: targets.eu-engine.base_url: is quic://127.0.0.1:7453, but engine `engine-eu` is at quic://127.0.0.1:7452 (regions.eu-west.engines[0])"),
                format!("{g}: tls.key: is {}, but node `engine-eu`'s file is engine-eu.key", dir.join("eu/../certs/edge-eu.key").display()),
                format!("{g}: models: the topology says `engine-eu` serves `m`, but this config has no such model"),
                format!("{g}: models: serves `m3`, which the topology does not list for `engine-eu`"),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A second region with an edge, for relay between `edge-eu` and `edge-us`.
    const US_EDGE_ENTRY: &str = r#"
        [[regions.us-east.edges]]
        name = "edge-us"
        listen = "127.0.0.1:8081"
        quic = "127.0.0.1:7461"
        config = "us/edge.toml"
    "#;

    /// `edge-us`'s config, without a relay listener.
    const US_EDGE: &str = r#"
        [node]
        listen = "127.0.0.1:8081"
        region = "us-east"
        [[tenants]]
        name = "acme"
        keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
        allowed_regions = ["eu-west"]
        [quic]
        ca = "../certs/ca.pem"
        cert = "../certs/edge-us.pem"
        key = "../certs/edge-us.key"
        [targets.openai]
        api = "openai"
        base_url = "https://api.openai.com/v1"
        [[models]]
        name = "m"
        targets = [{ target = "openai", model = "gpt-4o-mini" }]
    "#;

    /// A `[[relay.peers]]` entry.
    fn relay_peer(name: &str, region: &str, tenants: &str) -> String {
        format!("[[relay.peers]]\nname = \"{name}\"\nregion = \"{region}\"\ntenants = {tenants}\n")
    }

    /// `US_EDGE` taking relays from `peers` (`[[relay.peers]]` entries).
    fn us_edge_with(peers: &str) -> String {
        format!("{US_EDGE}\n[relay]\nlisten = \"127.0.0.1:7461\"\n{peers}")
    }

    /// `US_EDGE` taking relays of `acme` from `edge-eu`.
    fn us_edge() -> String {
        us_edge_with(&relay_peer("edge-eu", "eu-west", r#"["acme"]"#))
    }

    /// `EDGE` with a relay listener taking relays from `peers`, and `m` falling back to `edge-us`.
    fn relaying_edge_with(peers: &str) -> String {
        let edge = EDGE.replace(
            r#"targets = [{ target = "eu-engine" }, { target = "openai", model = "gpt-4o-mini" }]"#,
            r#"targets = [{ target = "eu-engine" }, { target = "openai", model = "gpt-4o-mini" }, { target = "edge-us" }]"#,
        );
        format!(
            "{edge}\n[relay]\nlisten = \"127.0.0.1:7462\"\n{peers}[targets.edge-us]\napi = \"edge\"\nkind = \"remote_edge\"\nbase_url = \"quic://127.0.0.1:7461\"\nserver_name = \"edge-us\"\nregion = \"us-east\"\n"
        )
    }

    /// `EDGE` relaying to `edge-us`, and taking relays of `acme` from it.
    fn relaying_edge() -> String {
        relaying_edge_with(&relay_peer("edge-us", "us-east", r#"["acme"]"#))
    }

    /// The fixture with `edge-us` added, `edge` as edge-eu's config and `us_edge` as edge-us's.
    fn relay_deployment(tag: &str, edge: &str, us_edge: &str) -> (PathBuf, PathBuf) {
        let (dir, path) = deployment(tag, edge, ENGINE);
        std::fs::write(&path, format!("{TOPOLOGY}\n{US_EDGE_ENTRY}")).unwrap();
        std::fs::create_dir_all(dir.join("us")).unwrap();
        std::fs::write(dir.join("us/edge.toml"), us_edge).unwrap();
        certs::write_node(&dir.join("certs"), "edge-us", &["edge-us".to_string()], &[], false).unwrap();
        (dir, path)
    }

    #[test]
    fn consistent_relay_between_edges() {
        let (dir, path) = relay_deployment("relay-ok", &relaying_edge(), &us_edge());
        assert_eq!(check(&path), Vec::<String>::new());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn relay_target_to_an_edge_in_no_region() {
        let edge = relaying_edge().replace(r#"server_name = "edge-us""#, r#"server_name = "edge-ap""#);
        let (dir, path) = relay_deployment("relay-unknown", &edge, &us_edge());
        assert_eq!(
            check(&path),
            [format!(
                "{}: targets.edge-us: unreachable: edge `edge-ap` is in no region of the topology (edges: edge-eu, edge-us)",
                dir.join("eu/edge.toml").display()
            )]
        );
        // An engine's name is not an edge's.
        let edge = relaying_edge().replace(r#"server_name = "edge-us""#, r#"server_name = "engine-eu""#);
        let (dir2, path) = relay_deployment("relay-engine", &edge, &us_edge());
        assert_eq!(
            check(&path),
            [format!(
                "{}: targets.edge-us: unreachable: `engine-eu` is an engine (regions.eu-west.engines[0]), not an edge (edges: edge-eu, edge-us)",
                dir2.join("eu/edge.toml").display()
            )]
        );
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(dir2).unwrap();
    }

    #[test]
    fn relay_addresses_disagreeing_with_the_topology() {
        let edge = relaying_edge()
            .replace("quic://127.0.0.1:7461", "quic://127.0.0.1:7463")
            .replace(r#"listen = "127.0.0.1:7462""#, r#"listen = "127.0.0.1:7465""#);
        let (dir, path) = relay_deployment("relay-addr", &edge, &us_edge());
        let e = dir.join("eu/edge.toml");
        let e = e.display();
        assert_eq!(
            check(&path),
            [
                format!("{e}: relay.listen: is 127.0.0.1:7465, but the topology says peer edges relay to `edge-eu` at 127.0.0.1:7462"),
                format!("{e}: targets.edge-us.base_url: is quic://127.0.0.1:7463, but edge `edge-us` takes relayed requests at quic://127.0.0.1:7461 (regions.us-east.edges[0])"),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn relay_to_an_edge_that_cannot_serve_it() {
        let us_edge =
            US_EDGE.replace(r#"name = "acme""#, r#"name = "other""#).replace(r#"name = "m""#, r#"name = "m2""#);
        let (dir, path) = relay_deployment("relay-peer", &relaying_edge(), &us_edge);
        let (e, u) = (dir.join("eu/edge.toml"), dir.join("us/edge.toml"));
        let (e, u) = (e.display(), u.display());
        assert_eq!(
            check(&path),
            [
                format!("{e}: targets.edge-us: unreachable: edge `edge-us` accepts no relayed requests: its config {u} has no [relay] section (listen = \"127.0.0.1:7461\")"),
                format!("{e}: targets.edge-us: edge `edge-us` has no tenant `acme` ({u}), so it refuses that tenant's relayed requests; add it there or set its `relay = \"never\"` here"),
                format!("{e}: models[0].targets[2]: relays model `m` to edge `edge-us`, which has no such model ({u})"),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn relay_peers_disagreeing_with_the_topology() {
        let peers = [
            relay_peer("edge-us", "ap-south", r#"["acme"]"#),
            relay_peer("engine-eu", "us-east", r#"["acme"]"#),
            relay_peer("edge-ap", "ap-south", r#"["acme"]"#),
        ]
        .concat();
        let (dir, path) = relay_deployment("relay-peers", &relaying_edge_with(&peers), &us_edge());
        let e = dir.join("eu/edge.toml");
        let e = e.display();
        assert_eq!(
            check(&path),
            [
                format!("{e}: relay.peers[0].region: is `ap-south`, but edge `edge-us` is in region `us-east` (regions.us-east.edges[0])"),
                format!("{e}: relay.peers[1].name: `engine-eu` is an engine (regions.eu-west.engines[0]), not an edge: only edges relay (edges: edge-eu, edge-us)"),
                format!("{e}: relay.peers[2].name: edge `edge-ap` is in no region of the topology (edges: edge-eu, edge-us)"),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn relay_to_an_edge_that_does_not_take_relays_from_the_sender() {
        // edge-us takes relays only from an edge-ap: nothing edge-eu relays is taken.
        let us_edge = us_edge_with(&relay_peer("edge-ap", "ap-south", r#"["acme"]"#));
        let (dir, path) = relay_deployment("relay-sender", &relaying_edge(), &us_edge);
        let (e, u) = (dir.join("eu/edge.toml"), dir.join("us/edge.toml"));
        let (e, u) = (e.display(), u.display());
        assert_eq!(
            check(&path),
            [
                format!("{e}: targets.edge-us: edge `edge-us` refuses every request this edge relays: its config {u} lists no `[[relay.peers]]` named `edge-eu`"),
                format!("{u}: relay.peers[0].name: edge `edge-ap` is in no region of the topology (edges: edge-eu, edge-us)"),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();

        // edge-us takes relays from edge-eu, but only of another tenant.
        let globex = format!("[[tenants]]\nname = \"globex\"\nkeys = [\"{}\"]\n", crate::config::hash_key("globex"));
        let us_edge = us_edge_with(&relay_peer("edge-eu", "eu-west", r#"["globex"]"#)).replacen(
            "[quic]",
            &format!("{globex}[quic]"),
            1,
        );
        let (dir, path) = relay_deployment("relay-tenant", &relaying_edge(), &us_edge);
        let (e, u) = (dir.join("eu/edge.toml"), dir.join("us/edge.toml"));
        let (e, u) = (e.display(), u.display());
        assert_eq!(
            check(&path),
            [format!(
                "{e}: targets.edge-us: edge `edge-us` takes no relays of tenant `acme` from `edge-eu` ({u}: relay.peers[0].tenants), so it refuses that tenant's relayed requests; add it there or set its `relay = \"never\"` here"
            )]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The shipped examples pass, with certificates made for their nodes in a temporary folder
    /// (the real ones are generated per deployment and never committed).
    #[test]
    fn shipped_example_topologies_pass() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../regions");
        for example in ["local", "three-regions"] {
            let t = Topology::load(&root.join(example).join("topology.toml")).unwrap();
            let dir = tmp_dir(example);
            let names: Vec<String> = t
                .nodes()
                .filter(|(_, _, n)| !matches!(n, Node::Target(_)))
                .map(|(_, _, n)| n.name().to_string())
                .collect();
            make_certs(&dir, names.iter().map(String::as_str));
            let problems: Vec<String> = t.check(Some(&dir)).iter().map(Problem::to_string).collect();
            assert_eq!(problems, Vec::<String>::new(), "regions/{example}/topology.toml");
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
