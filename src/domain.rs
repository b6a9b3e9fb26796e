//! Domain types that carry their own validity.
//!
//! Everything a client sends is parsed here, once, into types whose fields are private and
//! whose constructors reject bad input with a message that names the field and says what
//! a valid value looks like. Past the route, nothing checks these values again.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::Error;

/// Longest accepted `stage` text, in characters.
pub const MAX_STAGE_CHARS: usize = 256;
/// Longest accepted `image_url`, in characters.
pub const MAX_IMAGE_URL_CHARS: usize = 2048;
/// Longest accepted `error` text, in characters.
pub const MAX_ERROR_CHARS: usize = 1024;

/// The id of a row in `public.image_tasks`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(Uuid);

impl TaskId {
    /// Parses a task id, accepting only the hyphenated UUID form that Postgres prints.
    pub fn parse(raw: &str) -> Result<Self, Error> {
        let raw = raw.trim();
        if raw.len() != 36 {
            return Err(bad_task_id(raw));
        }
        Uuid::parse_str(raw)
            .map(TaskId)
            .map_err(|_| bad_task_id(raw))
    }

    /// A fresh random (v4) id, for tasks created through `POST /api/tasks`.
    pub fn random() -> Self {
        TaskId(Uuid::new_v4())
    }

    /// The id as a UUID, for binding to SQL parameters.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for TaskId {
    fn from(id: Uuid) -> Self {
        TaskId(id)
    }
}

fn bad_task_id(raw: &str) -> Error {
    let shown: String = raw.chars().take(40).collect();
    Error::invalid(
        "task_id",
        format!(
            "task_id must be a UUID such as 0b6f1c5e-3f0e-4d7a-9a57-3c1f6c2d9e10, got {shown:?}"
        ),
    )
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.0.hyphenated())
    }
}

impl Serialize for TaskId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.hyphenated())
    }
}

/// Percent complete, a finite number from 0 to 100 inclusive.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Progress(f64);

impl Progress {
    /// Accepts any finite number in `0..=100`; fractions are kept.
    pub fn new(value: f64) -> Result<Self, Error> {
        if value.is_finite() && (0.0..=100.0).contains(&value) {
            Ok(Progress(value))
        } else {
            Err(Error::invalid(
                "progress",
                format!("progress must be a number from 0 to 100, got {value}"),
            ))
        }
    }

    pub fn value(self) -> f64 {
        self.0
    }
}

/// Human-readable stage text such as "generating", at most [`MAX_STAGE_CHARS`] characters.
#[derive(Clone, PartialEq, Debug)]
pub struct Stage(String);

