//! Supabase's asymmetric session keys: the project's JWKS, fetched, cached and refreshed.
//!
//! `<SUPABASE_URL>/auth/v1/.well-known/jwks.json` lists the public keys that sign the
//! project's access tokens (ES256 on P-256, or RS256). The set is fetched at start, every
//! [`JwksOptions::refresh_interval`], and when a token names a `kid` the cache lacks (at
//! most once per [`JwksOptions::min_refetch_interval`]). A successful fetch replaces the
//! set, so a key Supabase removed stops verifying; a failed one keeps the cached keys.
//!
//! Each key's algorithm comes from the key itself (`kty`, `crv`, `alg`), never from a
//! token's header, so a token cannot pick how it is checked (an `HS256` header naming an RSA
//! key's `kid` fails). Known keys are read without waiting; only a token with an unknown
//! `kid` may wait, for one fetch at most, which has a deadline and a body cap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Header};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::shutdown::Shutdown;
use taskcast_wire::http::{HttpClient, request};

/// Timings and bounds of the key fetch.
#[derive(Clone, Debug)]
pub struct JwksOptions {
    /// Connect, TLS, request and body of one fetch. Default 5 s.
    pub fetch_timeout: Duration,
    /// Largest JWKS body read. Default 64 KiB (a key is well under 1 KiB).
    pub max_body_bytes: usize,
    /// Between scheduled refreshes. Default 10 minutes.
    pub refresh_interval: Duration,
    /// Least time between the starts of two fetches caused by unknown `kid`s, and the
    /// retry delay after a failed scheduled fetch. Default 30 s.
    pub min_refetch_interval: Duration,
}

impl Default for JwksOptions {
    fn default() -> Self {
        JwksOptions {
            fetch_timeout: Duration::from_secs(5),
            max_body_bytes: 64 * 1024,
            refresh_interval: Duration::from_secs(600),
            min_refetch_interval: Duration::from_secs(30),
        }
    }
}

/// Keys kept from one set at most; Supabase publishes a handful.
const MAX_KEYS: usize = 32;

/// A verifying key and the one algorithm it is used with.
pub struct SigningKey {
    pub decoding: DecodingKey,
    pub algorithm: Algorithm,
}

type KeySet = Arc<HashMap<String, Arc<SigningKey>>>;

struct Inner {
    url: String,
    issuer: String,
    client: HttpClient,
    options: JwksOptions,
    /// std RwLock: nothing awaits while it is held; readers clone the `Arc` out.
    keys: RwLock<KeySet>,
    /// Single flight: held for the length of a fetch; holds when the last fetch caused by
    /// an unknown `kid` started.
    fetching: Mutex<Option<Instant>>,
    /// Fetches finished (either way), so a caller that waited for one does not start another.
    finished: AtomicU64,
}

/// The key cache of one Supabase project. Cloning is shallow: it is an `Arc`.
#[derive(Clone)]
pub struct Jwks(Arc<Inner>);

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("url", &self.0.url).finish()
    }
}

impl Jwks {
    /// A cache for the project at `supabase_url` (an origin such as
    /// `https://abcd.supabase.co`, already validated). Nothing is fetched until
    /// [`Jwks::spawn_refresher`] runs or a token arrives.
    pub fn new(supabase_url: &str, options: JwksOptions) -> Jwks {
        let base = supabase_url.trim_end_matches('/');
        Jwks(Arc::new(Inner {
            url: format!("{base}/auth/v1/.well-known/jwks.json"),
            issuer: format!("{base}/auth/v1"),
            client: HttpClient::new(&[]),
            options,
            keys: RwLock::default(),
            fetching: Mutex::new(None),
            finished: AtomicU64::new(0),
        }))
    }

    /// The `iss` the project's tokens carry: `<SUPABASE_URL>/auth/v1`.
    pub fn issuer(&self) -> &str {
        &self.0.issuer
    }

    /// The key a token's header names by `kid`. A `kid` not cached, on a token that claims
    /// an algorithm a JWKS key could have, refetches the set (rate-limited, single flight)
    /// and waits for that fetch only. `None`: no such key, or the set cannot be had now.
    pub async fn key(&self, header: &Header) -> Option<Arc<SigningKey>> {
        let kid = header.kid.as_deref()?;
        if let Some(key) = self.cached(kid) {
            return Some(key);
        }
        if !matches!(header.alg, Algorithm::ES256 | Algorithm::RS256) {
            // A symmetric or unsupported header can match no key we would keep.
            return None;
        }
        let options = &self.0.options;
        let seen = self.0.finished.load(Ordering::Acquire);
        // The holder's fetch has its own deadline; this one only guards the wait.
        let mut last = tokio::time::timeout(options.fetch_timeout, self.0.fetching.lock())
            .await
            .ok()?;
        if self.0.finished.load(Ordering::Acquire) != seen {
            // A fetch ended while this call waited: its answer stands.
            return self.cached(kid);
        }
        if last.is_some_and(|at| at.elapsed() < options.min_refetch_interval) {
            tracing::debug!(kid, "unknown JWKS kid; refetch skipped (rate limit)");
            return None;
        }
        *last = Some(Instant::now());
        tracing::info!(kid, "unknown JWKS kid: fetching the key set");
        self.fetch_holding().await;
        self.cached(kid)
    }

