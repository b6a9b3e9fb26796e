//! The operator's routes: `GET /metrics`, `GET /healthz`, `GET /readyz`.

use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;

use super::AppState;
use crate::error::{Error, json_response};
use crate::telemetry;

/// Prometheus text. Gauges that are cheap to read are read now rather than tracked.
pub(super) fn metrics(state: &AppState, authorization: Option<&str>) -> Result<Response, Error> {
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

/// Alive: answers without touching the store.
pub(super) fn healthz() -> Response {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.to_string())
}

/// Ready: the store can take pushes (see [`crate::store::Store::check_ready`]).
pub(super) async fn readyz(state: Arc<AppState>) -> Result<Response, Error> {
    state.subscribers.store.check_ready().await?;
    let body = format!(
        r#"{{"status":"ready","store":"{}"}}"#,
        state.subscribers.store.kind()
    );
    Ok(json_response(StatusCode::OK, body))
}
