//! A task's own routes: create it (`POST /api/tasks`), read it (`GET /api/tasks/{id}`) and
//! ask to cancel it (`POST /api/tasks/{id}/cancel`).

use std::sync::Arc;

use bytes::Bytes;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{AppState, outcome_json};
use crate::domain::NewTask;
use crate::error::{Error, json_response};
use crate::query::Query;

/// `POST /api/tasks` (push key): 201 with the task and a subscribe token for it.
pub(super) async fn create(state: Arc<AppState>, body: Bytes) -> Result<Response, Error> {
    let (task, cancel) = NewTask::from_json_with_rights(&body)?;
    let created = state.subscribers.store.create(task).await?;
    // Its user's feed subscribers here see it at once, and it is last in line
    // (publishing marks the queue changed); other nodes hear of it through the
    // insert trigger's NOTIFY.
    state.subscribers.hub.publish(&created);
    let token = state
        .subscribers
        .auth
        .mint_with(&[created.task_id], state.token_ttl, cancel);
    let body = created.to_created_json(token.as_deref());
    Ok(json_response(StatusCode::CREATED, body))
}

/// `POST /api/tasks/{id}/cancel`, with the subscriber's credential (a subscribe token with
/// the cancel right, or the owner's Supabase session) as `Authorization: Bearer` or
/// `?token=`. The body, if any, is not read. 200 with the state (`cancel_requested: true`);
/// `applied: false` when it was asked before.
pub(super) async fn cancel(
    raw_id: String,
    state: Arc<AppState>,
    authorization: Option<String>,
    query: Query,
) -> Result<Response, Error> {
    let task = state.subscribers.store.parse_id(&raw_id).await?;
    let bearer = authorization.as_deref().and_then(crate::auth::bearer);
    let token = bearer.or(query.token.as_deref());
    let outcome = state.subscribers.cancel(token, task).await?;
    Ok(json_response(StatusCode::OK, outcome_json(&outcome)))
}

/// Readable with the push key (servers) or a subscribe token (browsers), given as
/// `Authorization: Bearer` or `?token=`.
pub(super) async fn get_task(
    raw_id: String,
    state: Arc<AppState>,
    authorization: Option<String>,
    query: Query,
) -> Result<Response, Error> {
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
        .ok_or_else(|| Error::NotFound(task.to_string()))?;
    Ok(json_response(StatusCode::OK, current.to_json(true, None)))
}
