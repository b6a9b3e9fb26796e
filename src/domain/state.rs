//! What a task is: its public state (and its one wire encoding), the stored row, and the
//! rules every store uses to decide what a push does.

use super::{TaskId, TaskStatus};
use crate::domain::ProgressUpdate;
use crate::error::Error;
use chrono::{DateTime, Utc};

/// What browsers see of a task. `version` grows by one with every applied change.
#[derive(Clone, PartialEq, Debug)]
pub struct TaskState {
    pub task_id: TaskId,
    pub progress: Option<f64>,
    pub stage: Option<String>,
    pub status: TaskStatus,
    /// The word the table holds, when it is not `status`'s own name (an alias, the app's
    /// word from TASKCAST_STATUS_MAP, or a word that maps to nothing).
    pub status_raw: Option<String>,
    pub version: i64,
    /// `None` when the stored time cannot be shown (`infinity`, or beyond year 262143).
    pub updated_at: Option<DateTime<Utc>>,
    pub image_url: Option<String>,
    pub error: Option<String>,
    /// Fields whose stored text was longer than a push may send and was cut (see
    /// [`crate::domain::StoredRow`]).
    pub truncated: Vec<&'static str>,
    pub step: Option<u32>,
    pub total_steps: Option<u32>,
    /// The latest in-progress preview; `None` once the task is finished.
    pub preview_url: Option<String>,
    /// `image_tasks.user_id` when it is a UUID: which user's feed (`user:<id>`) the state
    /// goes to. Not part of a task subscription's frames (a task token would learn its
    /// owner's id); a feed's frames name the feed instead.
    pub user_id: Option<uuid::Uuid>,
    /// When the stall sweep found the task without a change (see [`crate::stall`]);
    /// cleared by the next change. Shown only while the task is `processing`.
    pub stalled_since: Option<DateTime<Utc>>,
    /// When a subscriber asked to cancel the task (`image_tasks.cancel_requested_at`);
    /// the generator reads it in the answer to its next push.
    pub cancel_requested_at: Option<DateTime<Utc>>,
}

/// An estimate of the time left: `ms` milliseconds from `at`, the time of the change it
/// was made for.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Eta {
    pub ms: u64,
    pub at: DateTime<Utc>,
}

impl TaskState {
    /// Encodes the state message. `applied` is only set in the answer to a push.
    pub fn to_json(&self, snapshot: bool, applied: Option<bool>) -> String {
        self.encode(snapshot, applied, None, None)
    }

    /// The state message carrying `eta` as its time left (the hub's estimate), without
    /// copying the state to set it.
    pub fn to_json_with_eta(&self, snapshot: bool, eta: Option<Eta>) -> String {
        self.encode(snapshot, None, None, eta)
    }

    /// The state message as a user feed's frame: [`TaskState::to_json_with_eta`] with
    /// `"feed": "user:<id>"`.
    pub fn to_feed_json(&self, feed: &str, snapshot: bool, eta: Option<Eta>) -> String {
        self.encode_wire(snapshot, None, None, eta, Some(feed))
    }

    /// The answer to `POST /api/tasks`: the state plus a subscribe token for the task.
    pub fn to_created_json(&self, token: Option<&str>) -> String {
        self.encode(true, None, token, None)
    }

    /// `eta` is the hub's time left (none outside the hub).
    fn encode(
        &self,
        snapshot: bool,
        applied: Option<bool>,
        token: Option<&str>,
        eta: Option<Eta>,
    ) -> String {
        self.encode_wire(snapshot, applied, token, eta, None)
    }

