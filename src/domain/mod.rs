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
        // Most stages are ASCII: a character is a byte, and the only control characters
        // are below 0x20 and 0x7f. Both checks then look at every byte without stopping,
        // which the compiler turns into vector compares (decoding characters one by one
        // took ~10 instructions per byte).
        let ascii = text.is_ascii();
        let chars = if ascii {
            text.len()
        } else {
            text.chars().count()
        };
        if chars > MAX_STAGE_CHARS {
            return Err(Error::invalid(
                "stage",
                format!("stage must be at most {MAX_STAGE_CHARS} characters, got {chars}"),
            ));
        }
        let control = if ascii {
            text.bytes()
                .fold(false, |control, b| control | (b < 0x20) | (b == 0x7f))
        } else {
            text.chars().any(char::is_control)
        };
        if control {
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The rule, said the slow way: at most MAX_STAGE_CHARS characters, none a control one.
    fn allowed(text: &str) -> bool {
        text.chars().count() <= MAX_STAGE_CHARS && !text.chars().any(char::is_control)
    }

    #[test]
    fn a_stage_is_checked_the_same_whether_ascii_or_not() {
        let at_limit = "s".repeat(MAX_STAGE_CHARS);
        let wide_at_limit = "é".repeat(MAX_STAGE_CHARS);
        for text in [
            "sampling step 21/50",
            "",
            "tab\there",
            "del\u{7f}",
            "unit separator\u{1f}",
            "space ok ~",
            "C1 control \u{85} in Unicode",
            "漢字 🎨",
            at_limit.as_str(),
            &format!("{at_limit}s"),
            wide_at_limit.as_str(),
            &format!("{wide_at_limit}é"),
            &format!("{}é", "s".repeat(MAX_STAGE_CHARS - 1)),
        ] {
            assert_eq!(
                Stage::new(text.to_string()).is_ok(),
                allowed(text),
                "{text:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn any_stage_is_checked_as_the_rule_says(
            text in prop_oneof!["[\\x00-\\x7f]{0,300}", "\\PC{0,300}", ".{0,300}"]
        ) {
            prop_assert_eq!(Stage::new(text.clone()).is_ok(), allowed(&text));
        }
    }
}
