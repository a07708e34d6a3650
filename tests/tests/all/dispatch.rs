//! `meridian regions simulate` and the edge dispatch requests with the same core: one script of
//! requests, replayed by the simulation's own per-request step ([`simulate::replay`]) and sent to a
//! real edge in front of mock upstreams, tries the same targets in the same order and gives the
//! client the same result. The script covers a failing target falling back to the next, a target
//! ejected after failures in a row and then skipped, and personal data (labelled by the real
//! pii-redactor filter) that never reaches a target outside the tenant's allowed regions.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use meridian::config::{Config, PluginKind};
use meridian::dispatch::Policy;
use meridian::simulate::{self, Replay, Replayed, Response, ScriptedRequest, SimTarget};
use meridian::stats::Ejection;
use meridian_e2e::{add_plugin, Behavior, ConfigExt, MockUpstream, Mocks, TempDir, TestEdge, ACME_KEY};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Model `fallback`'s targets in static order, with their regions.
const TARGETS: [(&str, &str); 3] = [("oa", "us-east"), ("oa2", "eu-west"), ("an", "ap-south")];
/// The only region acme's personal data may be processed in.
const ACME_REGION: &str = "eu-west";

/// One request of the script: its text, and the targets that fail it (with a 502) if tried.
struct Case {
    text: &'static str,
    fail: &'static [&'static str],
}

/// With two failures in a row ejecting a target for longer than the test takes.
const SCRIPT: [Case; 9] = [
    Case { text: "request 1", fail: &["oa"] },
    Case { text: "request 2", fail: &["oa"] },
    Case { text: "request 3", fail: &[] },
    Case { text: "request 4: write to ann.lee@example.com", fail: &[] },
    Case { text: "request 5: write to ann.lee@example.com", fail: &["oa2"] },
    Case { text: "request 6", fail: &["oa2", "an"] },
    Case { text: "request 7", fail: &[] },
    Case { text: "request 8: write to ann.lee@example.com", fail: &[] },
    Case { text: "request 9", fail: &[] },
];

