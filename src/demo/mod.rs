//! The browser client, the API's OpenAPI document and the demo: `GET /client.js` and
//! `GET /openapi.json` always; with `--demo` (on by default with the in-memory store) also
//! the page at `/`, `POST /api/demo/tasks`, the result pictures at
//! `GET /demo/result/{task_id}.{prompt}.svg` and the previews at
//! `GET /demo/preview/{task_id}.{prompt}.{step}.svg`. Without `--demo` those are 404.
//!
//! A simulated generation ([`generation`]) runs in-process but pushes through the same
//! writer as `POST /api/tasks/{id}/progress`, so the page sees exactly what a real app's
//! browser would. It stops when the server shuts down (its pushes would get 503 from then
//! on), so after a restart its task stays where it was, like the task of a generator that
//! crashed.

mod generation;
mod picture;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::header::{self, HeaderValue};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;

use crate::auth::subscribe::SubscribeAuth;
use crate::domain::NewTask;
use crate::error::{Error, json_response};
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::writer::Writer;
use generation::{GPUS, Generation, Gpus, Pace};

/// The npm package's own module (clients/js), so `/client.js` and the package cannot drift.
const CLIENT_JS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/clients/js/src/index.js"
));
const INDEX_HTML: &str = include_str!("../../static/index.html");
/// The HTTP API as OpenAPI 3.1; `tests/api/openapi.rs` holds it to the router's routes.
const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// Simulated generations at once, running or waiting for a GPU; one more gets 503.
const MAX_GENERATIONS: usize = 20;
/// Steps of every simulated generation.
const TOTAL_STEPS: u32 = 30;
/// With random trouble on, one generation in this many fails part-way...
const FAILURE_ODDS: u64 = 6;
/// ...and one in this many stalls, for [`RANDOM_STALL`].
const STALL_ODDS: u64 = 8;
/// Longer than the server's default stall period (`TASKCAST_STALL_SECS`, 60 s), so the page
/// shows the stalled warning before the generation carries on.
const RANDOM_STALL: Duration = Duration::from_secs(75);
/// The longest stall `?stall_secs=` may ask for.
const MAX_STALL_SECS: u64 = 600;

const PROMPTS: [&str; 8] = [
    "a red fox in fresh snow",
    "a lighthouse at dusk, oil painting",
    "a tiny robot watering plants",
    "a neon city street in the rain",
    "an astronaut cat on the moon",
    "a bowl of ramen, studio lighting",
    "a paper boat on a quiet lake",
    "mountains at sunrise, watercolor",
];

const FAILURES: [&str; 3] = [
    "out of GPU memory at 1024x1024 (simulated failure)",
    "the safety filter rejected the image (simulated failure)",
    "the upstream model timed out after 60 s (simulated failure)",
];

#[derive(Deserialize)]
struct StartQuery {
    /// `?failures=false` turns off the random trouble: failures and stalls (the browser
    /// test needs that).
    failures: Option<bool>,
    /// `?fast=true`: a generation takes ~3 s on its GPU instead of ~20 s (tests; the page
    /// passes it on when opened as `/?fast`).
    fast: Option<bool>,
    /// `?stall_secs=N` (1 to 600): this generation stalls for N s part-way, whatever
    /// `failures` says (to see the stalled warning with a short `TASKCAST_STALL_SECS`).
    stall_secs: Option<u64>,
    /// `?user=<uuid>`: the page's visitor (a random id it keeps in localStorage), as the
    /// task's `user_id`, so the page's "my generations" feed shows it.
    user: Option<uuid::Uuid>,
}

/// What the demo uses. Cloning is shallow.
#[derive(Clone)]
pub struct Demo {
    /// Serve the demo page at `/` and `POST /api/demo/tasks` (`--demo`).
    pub enabled: bool,
    pub store: Store,
    pub writer: Writer,
    /// New tasks are published here, so the visitor's feed and the line see them at once.
    pub hub: Hub,
    pub subscribe: SubscribeAuth,
    pub token_ttl: Duration,
    pub shutdown: Shutdown,
}

/// The bounds of one route tree's simulated generations. Cloning is shallow.
#[derive(Clone)]
struct Capacity {
    /// Places for [`MAX_GENERATIONS`], running or waiting.
    places: Arc<Semaphore>,
    gpus: Arc<Gpus>,
    /// Held from creating a task until it has joined the GPU line, so the line's order is
    /// the tasks' creation order (the order the server counts places in line by).
    order: Arc<tokio::sync::Mutex<()>>,
}