    /// The state message: the wire form shared by WebSocket messages and HTTP bodies,
    /// its fields in this order, optional ones left out when empty.
    fn encode_wire(
        &self,
        snapshot: bool,
        applied: Option<bool>,
        token: Option<&str>,
        eta: Option<Eta>,
        feed: Option<&str>,
    ) -> String {
        use super::wire::{float, integer, key, nullable, optional, status, string, time};
        let stalled_since = self
            .stalled_since
            .filter(|_| self.status == TaskStatus::Processing);
        let texts = [
            self.stage.as_deref(),
            self.status_raw.as_deref(),
            self.image_url.as_deref(),
            self.error.as_deref(),
            self.preview_url.as_deref(),
            feed,
            token,
        ];
        let mut out =
            String::with_capacity(320 + texts.iter().flatten().map(|t| t.len()).sum::<usize>());
        out.push_str(r#"{"type":"state","task_id":"#);
        string(&mut out, self.task_id.as_str());
        nullable(&mut out, "progress", self.progress, float);
        nullable(&mut out, "stage", self.stage.as_deref(), string);
        key(&mut out, "status");
        status(&mut out, self.status);
        optional(&mut out, "status_raw", self.status_raw.as_deref(), string);
        key(&mut out, "version");
        integer(&mut out, self.version);
        nullable(&mut out, "updated_at", self.updated_at.as_ref(), time);
        optional(&mut out, "image_url", self.image_url.as_deref(), string);
        optional(&mut out, "error", self.error.as_deref(), string);
        if !self.truncated.is_empty() {
            key(&mut out, "truncated");
            for (i, field) in self.truncated.iter().enumerate() {
                out.push(if i == 0 { '[' } else { ',' });
                string(&mut out, field);
            }
            out.push(']');
        }
        optional(&mut out, "step", self.step, integer);
        optional(&mut out, "total_steps", self.total_steps, integer);
        optional(&mut out, "preview_url", self.preview_url.as_deref(), string);
        if self.cancel_requested_at.is_some() {
            out.push_str(r#","cancel_requested":true"#);
        }
        optional(
            &mut out,
            "cancel_requested_at",
            self.cancel_requested_at.as_ref(),
            time,
        );
        optional(&mut out, "eta_ms", eta.map(|eta| eta.ms), integer);
        optional(&mut out, "eta_at", eta.as_ref().map(|eta| &eta.at), time);
        optional(&mut out, "feed", feed, string);
        if stalled_since.is_some() {
            out.push_str(r#","stalled":true"#);
        }
        optional(&mut out, "stalled_since", stalled_since.as_ref(), time);
        out.push_str(if snapshot {
            r#","snapshot":true"#
        } else {
            r#","snapshot":false"#
        });
        optional(&mut out, "applied", applied, |out, applied| {
            out.push_str(if applied { "true" } else { "false" });
        });
        optional(&mut out, "token", token, string);
        out.push('}');
        out
    }
}

/// A task as stored: its public state plus the bookkeeping that decides what a push does.
#[derive(Clone, PartialEq, Debug)]
pub struct TaskRow {
    pub state: TaskState,
    pub last_seq: Option<i64>,
    /// `image_tasks.user_id` as text: the Supabase user who may watch the task with a
    /// session token.
    pub owner: Option<String>,
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
        if let (Some(seq), Some(last)) = (update.seq(), self.last_seq)
            && seq <= last
        {
            return Ok(Decision::Stale);
        }
        if self.state.status.is_terminal() {
            return Err(Error::Conflict {
                task: self.state.task_id.to_string(),
                status: self.state.status.as_str(),
            });
        }
        if self.state.version == i64::MAX {
            return Err(Error::VersionExhausted(self.state.task_id.to_string()));
        }
        Ok(Decision::Apply)
    }

    /// The row after `update` is applied at `now`; used by the in-memory store, and the
    /// same rules the Postgres UPDATE expresses in SQL.
    pub fn apply(&mut self, update: &ProgressUpdate, now: DateTime<Utc>) {
        let state = &mut self.state;
        if let Some(p) = update.progress() {
            state.progress = Some(p.value());
        }
        if let Some(stage) = update.stage() {
            state.stage = Some(stage.as_str().to_owned());
        }
        if let Some(status) = update.status() {
            state.status = status;
            state.status_raw = None;
        }
        if let Some(url) = update.image_url() {
            state.image_url = Some(url.to_owned());
        }
        if let Some(error) = update.error() {
            state.error = Some(error.to_owned());
        }
        if let Some(step) = update.step() {
            state.step = Some(step);
        }
        if let Some(total) = update.total_steps() {
            state.total_steps = Some(total);
        }
        match update.preview_url() {
            Some("") => state.preview_url = None,
            Some(url) => state.preview_url = Some(url.to_owned()),
            None => {}
        }
        if update.seq().is_some() {
            self.last_seq = update.seq();
        }
        state.stalled_since = None;
        state.version += 1;
        state.updated_at = Some(now);
    }
}

/// What a cancel request did, decided the same way by every store.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CancelDecision {
    /// Set `cancel_requested_at`: the task gets a new version.
    Request,
    /// Already requested: nothing changes, the answer is the same.
    AlreadyRequested,
}

impl TaskRow {
    /// A finished task cannot be cancelled (409); a second request changes nothing. The
    /// Postgres store expresses the same rules in its one conditional UPDATE.
    pub fn decide_cancel(&self) -> Result<CancelDecision, Error> {
        if self.state.status.is_terminal() {
            return Err(Error::CancelFinished {
                task: self.state.task_id.to_string(),
                status: self.state.status.as_str(),
            });
        }
        if self.state.cancel_requested_at.is_some() {
            return Ok(CancelDecision::AlreadyRequested);
        }
        if self.state.version == i64::MAX {
            return Err(Error::VersionExhausted(self.state.task_id.to_string()));
        }
        Ok(CancelDecision::Request)
    }

