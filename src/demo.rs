//! The browser client, the API's OpenAPI document and the demo: `GET /client.js` and
//! `GET /openapi.json` always; with `--demo` (on by default
//! with the in-memory store) also the page at `/`, `POST /api/demo/tasks` and the result
//! pictures at `GET /demo/result/{task_id}.{prompt}.svg`. Without `--demo` those are 404.
//!
//! A simulated generation runs in-process but pushes through the same writer as
//! `POST /api/tasks/{id}/progress`, so the page sees exactly what a real app's browser
//! would. It stops when the server shuts down (its pushes would get 503 from then on), so
//! after a restart its task stays where it was, like the task of a generator that crashed.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::header::{self, HeaderValue};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;

use crate::auth::subscribe::SubscribeAuth;
use crate::domain::{IdKind, NewTask, ProgressUpdate, TaskId};
use crate::error::{Error, json_response};
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::writer::Writer;

/// The npm package's own module (clients/js), so `/client.js` and the package cannot drift.
const CLIENT_JS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/clients/js/src/index.js"
));
const INDEX_HTML: &str = include_str!("../static/index.html");
/// The HTTP API as OpenAPI 3.1; `tests/api/openapi.rs` holds it to the router's routes.
const OPENAPI_JSON: &str = include_str!("../docs/openapi.json");

/// Simulated generations running at once; one more gets 503.
const MAX_RUNNING: usize = 20;
/// With failures on, one generation in this many fails part-way.
const FAILURE_ODDS: u64 = 6;

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
    /// `?failures=false` turns off the random failures (the browser test needs that).
    failures: Option<bool>,
    /// `?fast=true`: a generation takes ~3 s instead of ~20 s (tests; the page passes it on
    /// when opened as `/?fast`).
    fast: Option<bool>,
}

/// What the demo uses. Cloning is shallow.
#[derive(Clone)]
pub struct Demo {
    /// Serve the demo page at `/` and `POST /api/demo/tasks` (`--demo`).
    pub enabled: bool,
    pub store: Store,
    pub writer: Writer,
    pub subscribe: SubscribeAuth,
    pub token_ttl: Duration,
    pub shutdown: Shutdown,
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

    // Created per route tree, so each App (and each test server) has its own bound.
    let running = Arc::new(Semaphore::new(MAX_RUNNING));
    let start = warp::path!("api" / "demo" / "tasks")
        .and(warp::post())
        .and(warp::any().map(move || (state.clone(), running.clone())))
        .and(warp::header::headers_cloned())
        .and(warp::query::<StartQuery>())
        .then(
            |(state, running), headers: HeaderMap, query: StartQuery| async move {
                let failures = query.failures.unwrap_or(true);
                start(state, running, &headers, failures, query.fast == Some(true))
                    .await
                    .unwrap_or_else(Error::into_response)
            },
        );

    let result = warp::path!("demo" / "result" / String)
        .and(warp::get())
        .map(|file: String| result_picture(&file).unwrap_or_else(Error::into_response));

