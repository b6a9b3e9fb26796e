//! What the taskcast server and a generator's reporter both need, and nothing else: the
//! task id ([`TaskId`], parsed per the table's [`IdKind`]), the [`TaskStatus`] lifecycle, the
//! field limits a reporter cuts its texts to, the [`Secret`] type the push key travels in,
//! and the outgoing HTTP(S) client ([`http`]).
//!
//! It depends on no server part (no warp, no Postgres driver), so the reporter crate built
//! on it stays small.

use std::fmt::Write as _;

pub mod http;
mod id;
mod secret;
mod status;

pub use id::{IdKind, InvalidId, MAX_ID_BYTES, TaskId};
pub use secret::Secret;
pub use status::TaskStatus;

/// Longest accepted `stage` text, in characters.
pub const MAX_STAGE_CHARS: usize = 256;
/// Longest accepted `error` text, in characters.
pub const MAX_ERROR_CHARS: usize = 1024;

/// An error and its causes on one line, `error: cause: cause`: the one walker of a cause
/// chain, for logs, `taskcast doctor` and the HTTP client's errors.
pub fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(out, ": {cause}");
        source = cause.source();
    }
    out
}
