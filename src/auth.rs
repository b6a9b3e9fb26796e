//! The push key: where it comes from, and the constant-time check of a Bearer header.
//!
//! The key is resolved in the deployment guide's fallback order. It lives in a [`Secret`],
//! whose `Debug` prints `***`, so it cannot reach a log line by accident.

use std::fmt;

use subtle::ConstantTimeEq;

use crate::error::Error;

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

/// Where the effective push key came from, in the guide's fallback order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeySource {
    TaskProcessSecretKey,
    InternalApiKey,
    ApiSecretKey,
    /// The first 8 characters of `OPENAI_API_KEY`: `sk-proj-` for every modern key, so public.
    OpenAiKeyPrefix,
    /// The literal `development-key`, only outside production.
    DevelopmentDefault,
}

impl KeySource {
    /// The env var (or rule) a human would look at.
    pub fn describe(self) -> &'static str {
        match self {
            KeySource::TaskProcessSecretKey => "TASK_PROCESS_SECRET_KEY",
            KeySource::InternalApiKey => "INTERNAL_API_KEY",
            KeySource::ApiSecretKey => "API_SECRET_KEY",
            KeySource::OpenAiKeyPrefix => "the first 8 characters of OPENAI_API_KEY",
            KeySource::DevelopmentDefault => "the development default `development-key`",
        }
    }
}

/// The key the generator must present as `Authorization: Bearer <key>`.
#[derive(Clone, Debug)]
pub struct PushKey {
    secret: Secret,
    source: KeySource,
}

/// The guide's fallback chain, before the OpenAI prefix and the development default.
const FALLBACK_VARS: [(&str, KeySource); 2] = [
    ("INTERNAL_API_KEY", KeySource::InternalApiKey),
    ("API_SECRET_KEY", KeySource::ApiSecretKey),
];

impl PushKey {
    /// A key given directly (tests, embedding).
    pub fn new(key: impl Into<String>) -> Self {
        PushKey {
            secret: Secret::new(key),
            source: KeySource::TaskProcessSecretKey,
        }
    }

    /// Resolves the key in the guide's order: `explicit` (TASK_PROCESS_SECRET_KEY or
    /// `--push-key`), INTERNAL_API_KEY, API_SECRET_KEY, the first 8 characters of
    /// OPENAI_API_KEY, then `development-key` outside production. Surrounding whitespace
    /// is trimmed (the guide's most common 401 cause) with a warning; a value that is empty
    /// after trimming counts as unset.
    pub fn resolve(
        explicit: Option<String>,
        env: impl Fn(&str) -> Option<String>,
        production: bool,
    ) -> Result<Self, String> {
        let candidates = std::iter::once((explicit, KeySource::TaskProcessSecretKey))
            .chain(FALLBACK_VARS.map(|(var, source)| (env(var), source)));
        for (raw, source) in candidates {
            if let Some(key) = raw.and_then(|raw| trimmed(raw, source)) {
                return Ok(Self::from_source(key, source));
            }
        }
        let openai_prefix = env("OPENAI_API_KEY")
            .and_then(|raw| trimmed(raw, KeySource::OpenAiKeyPrefix))
            .filter(|key| key.chars().count() >= 8)
            .map(|key| key.chars().take(8).collect::<String>());
        if let Some(prefix) = openai_prefix {
            tracing::warn!(
                "the push key is the first 8 characters of OPENAI_API_KEY, which is public \
                 (`sk-proj-` for every modern key); set TASK_PROCESS_SECRET_KEY \
                 (e.g. `openssl rand -hex 16`)"
            );
            return Ok(Self::from_source(prefix, KeySource::OpenAiKeyPrefix));
        }
        if production {
            return Err(
                "no push key is set: set TASK_PROCESS_SECRET_KEY to the same value in \
                        the generator and in taskcast (e.g. `openssl rand -hex 16`)"
                    .to_string(),
            );
        }
        tracing::warn!(
            "no push key is set; using `development-key` (development only). \
             Set TASK_PROCESS_SECRET_KEY before deploying"
        );
        Ok(Self::from_source(
            "development-key".to_string(),
            KeySource::DevelopmentDefault,
        ))
    }