/// The order in which the edge sent requests to the targets: a TCP relay in front of each mock
/// notes its target's name whenever the edge sends it bytes.
#[derive(Clone, Default)]
struct Taps(Arc<Mutex<Vec<&'static str>>>);

impl Taps {
    /// Starts a relay to `upstream` that notes `name`; returns its address.
    async fn relay(&self, name: &'static str, upstream: SocketAddr) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let taps = self.clone();
        tokio::spawn(async move {
            while let Ok((edge_side, _)) = listener.accept().await {
                let taps = taps.clone();
                tokio::spawn(async move {
                    let Ok(mock_side) = TcpStream::connect(upstream).await else { return };
                    let (mut from_edge, mut to_edge) = edge_side.into_split();
                    let (mut from_mock, mut to_mock) = mock_side.into_split();
                    let up = async {
                        let mut buf = vec![0; 16 * 1024];
                        while let Ok(n @ 1..) = from_edge.read(&mut buf).await {
                            taps.0.lock().unwrap().push(name);
                            if to_mock.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to_mock.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut from_mock, &mut to_edge).await;
                        let _ = to_edge.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        addr
    }

    /// The targets noted since the last call, in order; a request arriving in several reads is
    /// noted once (the edge tries each target at most once per request).
    fn take(&self) -> Vec<String> {
        let mut tried: Vec<String> = Vec::new();
        for name in self.0.lock().unwrap().drain(..) {
            if tried.last().map(String::as_str) != Some(name) {
                tried.push(name.to_string());
            }
        }
        tried
    }
}

/// The mock behind target `name`.
fn mock<'m>(mocks: &'m Mocks, name: &str) -> &'m MockUpstream {
    match name {
        "oa" => &mocks.openai,
        "oa2" => &mocks.openai2,
        "an" => &mocks.anthropic,
        _ => panic!("no mock for {name}"),
    }
}

/// The standard config with the targets in their regions behind `taps`, two failures in a row
/// ejecting a target for ten minutes, and acme's requests labelled by pii-redactor (e-mails
/// labelled, not redacted) and its personal data allowed in eu-west only.
async fn config(mocks: &Mocks, taps: &Taps, cache: &TempDir) -> Config {
    let mut cfg = mocks.config();
    cfg.plugin_runtime.cache_dir = cache.path().to_path_buf();
    cfg.health.ejection_threshold = 2;
    cfg.health.base_ejection_ms = 600_000;
    cfg.health.max_ejection_ms = 600_000;
    for (name, region) in TARGETS {
        let mock = mock(mocks, name).addr();
        let relay = taps.relay(name, mock).await;
        let target = cfg.target_mut(name);
        target.region = Some(region.into());
        target.base_url = target.base_url.replace(&mock.to_string(), &relay.to_string());
    }
    add_plugin(&mut cfg, "pii", PluginKind::Filter, "pii-redactor", json!({"actions": {"email": "label"}}));
    let acme = cfg.tenant_mut("acme");
    acme.filters = vec!["pii".into()];
    acme.allowed_regions = vec![ACME_REGION.into()];
    cfg
}

/// The same edge as the simulation takes it: the targets as configured, acme's policy, the
/// `[health]` ejection, and the script with the labels pii-redactor gives each text.
fn replay_of(cfg: &Config) -> Replay {
    let targets = TARGETS
        .iter()
        .map(|(name, _)| {
            let t = &cfg.targets[*name];
            SimTarget { name: name.to_string(), region: t.region.clone(), kind: t.kind, price: t.price }
        })
        .collect();
    let requests = SCRIPT
        .iter()
        .map(|case| ScriptedRequest {
            labels: if case.text.contains('@') { vec!["pii.email".into()] } else { Vec::new() },
            responses: case.fail.iter().map(|name| (name.to_string(), Response::Fail)).collect(),
        })
        .collect();
    Replay {
        targets,
        tenant: Policy { allowed_regions: vec![ACME_REGION.into()], ..Policy::default() },
        ejection: Ejection::from(&cfg.health),
        requests,
    }
}

fn replayed(tried: &[&str], result: Result<&str, u16>) -> Replayed {
    Replayed { tried: tried.iter().map(|s| s.to_string()).collect(), result: result.map(str::to_string) }
}

#[tokio::test]
async fn the_simulation_tries_what_the_edge_tries() {
    let mocks = Mocks::start().await;
    let taps = Taps::default();
    let cache = TempDir::new("dispatch");
    let cfg = config(&mocks, &taps, &cache).await;
    let expected = simulate::replay(&replay_of(&cfg));
    // What the script is for, so that the edge and the simulation cannot agree on a mistake.
    let want = [
        replayed(&["oa", "oa2"], Ok("oa2")), // a failing first target falls back
        replayed(&["oa", "oa2"], Ok("oa2")), // its second failure in a row ejects it
        replayed(&["oa2"], Ok("oa2")),       // ejected: skipped
        replayed(&["oa2"], Ok("oa2")),       // personal data: eu-west
        replayed(&["oa2"], Err(502)),        // and only eu-west, though `an` is up
        replayed(&["oa2", "an"], Err(502)),  // the last failure; oa2 is ejected now
        replayed(&["an"], Ok("an")),         // both ejected: skipped
        replayed(&["oa2"], Ok("oa2")),       // every allowed target is out: tried anyway
        replayed(&["oa2"], Ok("oa2")),       // and its answer brought it back
    ];
    assert_eq!(expected, want, "the simulation's replay");

    let edge = TestEdge::start(cfg).await;
    for (n, (case, expected)) in SCRIPT.iter().zip(&expected).enumerate() {
        for name in case.fail {
            mock(&mocks, name).push(Behavior::Status(502));
        }
        let body = json!({"model": "fallback", "messages": [{"role": "user", "content": case.text}]});
        let r = edge.post_with("/v1/chat/completions", ACME_KEY, &[("x-meridian-cache", "bypass")], &body).await;
        let result = match r.status {
            200 => Ok(r.header("x-meridian-target").expect("the serving target").to_string()),
            status => Err(status),
        };
        let got = Replayed { tried: taps.take(), result };
        assert_eq!(&got, expected, "request {}: {}", n + 1, r.text());
        for (name, _) in TARGETS {
            let m = mock(&mocks, name);
            let asked = usize::from(got.tried.iter().any(|t| t == name));
            assert_eq!(m.request_count(), asked, "request {}: what {name} received", n + 1);
            // Forgets the request, and failures scripted for a target the request never reached.
            m.clear();
        }
    }
}