    client
        .or(openapi)
        .unify()
        .or(demo_on.and(page.or(start).unify().or(result).unify()))
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
/// 201 `{"task_id","token","prompt"}`. No push key: the demo is public by choice.
async fn start(
    state: Demo,
    running: Arc<Semaphore>,
    headers: &HeaderMap,
    failures: bool,
    fast: bool,
) -> Result<Response, Error> {
    let permit = running
        .try_acquire_owned()
        .map_err(|_| Error::Unavailable {
            what: "a demo generation slot (at most 20 run at once)",
            source: None,
        })?;
    let mut rng = Rng::new();
    let subject = rng.below(PROMPTS.len() as u64) as usize;
    let prompt = PROMPTS[subject];
    let created = state
        .store
        .create(NewTask {
            prompt: Some(prompt.to_string()),
            user_id: None,
        })
        .await?;
    let task = created.task_id;
    let token = state.subscribe.mint(&[task], state.token_ttl);
    let generation = Generation {
        writer: state.writer.clone(),
        shutdown: state.shutdown.clone(),
        task,
        result_url: result_url(headers, task, subject),
        fail: failures && rng.below(FAILURE_ODDS) == 0,
        pace: if fast { Pace::FAST } else { Pace::NORMAL },
        rng,
        seq: 0,
        _permit: permit,
    };
    tokio::spawn(generation.run());
    let body = json!({"task_id": task, "token": token, "prompt": prompt});
    Ok(json_response(StatusCode::CREATED, body.to_string()))
}

/// Where the finished picture is, as the browser reached us. Pushes accept only http(s)
/// URLs, so the page's origin is rebuilt from `Host` (and `X-Forwarded-Proto`).
fn result_url(headers: &HeaderMap, task: TaskId, subject: usize) -> String {
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
    format!("{scheme}://{host}/demo/result/{task}.{subject}.svg")
}

/// One simulated generation: queued, generating 0..100, uploading, completed (or failed).
struct Generation {
    writer: Writer,
    shutdown: Shutdown,
    task: TaskId,
    result_url: String,
    fail: bool,
    pace: Pace,
    rng: Rng,
    seq: i64,
    /// Holds a slot of the bound until the generation ends.
    _permit: OwnedSemaphorePermit,
}

/// How long a simulated generation takes: pauses in milliseconds and progress per step.
#[derive(Clone, Copy)]
struct Pace {
    queued_ms: (u64, u64),
    step_ms: (u64, u64),
    /// Progress added per step: `step_min + below(step_spread)`.
    step_min: u32,
    step_spread: u64,
    upload_ms: (u64, u64),
}

impl Pace {
    /// About 20 s: slow enough to restart the server mid-generation and watch it carry on.
    const NORMAL: Pace = Pace {
        queued_ms: (1_000, 2_000),
        step_ms: (500, 900),
        step_min: 2,
        step_spread: 5,
        upload_ms: (800, 1_500),
    };
    /// About 3 s, for tests.
    const FAST: Pace = Pace {
        queued_ms: (300, 700),
        step_ms: (100, 300),
        step_min: 3,
        step_spread: 9,
        upload_ms: (300, 600),
    };
}

/// Why a generation stops early.
enum Stop {
    Shutdown,
    Finished,
}

impl Generation {
    async fn run(mut self) {
        let _ = self.steps().await;
    }

    async fn steps(&mut self) -> Result<(), Stop> {
        self.push(json!({"status": "pending", "stage": "queued", "progress": 0}))
            .await?;
        let pace = self.pace;
        self.pause(pace.queued_ms).await?;
        let fail_at = self.fail.then(|| 15 + self.rng.below(60) as u32);
        let mut progress: u32 = 0;
        loop {
            let update =
                json!({"status": "processing", "stage": "generating", "progress": progress});
            self.push(update).await?;
            if fail_at.is_some_and(|at| progress >= at) {
                let error = FAILURES[self.rng.below(FAILURES.len() as u64) as usize];
                return self.push(json!({"status": "failed", "error": error})).await;
            }
            if progress == 100 {
                break;
            }
            self.pause(pace.step_ms).await?;
            let step = pace.step_min + self.rng.below(pace.step_spread) as u32;
            progress = (progress + step).min(100);
        }
        self.push(json!({"stage": "uploading"})).await?;
        self.pause(pace.upload_ms).await?;
        let done = json!({"status": "completed", "stage": "done", "image_url": self.result_url});
        self.push(done).await
    }

    /// A failed push is logged and the generation goes on, as the guide asks of real
    /// generators; only a finished task (someone else ended it) stops it.
    async fn push(&mut self, mut fields: serde_json::Value) -> Result<(), Stop> {
        self.seq += 1;
        fields["seq"] = self.seq.into();
        let update = ProgressUpdate::from_json(fields.to_string().as_bytes())
            .expect("the demo's updates are valid");
        match self.writer.push(self.task, update).await {
            Ok(_) => Ok(()),
            Err(Error::Conflict { .. }) => Err(Stop::Finished),
            Err(_) if self.shutdown.is_triggered() => Err(Stop::Shutdown),
            Err(e) => {
                tracing::warn!(task = %self.task, error = %e.chain(), "demo push failed");
                Ok(())
            }
        }
    }

