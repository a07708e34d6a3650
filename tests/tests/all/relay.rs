//! Edge-to-edge relay on loopback: real edges joined by real QUIC with the cluster's mutual TLS,
//! the real pii-redactor and residency components (build them first with `scripts/build-plugins`),
//! and mock managed APIs behind the receiving edge. The origin edges route every model to a peer
//! edge, so whatever reaches the mocks went through the relay. Each receiving edge takes relays
//! only from the edge before it (`[[relay.peers]]`); other nodes of the same cluster are refused.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian::chat::StreamEvent;
use meridian::config::{hash_key, Config, PluginKind, RelayPeer, RelayPolicy, RouteConfig};
use meridian_e2e::engine::Cluster;
use meridian_e2e::{add_plugin, metric, Mocks, TempDir, TestEdge, ACME_KEY, GLOBEX_KEY};
use meridian_engine::api::{ErrorCode, RelayRequest};
use meridian_engine::client::{ClientError, EngineClient};
use serde_json::{json, Value};

const ADMIN_KEY: &str = "sk-admin-relay";

/// The standard config as an edge of `region`, probing its peers every 100 ms.
fn edge_config(mocks: &Mocks, cache: &TempDir, region: &str) -> Config {
    let mut c = mocks.config();
    c.node.region = region.into();
    c.node.admin_keys = vec![hash_key(ADMIN_KEY)];
    c.health.probe_interval_ms = 100;
    c.plugin_runtime.cache_dir = cache.path().to_path_buf();
    c
}

/// Makes `config` (which takes relays) take them from edge `name` of `region`, for each of its
/// tenants.
fn accept_from(config: &mut Config, name: &str, region: &str) {
    let tenants = config.tenants.iter().map(|t| t.name.clone()).collect();
    let relay = config.relay.as_mut().expect("the edge takes relays");
    relay.peers.push(RelayPeer { name: name.into(), region: region.into(), tenants });
}

/// Sends every model of `config` to target `target` only.
fn route_all_to(config: &mut Config, target: &str) {
    for m in &mut config.models {
        m.targets = vec![RouteConfig { target: target.into(), model: None, price: None }];
    }
}

/// Edge `us-east` (`edge-us`) relaying everything to edge `eu-west` (`edge-eu`, which takes relays
/// from it for every tenant), whose targets are the mocks.
pub(crate) struct Pair {
    pub(crate) us: TestEdge,
    pub(crate) eu: TestEdge,
    pub(crate) mocks: Mocks,
    cluster: Cluster,
    /// `edge-eu`'s relay listener.
    relay: SocketAddr,
    _cache: TempDir,
}

pub(crate) async fn pair(us: impl FnOnce(&mut Config), eu: impl FnOnce(&mut Config)) -> Pair {
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("relay-pair");
    let cache = TempDir::new("relay-pair");
    let mut eu_cfg = edge_config(&mocks, &cache, "eu-west");
    let relay = cluster.accept_relays(&mut eu_cfg, "edge-eu", 1);
    accept_from(&mut eu_cfg, "edge-us", "us-east");
    eu(&mut eu_cfg);
    let mut us_cfg = edge_config(&mocks, &cache, "us-east");
    cluster.join(&mut us_cfg, "edge-us");
    cluster.add_edge_target(&mut us_cfg, "edge-eu", "edge-eu", "eu-west", relay);
    route_all_to(&mut us_cfg, "edge-eu");
    us(&mut us_cfg);
    let eu = TestEdge::start(eu_cfg).await;
    let us = TestEdge::start(us_cfg).await;
    Pair { us, eu, mocks, cluster, relay, _cache: cache }
}

/// A relay frame for `tenant` that passed through `path`.
fn relay_request(path: &[&str], tenant: &str, request: Value) -> RelayRequest {
    RelayRequest {
        request_id: "r-1".into(),
        tenant: tenant.into(),
        client_region: None,
        path: path.iter().map(|s| s.to_string()).collect(),
        labels: Vec::new(),
        redacted: false,
        no_cache: false,
        request,
        traceparent: None,
    }
}

/// The error code and status of a refused relay.
fn refusal<T>(result: Result<T, ClientError>) -> (ErrorCode, Option<u16>) {
    match result {
        Err(ClientError::Remote(e)) => (e.code, e.status),
        Err(other) => panic!("a typed refusal, not {other}"),
        Ok(_) => panic!("a refusal, not an answer"),
    }
}

/// The answer text of a relayed request sent straight to a peer edge by `client`.
async fn relayed_text(client: &EngineClient, request: RelayRequest) -> String {
    let mut stream = client.relay(request).await.unwrap_or_else(|e| panic!("an answer, not {e}"));
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        let json = event.expect("the answer streams");
        if let StreamEvent::Text(t) = meridian::api::relay::decode_event(&json).expect("an event") {
            text.push_str(&t);
        }
    }
    text
}

