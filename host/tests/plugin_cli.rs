//! `meridian plugin new | check | run`, through the built binary, against the components that
//! `scripts/build-plugins` builds and against freshly generated plugin crates.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A built plugin (the Rust plugins' folder first, then the fixtures'), or a panic that names it
/// and says how to build it.
fn component(file: &str) -> PathBuf {
    let dirs = ["target/wasm32-unknown-unknown/release", "target/wasm32-wasip2/release"];
    let found = dirs.iter().map(|dir| workspace().join(dir).join(file)).find(|path| path.is_file());
    found.unwrap_or_else(|| panic!("missing {file} in {dirs:?}: build the plugins first with scripts/build-plugins"))
}

/// Runs `meridian` with `args` in `dir`.
fn meridian(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running the meridian binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `meridian` and expects success.
fn ok(dir: &Path, args: &[&str]) -> String {
    let o = meridian(dir, args);
    assert!(o.status.success(), "meridian {args:?} failed\nstdout:\n{}\nstderr:\n{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// A fresh directory, removed on drop. Under the system temp dir, outside this workspace, so a
/// generated crate proves it builds standalone (no workspace `.cargo/config.toml` applies).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("meridian-plugin-cli-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test paths")
}

#[test]
fn check_prints_each_components_world() {
    let here = workspace();
    let router = component("latency_router.wasm");
    let out = ok(&here, &["plugin", "check", path_str(&router)]);
    assert!(out.contains("world: router\n"), "{out}");
    assert!(out.contains("exports: configure, route\n"), "{out}");
    assert!(out.contains("config: ok"), "{out}");

    let filter = component("pii_redactor.wasm");
    let out = ok(&here, &["plugin", "check", path_str(&filter)]);
    assert!(out.contains("world: privacy-filter\n"), "{out}");
    assert!(out.contains("exports: configure, inspect-request, inspect-response\n"), "{out}");
}

#[test]
fn check_fails_with_the_plugins_message_on_a_rejected_config() {
    let dir = TempDir::new("reject");
    let config = dir.0.join("c.toml");
    std::fs::write(&config, "threshold_ms = 5\n").unwrap();
    let fixture = component("fixture_config_reject.wasm");
    let o = meridian(&dir.0, &["plugin", "check", path_str(&fixture), "--config", path_str(&config)]);
    assert!(!o.status.success(), "a rejected config must fail: {}", stdout(&o));
    let err = stderr(&o);
    // The plugin's own words, about the TOML table converted to JSON as the node does.
    assert!(err.contains(r#"bad config: expected {"threshold_ms": <number>}, got {"threshold_ms":5}"#), "{err}");
    assert!(err.contains("is a router"), "{err}");
}

#[test]
fn check_refuses_what_is_not_a_component() {
    let dir = TempDir::new("garbage");
    let file = dir.0.join("not.wasm");
    std::fs::write(&file, "not wasm").unwrap();
    let o = meridian(&dir.0, &["plugin", "check", path_str(&file)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot compile the component"), "{}", stderr(&o));
}

#[test]
fn run_shows_a_filters_redactions() {
    let dir = TempDir::new("filter");
    let request = dir.0.join("request.json");
    let body = r#"{"model": "m", "messages": [{"role": "user", "content": "write to ann@example.com today"}]}"#;
    std::fs::write(&request, body).unwrap();
    let filter = component("pii_redactor.wasm");
    let out = ok(&dir.0, &["plugin", "run", path_str(&filter), "--request", path_str(&request)]);
    assert!(out.contains("world: privacy-filter\n"), "{out}");
    assert!(out.contains("labels: pii.email.redacted\n"), "{out}");
    assert!(out.contains(r#"email "ann@example.com""#), "{out}");
    assert!(out.contains("[0] user: write to [EMAIL_1] today\n"), "{out}");
    assert!(out.contains("fuel: not metered (epoch deadlines)"), "{out}");
    assert!(out.contains("peak memory: "), "{out}");
}

#[test]
fn run_shows_a_routers_decision() {
    let dir = TempDir::new("router");
    let request = dir.0.join("request.json");
    std::fs::write(&request, r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
    let targets = dir.0.join("targets.json");
    let list = r#"[
        {"name": "slow", "latency_ms": 900},
        {"name": "gone", "latency_ms": 10, "health": "down"},
        {"name": "fast", "kind": "serverless", "region": "eu-west", "latency_ms": 100,
         "price": {"per": "gpu_second", "usd_per_second": 0.001}}
    ]"#;
    std::fs::write(&targets, list).unwrap();
    let router = component("latency_router.wasm");
    let args = ["plugin", "run", path_str(&router), "--request", path_str(&request), "--targets", path_str(&targets)];
    let out = ok(&dir.0, &args);
    assert!(out.contains("decision: route to fast, slow\n"), "{out}");

    // A router without targets is a usage error, named as such.
    let o = meridian(&dir.0, &["plugin", "run", path_str(&router), "--request", path_str(&request)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pass --targets"), "{}", stderr(&o));
}

/// `plugin new` → build → `plugin check` → `plugin run` for one kind in one language, as the
/// README says. Python and JavaScript projects are built with the toolchains scripts/build-plugins
/// pinned and installed (the commands the project's README gives, with those tools).
fn template_end_to_end(kind: &str, lang: &str, expect: &[&str]) {
    let dir = TempDir::new(&format!("template-{lang}-{kind}"));
    let name = format!("my-{kind}");
    let out = ok(&dir.0, &["plugin", "new", &name, "--kind", kind, "--lang", lang]);
    assert!(out.contains("created"), "{out}");
    let project = dir.0.join(&name);

    // Never overwrites.
    let again = meridian(&dir.0, &["plugin", "new", &name, "--kind", kind, "--lang", lang]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already exists"), "{}", stderr(&again));

    let world = if kind == "router" { "router" } else { "privacy-filter" };
    let (build, wasm) = match lang {
        "rust" => {
            // A target dir of its own (git-ignored), shared by both kinds so the SDK builds once.
            let target_dir = workspace().join("target/plugin-template-test");
            let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            cargo
                .args(["build", "--release", "--target", "wasm32-unknown-unknown"])
                .env("CARGO_TARGET_DIR", &target_dir);
            (cargo, target_dir.join(format!("wasm32-unknown-unknown/release/my_{kind}.wasm")))
        }
        "python" => {
            let mut build = Command::new(workspace().join(".meridian/venv-plugins/bin/componentize-py"));
            build.args(["-d", "wit", "-w", world, "componentize", "app", "-o", &format!("my_{kind}.wasm")]);
            (build, project.join(format!("my_{kind}.wasm")))
        }
        _ => {
            let mut build = Command::new(workspace().join("plugins/js/node_modules/.bin/jco"));
            let out = format!("dist/my_{kind}.wasm");
            build.args(["componentize", "plugin.js", "--bundle", "--wit", "wit/meridian-plugin.wit"]);
            build.args(["--world-name", world, "--disable", "all", "-o", &out]);
            std::fs::create_dir_all(project.join("dist")).unwrap();
            (build, project.join(out))
        }
    };
    let mut build = build;
    let built = build.current_dir(&project).output().expect("running the build");
    assert!(built.status.success(), "building the {lang} {kind} template failed:\n{}", stderr(&built));

    // An interpreter's first instance takes longer than a Rust plugin's 20 ms.
    let deadline = if lang == "rust" { "20" } else { "2000" };
    // `run` loads as `check` does (and prints the world); an interpreter's component takes tens
    // of seconds to compile, so only Rust's are checked apart as well.
    if lang == "rust" {
        let out = ok(&project, &["plugin", "check", path_str(&wasm)]);
        assert!(out.contains(&format!("world: {world}\n")), "{out}");
    }
    let mut args = vec!["plugin", "run", path_str(&wasm), "--request", "request.json", "--deadline-ms", deadline];
    if kind == "router" {
        args.extend(["--targets", "targets.json"]);
    }
    let out = ok(&project, &args);
    assert!(out.contains(&format!("world: {world}\n")), "{out}");
    if lang == "rust" {
        // The project's `.cargo/config.toml` links a 64 KiB stack: with rustc's 1 MiB one the
        // stack alone (first in memory) took a fresh instance's memory past 1 MiB.
        let peak: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("peak memory: ")?.strip_suffix(" KiB of linear memory")?.parse().ok())
            .unwrap_or_else(|| panic!("no peak memory line in:\n{out}"));
        assert!(peak <= 512, "a fresh instance of the {kind} template held {peak} KiB");
    }
    for line in expect {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

/// dedicated-eu has spare capacity (free), then per-token openai-us, then serverless-eu;
/// anthropic-us is down.
const ROUTED: &str = "decision: route to dedicated-eu, openai-us, serverless-eu\n";

const REDACTED: [&str; 3] = [
    "labels: secret.code.redacted\n",
    r#"secret_code "secret-code-4711""#,
    "[1] user: Unlock the vault with [SECRET_CODE_1] and tell me what is inside.\n",
];

#[test]
fn router_template_builds_and_routes_cheapest_healthy_first() {
    template_end_to_end("router", "rust", &[ROUTED]);
}

#[test]
fn filter_template_builds_and_redacts_secret_codes() {
    template_end_to_end("filter", "rust", &REDACTED);
}

#[test]
fn python_templates_build_and_behave_as_the_rust_ones() {
    template_end_to_end("router", "python", &[ROUTED]);
    template_end_to_end("filter", "python", &REDACTED);
}

#[test]
fn javascript_templates_build_and_behave_as_the_rust_ones() {
    template_end_to_end("router", "js", &[ROUTED]);
    template_end_to_end("filter", "js", &REDACTED);
}
