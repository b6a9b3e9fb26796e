//! What clients send: a push (`ProgressUpdate`) and a new task (`NewTask`), each parsed
//! once with messages that name the field and the accepted form.

use serde_json::{Map, Value};
use uuid::Uuid;

use super::{
    IdKind, MAX_ERROR_CHARS, MAX_IMAGE_URL_CHARS, MAX_STEPS, Progress, Stage, TaskId, TaskStatus,
    json_body, shown,
};
use crate::error::Error;

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
    step: Option<u32>,
    total_steps: Option<u32>,
    preview_url: Option<String>,
}

const UPDATE_FIELDS: &str =
    "progress, stage, status, image_url, error, seq, step, total_steps, preview_url";

/// An http(s) URL without spaces, at most [`MAX_IMAGE_URL_CHARS`]: the result's address
/// (`image_url`) or an in-progress preview's (`preview_url`).
fn image_url(field: &'static str, value: Value) -> Result<String, Error> {
    let bad = |why: &str| Error::invalid(field, format!("{field} {why}"));
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

/// A step count: a whole number from 0 to [`MAX_STEPS`].
fn steps(field: &'static str, value: &Value) -> Result<u32, Error> {
    value
        .as_u64()
        .filter(|&n| n <= u64::from(MAX_STEPS))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            Error::invalid(
                field,
                format!(
                    "{field} must be a whole number from 0 to {MAX_STEPS}, got {}",
                    shown(value)
                ),
            )
        })
}

impl ProgressUpdate {
    /// Parses a push body. Every message names the offending field and the accepted form.
    pub fn from_json(body: &[u8]) -> Result<Self, Error> {
        let value = json_body(body)?;
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
            step: None,
            total_steps: None,
            preview_url: None,
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
                "image_url" => update.image_url = Some(image_url("image_url", value)?),
                "preview_url" => update.preview_url = Some(image_url("preview_url", value)?),
                "step" => update.step = Some(steps("step", &value)?),
                "total_steps" => update.total_steps = Some(steps("total_steps", &value)?),
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
        if let (Some(step), Some(total)) = (update.step, update.total_steps) {
            if step > total {
                return Err(Error::invalid(
                    "step",
                    format!("step must be at most total_steps ({total}), got {step}"),
                ));
            }
            // Progress follows from the steps unless the push says otherwise.
            if update.progress.is_none() && total > 0 {
                update.progress = Some(Progress::new(100.0 * f64::from(step) / f64::from(total))?);
            }
        }
        let empty = update.progress.is_none()
            && update.stage.is_none()
            && update.status.is_none()
            && update.image_url.is_none()
            && update.error.is_none()
            && update.step.is_none()
            && update.total_steps.is_none()
            && update.preview_url.is_none();
        if empty {
            return Err(Error::invalid(
                "body",
                "a push must set at least one of progress, stage, status, image_url, error, \
                 step, total_steps or preview_url"
                    .to_string(),
            ));
        }
        Ok(update)
    }

