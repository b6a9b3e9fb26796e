//! The HTTP routes: thin handlers that parse into domain types and call the writer, the
//! store or the WebSocket upgrade. Every error leaves through [`Error::into_response`].

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use futures::{Stream, StreamExt};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::hyper::upgrade::OnUpgrade;
use warp::reply::Response;

use crate::auth::PushKey;
use crate::domain::{NewTask, Outcome, ProgressUpdate};
use crate::error::{self, Error, json_response};
use crate::origin::{self, OriginPolicy};
use crate::query::{Query, query};
use crate::subscribers::Subscribers;
use crate::telemetry;
use crate::writer::Writer;
use crate::ws;

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
}

/// Bounds on request bodies, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub max_body_bytes: usize,
    /// From the end of the request header to the end of its body; slower gets 408.
    pub body_timeout: std::time::Duration,
    pub max_batch_body_bytes: usize,
    pub max_batch_items: usize,
}

/// The whole API as one filter, with rejections mapped by [`error::recover`]. `more` are
/// routes mounted beside the API (the demo's), under the same origin check.
pub fn routes(state: AppState, more: BoxedFilter<(Response,)>) -> BoxedFilter<(Response,)> {
    // One Arc per request, not a deep copy of keys, origins and limits per request.
    let with_state = {
        let shared = Arc::new(state.clone());
        warp::any().map(move || shared.clone())
    };
    let limit = state.bodies.max_body_bytes;
    let within = state.bodies.body_timeout;

    let push = warp::path!("api" / "tasks" / String / "progress")
        .and(warp::post())
        .and(with_state.clone())
        .and(authorized(state.push_key.clone()))
        .and(json_body(limit, MAX_BODY, within))
        .then(push);

    let create = warp::path!("api" / "tasks")
        .and(warp::post())
        .and(with_state.clone())
        .and(authorized(state.push_key.clone()))
        .and(json_body(limit, MAX_BODY, within))
        .then(create);

    let batch = warp::path!("api" / "progress")
        .and(warp::post())
        .and(with_state.clone())
        .and(authorized(state.push_key.clone()))
        .and(json_body(
            state.bodies.max_batch_body_bytes,
            MAX_BATCH_BODY,
            within,
        ))
        .then(push_batch);

    let cancel = warp::path!("api" / "tasks" / String / "cancel")
        .and(warp::post())
        .and(with_state.clone())
        .and(warp::header::optional::<String>("authorization"))
        .and(query())
        .then(cancel);

    let events = warp::path!("api" / "tasks" / String / "events")
        .and(warp::get())
        .and(with_state.clone())
        .and(query())
        .then(
            |raw_id: String, state: Arc<AppState>, query: Query| async move {
                respond(crate::sse::events(state.subscribers.clone(), raw_id, query.token).await)
            },
        );

    let get = warp::path!("api" / "tasks" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and(warp::header::optional::<String>("authorization"))
        .and(query())
        .then(get_task);

    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state.clone())
        .and(warp::header::optional::<String>("authorization"))
        .map(|state: Arc<AppState>, authorization: Option<String>| {
            respond(render_metrics(&state, authorization.as_deref()))
        });

    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| json_response(StatusCode::OK, r#"{"status":"ok"}"#.to_string()));

    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state.clone())
        .then(readyz);

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
                .unwrap_or_else(Error::into_response)
            },
        );

    let api = push
        .or(batch)
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

/// The settings that bound request bodies, named in a 413.
const MAX_BODY: &str = "TASKCAST_MAX_BODY_BYTES";
const MAX_BATCH_BODY: &str = "TASKCAST_MAX_BATCH_BODY_BYTES";

/// The request body, at most `limit` bytes (set by `setting`) whether or not
/// Content-Length is sent (chunked uploads are counted as they arrive), whole within
/// `within` (else 408), and JSON when a Content-Type is given.
fn json_body(
    limit: usize,
    setting: &'static str,
    within: std::time::Duration,
) -> impl Filter<Extract = (bytes::Bytes,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("content-type")
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::body::stream())
        .and_then(
            move |content_type: Option<String>, length: Option<u64>, body| async move {
                let is_json = content_type.as_deref().is_none_or(|ct| {
                    let mime = ct.split(';').next().unwrap_or_default().trim();
                    mime.eq_ignore_ascii_case("application/json")
                });
                if !is_json {
                    return Err(warp::reject::custom(Error::UnsupportedMediaType));
                }
                if length.is_some_and(|n| n > limit as u64) {
                    return Err(warp::reject::custom(Error::PayloadTooLarge {
                        limit,
                        setting,
                    }));
                }
                tokio::time::timeout(within, read_limited(body, limit, setting))
                    .await
                    .unwrap_or(Err(Error::RequestTimeout { within }))
                    .map_err(warp::reject::custom)
            },
        )
}

