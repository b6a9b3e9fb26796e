//! `docs/openapi.json` describes the router as it is: the same paths and methods as the
//! routes declared in `src/`, each documented operation reaches its handler, and
//! `GET /openapi.json` serves that same file.
//!
//! Routes are read from the source (every `warp::path!` and `warp::path::end()` with its
//! method filter) rather than from a hand-kept list, and a route written in a form this
//! reader does not know fails the test instead of being skipped, so the two cannot drift
//! silently.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::helpers::{StoreKind, spawn_app_with};

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn spec() -> Value {
    let text = std::fs::read_to_string(repo().join("docs/openapi.json")).expect("the spec");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// `(METHOD, /path/{}/with/params)` for every operation in the spec.
fn spec_routes(spec: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        let normalized: Vec<String> = path
            .split('/')
            .map(|s| if s.starts_with('{') { "{}" } else { s }.to_string())
            .collect();
        for method in item.as_object().expect("path item").keys() {
            assert!(METHODS.contains(&method.as_str()), "{path}: {method}");
            routes.insert((method.to_uppercase(), normalized.join("/")));
        }
    }
    routes
}

fn rust_files(dir: PathBuf, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The method filter in the code that follows a path filter, before the next statement.
fn method_after(rest: &str, at: &str) -> String {
    let statement = &rest[..rest.find(';').unwrap_or(rest.len())];
    let found: Vec<&str> = METHODS
        .iter()
        .copied()
        .filter(|m| statement.contains(&format!("warp::{m}()")))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{at}: a route needs exactly one warp::<method>() in its statement; teach this test \
         the form it uses"
    );
    found[0].to_uppercase()
}

/// `(METHOD, path)` for every route declared in `src/`.
fn source_routes() -> BTreeSet<(String, String)> {
    let mut files = Vec::new();
    rust_files(repo().join("src"), &mut files);
    let mut routes = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("a source file");
        let name = file
            .strip_prefix(repo())
            .unwrap_or(&file)
            .display()
            .to_string();
        for (at, _) in text.match_indices("warp::path") {
            let rest = &text[at + "warp::path".len()..];
            let line = text[..at].lines().count();
            let where_ = format!("{name}:{line}");
            if let Some(args) = rest.strip_prefix("!(") {
                let args = &args[..args.find(')').expect("the macro closes")];
                let segments: Vec<String> = args
                    .split('/')
                    .map(|s| {
                        let s = s.trim();
                        match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                            Some(literal) => literal.to_string(),
                            None => "{}".to_string(),
                        }
                    })
                    .collect();
                let path = format!("/{}", segments.join("/"));
                routes.insert((method_after(rest, &where_), path));
            } else if rest.starts_with("::end()") {
                routes.insert((method_after(rest, &where_), "/".to_string()));
            } else {
                panic!("{where_}: a path filter this test cannot read; teach it the new form");
            }
        }
    }
    routes
}

#[test]
fn the_spec_documents_exactly_the_routes_the_source_declares() {
    let in_source = source_routes();
    assert!(
        in_source.contains(&("POST".to_string(), "/api/tasks/{}/progress".to_string()))
            && in_source.len() >= 14,
        "the reader found too little: {in_source:?}"
    );
    let in_spec = spec_routes(&spec());
    let undocumented: Vec<_> = in_source.difference(&in_spec).collect();
    let unrouted: Vec<_> = in_spec.difference(&in_source).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes missing from docs/openapi.json: {undocumented:?}; operations in the spec \
         that no route serves: {unrouted:?}"
    );
}

/// Also proves the reader above right at run time: each documented operation reaches a
/// handler (no route_not_found, no 405), and every other method on its path is refused.
#[tokio::test]
async fn every_documented_operation_is_served_and_other_methods_get_405() {
    let app = spawn_app_with(StoreKind::Memory, |c| c.demo = true).await;
    let spec = spec();
    let task = app.create_task().await;
    for (path, item) in spec["paths"].as_object().expect("paths") {
        // A preview's name also has a step: `{task}.svg` is a result's.
        let file = if path.starts_with("/demo/preview/") {
            format!("{task}.0.1.svg")
        } else {
            format!("{task}.svg")
        };
        let concrete = path
            .replace("{id}", &task.to_string())
            .replace("{file}", &file);
        assert!(
            !concrete.contains('{'),
            "{path}: a parameter this test cannot fill"
        );
        for method in METHODS {
            let request = app.http.request(
                method.to_uppercase().parse().expect("a method"),
                app.url(&concrete),
            );
            let response = request.send().await.expect("the server answers");
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            let code = serde_json::from_str::<Value>(&body).ok();
            let code = code.as_ref().and_then(|v| v.get("error")?.as_str());
            if item.get(method).is_some() {
                assert!(
                    status != 405 && code != Some("route_not_found"),
                    "{method} {path} is documented but got {status} {body}"
                );
            } else {
                assert_eq!(status, 405, "{method} {path} is not documented: {body}");
            }
        }
    }
}

#[tokio::test]
async fn get_openapi_json_serves_the_document_in_the_repo() {
    let app = spawn_app_with(StoreKind::Memory, |_| {}).await;
    let response = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served: Value = response.json().await.unwrap();
    assert_eq!(served, spec());
    assert_eq!(served["openapi"], "3.1.0");
}
