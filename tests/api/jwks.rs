//! Supabase's asymmetric session tokens: a JWKS server this test runs (plain HTTP on a real
//! socket) with keys the test generates, and a real taskcast that fetches and caches it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{Value, json};
use taskcast::auth::Secret;
use taskcast::auth::jwks::{Jwks, JwksOptions};
use taskcast::auth::subscribe::{SubscribeAuth, now_unix};
use taskcast::cli::Cli;
use taskcast::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::helpers::{KEY, SUBSCRIBE_SECRET, StoreKind, TestApp, spawn_app_with, wait_until};
use crate::sse::Events;

/// A signing key and its public JWK (with `kid`).
pub struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl TestKey {
    fn new(kid: &str, alg: Algorithm, encoding: EncodingKey) -> TestKey {
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&encoding, alg).unwrap()).unwrap();
        jwk["kid"] = kid.into();
        jwk["use"] = "sig".into();
        TestKey {
            kid: kid.to_string(),
            alg,
            encoding,
            jwk,
        }
    }

    /// A fresh P-256 key (rcgen's default key type).
    pub fn es256(kid: &str) -> TestKey {
        let pair = rcgen::KeyPair::generate().unwrap();
        TestKey::new(
            kid,
            Algorithm::ES256,
            EncodingKey::from_ec_der(&pair.serialize_der()),
        )
    }

    /// A fresh 2048-bit RSA key, and its public key as PEM.
    fn rs256(kid: &str) -> (TestKey, String) {
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let pem = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let der = private.to_pkcs1_der().unwrap();
        let key = TestKey::new(
            kid,
            Algorithm::RS256,
            EncodingKey::from_rsa_der(der.as_bytes()),
        );
        (key, pem)
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Serve,
    /// Accepts and reads the request, then never answers.
    Hang,
}