impl Stage {
    pub fn new(text: String) -> Result<Self, Error> {
        let chars = text.chars().count();
        if chars > MAX_STAGE_CHARS {
            return Err(Error::invalid(
                "stage",
                format!("stage must be at most {MAX_STAGE_CHARS} characters, got {chars}"),
            ));
        }
        if text.chars().any(|c| c.is_control()) {
            return Err(Error::invalid(
                "stage",
                "stage must not contain control characters (newlines, tabs, NUL)".to_string(),
            ));
        }
        Ok(Stage(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The lifecycle of a task. The last three are terminal: once reached, nothing changes.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    const ALL: [TaskStatus; 5] = [
        TaskStatus::Pending,
        TaskStatus::Processing,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Processing => "processing",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Completed, failed and cancelled are final: further pushes get 409.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

/// One push from the generator: at least one of progress, stage or status, and an optional
/// `seq` that makes retries and reordering harmless.
#[derive(Clone, PartialEq, Debug)]
pub struct ProgressUpdate {
    progress: Option<Progress>,
    stage: Option<Stage>,
    status: Option<TaskStatus>,
    image_url: Option<String>,
    error: Option<String>,
    seq: Option<i64>,
}

/// A client's value for an error message, cut short: a huge bad value must not come back
/// as a huge error.
fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= 80 {
        text
    } else {
        format!(
            "{}… ({} characters)",
            text.chars().take(80).collect::<String>(),
            text.chars().count()
        )
    }
}

const UPDATE_FIELDS: &str = "progress, stage, status, image_url, error, seq";

/// The result's address: an http(s) URL without spaces, at most [`MAX_IMAGE_URL_CHARS`].
fn image_url(value: Value) -> Result<String, Error> {
    let bad = |why: &str| Error::invalid("image_url", format!("image_url {why}"));
    let Value::String(url) = value else {
        return Err(bad("must be a string"));
    };
    if url.chars().count() > MAX_IMAGE_URL_CHARS {
        return Err(bad(&format!(
            "must be at most {MAX_IMAGE_URL_CHARS} characters"
        )));
    }
    let lower = url.to_ascii_lowercase();
    let scheme_ok = lower.starts_with("https://") || lower.starts_with("http://");
    if !scheme_ok
        || url.len() <= "http://".len()
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad(
            "must be an http(s) URL without spaces, e.g. https://cdn.example.com/a.png",
        ));
    }
    Ok(url)
}

/// Why a generation failed, for the browser: text of at most [`MAX_ERROR_CHARS`].
fn error_text(value: Value) -> Result<String, Error> {
    let Value::String(text) = value else {
        return Err(Error::invalid(
            "error",
            "error must be a string".to_string(),
        ));
    };
    if text.chars().count() > MAX_ERROR_CHARS || text.contains('\0') {
        return Err(Error::invalid(
            "error",
            format!("error must be at most {MAX_ERROR_CHARS} characters, without NUL"),
        ));
    }
    Ok(text)
}

impl ProgressUpdate {
    /// Parses a push body. Every message names the offending field and the accepted form.
    pub fn from_json(body: &[u8]) -> Result<Self, Error> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| Error::invalid("body", format!("the body is not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(Error::invalid(
                "body",
                format!("the body must be a JSON object with some of: {UPDATE_FIELDS}"),
            ));
        };
        Self::from_fields(fields)
    }

    fn from_fields(fields: Map<String, Value>) -> Result<Self, Error> {
        let mut update = ProgressUpdate {
            progress: None,
            stage: None,
            status: None,
            image_url: None,
            error: None,
            seq: None,
        };
        for (name, value) in fields {
            if value.is_null() {
                continue;
            }
            match name.as_str() {
                "progress" => {
                    let n = value.as_f64().ok_or_else(|| {
                        Error::invalid(
                            "progress",
                            format!(
                                "progress must be a number from 0 to 100, got {}",
                                shown(&value)
                            ),
                        )
                    })?;
                    update.progress = Some(Progress::new(n)?);
                }
                "stage" => match value {
                    Value::String(s) => update.stage = Some(Stage::new(s)?),
                    other => {
                        return Err(Error::invalid(
                            "stage",
                            format!("stage must be a string, got {}", shown(&other)),
                        ));
                    }
                },
                "image_url" => update.image_url = Some(image_url(value)?),
                "error" => update.error = Some(error_text(value)?),
                "status" => {
                    let status = value.as_str().and_then(TaskStatus::parse);
                    update.status = Some(status.ok_or_else(|| {
                        Error::invalid(
                            "status",
                            format!(
                                "status must be one of pending, processing, completed, failed, \
                                 cancelled; got {}",
                                shown(&value)
                            ),
                        )
                    })?);
                }
                "seq" => {
                    let seq = value.as_u64().and_then(|n| i64::try_from(n).ok());
                    update.seq = Some(seq.ok_or_else(|| {
                        Error::invalid(
                            "seq",
                            format!(
                                "seq must be a whole number from 0 to {}, got {}",
                                i64::MAX,
                                shown(&value)
                            ),
                        )
                    })?);
                }
                other => {
                    let shown: String = other.chars().take(40).collect();
                    return Err(Error::invalid(
                        "body",
                        format!("unknown field {shown:?}; accepted fields are {UPDATE_FIELDS}"),
                    ));
                }
            }
        }
        let empty = update.progress.is_none()
            && update.stage.is_none()
            && update.status.is_none()
            && update.image_url.is_none()
            && update.error.is_none();
        if empty {
            return Err(Error::invalid(
                "body",
                "a push must set at least one of progress, stage, status, image_url or error"
                    .to_string(),
            ));
        }
        Ok(update)
    }