fn chat(model: &str, text: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]})
}

/// What the mocks were sent, as text.
fn sent_texts(mocks: &Mocks) -> Vec<String> {
    [&mocks.openai, &mocks.openai2, &mocks.anthropic]
        .iter()
        .flat_map(|m| m.received())
        .map(|r| r.body["messages"].to_string())
        .collect()
}

#[tokio::test]
async fn a_relayed_request_is_served_by_the_peer_edges_own_targets() {
    let p = pair(|_| {}, |_| {}).await;
    for stream in [false, true] {
        let r = p.us.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "hello over the sea", stream)).await;
        assert_eq!(r.header("x-meridian-target"), Some("edge-eu"));
        assert_eq!(r.answer_text(), "Echo: hello over the sea");
    }
    // An Anthropic client of the origin, an Anthropic upstream behind the peer.
    let body = json!({"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]});
    let r = p.us.send("POST", "/v1/messages", Some(ACME_KEY), &[], Bytes::from(body.to_string())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["content"][0]["text"], "Echo: hi");

    let sent = p.mocks.openai.received();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].body["model"], "gpt-4o-mini", "the peer's own route for the model");
    assert_eq!(p.mocks.anthropic.request_count(), 1);
    let eu = p.eu.metrics().await;
    let relayed = |target: &str| {
        metric(&eu, "meridian_requests_total", &["api=\"relay\"", &format!("target=\"{target}\""), "status=\"ok\""])
    };
    assert_eq!((relayed("oa"), relayed("an")), (2.0, 1.0), "{eu}");
    let us = p.us.metrics().await;
    assert_eq!(metric(&us, "meridian_requests_total", &["target=\"edge-eu\"", "status=\"ok\""]), 3.0);
    // The client's `no-store` holds at the peer's cache too.
    let same = json!({"model": "gpt-test", "temperature": 0, "messages": [{"role": "user", "content": "same"}]});
    for _ in 0..2 {
        let r = p.us.post_with("/v1/chat/completions", ACME_KEY, &[("cache-control", "no-store")], &same).await;
        assert_eq!(r.answer_text(), "Echo: same");
    }
    assert_eq!(p.mocks.openai.request_count(), 4, "both went upstream");

    // The origin probes its peer over the same QUIC connection: health, models and RTT.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = p.us.send("GET", "/admin/targets", Some(ADMIN_KEY), &[], Bytes::new()).await;
        let list = r.json()["targets"].as_array().cloned().unwrap_or_default();
        let peer = list.iter().find(|t| t["name"] == "edge-eu").cloned().unwrap_or_default();
        if peer["engine"]["provider"] == "edge" && peer["rtt_ms"].is_number() {
            assert_eq!((peer["kind"].as_str(), peer["region"].as_str()), (Some("remote_edge"), Some("eu-west")));
            assert_eq!(peer["health"], "healthy");
            break;
        }
        assert!(Instant::now() < deadline, "the peer edge was never probed: {peer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn personal_data_is_redacted_before_it_leaves_the_region_and_restored_after() {
    let p = pair(
        |us| {
            add_plugin(us, "pii", PluginKind::Filter, "pii-redactor", json!({"actions": {"email": "redact"}}));
            add_plugin(us, "pii-label", PluginKind::Filter, "pii-redactor", json!({"actions": {"email": "label"}}));
            us.tenants[0].filters = vec!["pii".into()];
            us.tenants[1].filters = vec!["pii-label".into()];
            for t in &mut us.tenants {
                t.relay = RelayPolicy::Redacted;
            }
        },
        |_| {},
    )
    .await;
    let personal = "write to ann.lee@example.com today";
    for stream in [false, true] {
        let r = p.us.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", personal, stream)).await;
        assert_eq!(r.answer_text(), format!("Echo: {personal}"), "restored at the origin");
    }
    let sent = sent_texts(&p.mocks);
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|t| t.contains("write to") && !t.contains("ann.lee")), "{sent:?}");

    // globex's filter only labels the address: it is still in the text, so it is not relayed.
    let r = p.us.post("/v1/chat/completions", GLOBEX_KEY, &chat("gpt-test", personal, false)).await;
    assert_eq!((r.status, r.error_code()), (451, "relay_refused".to_string()), "{}", r.text());
    assert!(!r.text().contains("ann.lee"));
    assert_eq!(sent_texts(&p.mocks).len(), 2, "nothing left the region");
    let r = p.us.post("/v1/chat/completions", GLOBEX_KEY, &chat("gpt-test", "nothing personal", false)).await;
    assert_eq!(r.answer_text(), "Echo: nothing personal");
}

