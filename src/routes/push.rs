//! The generator's writes: `POST /api/tasks/{id}/progress` (one push) and
//! `POST /api/progress` (a batch), both through the writer's group commit.

use std::sync::Arc;

use bytes::Bytes;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{AppState, outcome_json};
use crate::domain::{Outcome, ProgressUpdate};
use crate::error::{Error, json_response};
use crate::telemetry;

/// `POST /api/tasks/{id}/progress`: 200 with the state once the push is committed.
pub(super) async fn push(
    raw_id: String,
    state: Arc<AppState>,
    body: Bytes,
) -> Result<Response, Error> {
    let pushed = async {
        let task = state.subscribers.store.parse_id(&raw_id).await?;
        let update = ProgressUpdate::from_json(&body)?;
        state.writer.push(task, update).await
    };
    let outcome = count(pushed.await)?;
    Ok(json_response(StatusCode::OK, outcome_json(&outcome)))
}

/// Counts a push by outcome for `taskcast_pushes_total`, passing it through.
pub(super) fn count(result: Result<Outcome, Error>) -> Result<Outcome, Error> {
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
pub(super) async fn push_batch(state: Arc<AppState>, body: Bytes) -> Result<Response, Error> {
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
            let outcome = item.and_then(|()| outcomes.next().expect("one outcome per push sent"));
            match count(outcome) {
                Ok(outcome) => format!(r#"{{"status":200,"state":{}}}"#, outcome_json(&outcome)),
                Err(e) => e.to_item_json(),
            }
        })
        .collect();
    // Each item is JSON already (a state is encoded once, by `to_json`).
    let out = format!(r#"{{"results":[{}]}}"#, results.join(","));
    Ok(json_response(StatusCode::OK, out))
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
