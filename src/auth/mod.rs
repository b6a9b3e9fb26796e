//! Who may push (the push key) and who may watch (subscribe tokens, Supabase sessions).

pub mod jwks;
mod push_key;
pub mod subscribe;

pub use push_key::{KeySource, MIN_KEY_CHARS, PushKey};

use std::fmt;

/// A value that must never be printed. `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that needs it (comparing, connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

use crate::domain::TaskId;
use crate::error::Error;
use crate::store::Store;
use subscribe::{Access, SubscribeAuth};

/// The credential in an `Authorization: Bearer <credential>` value (scheme case-insensitive,
/// surrounding whitespace ignored).
pub fn bearer(authorization: &str) -> Option<&str> {
    let value = authorization.trim();
    let (scheme, credential) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credential.trim())
        .filter(|c| !c.is_empty())
}

/// Decides whether `token` lets its holder watch `task`, checking a Supabase user's
/// ownership against the store. A task that does not exist is refused exactly like a task
/// owned by someone else, so a refusal never tells whether the task exists.
pub async fn may_watch(
    auth: &SubscribeAuth,
    store: &Store,
    token: Option<&str>,
    task: TaskId,
) -> Result<Access, Error> {
    let access = auth.authorize(token, task).await?;
    if let Access::Owner { user_id, .. } = access
        && !store
            .owner(task)
            .await?
            .flatten()
            .is_some_and(|owner| owner.eq_ignore_ascii_case(&user_id.to_string()))
    {
        return Err(Error::Forbidden(format!(
            "this Supabase user may not watch task {task}"
        )));
    }
    Ok(access)
}
