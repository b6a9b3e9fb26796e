//! Who may watch what: a task (`authorize`), a task's cancel (`authorize_cancel`) or a
//! user's feed (`authorize_user`), decided from one verified token (see [`super::token`])
//! by a task claim or a feed claim; or, with `--public-subscribe`, anyone may watch.
//!
//! A subscribe token grants what it names. A Supabase access token (`role:
//! authenticated`) grants the tasks whose `user_id` is its `sub`, which the caller checks
//! against the store, and the feed of that user.

use std::time::Duration;

use uuid::Uuid;

use super::Secret;
use super::jwks::Jwks;
use super::token::{Keys, SessionClaims, Verified};
pub use super::token::{mint, mint_user, mint_with, now_unix};
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

/// The verifier. Cloning is cheap enough for per-connection use (keys are small).
#[derive(Clone)]
pub struct SubscribeAuth {
    keys: Keys,
    public: bool,
}

impl std::fmt::Debug for SubscribeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscribeAuth")
            .field("tokens", &self.keys.tokens.is_some())
            .field("supabase", &self.keys.supabase.is_some())
            .field("jwks", &self.keys.jwks)
            .field("public", &self.public)
            .finish()
    }
}

impl SubscribeAuth {
    pub fn new(tokens: Option<Secret>, supabase: Option<Secret>, public: bool) -> Self {
        SubscribeAuth {
            keys: Keys {
                tokens,
                supabase,
                jwks: None,
            },
            public,
        }
    }

    /// Also accepts Supabase sessions signed with a key of `jwks` (ES256, RS256).
    pub fn with_jwks(mut self, jwks: Jwks) -> Self {
        self.keys.jwks = Some(jwks);
        self
    }

    /// The JWKS cache, for the server to keep refreshed.
    pub fn jwks(&self) -> Option<&Jwks> {
        self.keys.jwks.as_ref()
    }

    pub fn is_public(&self) -> bool {
        self.public
    }

    pub fn has_supabase(&self) -> bool {
        self.keys.supabase.is_some() || self.keys.jwks.is_some()
    }

    /// Mints a token for `tasks`, valid for `ttl`; `None` without a subscribe secret.
    pub fn mint(&self, tasks: &[TaskId], ttl: Duration) -> Option<String> {
        self.mint_with(tasks, ttl, false)
    }

    /// [`Self::mint`], with the right to cancel the tasks when `cancel` is set.
    pub fn mint_with(&self, tasks: &[TaskId], ttl: Duration, cancel: bool) -> Option<String> {
        let secret = self.keys.tokens.as_ref()?;
        Some(mint_with(secret, tasks, ttl, cancel))
    }

    /// Mints a token for the feed of `user_id` (`user:<id>`), valid for `ttl`; `None`
    /// without a subscribe secret.
    pub fn mint_user(&self, user_id: Uuid, ttl: Duration) -> Option<String> {
        let secret = self.keys.tokens.as_ref()?;
        Some(mint_user(secret, user_id, ttl))
    }

    /// Decides whether `token` lets its holder watch `task`. Ownership of an
    /// [`Access::Owner`] grant is for the caller to check against the store.
    pub async fn authorize(&self, token: Option<&str>, task: TaskId) -> Result<Access, Error> {
        if self.public {
            return Ok(Access::Public);
        }
        task_claim(&self.keys.verify(token).await?, task)
    }

    /// Decides whether `token` lets its holder watch the feed of `user`: a subscribe token
    /// whose `user_id` claim is `user`, or a signed-in Supabase session whose `sub` is.
    /// The answer is [`Access::Granted`]: nothing is left to check against the store.
    pub async fn authorize_user(&self, token: Option<&str>, user: Uuid) -> Result<Access, Error> {
        if self.public {
            return Ok(Access::Public);
        }
        feed_claim(&self.keys.verify(token).await?, user)
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
        let verified = self.keys.verify(present).await?;
        let access = task_claim(&verified, task)?;
        if let Verified::Subscribe(claims) = &verified
            && !claims.cancel
        {
            return Err(Error::Forbidden(format!(
                "this subscribe token may watch task {task} but not cancel it \
                 (it has no \"cancel\": true claim)"
            )));
        }
        Ok(access)
    }
}

/// The task claim: a subscribe token must name `task`; a session grants its user's tasks.
fn task_claim(verified: &Verified, task: TaskId) -> Result<Access, Error> {
    match verified {
        Verified::Subscribe(claims) if claims.names_task(task) => Ok(Access::Granted {
            expires_at: claims.exp,
        }),
        Verified::Subscribe(_) => Err(Error::Forbidden(format!(
            "this subscribe token does not grant task {task}"
        ))),
        Verified::Session(session) => owner(session),
    }
}

/// The feed claim: a subscribe token's `user_id`, or a session's `sub`, must be `user`.
fn feed_claim(verified: &Verified, user: Uuid) -> Result<Access, Error> {
    let refused = || Error::Forbidden(format!("this token does not grant the feed user:{user}"));
    match verified {
        Verified::Subscribe(claims) if claims.names_user(user) => Ok(Access::Granted {
            expires_at: claims.exp,
        }),
        Verified::Subscribe(_) => Err(refused()),
        Verified::Session(session) => match owner(session)? {
            Access::Owner {
                user_id,
                expires_at,
            } if user_id == user => Ok(Access::Granted { expires_at }),
            _ => Err(refused()),
        },
    }
}

/// The grant of a verified Supabase session: its user's own tasks, if signed in.
fn owner(session: &SessionClaims) -> Result<Access, Error> {
    if session.role != "authenticated" {
        return Err(Error::Forbidden(
            "only signed-in Supabase users (role `authenticated`) may subscribe".to_string(),
        ));
    }
    let user_id = Uuid::parse_str(&session.sub)
        .map_err(|_| Error::Forbidden("the Supabase token's sub is not a user id".to_string()))?;
    Ok(Access::Owner {
        user_id,
        expires_at: session.exp,
    })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

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
        assert!(matches!(
            auth()
                .authorize_cancel(Some(&token), TaskId::random())
                .await,
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