    /// One item of the batch endpoint: the push fields plus its `task_id`.
    pub fn from_batch_item(item: Value) -> Result<(TaskId, Self), Error> {
        let Value::Object(mut fields) = item else {
            return Err(Error::invalid(
                "updates",
                format!(
                    "each update must be a JSON object with task_id and some of: {UPDATE_FIELDS}"
                ),
            ));
        };
        let task = match fields.remove("task_id") {
            Some(Value::String(raw)) => TaskId::parse(&raw)?,
            _ => {
                return Err(Error::invalid(
                    "task_id",
                    "each update needs a task_id string (a UUID)".to_string(),
                ));
            }
        };
        Ok((task, Self::from_fields(fields)?))
    }

    pub fn progress(&self) -> Option<Progress> {
        self.progress
    }

    pub fn stage(&self) -> Option<&Stage> {
        self.stage.as_ref()
    }

    pub fn status(&self) -> Option<TaskStatus> {
        self.status
    }

    pub fn image_url(&self) -> Option<&str> {
        self.image_url.as_deref()
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn seq(&self) -> Option<i64> {
        self.seq
    }
}

/// The body of `POST /api/tasks`: `{"prompt"?, "user_id"?}`.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct NewTask {
    pub prompt: Option<String>,
    pub user_id: Option<Uuid>,
}

impl NewTask {
    /// An empty body creates a task with neither field.
    pub fn from_json(body: &[u8]) -> Result<Self, Error> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(NewTask::default());
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| Error::invalid("body", format!("the body is not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(Error::invalid(
                "body",
                "the body must be a JSON object: {\"prompt\"?: string, \"user_id\"?: uuid}"
                    .to_string(),
            ));
        };
        let mut task = NewTask::default();
        for (name, value) in fields {
            match (name.as_str(), value) {
                (_, Value::Null) => {}
                ("prompt", Value::String(p)) if p.contains('\0') => {
                    // Postgres text cannot hold NUL; refuse it here rather than fail there.
                    return Err(Error::invalid(
                        "prompt",
                        "prompt must not contain NUL (\\u0000) characters".to_string(),
                    ));
                }
                ("prompt", Value::String(p)) => task.prompt = Some(p),
                ("prompt", other) => {
                    return Err(Error::invalid(
                        "prompt",
                        format!("prompt must be a string, got {}", shown(&other)),
                    ));
                }
                ("user_id", Value::String(u)) => {
                    task.user_id = Some(
                        TaskId::parse(&u)
                            .map_err(|_| {
                                Error::invalid(
                                    "user_id",
                                    format!(
                                        "user_id must be a UUID, got {}",
                                        shown(&Value::String(u.clone()))
                                    ),
                                )
                            })?
                            .as_uuid(),
                    );
                }
                ("user_id", other) => {
                    return Err(Error::invalid(
                        "user_id",
                        format!("user_id must be a UUID string, got {}", shown(&other)),
                    ));
                }
                (other, _) => {
                    let shown: String = other.chars().take(40).collect();
                    return Err(Error::invalid(
                        "body",
                        format!("unknown field {shown:?}; accepted fields are prompt, user_id"),
                    ));
                }
            }
        }
        Ok(task)
    }
}

/// What browsers see of a task. `version` grows by one with every applied change.
#[derive(Clone, PartialEq, Debug)]
pub struct TaskState {
    pub task_id: TaskId,
    pub progress: Option<f64>,
    pub stage: Option<String>,
    pub status: TaskStatus,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
    pub image_url: Option<String>,
    pub error: Option<String>,
}

