//! Outgoing HTTP and HTTPS: the reporter's pushes and the server's Supabase JWKS fetch.
//!
//! TLS is rustls with the ring provider, set on the connector itself rather than installed
//! process-wide, so nothing here depends on (or changes) a global rustls default. The trust
//! roots are Mozilla's (webpki-roots) plus any [`RootCa`] the caller adds. Every call has
//! one deadline (connect, TLS, request and body together) and a cap on the body it reads.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::cause_chain;

/// An extra certificate authority to trust (a private CA in front of taskcast, or a test's).
#[derive(Clone, Debug)]
pub struct RootCa(CertificateDer<'static>);

impl RootCa {
    /// The certificates of a PEM file (`-----BEGIN CERTIFICATE-----` blocks); at least one.
    pub fn from_pem(pem: &[u8]) -> Result<Vec<RootCa>, String> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .map(|c| c.map(RootCa))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate file: {e}"))?;
        if certs.is_empty() {
            return Err("no `-----BEGIN CERTIFICATE-----` block in the PEM data".to_string());
        }
        Ok(certs)
    }
}

/// What came back: status, headers and the whole (capped) body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why a call did not produce a [`Reply`].
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The request could not be built (a bad URL); sending it again fails the same way.
    #[error("{0}")]
    Invalid(String),
    /// Connecting, TLS, or the exchange failed; trying later may work.
    #[error("{0}")]
    Failed(String),
    /// The server's certificate is not trusted (wrong CA, wrong name, expired): the same
    /// server fails the same way until someone changes the configuration.
    #[error("{0}")]
    Untrusted(String),
    #[error("no complete answer within {0:?}")]
    TimedOut(Duration),
    #[error("the response body is over {0} bytes")]
    TooLarge(usize),
}

/// A pooled HTTP/1.1 client for `http://` and `https://` URLs. Cloning is shallow.
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// Mozilla's roots and `extra`, with the ring provider and TLS 1.2 and 1.3.
fn tls_config(extra: &[RootCa]) -> rustls::ClientConfig {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for ca in extra {
        // A certificate rustls cannot use as a trust anchor is left out, as browsers do;
        // the connection then fails verification and says so.
        if let Err(e) = roots.add(ca.0.clone()) {
            tracing::warn!(error = %e, "an extra root certificate was not usable and is ignored");
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

impl HttpClient {
    /// A client trusting the public web PKI and `extra_roots`.
    pub fn new(extra_roots: &[RootCa]) -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(extra_roots))
            .https_or_http()
            .enable_http1()
            .build();
        let inner = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        HttpClient { inner }
    }

    /// Sends `request` and reads the answer, all within `deadline`; a body longer than
    /// `max_body` bytes is an error.
    pub async fn call(
        &self,
        request: Request<Full<Bytes>>,
        deadline: Duration,
        max_body: usize,
    ) -> Result<Reply, CallError> {
        let exchange =
            async {
                let response = self.inner.request(request).await.map_err(|e| {
                    match untrusted_certificate(&e) {
                        true => CallError::Untrusted(cause_chain(&e)),
                        false => CallError::Failed(cause_chain(&e)),
                    }
                })?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, max_body)
                    .collect()
                    .await
                    .map_err(|e| {
                        if e.is::<http_body_util::LengthLimitError>() {
                            CallError::TooLarge(max_body)
                        } else {
                            CallError::Failed(format!("reading the response body: {e}"))
                        }
                    })?
                    .to_bytes();
                Ok(Reply {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                })
            };
        tokio::time::timeout(deadline, exchange)
            .await
            .unwrap_or(Err(CallError::TimedOut(deadline)))
    }
}

/// Builds a request; a URL hyper cannot parse is [`CallError::Invalid`].
pub fn request(
    method: hyper::Method,
    url: &str,
    headers: &[(hyper::header::HeaderName, &str)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, CallError> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("http" | "https")) {
        return Err(CallError::Invalid(format!(
            "{url:?} is not an http:// or https:// URL"
        )));
    }
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(name, *value);
    }
    builder
        .body(Full::new(body))
        .map_err(|e| CallError::Invalid(format!("{url:?}: {e}")))
}

/// Whether rustls refused the server's certificate somewhere in `error`'s causes (hyper-rustls
/// wraps it in an `io::Error`, whose `source` skips the wrapped error, hence `get_ref`).
fn untrusted_certificate(error: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(rustls::Error::InvalidCertificate(_)) = error.downcast_ref::<rustls::Error>() {
        return true;
    }
    let wrapped = (error.downcast_ref::<std::io::Error>()).and_then(std::io::Error::get_ref);
    if wrapped.is_some_and(|inner| untrusted_certificate(inner)) {
        return true;
    }
    error.source().is_some_and(untrusted_certificate)
}