    /// Records a cancel request at `now` (used by the in-memory store). `updated_at` stays:
    /// a request is no word from the generator, so it neither clears a stall mark nor
    /// restarts the stall clock.
    pub fn request_cancel(&mut self, now: DateTime<Utc>) {
        self.state.cancel_requested_at = Some(now);
        self.state.version += 1;
    }

    /// Marks a task whose cancel went unanswered for the grace period as cancelled (used
    /// by the in-memory store; Postgres does it in one conditional UPDATE).
    pub fn cancel_overdue(&mut self, now: DateTime<Utc>) {
        self.state.status = TaskStatus::Cancelled;
        self.state.status_raw = None;
        self.state.preview_url = None;
        self.state.version += 1;
        self.state.updated_at = Some(now);
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
    use proptest::prelude::*;
    use serde::Serialize;

    use super::*;
    use crate::domain::TaskStatus;

    /// The wire form shared by WebSocket messages and HTTP bodies.
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        task_id: TaskId,
        progress: Option<f64>,
        stage: Option<&'a str>,
        status: TaskStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        status_raw: Option<&'a str>,
        version: i64,
        updated_at: Option<DateTime<Utc>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        image_url: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a str>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        truncated: &'a [&'static str],
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        total_steps: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        preview_url: Option<&'a str>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cancel_requested: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        cancel_requested_at: Option<DateTime<Utc>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        eta_ms: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        eta_at: Option<DateTime<Utc>>,
        /// `user:<id>` on the frames of a user's feed, so a client can tell them apart.
        #[serde(skip_serializing_if = "Option::is_none")]
        feed: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        stalled: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        stalled_since: Option<DateTime<Utc>>,
        snapshot: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        applied: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<&'a str>,
    }

    fn parse(body: &str) -> ProgressUpdate {
        ProgressUpdate::from_json(body.as_bytes()).expect("a valid push")
    }

    fn row(status: TaskStatus, last_seq: Option<i64>) -> TaskRow {
        TaskRow {
            state: TaskState {
                task_id: TaskId::random(),
                progress: None,
                stage: None,
                status,
                status_raw: None,
                version: 3,
                updated_at: Some(Utc::now()),
                image_url: None,
                error: None,
                truncated: Vec::new(),
                step: None,
                total_steps: None,
                preview_url: None,
                user_id: None,
                stalled_since: None,
                cancel_requested_at: None,
            },
            last_seq,
            owner: None,
        }
    }

