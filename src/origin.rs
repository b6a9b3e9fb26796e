//! Browser origins: which pages may open a WebSocket or call the API from a browser.
//!
//! A request without an `Origin` header (the generator, a server, curl) is unaffected. A
//! request with one is allowed when the origin is the server's own (same host as the
//! `Host` header), NEXT_PUBLIC_APP_URL's, or listed in TASKCAST_ALLOWED_ORIGINS; anything
//! else gets 403 before any route runs, so a WebSocket is refused before the upgrade.

use std::sync::Arc;

use warp::Filter;
use warp::http::header::{self, HeaderValue};
use warp::reply::Response;

use crate::error::Error;

/// Cloning is shallow: the list is shared.
#[derive(Clone, Debug, Default)]
pub struct OriginPolicy {
    allowed: Arc<[String]>,
}

impl OriginPolicy {
    /// `allowed` holds normalized origins (`scheme://host[:port]`, lowercase).
    pub fn new(allowed: Vec<String>) -> Self {
        OriginPolicy {
            allowed: allowed.into(),
        }
    }

    /// `Ok(Some(origin))` for an allowed browser request, whose responses then carry CORS
    /// headers; `Ok(None)` when there is no Origin header.
    pub fn check(&self, origin: Option<&str>, host: Option<&str>) -> Result<Option<String>, Error> {
        let Some(origin) = origin else {
            return Ok(None);
        };
        let normalized = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        let authority = normalized
            .strip_prefix("https://")
            .or_else(|| normalized.strip_prefix("http://"));
        let same_host = authority
            .zip(host)
            .is_some_and(|(authority, host)| authority.eq_ignore_ascii_case(host.trim()));
        if same_host || self.allowed.contains(&normalized) {
            Ok(Some(origin.trim().to_string()))
        } else {
            let shown: String = origin.chars().take(80).collect();
            Err(Error::Forbidden(format!(
                "origin {shown:?} is not allowed; add it to TASKCAST_ALLOWED_ORIGINS \
                 (or set NEXT_PUBLIC_APP_URL)"
            )))
        }
    }

    /// Extracts the allowed origin (or none), rejecting a foreign one with 403.
    pub fn filter(
        &self,
    ) -> impl Filter<Extract = (Option<String>,), Error = warp::Rejection> + Clone + use<> {
        let policy = self.clone();
        warp::header::optional::<String>("origin")
            .and(warp::header::optional::<String>("host"))
            .and_then(move |origin: Option<String>, host: Option<String>| {
                let verdict = policy
                    .check(origin.as_deref(), host.as_deref())
                    .map_err(warp::reject::custom);
                async move { verdict }
            })
    }
}

/// Lets an allowed page read the response.
pub fn allow(mut response: Response, origin: Option<String>) -> Response {
    if let Some(value) = origin.and_then(|o| HeaderValue::from_str(&o).ok()) {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        headers.append(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

/// The answer to a CORS preflight (`OPTIONS`) from an allowed page.
pub fn preflight(origin: Option<String>) -> Response {
    let mut response = Response::default();
    *response.status_mut() = warp::http::StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    allow(response, origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_without_origin_pass_and_foreign_origins_do_not() {
        let policy = OriginPolicy::new(vec!["https://app.example.com".into()]);
        assert_eq!(policy.check(None, Some("x")).unwrap(), None);
        assert!(policy.check(Some("https://app.example.com"), None).is_ok());
        assert!(policy.check(Some("https://APP.example.com/"), None).is_ok());
        assert!(
            policy
                .check(Some("https://evil.example.com"), None)
                .is_err()
        );
        assert!(policy.check(Some("null"), Some("null")).is_err());
        // Same origin as the server itself (the demo page).
        assert!(
            policy
                .check(Some("http://127.0.0.1:8080"), Some("127.0.0.1:8080"))
                .is_ok()
        );
        assert!(
            policy
                .check(Some("http://127.0.0.1:9999"), Some("127.0.0.1:8080"))
                .is_err()
        );
    }
}