/// A JWKS endpoint on 127.0.0.1: serves `set` at Supabase's path, counts fetches.
pub struct JwksServer {
    pub origin: String,
    set: Arc<Mutex<Value>>,
    mode: Arc<Mutex<Mode>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(keys: &[&TestKey]) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let set = Arc::new(Mutex::new(Value::Null));
        let mode = Arc::new(Mutex::new(Mode::Serve));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (s, m, f) = (set.clone(), mode.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (set, mode, fetches) = (s.clone(), m.clone(), f.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    fetches.fetch_add(1, Ordering::SeqCst);
                    if *mode.lock().unwrap() == Mode::Hang {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let wanted = request.starts_with(b"GET /auth/v1/.well-known/jwks.json ");
                    let (status, body) = if wanted {
                        ("200 OK", set.lock().unwrap().to_string())
                    } else {
                        ("404 Not Found", "{}".to_string())
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        let server = JwksServer {
            origin,
            set,
            mode,
            fetches,
            task,
        };
        server.publish(keys);
        server
    }

    /// Replaces the published set.
    fn publish(&self, keys: &[&TestKey]) {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk.clone()).collect();
        *self.set.lock().unwrap() = json!({ "keys": keys });
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A one-second fetch deadline, no scheduled refresh during a test, and `refetch` between
/// fetches caused by unknown `kid`s.
fn options(refetch: Duration) -> JwksOptions {
    JwksOptions {
        fetch_timeout: Duration::from_secs(1),
        max_body_bytes: 64 * 1024,
        refresh_interval: Duration::from_secs(3600),
        min_refetch_interval: refetch,
    }
}

/// A taskcast (Postgres) verifying Supabase sessions with `server`'s keys, once it has
/// fetched them; also the legacy HS256 secret, when given.
pub async fn spawn_with_jwks(
    server: &JwksServer,
    refetch: Duration,
    legacy: Option<&str>,
) -> (TestApp, Jwks) {
    let jwks = Jwks::new(&server.origin, options(refetch));
    let auth = SubscribeAuth::new(
        Some(Secret::new(SUBSCRIBE_SECRET)),
        legacy.map(Secret::new),
        false,
    )
    .with_jwks(jwks.clone());
    let app = spawn_app_with(StoreKind::Postgres, |c| c.subscribe = auth).await;
    let cache = jwks.clone();
    wait_until(move || !cache.is_empty()).await;
    (app, jwks)
}

/// Claims of a signed-in user of the project at `origin`.
pub fn session(origin: &str, user: uuid::Uuid) -> Value {
    json!({
        "sub": user.to_string(), "role": "authenticated", "aud": "authenticated",
        "iss": format!("{origin}/auth/v1"), "iat": now_unix(), "exp": now_unix() + 600
    })
}

/// A task owned by `user`, created through the API.
pub async fn task_of(app: &TestApp, user: uuid::Uuid) -> String {
    let created: Value = (app.http.post(app.url("/api/tasks")).bearer_auth(KEY))
        .json(&json!({ "user_id": user.to_string() }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["task_id"].as_str().unwrap().to_string()
}

/// The first message on a fresh WebSocket subscribed to `task` with `token`.
async fn over_websocket(app: &TestApp, task: &str, token: &str) -> Value {
    let mut sub = app.connect(&format!("?task_id={task}&token={token}")).await;
    sub.next_message().await
}

/// The first event of an SSE stream of `task` with `token`, or the refusal's status.
async fn over_sse(app: &TestApp, task: &str, token: &str) -> Result<Value, u16> {
    let response = app
        .http
        .get(app.url(&format!("/api/tasks/{task}/events?token={token}")))
        .send()
        .await
        .unwrap();
    if response.status() != 200 {
        return Err(response.status().as_u16());
    }
    Ok(Events::new(response).next().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_and_rs256_sessions_subscribe_over_websocket_and_sse() {
    let ec = TestKey::es256("ec-1");
    let (rsa, _) = TestKey::rs256("rsa-1");
    let server = JwksServer::start(&[&ec, &rsa]).await;
    let (app, jwks) = spawn_with_jwks(&server, Duration::from_secs(3600), None).await;
    assert_eq!(jwks.len(), 2);
    let (alice, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let task = task_of(&app, alice).await;
    for key in [&ec, &rsa] {
        let token = key.sign(&session(&server.origin, alice));
        let first = over_websocket(&app, &task, &token).await;
        assert_eq!(
            first["type"], "state",
            "{:?} over WebSocket: {first}",
            key.alg
        );
        let event = over_sse(&app, &task, &token).await.expect("SSE accepted");
        assert_eq!(event["task_id"], task, "{:?} over SSE: {event}", key.alg);
        // Ownership still decides: another user's valid session is refused.
        let other = key.sign(&session(&server.origin, bob));
        let refused = over_websocket(&app, &task, &other).await;
        assert_eq!(refused["code"], "forbidden", "{refused}");
        assert_eq!(over_sse(&app, &task, &other).await.unwrap_err(), 403);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_audience_issuer_role_nbf_or_an_expired_session_is_refused() {
    let ec = TestKey::es256("ec-1");
    let server = JwksServer::start(&[&ec]).await;
    let (app, _jwks) = spawn_with_jwks(&server, Duration::from_secs(3600), None).await;
    let alice = uuid::Uuid::new_v4();
    let task = task_of(&app, alice).await;
    let with = |field: &str, value: Value| {
        let mut claims = session(&server.origin, alice);
        claims[field] = value;
        ec.sign(&claims)
    };
    let control = over_websocket(&app, &task, &with("sub", alice.to_string().into())).await;
    assert_eq!(control["type"], "state", "the control case: {control}");
    let cases = [
        (with("aud", "anon".into()), "token_invalid"),
        (
            with("iss", "https://other.supabase.co/auth/v1".into()),
            "token_invalid",
        ),
        (with("nbf", (now_unix() + 300).into()), "token_invalid"),
        (with("exp", (now_unix() - 60).into()), "token_expired"),
        (with("role", "anon".into()), "forbidden"),
    ];
    for (token, code) in cases {
        let refused = over_websocket(&app, &task, &token).await;
        assert_eq!(refused["code"], code, "{refused}");
    }
    // Without an `iss` at all.
    let mut claims = session(&server.origin, alice);
    claims.as_object_mut().unwrap().remove("iss");
    let refused = over_websocket(&app, &task, &ec.sign(&claims)).await;
    assert_eq!(refused["code"], "token_invalid", "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_set_is_picked_up_and_the_removed_key_stops_verifying() {
    let old = TestKey::es256("old");
    let (new, _) = TestKey::rs256("new");
    let server = JwksServer::start(&[&old]).await;
    let (app, jwks) = spawn_with_jwks(&server, Duration::from_millis(100), None).await;
    let alice = uuid::Uuid::new_v4();
    let task = task_of(&app, alice).await;
    let claims = session(&server.origin, alice);
    let before = over_websocket(&app, &task, &old.sign(&claims)).await;
    assert_eq!(before["type"], "state", "{before}");

    server.publish(&[&new]);
    let fetched = server.fetches();
    let after = over_websocket(&app, &task, &new.sign(&claims)).await;
    assert_eq!(after["type"], "state", "the new kid is fetched: {after}");
    assert_eq!(
        server.fetches(),
        fetched + 1,
        "one refetch for the unknown kid"
    );
    assert_eq!(jwks.len(), 1, "the set was replaced, not merged");
    let removed = over_websocket(&app, &task, &old.sign(&claims)).await;
    assert_eq!(removed["code"], "token_invalid", "{removed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_by_a_key_outside_the_set_is_refused_and_refetches_are_rate_limited() {
    let published = TestKey::es256("published");
    let server = JwksServer::start(&[&published]).await;
    let (app, _jwks) = spawn_with_jwks(&server, Duration::from_secs(3600), None).await;
    let alice = uuid::Uuid::new_v4();
    let task = task_of(&app, alice).await;
    let claims = session(&server.origin, alice);
    // Same kid, another key: the signature fails.
    let impostor = TestKey::es256("published");
    let refused = over_websocket(&app, &task, &impostor.sign(&claims)).await;
    assert_eq!(refused["code"], "token_invalid", "{refused}");
    // A kid not in the set: one refetch, then refused; more unknown kids fetch nothing.
    let fetched = server.fetches();
    for n in 0..5 {
        let stranger = TestKey::es256(&format!("stranger-{n}"));
        let refused = over_websocket(&app, &task, &stranger.sign(&claims)).await;
        assert_eq!(refused["code"], "token_invalid", "{refused}");
    }
    assert_eq!(server.fetches(), fetched + 1, "rate-limited to one refetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_jwks_server_hanging_or_down_cached_keys_verify_and_unknown_kids_fail_fast() {
    let cached = TestKey::es256("cached");
    let server = JwksServer::start(&[&cached]).await;
    let (app, _jwks) = spawn_with_jwks(&server, Duration::from_millis(100), None).await;
    let alice = uuid::Uuid::new_v4();
    let task = task_of(&app, alice).await;
    let claims = session(&server.origin, alice);
    let known = cached.sign(&claims);

    // Hanging: ten unknown kids at once share one fetch, which times out (1 s), and a
    // known key meanwhile verifies without waiting for it.
    server.set_mode(Mode::Hang);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let fetched = server.fetches();
    let started = Instant::now();
    let unknown = (0..10).map(|n| {
        let token = TestKey::es256(&format!("unknown-{n}")).sign(&claims);
        let (app, task) = (&app, &task);
        async move { over_websocket(app, task, &token).await }
    });
    let (refusals, during) = tokio::join!(futures::future::join_all(unknown), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let at = Instant::now();
        (over_websocket(&app, &task, &known).await, at.elapsed())
    });
    let elapsed = started.elapsed();
    for refused in &refusals {
        assert_eq!(refused["code"], "token_invalid", "{refused}");
    }
    assert!(
        elapsed < Duration::from_secs(3),
        "unknown kids took {elapsed:?}"
    );
    assert_eq!(during.0["type"], "state", "{}", during.0);
    assert!(
        during.1 < Duration::from_millis(500),
        "a cached key waited {:?}",
        during.1
    );
    assert_eq!(server.fetches(), fetched + 1, "one fetch for all of them");

    // Down (connection refused): cached keys still verify; unknown kids are refused fast.
    server.task.abort();
    let aborted = &server.task;
    wait_until(|| aborted.is_finished()).await;
    tokio::time::sleep(Duration::from_millis(150)).await; // past the refetch rate limit
    let still = over_websocket(&app, &task, &known).await;
    assert_eq!(still["type"], "state", "{still}");
    let started = Instant::now();
    let refused = over_websocket(&app, &task, &TestKey::es256("other").sign(&claims)).await;
    assert_eq!(refused["code"], "token_invalid", "{refused}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs256_header_naming_an_rsa_kid_is_refused_while_legacy_hs256_sessions_still_work() {
    const LEGACY: &str = "supabase-legacy-jwt-secret-0123456789abcd";
    let (rsa, public_pem) = TestKey::rs256("rsa-1");
    let server = JwksServer::start(&[&rsa]).await;
    let (app, _jwks) = spawn_with_jwks(&server, Duration::from_secs(3600), Some(LEGACY)).await;
    let alice = uuid::Uuid::new_v4();
    let task = task_of(&app, alice).await;
    let claims = session(&server.origin, alice);
    // The classic confusion: HMAC with the RSA public key's bytes, header naming its kid.
    let n = rsa.jwk["n"].as_str().unwrap().to_string();
    for secret in [public_pem.as_bytes(), n.as_bytes()] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(rsa.kid.clone());
        let forged =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap();
        let refused = over_websocket(&app, &task, &forged).await;
        assert_eq!(refused["code"], "token_invalid", "{refused}");
    }
    // The legacy secret keeps working beside the JWKS, and the RSA key too.
    let legacy = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(LEGACY.as_bytes()),
    )
    .unwrap();
    assert_eq!(over_websocket(&app, &task, &legacy).await["type"], "state");
    assert_eq!(
        over_websocket(&app, &task, &rsa.sign(&claims)).await["type"],
        "state"
    );
}

#[test]
fn supabase_url_must_be_https_in_production_and_a_plain_origin() {
    let parse = |url: &str, production: bool| {
        let cli = Cli::try_parse_from([
            "taskcast",
            "--supabase-url",
            url,
            "--push-key",
            &"k".repeat(40),
        ])
        .unwrap();
        Config::from_args(cli.serve, |k| {
            (production && k == "NODE_ENV").then(|| "production".to_string())
        })
    };
    let refused = parse("http://abcd.supabase.co", true).unwrap_err();
    assert!(refused.contains("https"), "{refused}");
    let config = parse("https://abcd.supabase.co/", true).expect("https, and enough auth alone");
    let jwks = config.subscribe.jwks().expect("a JWKS cache");
    assert_eq!(jwks.issuer(), "https://abcd.supabase.co/auth/v1");
    assert!(
        parse("http://127.0.0.1:54321", false).is_ok(),
        "http outside production"
    );
    assert!(
        parse("abcd.supabase.co", false)
            .unwrap_err()
            .contains("SUPABASE_URL")
    );
}
