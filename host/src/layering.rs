//! The import graph of the crate's modules has no cycle: codecs and error types at the bottom,
//! the dispatch core above them, the edge's request path above that, the servers at the top (see
//! `ARCHITECTURE.md`). A test reads the sources, so that a `use` that closes a circle fails CI
//! with the circle spelled out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module name → the modules it refers to through `crate::…` paths.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The top-level modules that `lib.rs` declares.
fn modules(src: &Path) -> Vec<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ").and_then(|r| r.strip_suffix(';')))
        .map(str::to_string)
        .collect()
}

/// The files of module `name`: `name.rs`, or every `.rs` under `name/`.
fn files(src: &Path, name: &str) -> Vec<PathBuf> {
    let file = src.join(format!("{name}.rs"));
    if file.is_file() {
        return vec![file];
    }
    let mut out = Vec::new();
    let mut dirs = vec![src.join(name)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("module folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out
}

/// The code of a file without comments and without its unit tests (a test module may reach
/// anywhere; it is not part of the layering).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The top-level modules `code` names through `crate::a`, `crate::{a, b::c}`.
fn references(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(group.split(',').filter_map(|item| first_ident(item.trim())));
        } else {
            out.extend(first_ident(rest));
        }
    }
    out
}

fn first_ident(s: &str) -> Option<String> {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    (end > 0).then(|| s[..end].to_string())
}

/// The crate's module graph, read from `src`.
fn graph(src: &Path) -> Graph {
    let names = modules(src);
    let mut g = Graph::new();
    for name in &names {
        let edges = g.entry(name.clone()).or_default();
        for file in files(src, name) {
            let text = std::fs::read_to_string(&file).expect("source file");
            edges.extend(references(&code(&text)).into_iter().filter(|m| m != name && names.contains(m)));
        }
    }
    g
}

/// A cycle of the graph, as the modules along it (the first repeated at the end), if any.
fn cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit<'a>(
        g: &'a Graph,
        m: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| *p == m) {
            let mut c: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            c.push(m.to_string());
            return Some(c);
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for next in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
}

#[test]
fn the_module_graph_has_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    assert!(g.len() > 10 && g["edge"].contains("dispatch"), "the graph was read: {g:?}");
    if let Some(c) = cycle(&g) {
        panic!("import cycle between modules: {}", c.join(" -> "));
    }
}

#[test]
fn the_reader_finds_grouped_paths_and_the_checker_finds_cycles() {
    let refs = references(&code("use crate::{api::relay, error};\n// crate::edge\nfn f() { crate::stats::x(); }"));
    assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["api", "error", "stats"]);
    let g: Graph = [("a", &["b"][..]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]
        .into_iter()
        .map(|(m, to)| (m.to_string(), to.iter().map(|t| t.to_string()).collect()))
        .collect();
    assert_eq!(cycle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let mut acyclic = g.clone();
    acyclic.get_mut("c").unwrap().clear();
    assert_eq!(cycle(&acyclic), None);
}