    #[test]
    fn stale_seq_is_not_applied_even_after_terminal() {
        let update = parse(r#"{"status":"completed","seq":5}"#);
        let done = row(TaskStatus::Completed, Some(5));
        assert_eq!(done.decide(&update).unwrap(), Decision::Stale);
        let newer = parse(r#"{"progress":1,"seq":6}"#);
        assert!(matches!(done.decide(&newer), Err(Error::Conflict { .. })));
    }

    #[test]
    fn apply_bumps_version_and_keeps_unset_fields() {
        let mut r = row(TaskStatus::Processing, None);
        r.state.stage = Some("queued".into());
        r.apply(&parse(r#"{"progress":10,"seq":1}"#), Utc::now());
        assert_eq!(r.state.version, 4);
        assert_eq!(r.state.stage.as_deref(), Some("queued"));
        assert_eq!(r.state.progress, Some(10.0));
        assert_eq!(r.last_seq, Some(1));
    }

    /// The encoding as `serde_json` made it of [`Wire`] before the hand-written one: the
    /// oracle the hand-written bytes must equal.
    fn serde_encoded(
        state: &TaskState,
        snapshot: bool,
        applied: Option<bool>,
        token: Option<&str>,
        eta: Option<Eta>,
        feed: Option<&str>,
    ) -> String {
        let stalled_since = state
            .stalled_since
            .filter(|_| state.status == TaskStatus::Processing);
        let wire = Wire {
            kind: "state",
            task_id: state.task_id,
            progress: state.progress,
            stage: state.stage.as_deref(),
            status: state.status,
            status_raw: state.status_raw.as_deref(),
            version: state.version,
            updated_at: state.updated_at,
            image_url: state.image_url.as_deref(),
            error: state.error.as_deref(),
            truncated: &state.truncated,
            step: state.step,
            total_steps: state.total_steps,
            preview_url: state.preview_url.as_deref(),
            cancel_requested: state.cancel_requested_at.is_some(),
            cancel_requested_at: state.cancel_requested_at,
            eta_ms: eta.map(|eta| eta.ms),
            eta_at: eta.map(|eta| eta.at),
            feed,
            stalled: stalled_since.map(|_| true),
            stalled_since,
            snapshot,
            applied,
            token,
        };
        serde_json::to_string(&wire).unwrap()
    }

    fn any_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(prop_oneof![
            "[a-z0-9 _./:-]{0,40}",
            any::<String>(),
            Just("quote \" back \\ nl \n ctl \u{1} del \u{7f} é 🎨".to_string()),
        ])
    }

    fn any_time() -> impl Strategy<Value = Option<DateTime<Utc>>> {
        // Whole seconds, milli-, micro- and nanosecond fractions, years 0001–9999 and
        // beyond (chrono's path), and leap seconds.
        let at = (
            -62_000_000_000i64..300_000_000_000,
            0u32..2_000_000_000,
            0usize..4,
        )
            .prop_filter_map("a valid time", |(secs, nanos, scale)| {
                let nanos = match scale {
                    0 => 0,
                    1 => nanos / 1_000_000 * 1_000_000,
                    2 => nanos / 1_000 * 1_000,
                    _ => nanos,
                };
                DateTime::from_timestamp(secs, nanos)
            });
        proptest::option::of(at)
    }

    fn any_state() -> impl Strategy<Value = TaskState> {
        let status = proptest::sample::select(TaskStatus::ALL.to_vec());
        let progress = proptest::option::of(prop_oneof![
            0.0..=100.0f64,
            any::<f64>(),
            Just(33.333333333333336),
            Just(100.0),
        ]);
        let truncated = proptest::sample::subsequence(vec!["stage", "error", "image_url"], 0..=3);
        (
            (
                status,
                progress,
                any_text(),
                any_text(),
                any::<i64>(),
                any_time(),
            ),
            (
                any_text(),
                any_text(),
                truncated,
                any::<Option<u32>>(),
                any::<Option<u32>>(),
            ),
            (any_text(), any_time(), any_time()),
        )
            .prop_map(|(a, b, c)| {
                let (status, progress, stage, status_raw, version, updated_at) = a;
                let (image_url, error, truncated, step, total_steps) = b;
                let (preview_url, stalled_since, cancel_requested_at) = c;
                TaskState {
                    task_id: TaskId::random(),
                    progress,
                    stage,
                    status,
                    status_raw,
                    version,
                    updated_at,
                    image_url,
                    error,
                    truncated,
                    step,
                    total_steps,
                    preview_url,
                    user_id: None,
                    stalled_since,
                    cancel_requested_at,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_written_state_is_byte_for_byte_what_serde_json_made_of_it(
            state in any_state(),
            snapshot in any::<bool>(),
            applied in any::<Option<bool>>(),
            token in any_text(),
            eta in proptest::option::of((any::<u64>(), any_time())),
            feed in any_text(),
        ) {
            let eta = eta.and_then(|(ms, at)| Some(Eta { ms, at: at? }));
            prop_assert_eq!(
                state.encode_wire(snapshot, applied, token.as_deref(), eta, feed.as_deref()),
                serde_encoded(&state, snapshot, applied, token.as_deref(), eta, feed.as_deref())
            );
        }
    }
}