#[tokio::test]
async fn labels_travel_with_the_request_and_the_peer_applies_residency_by_them() {
    let p = pair(
        |us| {
            add_plugin(us, "pii-label", PluginKind::Filter, "pii-redactor", json!({"actions": {"email": "label"}}));
            us.tenants[0].filters = vec!["pii-label".into()];
        },
        |eu| {
            // The peer has no filter of its own: only the relayed labels tell it what is inside.
            add_plugin(eu, "residency", PluginKind::Router, "residency", json!({}));
            eu.tenants[0].router = Some("residency".into());
            eu.tenants[0].allowed_regions = vec!["eu-west".into()];
            eu.targets.get_mut("oa").unwrap().region = Some("us-east".into());
            eu.targets.get_mut("oa2").unwrap().region = Some("eu-west".into());
        },
    )
    .await;
    let personal = "forward this to ann.lee@example.com please";
    let r = p.us.post("/v1/chat/completions", ACME_KEY, &chat("fallback", personal, false)).await;
    assert_eq!(r.answer_text(), format!("Echo: {personal}"));
    assert_eq!((p.mocks.openai.request_count(), p.mocks.openai2.request_count()), (0, 1), "eu-west only");
    let r = p.us.post("/v1/chat/completions", ACME_KEY, &chat("fallback", "a cat name?", false)).await;
    assert_eq!(r.answer_text(), "Echo: a cat name?");
    assert_eq!(p.mocks.openai.request_count(), 1, "no personal data: the peer's static order");
}

#[tokio::test]
async fn a_peer_that_is_down_or_refuses_is_skipped_for_the_next_target() {
    let dead: SocketAddr = meridian_e2e::engine::free_udp_addr();
    let p = pair(
        |us| {
            // The peer does not know globex; a second peer address answers nothing at all.
            let cluster_target = us.targets["edge-eu"].clone();
            let mut gone = cluster_target.clone();
            gone.base_url = format!("quic://{dead}");
            gone.region = Some("ap-south".into());
            gone.connect_timeout_ms = 500;
            us.targets.insert("edge-gone".into(), gone);
            for m in &mut us.models {
                let local = RouteConfig { target: "oa2".into(), model: Some("gpt-4o-mini".into()), price: None };
                let edge = |t: &str| RouteConfig { target: t.into(), model: None, price: None };
                m.targets = vec![edge("edge-gone"), edge("edge-eu"), local];
            }
        },
        |eu| eu.tenants.retain(|t| t.name == "acme"),
    )
    .await;
    let r = p.us.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "one", false)).await;
    assert_eq!((r.header("x-meridian-target"), r.answer_text()), (Some("edge-eu"), "Echo: one".to_string()));
    let r = p.us.post("/v1/chat/completions", GLOBEX_KEY, &chat("gpt-test", "two", true)).await;
    assert_eq!((r.header("x-meridian-target"), r.answer_text()), (Some("oa2"), "Echo: two".to_string()));
    assert_eq!((p.mocks.openai.request_count(), p.mocks.openai2.request_count()), (1, 1));
}

#[tokio::test]
async fn relay_loops_and_hop_limits_are_refused() {
    let mocks = Mocks::start().await;
    let cluster = Cluster::new("relay-loop");
    let cache = TempDir::new("relay-loop");
    let regions = ["us-east", "eu-west", "ap-south"];
    let mut configs: Vec<Config> = regions.iter().map(|r| edge_config(&mocks, &cache, r)).collect();
    let addrs: Vec<SocketAddr> =
        configs.iter_mut().zip(regions).map(|(c, r)| cluster.accept_relays(c, &format!("edge-{r}"), 3)).collect();
    // us → eu → ap → us: a ring, each edge's only target the next one, which takes its relays.
    for i in 0..3 {
        let next = (i + 1) % 3;
        let name = format!("edge-{}", regions[next]);
        cluster.add_edge_target(&mut configs[i], &name, &name, regions[next], addrs[next]);
        route_all_to(&mut configs[i], &name);
        accept_from(&mut configs[next], &format!("edge-{}", regions[i]), regions[i]);
    }
    let mut edges = Vec::new();
    for c in configs {
        edges.push(TestEdge::start(c).await);
    }
    let started = Instant::now();
    let r = edges[0].post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "round and round", false)).await;
    assert_eq!(r.status, 508, "{}", r.text());
    assert!(r.text().contains("relay loop") && r.text().contains("us-east > eu-west > ap-south"), "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(10), "refused at once, not timed out");
    let ap = edges[2].metrics().await;
    assert_eq!(metric(&ap, "meridian_requests_total", &["api=\"relay\"", "status=\"relay_loop\""]), 1.0, "{ap}");
    assert_eq!(sent_texts(&mocks).len(), 0);

    // eu's peer (us) speaking the protocol directly gets typed refusals, never an answer.
    let eu = cluster.client("edge-us-east", "edge-eu-west", addrs[1]);
    let good = json!({"chat": chat("gpt-test", "hi", false)});
    assert_eq!(
        refusal(eu.relay(relay_request(&["eu-west", "us-east"], "acme", good.clone())).await),
        (ErrorCode::LoopDetected, Some(508))
    );
    let long = ["a", "b", "c", "us-east"];
    assert_eq!(
        refusal(eu.relay(relay_request(&long, "acme", good.clone())).await),
        (ErrorCode::LoopDetected, Some(508))
    );
    assert_eq!(
        refusal(eu.relay(relay_request(&["us-east"], "initech", good.clone())).await),
        (ErrorCode::Refused, Some(403))
    );
    let bad = json!({"chat": {"model": 7}});
    assert_eq!(refusal(eu.relay(relay_request(&["us-east"], "acme", bad)).await), (ErrorCode::Refused, Some(400)));
    let unknown = json!({"chat": chat("no-such-model", "hi", false)});
    assert_eq!(refusal(eu.relay(relay_request(&["us-east"], "acme", unknown)).await).0, ErrorCode::UnknownModel);
    let engine_op = meridian_engine::api::ChatRequest { model: "gpt-test".into(), ..Default::default() };
    let Err(ClientError::Remote(e)) = eu.chat(engine_op).await else { panic!("an edge is not an engine") };
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert_eq!(sent_texts(&mocks).len(), 0);
}

