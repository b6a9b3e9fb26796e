//! Browser origins: which pages may open a WebSocket or call the API from a browser.
//!
//! A request without an `Origin` header (the generator, a server, curl) is unaffected. A
//! request with one is allowed only when its origin is configured: NEXT_PUBLIC_APP_URL's,
//! TASKCAST_PUBLIC_URL's (taskcast's own pages), or one in TASKCAST_ALLOWED_ORIGINS.
//! Outside production, loopback origins (localhost, 127.0.0.0/8, [::1]) are allowed too,
//! so the demo page works at http://127.0.0.1:8080. The `Host` header is never trusted:
//! a DNS-rebinding page has an origin equal to the host it made the browser send.
//! Anything else gets 403 before any route runs, so a WebSocket is refused before the
//! upgrade. Origins are compared normalized: lowercase, the scheme's default port dropped
//! (`http://a.com:80` is `http://a.com`).

use std::net::Ipv4Addr;
use std::sync::Arc;

use warp::Filter;
use warp::http::header::{self, HeaderValue};
use warp::reply::Response;

use crate::error::Error;

/// Cloning is shallow: the list is shared.
#[derive(Clone, Debug, Default)]
pub struct OriginPolicy {
    allowed: Arc<[String]>,
    allow_loopback: bool,
}

/// Reduces an origin to `scheme://host[:port]`, lowercase, without the scheme's default
/// port (80 for http, 443 for https); `None` unless it is http(s) with a plain authority.
pub fn normalize(origin: &str) -> Option<String> {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let (scheme, authority) = origin.split_once("://")?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || "-.:[]".contains(c);
    if !authority.chars().all(valid) {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        // A bare IPv6 literal's colons are inside the brackets.
        Some((host, port)) if !port.contains(']') => (host, Some(port.parse::<u16>().ok()?)),
        _ => (authority, None),
    };
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.is_empty() || (!bracketed && host.contains([':', '[', ']'])) {
        return None;
    }
    Some(match port {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// Whether a normalized origin's host is this machine: `localhost`, 127.0.0.0/8, `[::1]`.
fn is_loopback(origin: &str) -> bool {
    let authority = origin.split_once("://").map_or("", |(_, a)| a);
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => host,
        _ => authority,
    };
    host == "localhost"
        || host == "[::1]"
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

impl OriginPolicy {
    /// `allowed` are the configured origins (normalized here; ones that are not an
    /// origin are ignored, config has refused them already). `allow_loopback` lets pages
    /// on this machine in: development only.
    pub fn new(allowed: Vec<String>, allow_loopback: bool) -> Self {
        let allowed: Vec<String> = allowed.iter().filter_map(|o| normalize(o)).collect();
        OriginPolicy {
            allowed: allowed.into(),
            allow_loopback,
        }
    }

    /// `Ok(Some(origin))` for an allowed browser request, whose responses then carry CORS
    /// headers; `Ok(None)` when there is no Origin header.
    pub fn check(&self, origin: Option<&str>) -> Result<Option<String>, Error> {
        let Some(origin) = origin else {
            return Ok(None);
        };
        let allowed = normalize(origin).is_some_and(|normalized| {
            self.allowed.contains(&normalized) || (self.allow_loopback && is_loopback(&normalized))
        });
        if allowed {
            Ok(Some(origin.trim().to_string()))
        } else {
            Err(Error::OriginRefused {
                origin: origin.chars().take(80).collect(),
            })
        }
    }

    /// Extracts the allowed origin (or none), rejecting a foreign one with 403.
    pub fn filter(
        &self,
    ) -> impl Filter<Extract = (Option<String>,), Error = warp::Rejection> + Clone + use<> {
        let policy = self.clone();
        warp::header::optional::<String>("origin").and_then(move |origin: Option<String>| {
            let verdict = policy
                .check(origin.as_deref())
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

    fn allowed(policy: &OriginPolicy, origin: &str) -> bool {
        policy.check(Some(origin)).is_ok()
    }

    #[test]
    fn requests_without_origin_pass_and_only_configured_origins_do() {
        let policy = OriginPolicy::new(vec!["https://app.example.com".into()], false);
        assert_eq!(policy.check(None).unwrap(), None);
        assert!(allowed(&policy, "https://app.example.com"));
        assert!(allowed(&policy, "https://APP.example.com/"));
        assert!(!allowed(&policy, "https://evil.example.com"));
        assert!(
            !allowed(&policy, "http://app.example.com"),
            "another scheme"
        );
        assert!(!allowed(&policy, "null"));
        // Not configured and not development: the server's own loopback address is refused.
        assert!(!allowed(&policy, "http://127.0.0.1:8080"));
    }

    #[test]
    fn default_ports_are_the_same_origin() {
        let policy = OriginPolicy::new(
            vec![
                "http://a.example.com:80".into(),
                "https://b.example.com".into(),
            ],
            false,
        );
        assert!(allowed(&policy, "http://a.example.com"));
        assert!(allowed(&policy, "http://a.example.com:80"));
        assert!(allowed(&policy, "https://b.example.com:443"));
        assert!(!allowed(&policy, "http://a.example.com:8080"));
        assert!(!allowed(&policy, "https://b.example.com:80"));
        assert_eq!(
            normalize("HTTP://[::1]:80").as_deref(),
            Some("http://[::1]"),
            "IPv6 literals keep their brackets"
        );
        assert_eq!(normalize("http://[::1]").as_deref(), Some("http://[::1]"));
        for bad in [
            "ftp://a.com",
            "http://",
            "http://a.com:99999",
            "http://u@a.com",
            "a.com",
        ] {
            assert_eq!(normalize(bad), None, "{bad}");
        }
    }

    #[test]
    fn loopback_origins_are_allowed_only_in_development() {
        let development = OriginPolicy::new(Vec::new(), true);
        let production = OriginPolicy::new(Vec::new(), false);
        for origin in [
            "http://127.0.0.1:8080",
            "http://127.1.2.3",
            "http://localhost:3000",
            "https://localhost",
            "http://[::1]:8080",
        ] {
            assert!(allowed(&development, origin), "{origin}");
            assert!(!allowed(&production, origin), "{origin}");
        }
        for foreign in [
            "http://127.0.0.1.evil.com",
            "http://localhost.evil.com",
            "http://evil.com",
            "http://128.0.0.1",
        ] {
            assert!(!allowed(&development, foreign), "{foreign}");
        }
    }
}
