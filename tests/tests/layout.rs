//! The source tree's shape, checked: no import circles between the
//! modules of any crate (a module that uses another may not be used by
//! it, directly or around a loop), and the balancer and broker libraries
//! do not depend on each other (the `mqlb` app crate joins them).
//!
//! A module is a top-level `src/X.rs` or `src/X/` of a crate; it uses
//! another when its code (not comments, not its `mod tests`) names
//! `crate::other`.

// A test: a panic is a failure report, and the source files are ours.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir)
        .expect("readable source dir")
        .flatten()
    {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Module → the modules it uses, for one crate.
fn graph(krate: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let src = krate.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .unwrap_or_default();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("readable");
        let code: String = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let uses = g.entry(top.clone()).or_default();
        let mut rest = code.as_str();
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            // `crate::{a, b::c}` or `crate::name`.
            let names: Vec<String> = if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end]
                    .split(',')
                    .map(|item| item.trim().split("::").next().unwrap_or("").to_string())
                    .collect()
            } else {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                vec![rest[..end].to_string()]
            };
            for n in names {
                if !n.is_empty() && n != top {
                    uses.insert(n);
                }
            }
        }
    }
    g
}

/// The strongly connected components with more than one module: each is
/// an import circle.
fn circles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let Some((w, _)) = self.g.get_key_value(w.as_str()) else {
                    continue;
                };
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low[v];
                    self.low.insert(v, lv.min(lw));
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low[v];
                    self.low.insert(v, lv.min(iw));
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = Tarjan {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

fn crates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root())
        .expect("workspace root")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file() && p.join("src").is_dir())
        .collect();
    out.sort();
    out
}

#[test]
fn no_crate_has_an_import_circle() {
    let all = crates();
    assert!(all.len() >= 10, "found only {all:?}");
    let mut found = Vec::new();
    for c in &all {
        for circle in circles(&graph(c)) {
            found.push(format!("{}: {}", c.display(), circle.join(" <-> ")));
        }
    }
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

#[test]
fn the_checker_finds_a_circle() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    g.insert("d".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(circles(&g), vec![vec!["a", "b", "c"]]);
    // And reads `crate::` paths, grouped ones included, from real files.
    let broker = graph(&root().join("broker"));
    assert!(broker["conn"].contains("state"), "{:?}", broker["conn"]);
    assert!(broker["conn"].contains("node"), "{:?}", broker["conn"]);
}

#[test]
fn the_balancer_and_the_broker_do_not_depend_on_each_other() {
    for (krate, other) in [("balancer", "mqlb-broker"), ("broker", "mqlb-balancer")] {
        let manifest = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
        assert!(
            !manifest.lines().any(|l| l.trim_start().starts_with(other)),
            "{krate} depends on {other}"
        );
    }
}

/// The broker's core is plain data in and out: its crate builds without
/// tokio (a dev-dependency for its tests aside), so it holds no runtime
/// handle, spawns nothing and waits on nothing.
#[test]
fn the_broker_core_builds_without_tokio() {
    let manifest = std::fs::read_to_string(root().join("broker-core").join("Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .expect("a [dependencies] table");
    assert!(
        !deps.lines().any(|l| l.trim_start().starts_with("tokio")),
        "the core depends on tokio:\n{deps}"
    );
    for dir in ["src"] {
        let mut files = Vec::new();
        rust_files(&root().join("broker-core").join(dir), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let code = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or_default();
            for banned in [
                "tokio::",
                "Instant::now",
                "SystemTime::now",
                "std::thread::spawn",
            ] {
                let uses = code
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .filter(|l| l.contains(banned))
                    .count();
                // The one fallback: a core never told the time (a unit
                // test driving it directly) reads the system's.
                let allowed = match (f.file_name().and_then(|n| n.to_str()), banned) {
                    (Some("core.rs"), "Instant::now") => 1,
                    (Some("hlc.rs"), "SystemTime::now") => 1,
                    _ => 0,
                };
                assert!(
                    uses <= allowed,
                    "{} uses {banned} {uses} times outside its tests",
                    f.display()
                );
            }
        }
    }
}
