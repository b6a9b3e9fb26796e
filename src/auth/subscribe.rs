//! Who may watch a task: subscribe tokens, Supabase sessions, or (development) anyone.
//!
//! A subscribe token is a JWT signed with HS256 and `TASKCAST_SUBSCRIBE_SECRET`, with
//! claims `task_id` (or `task_ids`) and `exp`. A Supabase access token (`role:
//! authenticated`) grants the tasks whose `user_id` is its `sub`; the caller checks that
//! against the store. Supabase tokens are either HS256 with `SUPABASE_JWT_SECRET` (legacy)
//! or ES256/RS256 with a key of the project's JWKS (`SUPABASE_URL`, see [`super::jwks`]),
//! which must also carry `iss: <SUPABASE_URL>/auth/v1`. Each key has one algorithm:
//! `alg: none` and algorithm swaps fail verification. A token used before its `nbf`, or whose header
//! lists any `crit` extension (taskcast understands none), is refused; a Supabase token
//! must carry `aud: authenticated`, and a subscribe token (which taskcast mints without
//! one) must carry no `aud`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Secret;
use super::jwks::Jwks;
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
    /// The right to cancel the tasks the token names (`POST /api/tasks` with
    /// `"cancel": true`, `taskcast token --cancel`). Absent: watch only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cancel: bool,
    exp: u64,
}

/// A subscribe token for a user's feed: `user_id` and `exp`. It grants the feed
/// `user:<user_id>` only (not the user's tasks one by one, and never a cancel); any other
/// claims, such as `task_id`, are read by [`TaskClaims`] for task subscriptions.
#[derive(Serialize, Deserialize)]
struct UserClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
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
    jwks: Option<Jwks>,
    public: bool,
}

impl std::fmt::Debug for SubscribeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscribeAuth")
            .field("tokens", &self.tokens.is_some())
            .field("supabase", &self.supabase.is_some())
            .field("jwks", &self.jwks)
            .field("public", &self.public)
            .finish()
    }
}

/// Supabase's audience for signed-in users.
const SUPABASE_AUDIENCE: &str = "authenticated";

/// HS256, no leeway, `exp` required, `nbf` checked when present. With no audience set,
/// jsonwebtoken refuses any token that carries an `aud`: right for subscribe tokens.
fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = 0;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp"]);
    v
}

/// Supabase access tokens: as [`validation`], plus `aud` must be `authenticated`.
fn supabase_validation() -> Validation {
    let mut v = validation();
    v.set_audience(&[SUPABASE_AUDIENCE]);
    v.set_required_spec_claims(&["exp", "aud"]);
    v
}

/// Verifies `token` with an HMAC `secret` and returns its claims.
fn verify<T: serde::de::DeserializeOwned>(
    token: &str,
    secret: &Secret,
    validation: &Validation,
) -> Result<T, ErrorKind> {
    let key = DecodingKey::from_secret(secret.expose().as_bytes());
    verify_with(token, &key, validation)
}

/// Verifies a Supabase token against the project's JWKS: the key its `kid` names, that
/// key's algorithm only, and `iss` the project's auth URL.
async fn verify_jwks(token: &str, jwks: &Jwks) -> Result<SupabaseClaims, ErrorKind> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.into_kind())?;
    let key = jwks.key(&header).await.ok_or(ErrorKind::InvalidToken)?;
    let mut validation = supabase_validation();
    validation.algorithms = vec![key.algorithm];
    validation.set_issuer(&[jwks.issuer()]);
    validation.set_required_spec_claims(&["exp", "aud", "iss"]);
    verify_with(token, &key.decoding, &validation)
}

