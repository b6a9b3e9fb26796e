//! The HTTP routes: the filter tree here, thin handlers that parse into domain types and
//! call the writer, the store or the subscribers in `push` (progress), `tasks` (create,
//! read, cancel) and `operations` (metrics, health); request bodies are read by `body`.
//! Every error leaves through [`Error::into_response`].

mod body;
mod direct;
mod operations;
mod push;
mod stream;
mod tasks;

use std::sync::Arc;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, Method};
use warp::hyper::upgrade::OnUpgrade;
use warp::reply::Response;

use crate::auth::PushKey;
use crate::domain::Outcome;
use crate::error::{self, Error};
use crate::origin::{self, OriginPolicy};
use crate::query::{Query, query};
use crate::subscribers::Subscribers;
use crate::writer::Writer;
use crate::ws;
use body::{MAX_BATCH_BODY, MAX_BODY, json_body};
pub use direct::GeneratorWrites;

/// Everything the handlers share. Cloning is shallow.
#[derive(Clone)]
pub struct AppState {
    pub writer: Writer,
    pub push_key: PushKey,
    pub token_ttl: std::time::Duration,
    pub origins: OriginPolicy,
    pub bodies: BodyLimits,
    /// Bearer token required by GET /metrics, when set.
    pub metrics_token: Option<crate::auth::Secret>,
    /// The store and subscribe auth too: each is held once, there.
    pub subscribers: Arc<Subscribers>,
    /// Push streams open at once: a quarter of TASKCAST_MAX_HTTP_CONNECTIONS, so streams,
    /// which hold their connection and are never evicted, cannot fill the HTTP cap.
    pub streams: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// The push streams a node serves at once for `max_http_connections`.
    pub fn max_streams(max_http_connections: usize) -> usize {
        (max_http_connections / 4).max(1)
    }
}

/// Bounds on request bodies, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub max_body_bytes: usize,
    /// From the end of the request header to the end of its body; slower gets 408.
    pub body_timeout: std::time::Duration,
    pub max_batch_body_bytes: usize,
    pub max_batch_items: usize,
    /// A push stream ends when no line arrived for this long (as a kept-alive connection
    /// closes when no request came).
    pub keep_alive_timeout: std::time::Duration,
}