/// `GET /client.js`, `GET /openapi.json`, and the demo routes when `state.enabled` is set.
pub fn routes(state: Demo) -> BoxedFilter<(Response,)> {
    let client = warp::path!("client.js")
        .and(warp::get())
        .map(|| asset(CLIENT_JS, "text/javascript; charset=utf-8"));
    let openapi = warp::path!("openapi.json")
        .and(warp::get())
        .map(|| asset(OPENAPI_JSON, "application/json"));

    let enabled = state.enabled;
    let demo_on = warp::any()
        .and_then(move || async move {
            if enabled {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one();

    let page = warp::path::end()
        .and(warp::get())
        .map(|| asset(INDEX_HTML, "text/html; charset=utf-8"));

    // Created per route tree, so each App (and each test server) has its own bounds.
    let capacity = Capacity {
        places: Arc::new(Semaphore::new(MAX_GENERATIONS)),
        gpus: Gpus::new(GPUS),
        order: Arc::new(tokio::sync::Mutex::new(())),
    };
    let start = warp::path!("api" / "demo" / "tasks")
        .and(warp::post())
        .and(warp::any().map(move || (state.clone(), capacity.clone())))
        .and(warp::header::headers_cloned())
        .and(warp::query::<StartQuery>())
        .then(
            |(state, capacity), headers: HeaderMap, query: StartQuery| async move {
                start(state, capacity, &headers, query)
                    .await
                    .unwrap_or_else(Error::into_response)
            },
        );

    let result = warp::path!("demo" / "result" / String)
        .and(warp::get())
        .map(|file: String| picture::result_picture(&file).unwrap_or_else(Error::into_response));
    let preview = warp::path!("demo" / "preview" / String)
        .and(warp::get())
        .map(|file: String| picture::preview_picture(&file).unwrap_or_else(Error::into_response));

    let demo = page
        .or(start)
        .unify()
        .or(result)
        .unify()
        .or(preview)
        .unify();
    client
        .or(openapi)
        .unify()
        .or(demo_on.and(demo))
        .unify()
        .boxed()
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = Response::new(body.into());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Compiled in: a new binary may bring a new file, so browsers revalidate.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `POST /api/demo/tasks`: creates a task, starts its simulated generation, and answers
/// 201 `{"task_id","token","prompt","feed_token"}`: `token` may watch and cancel the task,
/// `feed_token` (with `?user=`) watch the visitor's feed. No push key: the demo is public
/// by choice.
async fn start(
    state: Demo,
    capacity: Capacity,
    headers: &HeaderMap,
    query: StartQuery,
) -> Result<Response, Error> {
    let stall_secs = query
        .stall_secs
        .map(|secs| match secs {
            1..=MAX_STALL_SECS => Ok(Duration::from_secs(secs)),
            _ => Err(Error::invalid(
                "stall_secs",
                format!("stall_secs must be from 1 to {MAX_STALL_SECS}, got {secs}"),
            )),
        })
        .transpose()?;
    let slot = capacity
        .places
        .try_acquire_owned()
        .map_err(|_| Error::Unavailable {
            what: "a demo generation slot (at most 20 at once, running or waiting for a GPU)",
            source: None,
        })?;
    let trouble = query.failures.unwrap_or(true);
    let mut rng = Rng::new();
    let subject = rng.below(PROMPTS.len() as u64) as usize;
    let prompt = PROMPTS[subject];
    let (created, gpu) = {
        let _order = capacity.order.lock().await;
        let created = state
            .store
            .create(NewTask {
                prompt: Some(prompt.to_string()),
                user_id: query.user,
            })
            .await?;
        // Last in line, and in the visitor's feed, at once (other nodes hear of it from
        // the insert's NOTIFY).
        state.hub.publish(&created);
        (created, capacity.gpus.join())
    };
    let task = created.task_id;
    // The page may watch and cancel its own generation, and watch its visitor's feed.
    let token = state.subscribe.mint_with(&[task], state.token_ttl, true);
    let feed_token = query
        .user
        .and_then(|user| state.subscribe.mint_user(user, state.token_ttl));
    let origin = origin(headers);
    let fail_at = (trouble && rng.below(FAILURE_ODDS) == 0)
        .then(|| 5 + rng.below(u64::from(TOTAL_STEPS) - 10) as u32);
    let stall = stall_secs
        .or_else(|| (trouble && rng.below(STALL_ODDS) == 0).then_some(RANDOM_STALL))
        .map(|stall| (6 + rng.below(u64::from(TOTAL_STEPS) / 3) as u32, stall));
    let generation = Generation {
        writer: state.writer.clone(),
        store: state.store.clone(),
        shutdown: state.shutdown.clone(),
        task,
        result_url: format!("{origin}/demo/result/{task}.{subject}.svg"),
        preview_url: format!("{origin}/demo/preview/{task}.{subject}.{{step}}.svg"),
        pace: if query.fast == Some(true) {
            Pace::FAST
        } else {
            Pace::NORMAL
        },
        fail_at,
        stall,
        gpu,
        held: None,
        rng,
        seq: 0,
        _slot: slot,
    };
    tokio::spawn(generation.run());
    let body = json!({"task_id": task, "token": token, "prompt": prompt,
        "feed_token": feed_token});
    Ok(json_response(StatusCode::CREATED, body.to_string()))
}

/// `scheme://host` of the page as the browser reached us, for the pictures' URLs. Pushes
/// accept only http(s) URLs, so the origin is rebuilt from `Host` (and
/// `X-Forwarded-Proto`); a `Host` that does not look like one is replaced.
fn origin(headers: &HeaderMap) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let host = header("host")
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("127.0.0.1");
    let scheme = match header("x-forwarded-proto") {
        Some(proto) if proto.trim().eq_ignore_ascii_case("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{host}")
}

/// xorshift64*, seeded from a v4 UUID: plenty for pauses and prompts, no extra crate.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = uuid::Uuid::new_v4().as_u64_pair().0;
        Rng(seed | 1)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TaskId;

    #[test]
    fn origin_is_built_from_a_plausible_host_only() {
        let task = TaskId::random();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
        assert_eq!(origin(&headers), "http://127.0.0.1:8080");
        let url = format!("{}/demo/preview/{task}.3.12.svg", origin(&headers));
        let body = json!({"image_url": url, "preview_url": url}).to_string();
        assert!(crate::domain::ProgressUpdate::from_json(body.as_bytes()).is_ok());

        headers.insert("host", HeaderValue::from_static("evil.example\"><x"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert_eq!(origin(&headers), "https://127.0.0.1");
    }

    /// The in-memory store turns the demo on; the whole path runs through `App`.
    #[tokio::test]
    async fn demo_queues_generations_for_its_gpus_and_refuses_a_21st_with_503() {
        let key = crate::auth::PushKey::new("k".repeat(32));
        let config = crate::config::Config::new(([127, 0, 0, 1], 0).into(), None, key);
        let app = crate::App::build(config).await.expect("the app builds");
        let base = format!("http://{}", app.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::new();

        for (path, content_type) in [("/client.js", "text/javascript"), ("/", "text/html")] {
            let response = http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            let header = response.headers()["content-type"].to_str().unwrap();
            assert!(header.starts_with(content_type), "{path}: {header}");
        }
        let start = |query: &str| http.post(format!("{base}/api/demo/tasks{query}")).send();
        for bad in ["?stall_secs=0", "?stall_secs=601", "?stall_secs=soon"] {
            assert_eq!(start(bad).await.unwrap().status(), 400, "{bad}");
        }

        let mut tasks = Vec::new();
        for _ in 0..MAX_GENERATIONS {
            let response = start("?failures=false&fast=true").await.unwrap();
            assert_eq!(response.status(), 201);
            let body: serde_json::Value = response.json().await.unwrap();
            assert!(body["token"].is_string(), "{body}");
            tasks.push(body);
        }
        let refused = start("").await.unwrap();
        assert_eq!(refused.status(), 503, "waiting generations count too");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "unavailable");

        let state = |task: &serde_json::Value| {
            let url = format!(
                "{base}/api/tasks/{}?token={}",
                task["task_id"].as_str().unwrap(),
                task["token"].as_str().unwrap()
            );
            let http = http.clone();
            async move {
                let state: serde_json::Value =
                    http.get(url).send().await.unwrap().json().await.unwrap();
                state
            }
        };
        // Two GPUs: the last of 20 waits behind 18 others, seconds each.
        let last = state(&tasks[MAX_GENERATIONS - 1]).await;
        assert_eq!(last["task_id"], tasks[MAX_GENERATIONS - 1]["task_id"]);
        assert_eq!(last["status"], "pending", "{last}");
        assert_eq!(last["total_steps"], TOTAL_STEPS, "{last}");

        // The first runs its steps, with a preview the server draws.
        let running = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let first = state(&tasks[0]).await;
                if first["preview_url"].is_string() {
                    return first;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the first generation shows a preview within 20 s");
        let step = running["step"].as_u64().unwrap();
        assert!(step >= 1, "{running}");
        let progress = running["progress"].as_f64().unwrap();
        assert!(
            (progress - 100.0 * step as f64 / f64::from(TOTAL_STEPS)).abs() < 0.01,
            "progress follows from the steps: {running}"
        );
        let preview = running["preview_url"].as_str().unwrap();
        assert!(
            preview.starts_with(&format!("{base}/demo/preview/")),
            "{preview}"
        );
        let response = http.get(preview).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "image/svg+xml");
        let nonsense = http
            .get(format!("{base}/demo/preview/nothing.svg"))
            .send()
            .await
            .unwrap();
        assert_eq!(nonsense.status(), 404);

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops while generations are mid-way or waiting")
            .unwrap();
    }

    #[test]
    fn rng_stays_below_its_bound() {
        let mut rng = Rng::new();
        assert!((0..1000).all(|_| rng.below(6) < 6));
    }
}
