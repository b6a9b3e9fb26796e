//! examples/nextjs: the route handler that mints subscribe tokens, run by Node against a
//! live taskcast that verifies Supabase sessions with a JWKS (ES256).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::helpers::{SUBSCRIBE_SECRET, WAIT};
use crate::jwks::{JwksServer, TestKey, session, spawn_with_jwks, task_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nextjs_route_mints_a_token_that_subscribes_for_the_owner_only() {
    let key = TestKey::es256("ec-1");
    let server = JwksServer::start(&[&key]).await;
    let (app, _jwks) = spawn_with_jwks(&server, Duration::from_secs(3600), None).await;
    let (alice, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let task = task_of(&app, alice).await;
    let owner = key.sign(&session(&server.origin, alice));
    let other = key.sign(&session(&server.origin, bob));
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/nextjs");
    let child = Command::new("node")
        .current_dir(&dir)
        .arg("test/watch-token.test.mjs")
        .args([&task, &owner, &other])
        .env("TASKCAST_URL", app.url(""))
        .env("TASKCAST_SUBSCRIBE_SECRET", SUBSCRIBE_SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: `node` is not installed, so examples/nextjs was not tested");
            return;
        }
        other => other.expect("node starts"),
    };
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the Node test ends within the wait")
        .expect("the Node test runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "examples/nextjs test failed: {stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("a JSON line");
    assert_eq!(summary["granted"], 200, "{summary}");
    assert_eq!(summary["first_event"], "state", "{summary}");
}