async fn read_limited<S, B>(
    body: S,
    limit: usize,
    setting: &'static str,
) -> Result<bytes::Bytes, Error>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    let mut collected = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk
            .map_err(|e| Error::invalid("body", format!("the body could not be read: {e}")))?;
        if collected.len() + chunk.remaining() > limit {
            return Err(Error::PayloadTooLarge { limit, setting });
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            collected.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(collected.freeze())
}

fn respond(result: Result<Response, Error>) -> Response {
    result.unwrap_or_else(Error::into_response)
}

async fn push(raw_id: String, state: Arc<AppState>, body: bytes::Bytes) -> Response {
    respond(
        async {
            let pushed = async {
                let task = state.subscribers.store.parse_id(&raw_id).await?;
                let update = ProgressUpdate::from_json(&body)?;
                state.writer.push(task, update).await
            };
            let outcome = count(pushed.await)?;
            let body = outcome.state().to_json(false, Some(outcome.applied()));
            Ok(json_response(StatusCode::OK, body))
        }
        .await,
    )
}

/// Counts a push by outcome for `taskcast_pushes_total`, passing it through.
fn count(result: Result<Outcome, Error>) -> Result<Outcome, Error> {
    telemetry::count_push(match &result {
        Ok(outcome) if outcome.applied() => "applied",
        Ok(_) => "stale",
        Err(e) => e.code(),
    });
    result
}

