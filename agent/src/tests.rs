//! Keeps the agent's modules free of import loops, at the level of files
//! and of the top-level modules (folders): a loop means two parts of the
//! request path that cannot be understood, or changed, one without the
//! other. The check reads the sources: every `crate::` and `super::` path
//! outside test code is an edge to the module file it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, by module path (`pipeline::attempts`).
fn modules(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("agent/src is readable") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "bin" {
                let mut p = prefix.to_vec();
                p.push(name);
                modules(&path, &p, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut p = prefix.to_vec();
            if name != "mod" && name != "lib" {
                p.push(name);
            }
            out.insert(p, path);
        }
    }
}

/// The source without its test code: a `#[cfg(test)]` item and all that
/// follows it (tests sit at the end of a file here).
fn without_tests(source: &str) -> &str {
    source.find("#[cfg(test)]").map_or(source, |i| &source[..i])
}

/// The module paths a source refers to, resolved against `me`.
fn references(source: &str, me: &[String], is_mod_file: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = source.as_bytes();
    for (start, prefix) in source
        .match_indices("crate::")
        .map(|(i, _)| (i, "crate"))
        .chain(source.match_indices("super::").map(|(i, _)| (i, "super")))
    {
        // A path starts at a word boundary (not `spillway_agent::crate`).
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        let rest = &source[start + prefix.len() + 2..];
        let segments: Vec<String> = rest
            .split("::")
            .map(|s| {
                s.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|s| !s.is_empty() && s.chars().next().unwrap().is_ascii_lowercase())
            .collect();
        let mut base: Vec<String> = if prefix == "crate" {
            Vec::new()
        } else {
            // `super` of a `mod.rs` is the parent of its folder; of a file,
            // its folder.
            let mut b = me.to_vec();
            if !is_mod_file || !b.is_empty() {
                b.pop();
            }
            b
        };
        base.extend(segments);
        out.push(base);
    }
    out
}

#[test]
fn no_import_loops() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    modules(&src, &[], &mut files);
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, path) in &files {
        let source = std::fs::read_to_string(path).unwrap();
        let is_mod_file = path.file_name().is_some_and(|n| n == "mod.rs");
        for mut target in references(without_tests(&source), module, is_mod_file) {
            // The deepest module that exists as a file.
            while !target.is_empty() && !files.contains_key(&target) {
                target.pop();
            }
            if &target != module && !target.is_empty() {
                edges.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    assert!(
        edges.len() > 10,
        "the check found too few references to mean anything: {edges:?}"
    );
    let top: BTreeMap<String, BTreeSet<String>> =
        edges.iter().fold(BTreeMap::new(), |mut acc, (from, to)| {
            for t in to {
                if t[0] != from[0] {
                    acc.entry(from[0].clone()).or_default().insert(t[0].clone());
                }
            }
            acc
        });
    let joined = |m: &Vec<String>| m.join("::");
    let file_graph: BTreeMap<String, BTreeSet<String>> = edges
        .iter()
        .map(|(k, v)| (joined(k), v.iter().map(joined).collect()))
        .collect();
    for (what, graph) in [("files", &file_graph), ("top-level modules", &top)] {
        if let Some(cycle) = find_cycle(graph) {
            panic!("an import loop between {what}: {}", cycle.join(" -> "));
        }
    }
}

/// A cycle of the graph, if it has one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_loop_check_finds_a_loop() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let refs = references(
        "use super::x::Y; use crate::pipeline::auth::presented;",
        &["upstream".to_string(), "meter".to_string()],
        false,
    );
    assert_eq!(
        refs,
        [vec!["pipeline", "auth", "presented"], vec!["upstream", "x"]]
    );
}