/// The wire form shared by WebSocket messages and HTTP bodies.
#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    task_id: TaskId,
    progress: Option<f64>,
    stage: Option<&'a str>,
    status: TaskStatus,
    version: i64,
    updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    snapshot: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
}

impl TaskState {
    /// Encodes the state message. `applied` is only set in the answer to a push.
    pub fn to_json(&self, snapshot: bool, applied: Option<bool>) -> String {
        self.encode(snapshot, applied, None)
    }

    /// The answer to `POST /api/tasks`: the state plus a subscribe token for the task.
    pub fn to_created_json(&self, token: Option<&str>) -> String {
        self.encode(true, None, token)
    }

    fn encode(&self, snapshot: bool, applied: Option<bool>, token: Option<&str>) -> String {
        let wire = Wire {
            kind: "state",
            task_id: self.task_id,
            progress: self.progress,
            stage: self.stage.as_deref(),
            status: self.status,
            version: self.version,
            updated_at: self.updated_at,
            image_url: self.image_url.as_deref(),
            error: self.error.as_deref(),
            snapshot,
            applied,
            token,
        };
        serde_json::to_string(&wire).expect("a struct of plain fields always serializes")
    }
}

/// A task as stored: its public state plus the bookkeeping that decides what a push does.
#[derive(Clone, PartialEq, Debug)]
pub struct TaskRow {
    pub state: TaskState,
    pub last_seq: Option<i64>,
    /// `image_tasks.user_id`: the Supabase user who may watch the task with a session token.
    pub owner: Option<Uuid>,
}

/// What a push does to a task, decided the same way by every store.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Decision {
    /// Write it: the task gets a new version.
    Apply,
    /// Its `seq` is not newer than the last applied one: a retry or a late duplicate.
    Stale,
}

impl TaskRow {
    /// A retried push is answered before the terminal check, so a generator that retries
    /// its final "completed" push after a timeout gets 200 `applied: false`, not 409.
    pub fn decide(&self, update: &ProgressUpdate) -> Result<Decision, Error> {
        if let (Some(seq), Some(last)) = (update.seq, self.last_seq)
            && seq <= last
        {
            return Ok(Decision::Stale);
        }
        if self.state.status.is_terminal() {
            return Err(Error::Conflict {
                task: self.state.task_id,
                status: self.state.status,
            });
        }
        Ok(Decision::Apply)
    }

    /// The row after `update` is applied at `now`; used by the in-memory store, and the
    /// same rules the Postgres UPDATE expresses in SQL.
    pub fn apply(&mut self, update: &ProgressUpdate, now: DateTime<Utc>) {
        let state = &mut self.state;
        if let Some(p) = update.progress {
            state.progress = Some(p.value());
        }
        if let Some(stage) = &update.stage {
            state.stage = Some(stage.as_str().to_owned());
        }
        if let Some(status) = update.status {
            state.status = status;
        }
        if let Some(url) = &update.image_url {
            state.image_url = Some(url.clone());
        }
        if let Some(error) = &update.error {
            state.error = Some(error.clone());
        }
        if update.seq.is_some() {
            self.last_seq = update.seq;
        }
        state.version += 1;
        state.updated_at = now;
    }
}

/// The result of one push.
#[derive(Clone, PartialEq, Debug)]
pub enum Outcome {
    /// The change is committed and this is the new state.
    Applied(TaskState),
    /// Nothing changed (a stale `seq`); this is the current state.
    Stale(TaskState),
}

impl Outcome {
    pub fn state(&self) -> &TaskState {
        match self {
            Outcome::Applied(s) | Outcome::Stale(s) => s,
        }
    }