    async fn pause(&mut self, (min_ms, max_ms): (u64, u64)) -> Result<(), Stop> {
        let wait = Duration::from_millis(min_ms + self.rng.below(max_ms - min_ms + 1));
        tokio::select! {
            () = tokio::time::sleep(wait) => Ok(()),
            _ = self.shutdown.wait() => Err(Stop::Shutdown),
        }
    }
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

/// 16 bytes from any id (FNV-1a, then xorshift): a stable picture per task.
fn spread(id: TaskId) -> [u8; 16] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_str().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = Rng(h | 1);
    std::array::from_fn(|_| rng.below(256) as u8)
}

/// `GET /demo/result/{task_id}.{prompt}.svg`: the "generated image", a small scene showing
/// the prompt's subject (`prompt` is its index in [`PROMPTS`]; without it, one follows from
/// the id), with colours and shapes varied by the task id. Only numbers are interpolated.
fn result_picture(file: &str) -> Result<Response, Error> {
    let raw = file.strip_suffix(".svg").ok_or(Error::RouteNotFound)?;
    let (raw, subject) = match raw.rsplit_once('.') {
        Some((id, digit)) if digit.len() == 1 && digit.as_bytes()[0].is_ascii_digit() => {
            (id, usize::from(digit.as_bytes()[0] - b'0'))
        }
        _ => (raw, usize::MAX),
    };
    // Any id a table may have (a UUID, an integer, text): a UUID's own bytes, else a hash.
    let id = IdKind::Text.parse(raw)?;
    let bytes = uuid::Uuid::parse_str(id.as_str()).map_or_else(|_| spread(id), |u| u.into_bytes());
    let n = |i: usize| u32::from(bytes[i]);
    let subject = if subject < PROMPTS.len() {
        subject
    } else {
        n(11) as usize % PROMPTS.len()
    };
    // Skies from cyan through violet to pink, a warm sun, muted green-to-teal land; night
    // and snow scenes change the palette. (Bytes 6 and 8 hold the UUID's version and
    // variant bits, so they are not used.)
    let night = matches!(subject, 3 | 4);
    let sky = if night {
        225 + n(0) % 40
    } else {
        180 + n(0) * 150 / 256
    };
    let (sky_l, sky2_l) = if night { (12, 30) } else { (60, 85) };
    let sun = 25 + n(1) % 30;
    let (land, land_s, land_l) = match subject {
        0 => (210, 20, 92),
        4 => (0, 0, 62),
        6 => (200 + n(9) % 20, 55, 45),
        _ => (90 + n(9) * 110 / 256, 25, 45),
    };
    let (sun_x, sun_y, sun_r) = (60 + n(2) * 140 / 256, 40 + n(3) % 40, 14 + n(4) % 14);
    let (peak_a, peak_b, peak_c) = (50 + n(5) % 40, 40 + n(7) % 50, 60 + n(10) % 40);
    let x = 70 + n(12) % 110;
    let hue = n(13) * 360 / 256;
    let subject_svg = match subject {
        // a red fox in fresh snow
        0 => format!(
            r##"<ellipse cx="{x}" cy="128" rx="26" ry="14" fill="hsl(22,85%,50%)"/><circle cx="{hx}" cy="112" r="11" fill="hsl(22,85%,50%)"/><path d="M{e1} 104 l4 -14 l6 12 Z M{e2} 104 l4 -14 l6 12 Z" fill="hsl(22,85%,40%)"/><path d="M{tx} 128 q-26 -4 -30 -22 q14 10 30 14 Z" fill="hsl(22,85%,55%)"/>"##,
            hx = x + 24,
            e1 = x + 15,
            e2 = x + 25,
            tx = x - 22,
        ),
        // a lighthouse at dusk
        1 => format!(
            r##"<path d="M{x} 150 l6 -80 h12 l6 80 Z" fill="#f4f1ea"/><path d="M{x1} 110 h17 v10 h-18 Z M{x2} 130 h21 v10 h-22 Z" fill="#c0392b"/><rect x="{x3}" y="58" width="14" height="12" fill="hsl(50,100%,70%)"/><path d="M{x4} 64 L256 40 L256 88 Z" fill="hsla(50,100%,80%,0.45)"/>"##,
            x1 = x + 3,
            x2 = x + 1,
            x3 = x + 5,
            x4 = x + 12,
        ),
        // a tiny robot watering plants
        2 => format!(
            r##"<rect x="{x}" y="100" width="30" height="34" rx="4" fill="hsl({hue},15%,70%)"/><rect x="{hx}" y="82" width="22" height="18" rx="3" fill="hsl({hue},15%,80%)"/><circle cx="{e1}" cy="91" r="3" fill="#2b6cb0"/><circle cx="{e2}" cy="91" r="3" fill="#2b6cb0"/><path d="M{px} 150 v-18 M{px2} 150 v-12" stroke="#2f855a" stroke-width="3"/><circle cx="{px}" cy="128" r="7" fill="#48bb78"/><circle cx="{px2}" cy="136" r="6" fill="#68d391"/>"##,
            hx = x + 4,
            e1 = x + 10,
            e2 = x + 20,
            px = x + 48,
            px2 = x + 62,
        ),
        // a neon city street in the rain
        3 => {
            let mut city = String::new();
            for i in 0..8u32 {
                let height = 40 + (n(i as usize % 16) + i * 37) % 70;
                let neon = (hue + i * 47) % 360;
                city.push_str(&format!(
                    r##"<rect x="{bx}" y="{by}" width="28" height="{height}" fill="#1a1b2e"/><rect x="{wx}" y="{wy}" width="16" height="4" fill="hsl({neon},100%,60%)"/>"##,
                    bx = i * 32,
                    by = 160 - height,
                    wx = i * 32 + 6,
                    wy = 170 - height,
                ));
            }
            city.push_str(r##"<path d="M20 10 l-6 24 M70 20 l-6 24 M130 5 l-6 24 M190 18 l-6 24 M240 8 l-6 24" stroke="hsla(200,80%,80%,0.6)" stroke-width="1.5"/>"##);
            city
        }
        // an astronaut cat on the moon
        4 => format!(
            r##"<circle cx="200" cy="40" r="18" fill="hsl(210,70%,55%)"/><rect x="{x}" y="108" width="26" height="28" rx="8" fill="#f7fafc"/><circle cx="{hx}" cy="96" r="16" fill="hsla(200,60%,85%,0.5)" stroke="#f7fafc" stroke-width="3"/><circle cx="{hx}" cy="98" r="9" fill="hsl(30,60%,55%)"/><path d="M{e1} 92 l3 -8 l4 7 Z M{e2} 92 l3 -8 l4 7 Z" fill="hsl(30,60%,45%)"/>"##,
            hx = x + 13,
            e1 = x + 5,
            e2 = x + 14,
        ),
        // a bowl of ramen, studio lighting
        5 => format!(
            r##"<path d="M{x0} 100 a50 40 0 0 0 100 0 Z" fill="hsl({hue},55%,45%)"/><ellipse cx="{cx}" cy="100" rx="50" ry="8" fill="hsl(40,70%,75%)"/><path d="M{n1} 100 q10 -30 20 0 M{n2} 100 q10 -30 20 0" stroke="hsl(45,80%,85%)" stroke-width="3" fill="none"/><circle cx="{egg}" cy="98" r="8" fill="#fff"/><circle cx="{egg}" cy="98" r="4" fill="hsl(40,95%,55%)"/>"##,
            x0 = x - 20,
            cx = x + 30,
            n1 = x,
            n2 = x + 14,
            egg = x + 52,
        ),
        // a paper boat on a quiet lake
        6 => format!(
            r##"<path d="M{x} 120 h50 l-10 14 h-30 Z" fill="#fdfdfd"/><path d="M{m} 120 l12 -26 l12 26 Z" fill="#edf2f7"/><path d="M{w1} 140 h40 M{w2} 148 h30" stroke="hsla(0,0%,100%,0.6)" stroke-width="2"/>"##,
            m = x + 13,
            w1 = x - 10,
            w2 = x + 20,
        ),
        // mountains at sunrise, watercolor: the landscape alone
        _ => String::new(),
    };
    let svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 256 160" width="512" height="320">
<defs><linearGradient id="sky" x1="0" y1="0" x2="0" y2="1">
<stop offset="0" stop-color="hsl({sky},60%,{sky_l}%)"/><stop offset="1" stop-color="hsl({sky2},75%,{sky2_l}%)"/>
</linearGradient></defs>
<rect width="256" height="160" fill="url(#sky)"/>
<circle cx="{sun_x}" cy="{sun_y}" r="{sun_r}" fill="hsl({sun},95%,{sun_l}%)"/>
<path d="M0 160 L0 {a} L60 {b} L120 {c} L190 {d} L256 {e} L256 160 Z" fill="hsl({land},{land_s}%,{land_l}%)"/>
<path d="M0 160 L0 130 L70 112 L150 128 L256 108 L256 160 Z" fill="hsl({land},{land_s2}%,{land_l2}%)"/>
{subject_svg}
</svg>
"##,
        sky2 = (sky + 25) % 360,
        sun_l = if night { 92 } else { 70 },
        land_s2 = land_s + 5,
        land_l2 = land_l * 2 / 3,
        a = 160 - peak_a,
        b = 160 - peak_b - 20,
        c = 160 - peak_c,
        d = 160 - peak_b,
        e = 160 - peak_a - 10,
    );
    let mut response = Response::new(svg.into());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("image/svg+xml"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400, immutable"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_url_is_built_from_a_plausible_host_only() {
        let task = TaskId::random();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
        let url = result_url(&headers, task, 3);
        assert_eq!(
            url,
            format!("http://127.0.0.1:8080/demo/result/{task}.3.svg")
        );
        let body = json!({"image_url": url}).to_string();
        assert!(ProgressUpdate::from_json(body.as_bytes()).is_ok());

        headers.insert("host", HeaderValue::from_static("evil.example\"><x"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert_eq!(
            result_url(&headers, task, 0),
            format!("https://127.0.0.1/demo/result/{task}.0.svg")
        );
    }

    #[test]
    fn result_picture_needs_a_task_id_and_the_svg_suffix() {
        let task = TaskId::random();
        let ok = result_picture(&format!("{task}.svg")).unwrap();
        assert_eq!(ok.headers()["content-type"], "image/svg+xml");
        assert!(result_picture(&task.to_string()).is_err());
        assert!(result_picture("a,b.svg").is_err());
        assert!(result_picture(".svg").is_err());
        assert!(
            result_picture("42.svg").is_ok(),
            "integer ids have pictures too"
        );
    }

    #[test]
    fn each_prompt_gets_a_picture_of_its_own_subject() {
        let task = TaskId::random();
        let body = |file: String| {
            let response = result_picture(&file).unwrap();
            let bytes =
                futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body()))
                    .unwrap()
                    .to_bytes();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        let pictures: Vec<String> = (0..PROMPTS.len())
            .map(|i| body(format!("{task}.{i}.svg")))
            .collect();
        for (i, a) in pictures.iter().enumerate() {
            for b in &pictures[i + 1..] {
                assert_ne!(a, b, "two prompts drew the same picture for one task");
            }
        }
        // Without a prompt index the subject follows from the id, and a text id that ends
        // in ".<digit>" is still a picture.
        assert!(body(format!("{task}.svg")).starts_with("<svg"));
        assert!(result_picture("job.7.svg").is_ok());
    }

    /// The in-memory store turns the demo on; the whole path runs through `App`.
    #[tokio::test]
    async fn demo_serves_its_files_and_refuses_a_21st_running_generation_with_503() {
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

        let mut tasks = Vec::new();
        for _ in 0..MAX_RUNNING {
            let response = http
                .post(format!("{base}/api/demo/tasks?failures=false&fast=true"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
            let body: serde_json::Value = response.json().await.unwrap();
            assert!(body["token"].is_string(), "{body}");
            tasks.push(body);
        }
        let refused = http
            .post(format!("{base}/api/demo/tasks"))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 503);
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "unavailable");

        let first = &tasks[0];
        let url = format!(
            "{base}/api/tasks/{}?token={}",
            first["task_id"].as_str().unwrap(),
            first["token"].as_str().unwrap()
        );
        let state: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
        assert_eq!(state["task_id"], first["task_id"]);

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops while generations are mid-way")
            .unwrap();
    }

    #[test]
    fn rng_stays_below_its_bound() {
        let mut rng = Rng::new();
        assert!((0..1000).all(|_| rng.below(6) < 6));
    }
}
