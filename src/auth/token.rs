//! Subscriber tokens as JWTs: minting taskcast's own subscribe tokens, and verifying a
//! presented token (a subscribe token or a Supabase session). What a verified token grants
//! is decided in [`super::subscribe`].
//!
//! A subscribe token is signed with HS256 and `TASKCAST_SUBSCRIBE_SECRET`, with claims
//! `exp` and `task_id` (or `task_ids`, and `cancel`), or `user_id` for a user's feed.
//! A Supabase access token is either HS256 with `SUPABASE_JWT_SECRET` (legacy) or
//! ES256/RS256 with a key of the project's JWKS (`SUPABASE_URL`, see [`super::jwks`]),
//! which must also carry `iss: <SUPABASE_URL>/auth/v1`. Each key has one algorithm:
//! `alg: none` and algorithm swaps fail verification. A token used before its `nbf`, or
//! whose header lists any `crit` extension (taskcast understands none), is refused; a
//! Supabase token must carry `aud: authenticated`, and a subscribe token (which taskcast
//! mints without one) must carry no `aud`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Secret;
use super::jwks::Jwks;
use crate::domain::TaskId;
use crate::error::Error;

/// The claims of a subscribe token: the tasks it names (with or without the right to
/// cancel them), or the user whose feed it grants. Each kind of token leaves the other
/// kind's claims out, so a task token grants no feed and a feed token no task.
#[derive(Serialize, Deserialize)]
pub(super) struct SubscribeClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    task_ids: Vec<String>,
    /// The feed `user:<user_id>` (not the user's tasks one by one, and never a cancel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
    /// The right to cancel the tasks the token names (`POST /api/tasks` with
    /// `"cancel": true`, `taskcast token --cancel`). Absent: watch only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
    pub exp: u64,
}

impl SubscribeClaims {
    /// Whether a `task_id` or `task_ids` claim names `task`.
    pub fn names_task(&self, task: TaskId) -> bool {
        let named = self.task_id.iter().chain(&self.task_ids);
        named.into_iter().any(|claim| names(claim, task))
    }

    /// Whether the `user_id` claim is `user`.
    pub fn names_user(&self, user: Uuid) -> bool {
        let named = self
            .user_id
            .as_deref()
            .and_then(|u| Uuid::parse_str(u).ok());
        named == Some(user)
    }
}

/// The claims taskcast reads from a Supabase access token.
#[derive(Deserialize)]
pub(super) struct SessionClaims {
    pub sub: String,
    pub role: String,
    pub exp: u64,
}

/// A token whose signature, algorithm, audience and times check out.
pub(super) enum Verified {
    /// taskcast's own subscribe token.
    Subscribe(SubscribeClaims),
    /// A Supabase session.
    Session(SessionClaims),
}

/// The keys tokens are signed and verified with.
#[derive(Clone)]
pub(super) struct Keys {
    /// `TASKCAST_SUBSCRIBE_SECRET`: signs and verifies subscribe tokens.
    pub tokens: Option<Secret>,
    /// `SUPABASE_JWT_SECRET`: verifies legacy HS256 sessions.
    pub supabase: Option<Secret>,
    /// `SUPABASE_URL`'s JWKS: verifies ES256/RS256 sessions.
    pub jwks: Option<Jwks>,
}

impl Keys {
    /// The one verifier: `token` as a subscribe token, else as a Supabase session (the
    /// legacy secret, then the JWKS). 401 when it is missing, expired, or verified by none.
    pub async fn verify(&self, token: Option<&str>) -> Result<Verified, Error> {
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Error::TokenRequired)?;
        let mut expired = false;
        let mut note = |kind: ErrorKind| expired |= matches!(kind, ErrorKind::ExpiredSignature);
        if let Some(secret) = &self.tokens {
            match verify_hs256(token, secret, &validation()) {
                Ok(claims) => return Ok(Verified::Subscribe(claims)),
                Err(kind) => note(kind),
            }
        }
        if let Some(secret) = &self.supabase {
            match verify_hs256(token, secret, &session_validation()) {
                Ok(claims) => return Ok(Verified::Session(claims)),
                Err(kind) => note(kind),
            }
        }
        if let Some(jwks) = &self.jwks {
            match verify_jwks(token, jwks).await {
                Ok(claims) => return Ok(Verified::Session(claims)),
                Err(kind) => note(kind),
            }
        }
        Err(if expired {
            Error::TokenExpired
        } else {
            Error::TokenInvalid
        })
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
fn session_validation() -> Validation {
    let mut v = validation();
    v.set_audience(&[SUPABASE_AUDIENCE]);
    v.set_required_spec_claims(&["exp", "aud"]);
    v
}

/// Verifies `token` with an HMAC `secret` and returns its claims.
fn verify_hs256<T: serde::de::DeserializeOwned>(
    token: &str,
    secret: &Secret,
    validation: &Validation,
) -> Result<T, ErrorKind> {
    let key = DecodingKey::from_secret(secret.expose().as_bytes());
    verify_with(token, &key, validation)
}

/// Verifies a Supabase token against the project's JWKS: the key its `kid` names, that
/// key's algorithm only, and `iss` the project's auth URL.
async fn verify_jwks(token: &str, jwks: &Jwks) -> Result<SessionClaims, ErrorKind> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.into_kind())?;
    let key = jwks.key(&header).await.ok_or(ErrorKind::InvalidToken)?;
    let mut validation = session_validation();
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

/// Whether a token's `task_id` claim names `task`: the same text, or the same UUID in
/// another case (ids of integer and text tables are compared exactly).
fn names(claim: &str, task: TaskId) -> bool {
    claim == task.as_str()
        || (claim.len() == 36 && Uuid::parse_str(claim).is_ok_and(|u| TaskId::from(u) == task))
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs a subscribe token; used by `POST /api/tasks`, `taskcast token` and tests.
pub fn mint(secret: &Secret, tasks: &[TaskId], ttl: Duration) -> String {
    mint_with(secret, tasks, ttl, false)
}

/// [`mint`], with the `cancel` claim when `cancel` is set.
pub fn mint_with(secret: &Secret, tasks: &[TaskId], ttl: Duration, cancel: bool) -> String {
    let mut ids: Vec<String> = tasks.iter().map(TaskId::to_string).collect();
    sign(
        secret,
        &SubscribeClaims {
            task_id: (ids.len() == 1).then(|| ids.remove(0)),
            task_ids: ids,
            user_id: None,
            cancel,
            exp: now_unix() + ttl.as_secs(),
        },
    )
}

/// Signs a feed token for `user_id` (claims `user_id`, `exp`); used by
/// [`super::subscribe::SubscribeAuth::mint_user`], `taskcast token --user` and tests.
pub fn mint_user(secret: &Secret, user_id: Uuid, ttl: Duration) -> String {
    sign(
        secret,
        &SubscribeClaims {
            task_id: None,
            task_ids: Vec::new(),
            user_id: Some(user_id.to_string()),
            cancel: false,
            exp: now_unix() + ttl.as_secs(),
        },
    )
}

fn sign(secret: &Secret, claims: &SubscribeClaims) -> String {
    let key = EncodingKey::from_secret(secret.expose().as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)
        .expect("HS256 signing of plain claims cannot fail")
}