/// Verifies `token` with `key` and returns its claims. jsonwebtoken ignores the `crit`
/// header, so it is checked here: RFC 7515 says a receiver that does not understand a
/// listed extension must reject the token, and taskcast understands none.
fn verify_with<T: serde::de::DeserializeOwned>(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<T, ErrorKind> {
    let data = jsonwebtoken::decode::<T>(token, key, validation).map_err(|e| e.into_kind())?;
    if data.header.crit.is_some() {
        return Err(ErrorKind::InvalidToken);
    }
    Ok(data.claims)
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
            jwks: None,
            public,
        }
    }

    /// Also accepts Supabase sessions signed with a key of `jwks` (ES256, RS256).
    pub fn with_jwks(mut self, jwks: Jwks) -> Self {
        self.jwks = Some(jwks);
        self
    }

    /// The JWKS cache, for the server to keep refreshed.
    pub fn jwks(&self) -> Option<&Jwks> {
        self.jwks.as_ref()
    }

    pub fn is_public(&self) -> bool {
        self.public
    }

    pub fn has_supabase(&self) -> bool {
        self.supabase.is_some() || self.jwks.is_some()
    }

    /// Mints a token for `tasks`, valid for `ttl`; `None` without a subscribe secret.
    pub fn mint(&self, tasks: &[TaskId], ttl: Duration) -> Option<String> {
        self.tokens.as_ref().map(|secret| mint(secret, tasks, ttl))
    }

    /// Mints a token for the feed of `user_id` (`user:<id>`), valid for `ttl`; `None`
    /// without a subscribe secret.
    pub fn mint_user(&self, user_id: Uuid, ttl: Duration) -> Option<String> {
        self.tokens
            .as_ref()
            .map(|secret| mint_user(secret, user_id, ttl))
    }

    /// Decides whether `token` lets its holder watch the feed of `user`: a subscribe token
    /// whose `user_id` claim is `user`, or a signed-in Supabase session whose `sub` is.
    /// The answer is [`Access::Granted`]: nothing is left to check against the store.
    pub async fn authorize_user(&self, token: Option<&str>, user: Uuid) -> Result<Access, Error> {
        if self.public {
            return Ok(Access::Public);
        }
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Error::TokenRequired)?;
        let refused =
            || Error::Forbidden(format!("this token does not grant the feed user:{user}"));
        let mut expired = false;
        if let Some(secret) = &self.tokens {
            match verify::<UserClaims>(token, secret, &validation()) {
                Ok(claims) => {
                    let named = claims
                        .user_id
                        .as_deref()
                        .and_then(|u| Uuid::parse_str(u).ok());
                    return if named == Some(user) {
                        Ok(Access::Granted {
                            expires_at: claims.exp,
                        })
                    } else {
                        Err(refused())
                    };
                }
                Err(kind) => expired |= matches!(kind, ErrorKind::ExpiredSignature),
            }
        }
        let mut session = None;
        if let Some(secret) = &self.supabase {
            match verify::<SupabaseClaims>(token, secret, &supabase_validation()) {
                Ok(claims) => session = Some(claims),
                Err(kind) => expired |= matches!(kind, ErrorKind::ExpiredSignature),
            }
        }
        if session.is_none()
            && let Some(jwks) = &self.jwks
        {
            match verify_jwks(token, jwks).await {
                Ok(claims) => session = Some(claims),
                Err(kind) => expired |= matches!(kind, ErrorKind::ExpiredSignature),
            }
        }
        match session.map(owner) {
            Some(Ok(Access::Owner {
                user_id,
                expires_at,
            })) if user_id == user => Ok(Access::Granted { expires_at }),
            Some(Ok(_)) => Err(refused()),
            Some(Err(e)) => Err(e),
            None if expired => Err(Error::TokenExpired),
            None => Err(Error::TokenInvalid),
        }
    }

    /// [`Self::mint`], with the right to cancel the tasks when `cancel` is set.
    pub fn mint_with(&self, tasks: &[TaskId], ttl: Duration, cancel: bool) -> Option<String> {
        self.tokens
            .as_ref()
            .map(|secret| mint_with(secret, tasks, ttl, cancel))
    }

    /// Decides whether `token` lets its holder watch `task`. Ownership of an
    /// [`Access::Owner`] grant is for the caller to check against the store.
    pub async fn authorize(&self, token: Option<&str>, task: TaskId) -> Result<Access, Error> {
        if self.public {
            return Ok(Access::Public);
        }
        self.authorize_token(token, task).await
    }

    /// Decides whether `token` lets its holder cancel `task`: a subscribe token that names
    /// the task and carries `"cancel": true`, or a Supabase session (an [`Access::Owner`],
    /// whose ownership the caller checks). `--public-subscribe` grants watching only: a
    /// development server open to anyone must not let anyone stop generations.
    pub async fn authorize_cancel(
        &self,
        token: Option<&str>,
        task: TaskId,
    ) -> Result<Access, Error> {
        let present = token.map(str::trim).filter(|t| !t.is_empty());
        if self.public && present.is_none() {
            return Err(Error::Forbidden(format!(
                "--public-subscribe lets anyone watch, not cancel; cancelling task {task} \
                 needs a subscribe token with the cancel right or the owner's session"
            )));
        }
        let access = self.authorize_token(present, task).await?;
        if let Access::Granted { .. } = access {
            let cancel = self.tokens.as_ref().is_some_and(|secret| {
                present.is_some_and(|token| {
                    verify::<TaskClaims>(token, secret, &validation()).is_ok_and(|c| c.cancel)
                })
            });
            if !cancel {
                return Err(Error::Forbidden(format!(
                    "this subscribe token may watch task {task} but not cancel it \
                     (it has no \"cancel\": true claim)"
                )));
            }
        }
        Ok(access)
    }

    /// [`Self::authorize`] without public mode: what the token itself grants.
    async fn authorize_token(&self, token: Option<&str>, task: TaskId) -> Result<Access, Error> {
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Error::TokenRequired)?;
        let mut expired = false;
        if let Some(secret) = &self.tokens {
            match verify::<TaskClaims>(token, secret, &validation()) {
                Ok(claims) => {
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
                Err(kind) => expired |= matches!(kind, ErrorKind::ExpiredSignature),
            }
        }
        if let Some(secret) = &self.supabase {
            match verify::<SupabaseClaims>(token, secret, &supabase_validation()) {
                Ok(claims) => return owner(claims),
                Err(kind) => expired |= matches!(kind, ErrorKind::ExpiredSignature),
            }
        }
        if let Some(jwks) = &self.jwks {
            match verify_jwks(token, jwks).await {
                Ok(claims) => return owner(claims),
                Err(kind) => expired |= matches!(kind, ErrorKind::ExpiredSignature),
            }
        }
        Err(if expired {
            Error::TokenExpired
        } else {
            Error::TokenInvalid
        })
    }
}

