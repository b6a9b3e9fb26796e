//! The push key: where it comes from, whether it is strong enough, and the constant-time
//! check of a Bearer header.
//!
//! The key is resolved in the deployment guide's fallback order. It lives in a [`Secret`],
//! whose `Debug` prints `***`, so it cannot reach a log line by accident. Resolution does
//! not log: the caller reports [`PushKey::source`], [`PushKey::was_trimmed`] and
//! [`PushKey::weakness`] (the server as log lines, `taskcast doctor` as checks).

use subtle::{Choice, ConstantTimeEq};

use super::Secret;
use crate::error::Error;

/// The guide's own minimum length for the push key (`openssl rand -hex 16`).
pub const MIN_KEY_CHARS: usize = 32;

/// Where the effective push key came from, in the guide's fallback order. The guide's
/// last fallback, the first 8 characters of `OPENAI_API_KEY`, is never used: every modern
/// OpenAI key starts with the same 8 characters, so that key would be public.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeySource {
    TaskProcessSecretKey,
    InternalApiKey,
    ApiSecretKey,
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
            KeySource::DevelopmentDefault => "the development default `development-key`",
        }
    }
}

/// The key the generator must present as `Authorization: Bearer <key>`, and optionally
/// the previous one while a rotation is under way.
#[derive(Clone, Debug)]
pub struct PushKey {
    secret: Secret,
    source: KeySource,
    trimmed: bool,
    previous: Option<Secret>,
}