    pub fn applied(&self) -> bool {
        matches!(self, Outcome::Applied(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ProgressUpdate, Error> {
        ProgressUpdate::from_json(body.as_bytes())
    }

    fn message(err: Error) -> String {
        err.to_string()
    }

    #[test]
    fn task_id_accepts_hyphenated_uuid_only() {
        assert!(TaskId::parse("0b6f1c5e-3f0e-4d7a-9a57-3c1f6c2d9e10").is_ok());
        assert!(TaskId::parse("0b6f1c5e3f0e4d7a9a573c1f6c2d9e10").is_err());
        assert!(TaskId::parse("not-a-uuid").is_err());
    }

    #[test]
    fn progress_outside_0_to_100_names_the_range() {
        assert!(message(parse(r#"{"progress":101}"#).unwrap_err()).contains("0 to 100"));
        assert!(parse(r#"{"progress":-0.5}"#).is_err());
        assert_eq!(
            parse(r#"{"progress":42.5}"#).unwrap().progress(),
            Some(Progress(42.5))
        );
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let msg = message(parse(r#"{"progress":1,"colour":"red"}"#).unwrap_err());
        assert!(msg.contains("colour"), "{msg}");
    }

    #[test]
    fn image_url_must_be_http_and_error_bounded() {
        let ok = parse(r#"{"status":"completed","image_url":"https://cdn.example.com/a.png"}"#);
        assert_eq!(
            ok.unwrap().image_url(),
            Some("https://cdn.example.com/a.png")
        );
        assert!(parse(r#"{"image_url":"javascript:alert(1)"}"#).is_err());
        assert!(parse(r#"{"image_url":"https://a b"}"#).is_err());
        assert!(parse(&format!(r#"{{"error":"{}"}}"#, "e".repeat(1025))).is_err());
        assert!(parse(r#"{"status":"failed","error":"out of memory"}"#).is_ok());
    }

    #[test]
    fn push_needs_progress_stage_or_status() {
        assert!(parse(r#"{"seq":3}"#).is_err());
        assert!(parse(r#"{}"#).is_err());
        assert!(parse(r#"{"stage":"upscaling"}"#).is_ok());
    }

    #[test]
    fn status_must_be_a_known_word() {
        assert!(message(parse(r#"{"status":"done"}"#).unwrap_err()).contains("completed"));
    }

    #[test]
    fn seq_must_fit_a_bigint() {
        assert!(parse(&format!(r#"{{"status":"pending","seq":{}}}"#, u64::MAX)).is_err());
        assert!(parse(r#"{"status":"pending","seq":-1}"#).is_err());
    }

    #[test]
    fn stage_longer_than_256_chars_is_rejected() {
        let long = "é".repeat(257);
        assert!(parse(&format!(r#"{{"stage":"{long}"}}"#)).is_err());
        let ok = "é".repeat(256);
        assert!(parse(&format!(r#"{{"stage":"{ok}"}}"#)).is_ok());
    }

    fn row(status: TaskStatus, last_seq: Option<i64>) -> TaskRow {
        TaskRow {
            state: TaskState {
                task_id: TaskId::random(),
                progress: None,
                stage: None,
                status,
                version: 3,
                updated_at: Utc::now(),
                image_url: None,
                error: None,
            },
            last_seq,
            owner: None,
        }
    }

    #[test]
    fn stale_seq_is_not_applied_even_after_terminal() {
        let update = parse(r#"{"status":"completed","seq":5}"#).unwrap();
        let done = row(TaskStatus::Completed, Some(5));
        assert_eq!(done.decide(&update).unwrap(), Decision::Stale);
        let newer = parse(r#"{"progress":1,"seq":6}"#).unwrap();
        assert!(matches!(done.decide(&newer), Err(Error::Conflict { .. })));
    }

    #[test]
    fn apply_bumps_version_and_keeps_unset_fields() {
        let mut r = row(TaskStatus::Processing, None);
        r.state.stage = Some("queued".into());
        r.apply(&parse(r#"{"progress":10,"seq":1}"#).unwrap(), Utc::now());
        assert_eq!(r.state.version, 4);
        assert_eq!(r.state.stage.as_deref(), Some("queued"));
        assert_eq!(r.state.progress, Some(10.0));
        assert_eq!(r.last_seq, Some(1));
    }
}