    fn from_source(key: String, source: KeySource) -> Self {
        tracing::info!(source = source.describe(), "push key loaded");
        PushKey {
            secret: Secret::new(key),
            source,
        }
    }

    pub fn source(&self) -> KeySource {
        self.source
    }

    /// Checks an `Authorization` header value. The comparison takes the same time
    /// wherever the first differing byte is; only a length difference returns early.
    pub fn verify(&self, authorization: Option<&str>) -> Result<(), Error> {
        let presented = authorization
            .and_then(|value| value.trim().strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(Error::Unauthorized)?;
        let expected = self.secret.expose().as_bytes();
        if bool::from(presented.as_bytes().ct_eq(expected)) {
            Ok(())
        } else {
            Err(Error::Unauthorized)
        }
    }
}

/// Trims whitespace and newlines, warning when that changed the value.
fn trimmed(raw: String, source: KeySource) -> Option<String> {
    let key = raw.trim();
    if key.is_empty() {
        return None;
    }
    if key.len() != raw.len() {
        tracing::warn!(
            source = source.describe(),
            "the push key had surrounding whitespace or a newline; it was trimmed. \
             Fix the value where it is set: the generator may not trim it"
        );
    }
    Some(key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn explicit_key_wins_over_every_fallback() {
        let key = PushKey::resolve(
            Some("explicit".into()),
            env_of(&[("INTERNAL_API_KEY", "internal")]),
            false,
        )
        .unwrap();
        assert_eq!(key.source(), KeySource::TaskProcessSecretKey);
        assert!(key.verify(Some("Bearer explicit")).is_ok());
    }

    #[test]
    fn fallbacks_follow_the_guides_order() {
        let env = env_of(&[
            ("API_SECRET_KEY", "api"),
            ("OPENAI_API_KEY", "sk-proj-abcdef"),
        ]);
        let key = PushKey::resolve(None, env, false).unwrap();
        assert_eq!(key.source(), KeySource::ApiSecretKey);

        let key =
            PushKey::resolve(None, env_of(&[("OPENAI_API_KEY", "sk-proj-abc")]), true).unwrap();
        assert_eq!(key.source(), KeySource::OpenAiKeyPrefix);
        assert!(key.verify(Some("Bearer sk-proj-")).is_ok());
    }

    #[test]
    fn development_key_only_outside_production() {
        let key = PushKey::resolve(None, env_of(&[]), false).unwrap();
        assert_eq!(key.source(), KeySource::DevelopmentDefault);
        let refused = PushKey::resolve(None, env_of(&[]), true).unwrap_err();
        assert!(refused.contains("TASK_PROCESS_SECRET_KEY"));
    }

    #[test]
    fn whitespace_around_the_key_is_trimmed_and_blank_counts_as_unset() {
        let key = PushKey::resolve(
            Some("  \n".into()),
            env_of(&[("INTERNAL_API_KEY", " secret\n")]),
            false,
        )
        .unwrap();
        assert_eq!(key.source(), KeySource::InternalApiKey);
        assert!(key.verify(Some("Bearer secret")).is_ok());
    }

    #[test]
    fn wrong_or_missing_bearer_is_unauthorized() {
        let key = PushKey::new("secret");
        assert!(key.verify(None).is_err());
        assert!(key.verify(Some("secret")).is_err());
        assert!(key.verify(Some("Bearer secreT")).is_err());
        assert!(key.verify(Some("Bearer secret2")).is_err());
    }

    #[test]
    fn secret_debug_never_shows_the_value() {
        let key = PushKey::new("hunter2-hunter2");
        assert!(!format!("{key:?}").contains("hunter2"));
    }
}