/// The guide's fallback chain, before the development default.
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
            trimmed: false,
            previous: None,
        }
    }

    /// Also accepts `previous`, for rotating the key without downtime.
    pub fn with_previous(mut self, previous: impl Into<String>) -> Self {
        self.previous = Some(Secret::new(previous));
        self
    }

    /// Resolves the key in the guide's order: `explicit` (TASK_PROCESS_SECRET_KEY or
    /// `--push-key`), INTERNAL_API_KEY, API_SECRET_KEY, then `development-key` outside
    /// production (never any part of OPENAI_API_KEY, see [`KeySource`]). Surrounding whitespace
    /// is trimmed (the guide's most common 401 cause); a value that is empty after
    /// trimming counts as unset. `previous` (TASK_PROCESS_SECRET_KEY_PREVIOUS) is accepted too.
    ///
    /// In production a weak key is refused with a message that says what to set.
    pub fn resolve(
        explicit: Option<String>,
        previous: Option<String>,
        env: impl Fn(&str) -> Option<String>,
        production: bool,
    ) -> Result<Self, String> {
        let mut key = Self::find(explicit, &env, production)?;
        key.previous = previous
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .map(Secret::new);
        if production {
            if let Some(weakness) = key.weakness() {
                return Err(format!(
                    "refusing to start in production: the push key ({}) {weakness}. Set \
                     TASK_PROCESS_SECRET_KEY to at least {MIN_KEY_CHARS} random characters \
                     (e.g. `openssl rand -hex 16`), the same value in the generator and in taskcast",
                    key.source.describe()
                ));
            }
            if key
                .previous
                .as_ref()
                .is_some_and(|p| p.expose().chars().count() < MIN_KEY_CHARS)
            {
                return Err(format!(
                    "refusing to start in production: TASK_PROCESS_SECRET_KEY_PREVIOUS is shorter \
                     than {MIN_KEY_CHARS} characters; unset it once the rotation is done"
                ));
            }
        }
        Ok(key)
    }

    fn find(
        explicit: Option<String>,
        env: &impl Fn(&str) -> Option<String>,
        production: bool,
    ) -> Result<Self, String> {
        let candidates = std::iter::once((explicit, KeySource::TaskProcessSecretKey))
            .chain(FALLBACK_VARS.map(|(var, source)| (env(var), source)));
        for (raw, source) in candidates {
            if let Some(found) = raw.and_then(|raw| Self::from_raw(&raw, source)) {
                return Ok(found);
            }
        }
        if production {
            return Err(
                "no push key is set: set TASK_PROCESS_SECRET_KEY to at least 32 random \
                        characters (e.g. `openssl rand -hex 16`), the same value in the \
                        generator and in taskcast"
                    .to_string(),
            );
        }
        Ok(Self::from_raw("development-key", KeySource::DevelopmentDefault).expect("not blank"))
    }

    fn from_raw(raw: &str, source: KeySource) -> Option<Self> {
        let key = raw.trim();
        (!key.is_empty()).then(|| PushKey {
            secret: Secret::new(key),
            source,
            trimmed: key.len() != raw.len(),
            previous: None,
        })
    }

    pub fn source(&self) -> KeySource {
        self.source
    }

    /// True when surrounding whitespace or a newline was removed from the configured value.
    pub fn was_trimmed(&self) -> bool {
        self.trimmed
    }

    /// True while TASK_PROCESS_SECRET_KEY_PREVIOUS is also accepted.
    pub fn has_previous(&self) -> bool {
        self.previous.is_some()
    }

    /// Why this key is not fit for production, if it is not.
    pub fn weakness(&self) -> Option<String> {
        match self.source {
            KeySource::DevelopmentDefault => {
                Some("is the built-in `development-key`, which anyone can guess".to_string())
            }
            _ => {
                let chars = self.secret.expose().chars().count();
                (chars < MIN_KEY_CHARS).then(|| {
                    format!(
                        "is {chars} characters long, shorter than the minimum of {MIN_KEY_CHARS}"
                    )
                })
            }
        }
    }

    /// Checks an `Authorization` header value against the key (and the previous key).
    /// Both comparisons always run and take the same time wherever the first differing
    /// byte is; only the length of a key can be learned from timing.
    pub fn verify(&self, authorization: Option<&str>) -> Result<(), Error> {
        let presented = authorization
            .and_then(super::bearer)
            .ok_or(Error::Unauthorized)?
            .as_bytes();
        let current = presented.ct_eq(self.secret.expose().as_bytes());
        let previous = match &self.previous {
            Some(p) => presented.ct_eq(p.expose().as_bytes()),
            None => Choice::from(0),
        };
        if bool::from(current | previous) {
            Ok(())
        } else {
            Err(Error::Unauthorized)
        }
    }
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
            None,
            env_of(&[("INTERNAL_API_KEY", "internal")]),
            false,
        )
        .unwrap();
        assert_eq!(key.source(), KeySource::TaskProcessSecretKey);
        assert!(key.verify(Some("Bearer explicit")).is_ok());
    }

    const STRONG: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn fallbacks_follow_the_guides_order() {
        let env = env_of(&[
            ("API_SECRET_KEY", "api"),
            ("OPENAI_API_KEY", "sk-proj-abcdef"),
        ]);
        let key = PushKey::resolve(None, None, env, false).unwrap();
        assert_eq!(key.source(), KeySource::ApiSecretKey);
    }

    #[test]
    fn no_part_of_openai_api_key_is_ever_the_push_key() {
        let env = env_of(&[("OPENAI_API_KEY", "sk-proj-abc")]);
        let key = PushKey::resolve(None, None, env, false).unwrap();
        assert_eq!(key.source(), KeySource::DevelopmentDefault);
        assert!(key.verify(Some("Bearer sk-proj-")).is_err());
        assert!(key.verify(Some("Bearer sk-proj-abc")).is_err());
        let env = env_of(&[("OPENAI_API_KEY", "sk-proj-abc")]);
        assert!(
            PushKey::resolve(None, None, env, true).is_err(),
            "production: no key"
        );
    }

    #[test]
    fn production_refuses_weak_keys_with_what_to_set() {
        for env in [
            env_of(&[]),
            env_of(&[("OPENAI_API_KEY", "sk-proj-0123456789abcdef0123456789")]),
            env_of(&[("INTERNAL_API_KEY", "short-but-set")]),
        ] {
            let refused = PushKey::resolve(None, None, env, true).unwrap_err();
            assert!(refused.contains("TASK_PROCESS_SECRET_KEY"), "{refused}");
            assert!(
                !refused.contains("short-but-set"),
                "the message leaked the key"
            );
        }
        let ok = PushKey::resolve(Some(STRONG.into()), None, env_of(&[]), true).unwrap();
        assert!(ok.weakness().is_none());
        let weak_previous =
            PushKey::resolve(Some(STRONG.into()), Some("old".into()), env_of(&[]), true);
        assert!(
            weak_previous
                .unwrap_err()
                .contains("TASK_PROCESS_SECRET_KEY_PREVIOUS")
        );
    }

    #[test]
    fn development_key_only_outside_production() {
        let key = PushKey::resolve(None, None, env_of(&[]), false).unwrap();
        assert_eq!(key.source(), KeySource::DevelopmentDefault);
        assert!(key.weakness().is_some());
    }

    #[test]
    fn whitespace_around_the_key_is_trimmed_and_blank_counts_as_unset() {
        let key = PushKey::resolve(
            Some("  \n".into()),
            None,
            env_of(&[("INTERNAL_API_KEY", " secret\n")]),
            false,
        )
        .unwrap();
        assert_eq!(key.source(), KeySource::InternalApiKey);
        assert!(key.was_trimmed());
        assert!(key.verify(Some("Bearer secret")).is_ok());
    }

    #[test]
    fn previous_key_is_accepted_during_rotation() {
        let key = PushKey::new(STRONG).with_previous("old-key");
        assert!(key.verify(Some(&format!("Bearer {STRONG}"))).is_ok());
        assert!(key.verify(Some("Bearer old-key")).is_ok());
        assert!(key.verify(Some("Bearer older-key")).is_err());
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
        let key = PushKey::new("hunter2-hunter2").with_previous("old-secret-value");
        let shown = format!("{key:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("old-secret"));
    }
}