/// The whole API as one filter, with rejections mapped by [`error::recover`]. `more` are
/// routes mounted beside the API (the demo's), under the same origin check.
pub fn routes(state: AppState, more: BoxedFilter<(Response,)>) -> BoxedFilter<(Response,)> {
    // One Arc per request, not a deep copy of keys, origins and limits per request.
    let with_state = {
        let shared = Arc::new(state.clone());
        warp::any().map(move || shared.clone())
    };
    // A generator's request: the push key and a JSON body of at most `limit` bytes (the
    // setting named `setting`). Each route names its method itself, where the OpenAPI test
    // reads it.
    let from_generator = |limit: usize, setting: &'static str| {
        with_state
            .clone()
            .and(authorized(state.push_key.clone()))
            .and(json_body(limit, setting, state.bodies.body_timeout))
    };
    let body_limit = state.bodies.max_body_bytes;

    let push = warp::path!("api" / "tasks" / String / "progress")
        .and(warp::post())
        .and(from_generator(body_limit, MAX_BODY))
        .then(push::push)
        .map(respond);

    let create = warp::path!("api" / "tasks")
        .and(warp::post())
        .and(from_generator(body_limit, MAX_BODY))
        .then(tasks::create)
        .map(respond);

    let batch = warp::path!("api" / "progress")
        .and(warp::post())
        .and(from_generator(
            state.bodies.max_batch_body_bytes,
            MAX_BATCH_BODY,
        ))
        .then(push::push_batch)
        .map(respond);

    // The push stream is served in its plain form by `direct` (it needs the connection);
    // a request that reaches the filter tree is told what to change.
    let stream = warp::path!("api" / "progress" / "stream")
        .and(warp::post())
        .and(authorized(state.push_key.clone()))
        .map(|| {
            Error::invalid(
                "request",
                "a push stream must be a plain POST: no query string, header values in \
                 visible ASCII, and a numeric Content-Length if any (usually none: chunked)"
                    .to_string(),
            )
            .into_response()
        });

    let cancel = warp::path!("api" / "tasks" / String / "cancel")
        .and(warp::post())
        .and(with_state.clone())
        .and(warp::header::optional::<String>("authorization"))
        .and(query())
        .then(tasks::cancel)
        .map(respond);

    let events = warp::path!("api" / "tasks" / String / "events")
        .and(warp::get())
        .and(with_state.clone())
        .and(query())
        .then(
            |raw_id: String, state: Arc<AppState>, query: Query| async move {
                crate::sse::events(state.subscribers.clone(), raw_id, query.token).await
            },
        )
        .map(respond);

    let get = warp::path!("api" / "tasks" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and(warp::header::optional::<String>("authorization"))
        .and(query())
        .then(tasks::get_task)
        .map(respond);

    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state.clone())
        .and(warp::header::optional::<String>("authorization"))
        .map(|state: Arc<AppState>, authorization: Option<String>| {
            operations::metrics(&state, authorization.as_deref())
        })
        .map(respond);

    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(operations::healthz);

    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state.clone())
        .then(operations::readyz)
        .map(respond);

    let socket = warp::path!("ws")
        .and(warp::get())
        .and(with_state)
        .and(query())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .then(
            |state: Arc<AppState>, query: Query, headers: HeaderMap, on_upgrade| async move {
                ws::upgrade(
                    state.subscribers.clone(),
                    query.task_id,
                    query.token,
                    &headers,
                    on_upgrade,
                )
                .await
            },
        )
        .map(respond);

    let api = push
        .or(batch)
        .unify()
        .or(stream)
        .unify()
        .or(create)
        .unify()
        .or(cancel)
        .unify()
        .or(get)
        .unify()
        .or(events)
        .unify()
        .or(healthz)
        .unify()
        .or(metrics)
        .unify()
        .or(readyz)
        .unify()
        .or(socket)
        .unify()
        .or(more)
        .unify();
    // The origin check runs first, so a foreign page is refused before any route (and
    // before a WebSocket upgrade); allowed cross-origin responses carry CORS headers.
    let origins = state.origins.filter();
    // Matched by hand rather than with warp::options(): its "method not allowed" rejection
    // would outrank the 404 of an unknown route.
    let preflight = warp::method()
        .and_then(|method: Method| async move {
            if method == Method::OPTIONS {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
        .and(origins.clone())
        .map(origin::preflight);
    origins
        .and(api)
        .map(|allowed: Option<String>, response: Response| origin::allow(response, allowed))
        .or(preflight)
        .unify()
        .recover(error::recover)
        .unify()
        .with(warp::log::custom(|info| {
            tracing::debug!(
                method = %info.method(),
                path = info.path(),
                status = info.status().as_u16(),
                micros = info.elapsed().as_micros() as u64,
                "request"
            );
        }))
        .map(warp::Reply::into_response)
        .boxed()
}

/// Auth runs after path matching, so an unknown route is a 404, not a 401.
fn authorized(key: PushKey) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and_then(move |value: Option<String>| {
            let verdict = key.verify(value.as_deref()).map_err(warp::reject::custom);
            async move { verdict }
        })
        .untuple_one()
}

/// A handler's answer: its response, or its error mapped by [`Error::into_response`].
fn respond(result: Result<Response, Error>) -> Response {
    result.unwrap_or_else(Error::into_response)
}

/// The body that answers a push or a cancel: the task's state, and `applied`, whether this
/// request changed it.
fn outcome_json(outcome: &Outcome) -> String {
    outcome.state().to_json(false, Some(outcome.applied()))
}