    fn cached(&self, kid: &str) -> Option<Arc<SigningKey>> {
        let keys = self.0.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.get(kid).cloned()
    }

    /// Keys cached now (for tests and the startup log).
    pub fn len(&self) -> usize {
        self.0.keys.read().map_or(0, |keys| keys.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fetches now and every `refresh_interval` (after a failure, every
    /// `min_refetch_interval`) until `stop` is triggered.
    pub fn spawn_refresher(&self, stop: Shutdown) -> tokio::task::JoinHandle<()> {
        let jwks = self.clone();
        tokio::spawn(async move {
            loop {
                let fetched = async {
                    let _single_flight = jwks.0.fetching.lock().await;
                    jwks.fetch_holding().await
                };
                let ok = tokio::select! {
                    ok = fetched => ok,
                    () = stop.wait() => return,
                };
                let options = &jwks.0.options;
                let wait = if ok {
                    options.refresh_interval
                } else {
                    options.min_refetch_interval
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.wait() => return,
                }
            }
        })
    }

    /// Fetches the set and, if that works, replaces the cache. The caller holds the
    /// single-flight lock. Returns whether it worked.
    async fn fetch_holding(&self) -> bool {
        let worked = match self.fetch().await {
            Ok(keys) => {
                tracing::info!(url = %self.0.url, keys = keys.len(), "JWKS fetched");
                *self.0.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
                true
            }
            Err(why) => {
                tracing::warn!(url = %self.0.url, error = %why,
                    "JWKS fetch failed; keeping the cached keys");
                false
            }
        };
        self.0.finished.fetch_add(1, Ordering::Release);
        worked
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<SigningKey>>, String> {
        let Inner {
            url,
            client,
            options,
            ..
        } = &*self.0;
        let accept = [(hyper::header::ACCEPT, "application/json")];
        let get =
            request(hyper::Method::GET, url, &accept, Bytes::new()).map_err(|e| e.to_string())?;
        let reply = (client
            .call(get, options.fetch_timeout, options.max_body_bytes)
            .await)
            .map_err(|e| e.to_string())?;
        if !reply.status.is_success() {
            return Err(format!("answered {}", reply.status));
        }
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = serde_json::from_slice(&reply.body)
            .map_err(|e| format!("not a JWKS (a JSON object with `keys`): {e}"))?;
        let mut keys = HashMap::new();
        for value in set.keys.into_iter().take(MAX_KEYS) {
            match serde_json::from_value::<Jwk>(value)
                .map_err(|e| e.to_string())
                .and_then(|jwk| usable(&jwk))
            {
                Ok((kid, key)) => {
                    keys.insert(kid, Arc::new(key));
                }
                Err(why) => tracing::debug!(error = %why, "JWKS key skipped"),
            }
        }
        Ok(keys)
    }
}

/// The `kid` and verifying key of a JWK that signs ES256 (EC P-256) or RS256 (RSA).
fn usable(jwk: &Jwk) -> Result<(String, SigningKey), String> {
    let kid = jwk.common.key_id.clone().ok_or("a key without `kid`")?;
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return Err(format!("key {kid} is not for signatures (`use`)"));
    }
    let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
            if ec.curve == EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
        _ => {
            return Err(format!(
                "key {kid} is neither ES256 (EC P-256) nor RS256 (RSA)"
            ));
        }
    };
    let decoding = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid}: {e}"))?;
    Ok((
        kid,
        SigningKey {
            decoding,
            algorithm,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(value: serde_json::Value) -> Jwk {
        serde_json::from_value(value).expect("a JWK")
    }

    #[test]
    fn the_algorithm_comes_from_the_key_type_and_curve() {
        let ec = jwk(serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": "e",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"
        }));
        assert_eq!(usable(&ec).unwrap().1.algorithm, Algorithm::ES256);
        let rsa = jwk(serde_json::json!({"kty": "RSA", "kid": "r", "n": "sXch", "e": "AQAB"}));
        assert_eq!(usable(&rsa).unwrap().1.algorithm, Algorithm::RS256);
        let mislabelled = jwk(serde_json::json!({
            "kty": "RSA", "kid": "r", "alg": "RS384", "n": "sXch", "e": "AQAB"
        }));
        assert!(usable(&mislabelled).is_err());
        let symmetric = jwk(serde_json::json!({"kty": "oct", "kid": "o", "k": "c2VjcmV0"}));
        assert!(
            usable(&symmetric).is_err(),
            "a JWKS never supplies an HMAC secret"
        );
        let encryption = jwk(serde_json::json!({
            "kty": "RSA", "kid": "r", "use": "enc", "n": "sXch", "e": "AQAB"
        }));
        assert!(usable(&encryption).is_err());
    }
}
