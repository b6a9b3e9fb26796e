//! Domain types that carry their own validity.
//!
//! Everything a client sends is parsed here, once, into types whose fields are private and
//! whose constructors reject bad input with a message that names the field and says what
//! a valid value looks like. Past the route, nothing checks these values again.

use serde_json::Value;

use crate::error::Error;

mod place;
mod state;
mod status_map;
mod stored;
mod update;
mod wire;

pub use place::{QueuePlace, STALL_ERROR};
pub use state::{CancelDecision, Decision, Eta, Outcome, TaskRow, TaskState};
pub use status_map::{StatusMap, StatusWords};
pub use stored::{StoredRow, Unreadable};
pub use taskcast_wire::{
    IdKind, InvalidId, MAX_ERROR_CHARS, MAX_ID_BYTES, MAX_STAGE_CHARS, TaskId, TaskStatus,
};
pub use update::{NewTask, ProgressUpdate};

/// Longest accepted `image_url`, in characters.
pub const MAX_IMAGE_URL_CHARS: usize = 2048;
/// Largest accepted `step` and `total_steps`.
pub const MAX_STEPS: u32 = 1_000_000;

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

/// A request body as JSON. An empty body is named as such, not as serde's "EOF while
/// parsing a value".
pub fn json_body(body: &[u8]) -> Result<Value, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::invalid(
            "body",
            "the body is empty; send a JSON object (see README.md, HTTP API)".to_string(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| Error::invalid("body", format!("the body is not valid JSON: {e}")))
}

/// A client's value for an error message, cut short: a huge bad value must not come back
/// as a huge error.
pub(crate) fn shown(value: &Value) -> String {
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
