//! A committed state's wire encoding, built once per change and shared by every subscriber:
//! the state message, with a pending task's place in line written just before its end, and
//! the place-only (`"derived": true`) re-send of the same version.

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::domain::{Eta, QueuePlace, TaskState, TaskStatus};

/// A committed state's wire encoding, built once per change. Only the bytes and the
/// version are kept: a hub entry lives as long as its task has subscribers, so its size is
/// part of what every idle connection costs.
#[derive(Debug)]
pub struct Frame {
    pub(super) version: i64,
    /// The `{"type":"state",...,"snapshot":false}` message every subscriber is sent, or,
    /// for a notice, the `{"type":"error",...}` message.
    pub text: Utf8Bytes,
    /// An error about the task (its row cannot be read), not a state: delivered to the
    /// subscribers present once, never as a snapshot, and replaced by the next state.
    pub(super) notice: bool,
    /// The state is `pending`: it has a place in line.
    pub(super) pending: bool,
    /// The place in line the text carries, if known.
    pub(super) place: Option<QueuePlace>,
    /// Only the place changed since the frame of this version before it.
    pub(super) derived: bool,
}

/// How every frame's text ends: `snapshot` is the last field written when neither
/// `applied` nor `token` is set.
pub(super) const LIVE_END: &str = r#""snapshot":false}"#;
pub(super) const SNAPSHOT_END: &str = r#""snapshot":true}"#;
pub(super) const DERIVED: &str = r#""derived":true,"#;

/// A frame's bytes, shared by every subscriber for as long as the hub holds the frame.
/// Trimmed to fit: the JSON encoder leaves up to half its buffer spare, and a `Bytes` made
/// from a `String` keeps all of it (about 100 bytes per frame).
pub(super) fn shared_text(mut text: String) -> Utf8Bytes {
    text.shrink_to_fit();
    Utf8Bytes::from(text)
}

/// `text` (a state message ending in `end`) with `place` written just before the end.
pub(super) fn with_place(text: String, end: &str, place: Option<QueuePlace>) -> String {
    let Some(place) = place else {
        return text;
    };
    let body = text
        .strip_suffix(end)
        .expect("a state message ends with its snapshot flag");
    format!("{body}{}{end}", place.json_fields())
}

impl Frame {
    pub(super) fn new(state: &TaskState, eta: Option<Eta>, place: Option<QueuePlace>) -> Self {
        let pending = state.status == TaskStatus::Pending;
        let place = place.filter(|_| pending);
        let text = with_place(state.to_json_with_eta(false, eta), LIVE_END, place);
        debug_assert!(text.ends_with(LIVE_END));
        Frame {
            version: state.version,
            text: shared_text(text),
            notice: false,
            pending,
            place,
            derived: false,
        }
    }

    /// The state as a frame of the feed named `feed` (`user:<id>`).
    pub(super) fn feed(state: &TaskState, eta: Option<Eta>, feed: &str) -> Self {
        Frame {
            version: state.version,
            text: shared_text(state.to_feed_json(feed, false, eta)),
            notice: false,
            pending: false,
            place: None,
            derived: false,
        }
    }

    /// The text before the place fields (and the `derived` mark), without the end.
    fn base(&self) -> &str {
        let mut suffix = self.place.map(|p| p.json_fields()).unwrap_or_default();
        if self.derived {
            suffix.push_str(DERIVED);
        }
        suffix.push_str(LIVE_END);
        self.text
            .as_str()
            .strip_suffix(suffix.as_str())
            .expect("the text ends with the place it records")
    }

    /// The same state at the same version with a new place, marked derived.
    pub(super) fn placed(&self, place: QueuePlace) -> Frame {
        let text = format!("{}{}{DERIVED}{LIVE_END}", self.base(), place.json_fields());
        Frame {
            version: self.version,
            text: shared_text(text),
            notice: false,
            pending: true,
            place: Some(place),
            derived: true,
        }
    }

    /// A place-only update: the same version as the frame before it, and only
    /// `queue_position` and `queue_length` changed.
    pub fn is_derived(&self) -> bool {
        self.derived
    }

    pub fn is_notice(&self) -> bool {
        self.notice
    }

    pub fn version(&self) -> i64 {
        self.version
    }

    /// The same state as a subscription's first message, `"snapshot":true`.
    pub fn snapshot_json(&self) -> String {
        let text = self.text.as_str();
        let body = text
            .strip_suffix(LIVE_END)
            .expect("Frame::new encodes the snapshot flag last");
        let body = if self.derived {
            body.strip_suffix(DERIVED)
                .expect("a derived frame is marked")
        } else {
            body
        };
        format!("{body}{SNAPSHOT_END}")
    }
}