#[tokio::test]
async fn only_listed_peer_edges_relay_and_only_from_their_region() {
    // edge-eu takes relays from edge-us for acme only.
    let p = pair(|_| {}, |eu| eu.relay.as_mut().unwrap().peers[0].tenants.retain(|t| t == "acme")).await;
    let good = |path: &[&str]| relay_request(path, "acme", json!({"chat": chat("gpt-test", "hi", false)}));
    let refused = (ErrorCode::Refused, Some(403));

    // Certificates from the same CA: an engine's, and an edge that is not a listed peer.
    for name in ["engine-x", "edge-ap"] {
        let intruder = p.cluster.client(name, "edge-eu", p.relay);
        assert_eq!(refusal(intruder.relay(good(&["us-east"])).await), refused, "{name}");
    }
    // The peer itself, with a path that does not end in its region, or with another tenant.
    let us = p.cluster.client("edge-us", "edge-eu", p.relay);
    for path in [&[][..], &["ap-south"][..], &["us-east", "ap-south"][..]] {
        assert_eq!(refusal(us.relay(good(path)).await), refused, "{path:?}");
    }
    let globex = relay_request(&["us-east"], "globex", json!({"chat": chat("gpt-test", "hi", false)}));
    assert_eq!(refusal(us.relay(globex).await), refused);
    assert_eq!(sent_texts(&p.mocks).len(), 0, "nothing reached an upstream");
    let eu = p.eu.metrics().await;
    let refusals = |reason: &str| metric(&eu, "meridian_relay_refusals_total", &[&format!("reason=\"{reason}\"")]);
    assert_eq!(
        (refusals("unauthorized_peer"), refusals("bad_path"), refusals("tenant_not_accepted")),
        (2.0, 3.0, 1.0),
        "{eu}"
    );

    // The peer's legitimate request is served, directly and through the origin edge.
    assert_eq!(relayed_text(&us, good(&["us-east"])).await, "Echo: hi");
    let r = p.us.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "hello", false)).await;
    assert_eq!((r.header("x-meridian-target"), r.answer_text()), (Some("edge-eu"), "Echo: hello".to_string()));
    assert_eq!(p.mocks.openai.request_count(), 2);
}

#[tokio::test]
async fn an_origin_the_peer_does_not_list_goes_on_to_its_next_target() {
    let p = pair(
        |us| {
            for m in &mut us.models {
                let local = RouteConfig { target: "oa2".into(), model: Some("gpt-4o-mini".into()), price: None };
                m.targets.push(local);
            }
        },
        |eu| eu.relay.as_mut().unwrap().peers[0].name = "edge-ap".into(),
    )
    .await;
    let r = p.us.post("/v1/chat/completions", ACME_KEY, &chat("gpt-test", "refused there", false)).await;
    assert_eq!((r.header("x-meridian-target"), r.answer_text()), (Some("oa2"), "Echo: refused there".to_string()));
    assert_eq!((p.mocks.openai.request_count(), p.mocks.openai2.request_count()), (0, 1));
    let eu = p.eu.metrics().await;
    assert_eq!(metric(&eu, "meridian_relay_refusals_total", &["reason=\"unauthorized_peer\""]), 1.0, "{eu}");
}
