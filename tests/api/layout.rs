//! The module graph of src/ has no cycles: dependencies between top-level modules point
//! one way. `cargo test --test api layout -- --nocapture` also prints the graph.
//!
//! Reads every `crate::` path in src/ (comments stripped), maps each file to its top-level
//! module (`src/store/postgres.rs` is `store`) and each path to the module it names, then
//! looks for a cycle. `lib.rs` and `main.rs` wire everything and are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module -> the top-level modules it names through `crate::`.
pub fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    collect_rs(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = top_module(src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("src files are readable");
        let deps = graph.entry(from.clone()).or_default();
        for name in crate_paths(&without_test_modules(&strip_comments(&text))) {
            if name != from && modules.contains(&name) {
                deps.insert(name);
            }
        }
    }
    graph
}

/// A cycle in `graph`, as the modules along it (first repeated at the end), if any.
pub fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is a readable directory") {
        let path = entry.expect("directory entries are readable").path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// The text without comments, and with string literals (raw ones included) emptied.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let raw_hashes = rest
            .strip_prefix('r')
            .filter(|_| !out.ends_with(|c: char| c.is_alphanumeric() || c == '_'))
            .map(|after| after.len() - after.trim_start_matches('#').len())
            .filter(|&n| rest[1 + n..].starts_with('"'));
        if let Some(n) = raw_hashes {
            let close = format!("\"{}", "#".repeat(n));
            let body = &rest[2 + n..];
            rest = body.find(&close).map_or("", |i| &body[i + close.len()..]);
            out.push_str("\"\"");
        } else if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |i| &after[i..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |i| &after[i + 2..]);
        } else if let Some(after) = rest.strip_prefix("'{'").or(rest.strip_prefix("'}'")) {
            out.push_str("' '"); // a brace as a char literal would confuse brace matching
            rest = after;
        } else if let Some(after) = rest.strip_prefix('"') {
            // Skip string literals so a "//" inside one is not taken for a comment.
            let mut end = after.len();
            let mut escaped = false;
            for (i, c) in after.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = i + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            out.push_str("\"\"");
            rest = &after[end.min(after.len())..];
        } else {
            let c = rest.chars().next().expect("rest is not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The text without `#[cfg(test)] mod … { … }` blocks: a unit test may build the whole
/// `App` from a `Config`, as an integration test does, without making its module depend on
/// them.
fn without_test_modules(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let is_module = after.trim_start().starts_with("mod ");
        match after.find(['{', ';']) {
            Some(open) if is_module && after[open..].starts_with('{') => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (i, c) in after[open..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
            _ => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// The first segment of every `crate::` path, `crate::{a::X, b}` included.
fn crate_paths(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `taskcast_crate::`
        }
        let rest = text[at + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        start = true;
                        continue;
                    }
                    _ => {}
                }
                if start && (c.is_alphanumeric() || c == '_') {
                    names.push(ident(&group[i..]));
                }
                if !c.is_whitespace() {
                    start = false;
                }
            }
        } else {
            names.push(ident(rest));
        }
    }
    names
}

fn ident(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn modules_under_src_import_each_other_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.len() > 5, "src/ was read: {graph:?}");
    for (module, deps) in &graph {
        println!(
            "{module} -> {}",
            Vec::from_iter(deps.iter().map(String::as_str)).join(", ")
        );
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "module cycle: {} (a small item in the wrong module; move it down)",
            cycle.join(" -> ")
        );
    }
}

/// `config` is the top of the graph: only `lib.rs` (which wires everything) and the
/// subcommands that read a whole configuration (`doctor`) may name it. Everything else
/// takes its own small options type.
#[test]
fn nothing_below_config_imports_config() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let importers: Vec<_> = module_graph(&src)
        .into_iter()
        .filter(|(module, deps)| deps.contains("config") && module != "doctor")
        .map(|(module, _)| module)
        .collect();
    assert!(
        importers.is_empty(),
        "modules importing config: {importers:?}"
    );
}

#[test]
fn the_cycle_check_sees_grouped_imports_and_cycles() {
    let text = "use crate::{config::{A, B}, hub::Hub};\nlet x = crate::store::X;\n\
                #[cfg(test)]\nmod tests { fn f() { crate::demo::f() } }\n\
                let s = r#\"crate::routes\"#; // crate::origin\nuse crate::ws;";
    let names = crate_paths(&without_test_modules(&strip_comments(text)));
    assert_eq!(names, ["config", "hub", "store", "ws"]);
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&graph).expect("a cycle"), ["a", "b", "a"]);
}

/// The README's "Where things live" map names every top-level module, so it stays a map.
#[test]
fn the_readme_map_names_every_top_level_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md exists");
    let map = readme
        .split("### Where things live")
        .nth(1)
        .and_then(|rest| rest.split("\n#").next())
        .expect("the README has a \"Where things live\" section");
    let missing: Vec<_> = module_graph(&root.join("src"))
        .into_keys()
        .filter(|module| !map.contains(&format!("`{module}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "modules missing from the map: {missing:?}"
    );
}

/// The crates under crates/ are what a generator links: none may name the server package or
/// a server-only dependency, so `taskcast-reporter` never drags warp or Postgres along.
#[test]
fn the_workspace_crates_depend_on_no_server_part() {
    const SERVER_ONLY: [&str; 7] = [
        "taskcast",
        "warp",
        "tokio-postgres",
        "deadpool-postgres",
        "tokio-tungstenite",
        "jsonwebtoken",
        "metrics",
    ];
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates");
    let mut checked = 0;
    for entry in std::fs::read_dir(&crates).expect("crates/ is a readable directory") {
        let manifest = entry.expect("a directory entry").path().join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).expect("each crate has a Cargo.toml");
        // Dependency names start a line inside a [*dependencies] table.
        let mut in_deps = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_deps = line.ends_with("dependencies]") && !line.contains("dev-");
                continue;
            }
            let name = line.split(['=', ' ']).next().unwrap_or_default();
            assert!(
                !(in_deps && SERVER_ONLY.contains(&name)),
                "{} depends on {name}",
                manifest.display()
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 2,
        "crates/ holds the reporter and the wire crate"
    );
}
