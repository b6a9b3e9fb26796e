//! A row as the app's table holds it, turned into a task state by rules that cannot fail
//! on the values: whatever the app wrote, subscribers get a bounded state.
//!
//! The store reads every column as text (or a type that cannot overflow), so no value
//! can fail the query for the other rows it reads. Here each column is rendered on its own:
//! - `progress`: a number outside 0..100 is clamped to the nearest end; `NaN` or text
//!   that is not a number is `null`.
//! - `status`: read through the [`StatusMap`]; a word that means nothing is `processing`
//!   (not final, so a push can repair it) with the word in `status_raw`; `NULL` is
//!   `pending`.
//! - `updated_at`: `null` when it cannot be shown (`infinity`, years past 262143).
//! - `stage` and `error` longer than a push may send are cut (ending in `…`), an
//!   `image_url` longer than that is left out (half a URL is worse than none); each such
//!   field is named in `truncated`; `preview_url` likewise, and it is left out of a
//!   finished task's state (the result replaces the preview).
//! - `step` and `total_steps`: a whole number from 0 to [`MAX_STEPS`], else `null`.
//!
//! Only a row without a usable id or version is unreadable: it has no place in the
//! version order subscribers rely on.

use chrono::{DateTime, Utc};

use super::{
    MAX_ERROR_CHARS, MAX_IMAGE_URL_CHARS, MAX_STAGE_CHARS, MAX_STEPS, StatusMap, TaskId, TaskRow,
    TaskState, TaskStatus,
};

/// One row's columns as read (see [`crate::store`] for the casts).
#[derive(Clone, Debug, Default)]
pub struct StoredRow {
    pub id: Option<String>,
    pub progress: Option<String>,
    pub stage: Option<String>,
    pub status: Option<String>,
    pub version: Option<i64>,
    /// `date_part('epoch', updated_at)`: infinite for `infinity`.
    pub updated_epoch: Option<f64>,
    pub image_url: Option<String>,
    pub error: Option<String>,
    pub seq: Option<i64>,
    pub owner: Option<String>,
    /// `NULL` too when the table has no such column.
    pub step: Option<String>,
    pub total_steps: Option<String>,
    pub preview_url: Option<String>,
    /// `date_part('epoch', stalled_since)`; `NULL` when the table has no such column.
    pub stalled_epoch: Option<f64>,
    /// `date_part('epoch', cancel_requested_at)`; `NULL` too when the table has no such
    /// column.
    pub cancel_requested_epoch: Option<f64>,
}

/// A row taskcast cannot place: which task (when its id is readable) and which column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub task: Option<TaskId>,
    pub column: &'static str,
    /// What the column held, described without its value (`NULL`, `63+ bytes`).
    pub held: &'static str,
}

impl StoredRow {
    /// Renders the row; only a missing id or version makes it [`Unreadable`].
    pub fn decode(self, statuses: &StatusMap) -> Result<TaskRow, Unreadable> {
        let id = self.id.ok_or(Unreadable {
            task: None,
            column: "id",
            held: "NULL",
        })?;
        let task_id = TaskId::from_stored(&id).ok_or(Unreadable {
            task: None,
            column: "id",
            held: "text longer than 63 bytes",
        })?;
        let version = self.version.ok_or(Unreadable {
            task: Some(task_id),
            column: "taskcast_version",
            held: "NULL",
        })?;
        let (status, status_raw) = match self.status {
            None => (TaskStatus::Pending, None),
            Some(raw) => match statuses.read(&raw) {
                Some(status) if status.as_str() == raw => (status, None),
                Some(status) => (status, Some(raw)),
                None => (TaskStatus::Processing, Some(raw)),
            },
        };
        let mut truncated = Vec::new();
        let stage = cut(self.stage, MAX_STAGE_CHARS, "stage", &mut truncated);
        let error = cut(self.error, MAX_ERROR_CHARS, "error", &mut truncated);
        let image_url = whole_url(self.image_url, "image_url", &mut truncated);
        let preview_url = whole_url(self.preview_url, "preview_url", &mut truncated)
            .filter(|_| !status.is_terminal());
        Ok(TaskRow {
            state: TaskState {
                task_id,
                progress: self.progress.as_deref().and_then(progress),
                stage,
                status,
                status_raw,
                version,
                updated_at: self.updated_epoch.and_then(timestamp),
                image_url,
                error,
                truncated,
                step: self.step.as_deref().and_then(steps),
                total_steps: self.total_steps.as_deref().and_then(steps),
                preview_url,
                user_id: self
                    .owner
                    .as_deref()
                    .and_then(|o| uuid::Uuid::parse_str(o).ok()),
                stalled_since: self.stalled_epoch.and_then(timestamp),
                cancel_requested_at: self.cancel_requested_epoch.and_then(cancel_time),
            },
            last_seq: self.seq,
            owner: self.owner,
        })
    }
}

fn progress(text: &str) -> Option<f64> {
    let value: f64 = text.trim().parse().ok()?;
    (!value.is_nan()).then(|| value.clamp(0.0, 100.0))
}

fn steps(text: &str) -> Option<u32> {
    text.trim().parse().ok().filter(|&n| n <= MAX_STEPS)
}

/// A URL of at most [`MAX_IMAGE_URL_CHARS`], or none: half a URL is worse than none.
fn whole_url(
    url: Option<String>,
    field: &'static str,
    truncated: &mut Vec<&'static str>,
) -> Option<String> {
    let url = url?;
    if url.chars().count() <= MAX_IMAGE_URL_CHARS {
        Some(url)
    } else {
        truncated.push(field);
        None
    }
}