/// The grant of a verified Supabase session: its user's own tasks, if signed in.
fn owner(claims: SupabaseClaims) -> Result<Access, Error> {
    if claims.role != "authenticated" {
        return Err(Error::Forbidden(
            "only signed-in Supabase users (role `authenticated`) may subscribe".to_string(),
        ));
    }
    let user_id = Uuid::parse_str(&claims.sub)
        .map_err(|_| Error::Forbidden("the Supabase token's sub is not a user id".to_string()))?;
    Ok(Access::Owner {
        user_id,
        expires_at: claims.exp,
    })
}

/// Whether a token's `task_id` claim names `task`: the same text, or the same UUID in
/// another case (ids of integer and text tables are compared exactly).
fn names(claim: &str, task: TaskId) -> bool {
    claim == task.as_str()
        || (claim.len() == 36 && Uuid::parse_str(claim).is_ok_and(|u| TaskId::from(u) == task))
}

/// Signs a subscribe token; used by `POST /api/tasks`, `taskcast token` and tests.
pub fn mint(secret: &Secret, tasks: &[TaskId], ttl: Duration) -> String {
    mint_with(secret, tasks, ttl, false)
}

/// [`mint`], with the `cancel` claim when `cancel` is set.
pub fn mint_with(secret: &Secret, tasks: &[TaskId], ttl: Duration, cancel: bool) -> String {
    let mut ids: Vec<String> = tasks.iter().map(TaskId::to_string).collect();
    let claims = TaskClaims {
        task_id: (ids.len() == 1).then(|| ids.remove(0)),
        task_ids: ids,
        cancel,
        exp: now_unix() + ttl.as_secs(),
    };
    let key = EncodingKey::from_secret(secret.expose().as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .expect("HS256 signing of plain claims cannot fail")
}

/// Signs a feed token for `user_id` (claims `user_id`, `exp`); used by
/// [`SubscribeAuth::mint_user`], `taskcast token --user` and tests.
pub fn mint_user(secret: &Secret, user_id: Uuid, ttl: Duration) -> String {
    let claims = UserClaims {
        user_id: Some(user_id.to_string()),
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

    #[tokio::test]
    async fn a_token_grants_exactly_its_tasks() {
        let (a, b) = (TaskId::random(), TaskId::random());
        let token = auth().mint(&[a], Duration::from_secs(60)).unwrap();
        assert!(matches!(
            auth().authorize(Some(&token), a).await,
            Ok(Access::Granted { .. })
        ));
        assert!(matches!(
            auth().authorize(Some(&token), b).await,
            Err(Error::Forbidden(_))
        ));
        let both = auth().mint(&[a, b], Duration::from_secs(60)).unwrap();
        assert!(auth().authorize(Some(&both), b).await.is_ok());
    }

    #[tokio::test]
    async fn missing_forged_and_unsigned_tokens_are_refused() {
        let task = TaskId::random();
        assert!(matches!(
            auth().authorize(None, task).await,
            Err(Error::TokenRequired)
        ));
        let other = SubscribeAuth::new(Some(Secret::new("x".repeat(32))), None, false);
        let forged = other.mint(&[task], Duration::from_secs(60)).unwrap();
        assert!(matches!(
            auth().authorize(Some(&forged), task).await,
            Err(Error::TokenInvalid)
        ));
        // alg: none, with the same claims.
        let real = auth().mint(&[task], Duration::from_secs(60)).unwrap();
        let payload = real.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(matches!(
            auth().authorize(Some(&none), task).await,
            Err(Error::TokenInvalid)
        ));
    }

    fn sign(secret: &str, header: &Header, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            header,
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn tokens_before_their_nbf_or_with_a_crit_header_are_refused() {
        let task = TaskId::random();
        let secret = "s".repeat(32);
        let hs256 = Header::new(Algorithm::HS256);
        let claims = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"task_id": task.to_string(), "exp": now_unix() + 600});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            c
        };
        let plain = sign(&secret, &hs256, claims(serde_json::json!({})));
        assert!(
            auth().authorize(Some(&plain), task).await.is_ok(),
            "the control case"
        );
        let past = sign(
            &secret,
            &hs256,
            claims(serde_json::json!({"nbf": now_unix() - 5})),
        );
        assert!(auth().authorize(Some(&past), task).await.is_ok());
        let future = sign(
            &secret,
            &hs256,
            claims(serde_json::json!({"nbf": now_unix() + 300})),
        );
        assert!(matches!(
            auth().authorize(Some(&future), task).await,
            Err(Error::TokenInvalid)
        ));
        let mut critical = Header::new(Algorithm::HS256);
        critical.crit = Some(vec!["exp-ext".to_string()]);
        critical.extras.insert("exp-ext", "must-understand");
        let crit = sign(&secret, &critical, claims(serde_json::json!({})));
        assert!(matches!(
            auth().authorize(Some(&crit), task).await,
            Err(Error::TokenInvalid)
        ));
        // A subscribe token never carries an audience; one that does was minted elsewhere.
        let aud = sign(
            &secret,
            &hs256,
            claims(serde_json::json!({"aud": "authenticated"})),
        );
        assert!(matches!(
            auth().authorize(Some(&aud), task).await,
            Err(Error::TokenInvalid)
        ));
    }

    #[tokio::test]
    async fn supabase_tokens_must_be_for_the_authenticated_audience() {
        let secret = "supabase-secret-0123456789abcdefghij";
        let supabase = SubscribeAuth::new(None, Some(Secret::new(secret)), false);
        let user = Uuid::new_v4();
        let token = |aud: Option<&str>| {
            let mut claims = serde_json::json!({
                "sub": user.to_string(), "role": "authenticated", "exp": now_unix() + 600
            });
            if let Some(aud) = aud {
                claims["aud"] = aud.into();
            }
            sign(secret, &Header::new(Algorithm::HS256), claims)
        };
        let task = TaskId::random();
        assert!(matches!(
            supabase.authorize(Some(&token(Some("authenticated"))), task).await,
            Ok(Access::Owner { user_id, .. }) if user_id == user
        ));
        for aud in [Some("anon"), Some("another-project"), None] {
            assert!(
                matches!(
                    supabase.authorize(Some(&token(aud)), task).await,
                    Err(Error::TokenInvalid)
                ),
                "aud {aud:?} must be refused"
            );
        }
    }

    #[tokio::test]
    async fn a_user_token_grants_that_users_feed_and_no_task() {
        let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
        let token = auth().mint_user(user, Duration::from_secs(60)).unwrap();
        assert!(matches!(
            auth().authorize_user(Some(&token), user).await,
            Ok(Access::Granted { .. })
        ));
        assert!(matches!(
            auth().authorize_user(Some(&token), other).await,
            Err(Error::Forbidden(_))
        ));
        assert!(matches!(
            auth().authorize(Some(&token), TaskId::random()).await,
            Err(Error::Forbidden(_))
        ));
        let task = auth()
            .mint(&[TaskId::random()], Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            auth().authorize_user(Some(&task), user).await,
            Err(Error::Forbidden(_))
        ));
    }

    #[tokio::test]
    async fn public_mode_needs_no_token() {
        let public = SubscribeAuth::new(None, None, true);
        assert_eq!(
            public.authorize(None, TaskId::random()).await.unwrap(),
            Access::Public
        );
    }
}