    /// One item of the batch endpoint: the push fields plus its `task_id`, which must be
    /// an id of `kind`.
    pub fn from_batch_item(item: Value, kind: IdKind) -> Result<(TaskId, Self), Error> {
        let Value::Object(mut fields) = item else {
            return Err(Error::invalid(
                "updates",
                format!(
                    "each update must be a JSON object with task_id and some of: {UPDATE_FIELDS}"
                ),
            ));
        };
        let task = match fields.remove("task_id") {
            Some(Value::String(raw)) => kind.parse(&raw)?,
            _ => {
                return Err(Error::invalid(
                    "task_id",
                    format!("each update needs a task_id string: {}", kind.describe()),
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

    pub fn step(&self) -> Option<u32> {
        self.step
    }

    pub fn total_steps(&self) -> Option<u32> {
        self.total_steps
    }

    /// The preview to store: the pushed one, or `Some("")` (clear it) when the push
    /// finishes the task, so a finished task shows its result, not a stale preview.
    pub fn preview_url(&self) -> Option<&str> {
        match self.status {
            Some(status) if status.is_terminal() => Some(""),
            _ => self.preview_url.as_deref(),
        }
    }

    /// The table columns this push writes beyond those every table has.
    pub fn optional_columns(&self) -> impl Iterator<Item = &'static str> {
        [
            ("step", self.step.is_some()),
            ("total_steps", self.total_steps.is_some()),
            ("preview_url", self.preview_url.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
    }
}

/// The body of `POST /api/tasks`: `{"prompt"?, "user_id"?}`.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct NewTask {
    pub prompt: Option<String>,
    pub user_id: Option<Uuid>,
}

impl NewTask {
    /// The body of `POST /api/tasks` with the rights its token should carry: `"cancel":
    /// true` asks for a token that may also cancel the task.
    pub fn from_json_with_rights(body: &[u8]) -> Result<(Self, bool), Error> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok((NewTask::default(), false));
        }
        let Value::Object(mut fields) = json_body(body)? else {
            return Self::from_json(body).map(|task| (task, false));
        };
        let cancel = match fields.remove("cancel") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(cancel)) => cancel,
            Some(other) => {
                return Err(Error::invalid(
                    "cancel",
                    format!("cancel must be true or false, got {}", shown(&other)),
                ));
            }
        };
        let rest =
            serde_json::to_vec(&Value::Object(fields)).expect("a JSON object always serializes");
        Ok((Self::from_json(&rest)?, cancel))
    }

    /// An empty body creates a task with neither field.
    pub fn from_json(body: &[u8]) -> Result<Self, Error> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(NewTask::default());
        }
        let value = json_body(body)?;
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
                    let parsed = Uuid::parse_str(u.trim())
                        .ok()
                        .filter(|_| u.trim().len() == 36);
                    task.user_id = Some(parsed.ok_or_else(|| {
                        Error::invalid(
                            "user_id",
                            format!(
                                "user_id must be a UUID (a Supabase user id), got {}",
                                shown(&Value::String(u.clone()))
                            ),
                        )
                    })?);
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
                        format!(
                            "unknown field {shown:?}; accepted fields are prompt, user_id, cancel"
                        ),
                    ));
                }
            }
        }
        Ok(task)
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
            Some(Progress::new(42.5).unwrap())
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
    fn steps_are_bounded_whole_numbers_and_give_progress() {
        let update = parse(r#"{"step":3,"total_steps":12}"#).unwrap();
        assert_eq!((update.step(), update.total_steps()), (Some(3), Some(12)));
        assert_eq!(update.progress(), Some(Progress::new(25.0).unwrap()));
        let explicit = parse(r#"{"step":3,"total_steps":12,"progress":30}"#).unwrap();
        assert_eq!(explicit.progress(), Some(Progress::new(30.0).unwrap()));
        assert_eq!(
            parse(r#"{"step":0,"total_steps":0}"#).unwrap().progress(),
            None
        );
        for (body, field) in [
            (r#"{"step":5,"total_steps":4}"#, "step"),
            (r#"{"step":-1}"#, "step"),
            (r#"{"step":1.5}"#, "step"),
            (r#"{"total_steps":"30"}"#, "total_steps"),
            (r#"{"total_steps":1000001}"#, "total_steps"),
        ] {
            let msg = message(parse(body).unwrap_err());
            assert!(msg.starts_with(field), "{body}: {msg}");
        }
    }

    #[test]
    fn a_finishing_push_clears_the_preview() {
        let running = parse(r#"{"preview_url":"https://cdn.example.com/p.png"}"#).unwrap();
        assert_eq!(running.preview_url(), Some("https://cdn.example.com/p.png"));
        assert_eq!(
            running.optional_columns().collect::<Vec<_>>(),
            ["preview_url"]
        );
        let done = parse(r#"{"status":"completed"}"#).unwrap();
        assert_eq!(done.preview_url(), Some(""));
        assert_eq!(done.optional_columns().count(), 0);
        assert!(parse(r#"{"preview_url":"ftp://x/y.png"}"#).is_err());
    }

    #[test]
    fn stage_longer_than_256_chars_is_rejected() {
        let long = "é".repeat(257);
        assert!(parse(&format!(r#"{{"stage":"{long}"}}"#)).is_err());
        let ok = "é".repeat(256);
        assert!(parse(&format!(r#"{{"stage":"{ok}"}}"#)).is_ok());
    }
}
