//! Who may watch a task: subscribe tokens, Supabase sessions, or (development) anyone.
//!
//! A subscribe token is a JWT signed with HS256 and `TASKCAST_SUBSCRIBE_SECRET`, with
//! claims `task_id` (or `task_ids`) and `exp`. A Supabase access token (HS256 with
//! `SUPABASE_JWT_SECRET`, `role: authenticated`) grants the tasks whose `user_id` is its
//! `sub`; the caller checks that against the store. Only HS256 is accepted: `alg: none`
//! and algorithm swaps fail verification.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Secret;
use crate::domain::TaskId;
use crate::error::Error;

/// What a verified token allows for one task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `--public-subscribe`: no token needed, no expiry.
    Public,
    /// A subscribe token that names the task; valid until `expires_at` (Unix seconds).
    Granted { expires_at: u64 },
    /// A Supabase user: allowed only if the task's `user_id` is `user_id`.
    Owner { user_id: Uuid, expires_at: u64 },
}

impl Access {
    pub fn expires_at(&self) -> Option<u64> {
        match self {
            Access::Public => None,
            Access::Granted { expires_at } | Access::Owner { expires_at, .. } => Some(*expires_at),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct TaskClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    task_ids: Vec<String>,
    exp: u64,
}

#[derive(Deserialize)]
struct SupabaseClaims {
    sub: String,
    role: String,
    exp: u64,
}

/// The verifier. Cloning is cheap enough for per-connection use (keys are small).
#[derive(Clone)]
pub struct SubscribeAuth {
    tokens: Option<Secret>,
    supabase: Option<Secret>,
    public: bool,
}

impl std::fmt::Debug for SubscribeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscribeAuth")
            .field("tokens", &self.tokens.is_some())
            .field("supabase", &self.supabase.is_some())
            .field("public", &self.public)
            .finish()
    }
}

fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = 0;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp"]);
    v
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl SubscribeAuth {
    pub fn new(tokens: Option<Secret>, supabase: Option<Secret>, public: bool) -> Self {
        SubscribeAuth {
            tokens,
            supabase,
            public,
        }
    }

    pub fn is_public(&self) -> bool {
        self.public
    }

    pub fn has_supabase(&self) -> bool {
        self.supabase.is_some()
    }

    /// Mints a token for `tasks`, valid for `ttl`; `None` without a subscribe secret.
    pub fn mint(&self, tasks: &[TaskId], ttl: Duration) -> Option<String> {
        self.tokens.as_ref().map(|secret| mint(secret, tasks, ttl))
    }

    /// Decides whether `token` lets its holder watch `task`. Ownership of an
    /// [`Access::Owner`] grant is for the caller to check against the store.
    pub fn authorize(&self, token: Option<&str>, task: TaskId) -> Result<Access, Error> {
        if self.public {
            return Ok(Access::Public);
        }
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Error::TokenRequired)?;
        let mut expired = false;
        if let Some(secret) = &self.tokens {
            let key = DecodingKey::from_secret(secret.expose().as_bytes());
            match jsonwebtoken::decode::<TaskClaims>(token, &key, &validation()) {
                Ok(data) => {
                    let claims = data.claims;
                    let named = claims.task_id.iter().chain(&claims.task_ids);
                    return if named.into_iter().any(|t| names(t, task)) {
                        Ok(Access::Granted {
                            expires_at: claims.exp,
                        })
                    } else {
                        Err(Error::Forbidden(format!(
                            "this subscribe token does not grant task {task}"
                        )))
                    };
                }
                Err(e) => expired |= matches!(e.kind(), ErrorKind::ExpiredSignature),
            }
        }
        if let Some(secret) = &self.supabase {
            let key = DecodingKey::from_secret(secret.expose().as_bytes());
            match jsonwebtoken::decode::<SupabaseClaims>(token, &key, &validation()) {
                Ok(data) if data.claims.role == "authenticated" => {
                    let user_id = Uuid::parse_str(&data.claims.sub).map_err(|_| {
                        Error::Forbidden("the Supabase token's sub is not a user id".to_string())
                    })?;
                    return Ok(Access::Owner {
                        user_id,
                        expires_at: data.claims.exp,
                    });
                }
                Ok(_) => {
                    return Err(Error::Forbidden(
                        "only signed-in Supabase users (role `authenticated`) may subscribe"
                            .to_string(),
                    ));
                }
                Err(e) => expired |= matches!(e.kind(), ErrorKind::ExpiredSignature),
            }
        }
        Err(if expired {
            Error::TokenExpired
        } else {
            Error::TokenInvalid
        })
    }
}

/// Whether a token's `task_id` claim names `task`: the same text, or the same UUID in
/// another case (ids of integer and text tables are compared exactly).
fn names(claim: &str, task: TaskId) -> bool {
    claim == task.as_str()
        || (claim.len() == 36 && Uuid::parse_str(claim).is_ok_and(|u| TaskId::from(u) == task))
}

/// Signs a subscribe token; used by `POST /api/tasks`, `taskcast token` and tests.
pub fn mint(secret: &Secret, tasks: &[TaskId], ttl: Duration) -> String {
    let mut ids: Vec<String> = tasks.iter().map(TaskId::to_string).collect();
    let claims = TaskClaims {
        task_id: (ids.len() == 1).then(|| ids.remove(0)),
        task_ids: ids,
        exp: now_unix() + ttl.as_secs(),
    };
    let key = EncodingKey::from_secret(secret.expose().as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .expect("HS256 signing of plain claims cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> SubscribeAuth {
        SubscribeAuth::new(Some(Secret::new("s".repeat(32))), None, false)
    }

    #[test]
    fn a_token_grants_exactly_its_tasks() {
        let (a, b) = (TaskId::random(), TaskId::random());
        let token = auth().mint(&[a], Duration::from_secs(60)).unwrap();
        assert!(matches!(
            auth().authorize(Some(&token), a),
            Ok(Access::Granted { .. })
        ));
        assert!(matches!(
            auth().authorize(Some(&token), b),
            Err(Error::Forbidden(_))
        ));
        let both = auth().mint(&[a, b], Duration::from_secs(60)).unwrap();
        assert!(auth().authorize(Some(&both), b).is_ok());
    }

    #[test]
    fn missing_forged_and_unsigned_tokens_are_refused() {
        let task = TaskId::random();
        assert!(matches!(
            auth().authorize(None, task),
            Err(Error::TokenRequired)
        ));
        let other = SubscribeAuth::new(Some(Secret::new("x".repeat(32))), None, false);
        let forged = other.mint(&[task], Duration::from_secs(60)).unwrap();
        assert!(matches!(
            auth().authorize(Some(&forged), task),
            Err(Error::TokenInvalid)
        ));
        // alg: none, with the same claims.
        let real = auth().mint(&[task], Duration::from_secs(60)).unwrap();
        let payload = real.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(matches!(
            auth().authorize(Some(&none), task),
            Err(Error::TokenInvalid)
        ));
    }

    #[test]
    fn public_mode_needs_no_token() {
        let public = SubscribeAuth::new(None, None, true);
        assert_eq!(
            public.authorize(None, TaskId::random()).unwrap(),
            Access::Public
        );
    }
}