/// A cancel request at a time that cannot be shown (`infinity`, set in SQL) is still a
/// request: it reads as the Unix epoch.
fn cancel_time(epoch: f64) -> Option<DateTime<Utc>> {
    timestamp(epoch).or(Some(DateTime::UNIX_EPOCH))
}

fn timestamp(epoch: f64) -> Option<DateTime<Utc>> {
    if !epoch.is_finite() {
        return None;
    }
    DateTime::from_timestamp_micros((epoch * 1e6).round() as i64)
}

/// At most `max` characters: the first `max - 1` and `…` when longer.
fn cut(
    text: Option<String>,
    max: usize,
    field: &'static str,
    truncated: &mut Vec<&'static str>,
) -> Option<String> {
    let text = text?;
    match text.char_indices().nth(max) {
        None => Some(text),
        Some(_) => {
            truncated.push(field);
            let end = text.char_indices().nth(max - 1).map_or(0, |(i, _)| i);
            Some(format!("{}…", &text[..end]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> StoredRow {
        StoredRow {
            id: Some("42".to_string()),
            version: Some(3),
            status: Some("processing".to_string()),
            ..StoredRow::default()
        }
    }

    #[test]
    fn odd_numbers_and_times_have_a_defined_rendering() {
        let map = StatusMap::default();
        for (text, want) in [
            ("1".to_string() + &"0".repeat(400), Some(100.0)),
            ("-5".to_string(), Some(0.0)),
            ("NaN".to_string(), None),
            ("42.5".to_string(), Some(42.5)),
        ] {
            let stored = StoredRow {
                progress: Some(text),
                ..row()
            };
            assert_eq!(stored.decode(&map).unwrap().state.progress, want);
        }
        for epoch in [f64::INFINITY, f64::NEG_INFINITY, 9.0e12] {
            let stored = StoredRow {
                updated_epoch: Some(epoch),
                ..row()
            };
            assert_eq!(stored.decode(&map).unwrap().state.updated_at, None);
        }
        let stored = StoredRow {
            updated_epoch: Some(1.5),
            ..row()
        };
        let at = stored.decode(&map).unwrap().state.updated_at.unwrap();
        assert_eq!(at.timestamp_micros(), 1_500_000);
    }

    #[test]
    fn unknown_statuses_are_open_and_keep_their_word() {
        let map = StatusMap::default();
        let decode = |word: &str| {
            let stored = StoredRow {
                status: Some(word.to_string()),
                ..row()
            };
            let state = stored.decode(&map).unwrap().state;
            (state.status, state.status_raw)
        };
        assert_eq!(decode("processing"), (TaskStatus::Processing, None));
        assert_eq!(
            decode("DONE"),
            (TaskStatus::Completed, Some("DONE".to_string()))
        );
        assert_eq!(
            decode("reviewing"),
            (TaskStatus::Processing, Some("reviewing".to_string()))
        );
        assert_eq!(decode(""), (TaskStatus::Processing, Some(String::new())));
    }

    #[test]
    fn long_texts_are_cut_to_the_push_limits_and_named() {
        let stored = StoredRow {
            stage: Some("s".repeat(MAX_STAGE_CHARS + 1)),
            error: Some("é".repeat(100_000)),
            image_url: Some(format!("data:image/png;base64,{}", "A".repeat(70_000))),
            ..row()
        };
        let state = stored.decode(&StatusMap::default()).unwrap().state;
        assert_eq!(state.stage.unwrap().chars().count(), MAX_STAGE_CHARS);
        assert_eq!(state.error.unwrap().chars().count(), MAX_ERROR_CHARS);
        assert_eq!(state.image_url, None);
        assert_eq!(state.truncated, ["stage", "error", "image_url"]);
        let exact = StoredRow {
            stage: Some("s".repeat(MAX_STAGE_CHARS)),
            ..row()
        };
        assert!(
            exact
                .decode(&StatusMap::default())
                .unwrap()
                .state
                .truncated
                .is_empty()
        );
    }

    #[test]
    fn steps_read_as_whole_numbers_and_a_finished_task_has_no_preview() {
        let map = StatusMap::default();
        let stored = StoredRow {
            step: Some("12".to_string()),
            total_steps: Some("-3".to_string()),
            preview_url: Some("https://cdn.example.com/p.png".to_string()),
            ..row()
        };
        let state = stored.clone().decode(&map).unwrap().state;
        assert_eq!((state.step, state.total_steps), (Some(12), None));
        assert_eq!(
            state.preview_url.as_deref(),
            Some("https://cdn.example.com/p.png")
        );
        let done = StoredRow {
            status: Some("completed".to_string()),
            ..stored
        };
        assert_eq!(done.decode(&map).unwrap().state.preview_url, None);
    }

    #[test]
    fn only_a_missing_id_or_version_is_unreadable() {
        let map = StatusMap::default();
        let no_version = StoredRow {
            version: None,
            ..row()
        };
        let e = no_version.decode(&map).unwrap_err();
        assert_eq!((e.column, e.held), ("taskcast_version", "NULL"));
        assert!(e.task.is_some());
        let long_id = StoredRow {
            id: Some("x".repeat(64)),
            ..row()
        };
        assert_eq!(long_id.decode(&map).unwrap_err().column, "id");
    }
}
