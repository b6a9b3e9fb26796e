//! Who may push (the push key) and who may watch (subscribe tokens, Supabase sessions).

pub mod jwks;
mod push_key;
pub mod subscribe;
mod token;

pub use push_key::{KeySource, MIN_KEY_CHARS, PushKey};

pub use taskcast_wire::Secret;

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