/// `POST /api/progress`: many pushes, for many tasks, in one request. The request
/// succeeds as a whole (200) and each item has its own status, in the order sent:
/// `{"results":[{"status":200,"state":{...}}, {"status":404,"error":...}, ...]}`.
async fn push_batch(state: Arc<AppState>, body: bytes::Bytes) -> Response {
    respond(
        async {
            let items = parse_batch(&body, state.bodies.max_batch_items)?;
            let kind = state.subscribers.store.id_kind().await?;
            // The valid pushes go to the writer together; each item keeps its place, and
            // takes the next outcome when it was sent.
            let mut valid = Vec::with_capacity(items.len());
            let sent: Vec<Result<(), Error>> = items
                .into_iter()
                .map(|item| ProgressUpdate::from_batch_item(item, kind).map(|p| valid.push(p)))
                .collect();
            let mut outcomes = state.writer.push_many(valid).await.into_iter();
            let results: Vec<String> = sent
                .into_iter()
                .map(|item| {
                    let outcome =
                        item.and_then(|()| outcomes.next().expect("one outcome per push sent"));
                    match count(outcome) {
                        Ok(outcome) => format!(
                            r#"{{"status":200,"state":{}}}"#,
                            outcome.state().to_json(false, Some(outcome.applied()))
                        ),
                        Err(e) => e.to_item_json(),
                    }
                })
                .collect();
            // Each item is JSON already (a state is encoded once, by `to_json`).
            let out = format!(r#"{{"results":[{}]}}"#, results.join(","));
            Ok(json_response(StatusCode::OK, out))
        }
        .await,
    )
}

/// The batch body: `{"updates":[...]}` or a bare array, with at most `max` items.
fn parse_batch(body: &[u8], max: usize) -> Result<Vec<serde_json::Value>, Error> {
    let value = crate::domain::json_body(body)?;
    let items = match value {
        serde_json::Value::Array(items) => items,
        serde_json::Value::Object(mut fields) => match fields.remove("updates") {
            Some(serde_json::Value::Array(items)) if fields.is_empty() => items,
            _ => {
                return Err(Error::invalid(
                    "body",
                    r#"the body must be {"updates":[{"task_id":...,"progress":...},...]} or an array"#
                        .to_string(),
                ));
            }
        },
        _ => {
            return Err(Error::invalid(
                "body",
                r#"the body must be {"updates":[...]} or an array of updates"#.to_string(),
            ));
        }
    };
    if items.is_empty() || items.len() > max {
        return Err(Error::invalid(
            "updates",
            format!(
                "send from 1 to {max} updates per request (TASKCAST_MAX_BATCH_ITEMS), got {}",
                items.len()
            ),
        ));
    }
    Ok(items)
}

async fn create(state: Arc<AppState>, body: bytes::Bytes) -> Response {
    respond(
        async {
            let (task, cancel) = NewTask::from_json_with_rights(&body)?;
            let created = state.subscribers.store.create(task).await?;
            // Its user's feed subscribers here see it at once, and it is last in line
            // (publishing marks the queue changed); other nodes hear of it through the
            // insert trigger's NOTIFY.
            state.subscribers.hub.publish(&created);
            let token =
                state
                    .subscribers
                    .auth
                    .mint_with(&[created.task_id], state.token_ttl, cancel);
            let body = created.to_created_json(token.as_deref());
            Ok(json_response(StatusCode::CREATED, body))
        }
        .await,
    )
}

/// `POST /api/tasks/{id}/cancel`, with the subscriber's credential (a subscribe token with
/// the cancel right, or the owner's Supabase session) as `Authorization: Bearer` or
/// `?token=`. The body, if any, is not read. 200 with the state (`cancel_requested: true`);
/// `applied: false` when it was asked before.
async fn cancel(
    raw_id: String,
    state: Arc<AppState>,
    authorization: Option<String>,
    query: Query,
) -> Response {
    respond(
        async {
            let task = state.subscribers.store.parse_id(&raw_id).await?;
            let bearer = authorization.as_deref().and_then(crate::auth::bearer);
            let token = bearer.or(query.token.as_deref());
            let outcome = state.subscribers.cancel(token, task).await?;
            let body = outcome.state().to_json(false, Some(outcome.applied()));
            Ok(json_response(StatusCode::OK, body))
        }
        .await,
    )
}

/// Readable with the push key (servers) or a subscribe token (browsers), given as
/// `Authorization: Bearer` or `?token=`.
async fn get_task(
    raw_id: String,
    state: Arc<AppState>,
    authorization: Option<String>,
    query: Query,
) -> Response {
    respond(
        async {
            let task = state.subscribers.store.parse_id(&raw_id).await?;
            if state.push_key.verify(authorization.as_deref()).is_err() {
                let bearer = authorization.as_deref().and_then(crate::auth::bearer);
                let token = query.token.as_deref().or(bearer);
                state.subscribers.may_watch(token, task).await?;
            }
            let current = state
                .subscribers
                .store
                .get(task)
                .await?
                .ok_or(Error::NotFound(task.to_string()))?;
            Ok(json_response(StatusCode::OK, current.to_json(true, None)))
        }
        .await,
    )
}

/// Prometheus text. Gauges that are cheap to read are read now rather than tracked.
fn render_metrics(state: &AppState, authorization: Option<&str>) -> Result<Response, Error> {
    if let Some(token) = &state.metrics_token {
        let presented = authorization
            .and_then(crate::auth::bearer)
            .unwrap_or_default();
        let matches: bool =
            subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), token.expose().as_bytes()).into();
        if !matches {
            return Err(Error::Forbidden(
                "GET /metrics needs Authorization: Bearer <TASKCAST_METRICS_TOKEN>".to_string(),
            ));
        }
    }
    let open = state.subscribers.limits.max_connections
        - state.subscribers.connections.available_permits();
    metrics::gauge!(telemetry::CONNECTIONS).set(open as f64);
    metrics::gauge!(telemetry::HUB_TASKS).set(state.subscribers.hub.len() as f64);
    let handle = telemetry::metrics();
    handle.run_upkeep();
    let mut response = Response::new(handle.render().into());
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(response)
}

async fn readyz(state: Arc<AppState>) -> Response {
    respond(state.subscribers.store.check_ready().await.map(|()| {
        let body = format!(
            r#"{{"status":"ready","store":"{}"}}"#,
            state.subscribers.store.kind()
        );
        json_response(StatusCode::OK, body)
    }))
}
