//! The generator's writes, `POST /api/tasks/{id}/progress`, `POST /api/progress` and
//! `POST /api/progress/stream`, answered straight from hyper.
//!
//! They are most of a node's requests, and warp's filter tree cost them more than the push
//! itself: each request walked the chain of routes, building and moving a future for every
//! level. Here the same steps run in the same order as in [`super::routes`]: the origin
//! check, the push key, the body's type, size and deadline, the handler, then CORS on the
//! handler's answer (a refusal before the handler carries none, as a filter's rejection
//! does not). Anything but the plain form (another method, a query string, a header that
//! is not visible ASCII, an unreadable Content-Length) goes to the filter tree, which
//! serves it as before.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use warp::http::{HeaderMap, Method, Request, header};
use warp::hyper::body::Incoming;
use warp::reply::Response;

use super::body::{MAX_BATCH_BODY, MAX_BODY, check_type_and_length, read_limited};
use super::{AppState, push, respond, stream};
use crate::error::Error;
use crate::origin;
use crate::server::{BoxFuture, Connection, Shortcut, StreamDeadline};

/// The shortcut for the generator's two write routes.
pub struct GeneratorWrites {
    state: Arc<AppState>,
}

impl GeneratorWrites {
    pub fn new(state: AppState) -> Arc<Self> {
        Arc::new(GeneratorWrites {
            state: Arc::new(state),
        })
    }
}

/// Which of the three routes a request is for.
#[derive(Debug, PartialEq)]
enum Route {
    /// One push, with the raw id segment.
    Push(String),
    Batch,
    Stream,
}

/// A route taken, with what its answer needs.
enum Taken {
    Push(String),
    Batch,
    Stream(StreamDeadline),
}

impl Shortcut for GeneratorWrites {
    fn serve(
        &self,
        request: Request<Incoming>,
        connection: &Connection,
    ) -> Result<BoxFuture<Response>, Request<Incoming>> {
        let Some(route) = plain_route(&request) else {
            return Err(request);
        };
        let state = self.state.clone();
        let taken = match route {
            Route::Push(raw_id) => Taken::Push(raw_id),
            Route::Batch => Taken::Batch,
            Route::Stream => Taken::Stream(connection.stream_deadline()),
        };
        Ok(Box::pin(async move {
            let started = Instant::now();
            let path = request.uri().path().to_owned();
            let response = answer(state, taken, request).await;
            tracing::debug!(
                method = "POST",
                path,
                status = response.status().as_u16(),
                micros = started.elapsed().as_micros() as u64,
                "request"
            );
            response
        }))
    }
}

/// The route of a plain generator write; `None` sends the request to the filter tree.
fn plain_route<B>(request: &Request<B>) -> Option<Route> {
    if request.method() != Method::POST || request.uri().query().is_some() {
        return None;
    }
    let headers = request.headers();
    let readable = [
        header::ORIGIN,
        header::AUTHORIZATION,
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
    ]
    .iter()
    .all(|name| headers.get(name).is_none_or(|v| v.to_str().is_ok()));
    if !readable || content_length(headers).is_err() {
        return None;
    }
    let path = request.uri().path();
    if path == "/api/progress" {
        return Some(Route::Batch);
    }
    if path == "/api/progress/stream" {
        return Some(Route::Stream);
    }
    let id = path
        .strip_prefix("/api/tasks/")?
        .strip_suffix("/progress")?;
    (!id.is_empty() && !id.contains('/')).then(|| Route::Push(id.to_owned()))
}

/// The Content-Length, if any; `Err` when it is not a number (the filter tree answers it).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or(()),
    }
}

/// The answer to a plain generator write, as the filter tree gives it.
async fn answer(state: Arc<AppState>, taken: Taken, request: Request<Incoming>) -> Response {
    let (parts, body) = request.into_parts();
    let text = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let allowed = match state.origins.check(text(header::ORIGIN)) {
        Ok(allowed) => allowed,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = state.push_key.verify(text(header::AUTHORIZATION)) {
        return e.into_response();
    }
    // A stream reads its body line by line; the others read it whole first.
    let one = match taken {
        Taken::Stream(deadline) => {
            let content_type = text(header::CONTENT_TYPE);
            let response = stream::open(state, content_type, body, deadline).await;
            return origin::allow(response, allowed);
        }
        Taken::Push(raw_id) => Some(raw_id),
        Taken::Batch => None,
    };
    let (limit, setting) = match one {
        Some(_) => (state.bodies.max_body_bytes, MAX_BODY),
        None => (state.bodies.max_batch_body_bytes, MAX_BATCH_BODY),
    };
    let length = content_length(&parts.headers).unwrap_or(None);
    if let Err(e) = check_type_and_length(text(header::CONTENT_TYPE), length, limit, setting) {
        return e.into_response();
    }
    let within = state.bodies.body_timeout;
    let read = read_limited(body.into_data_stream(), limit, setting);
    let body = match tokio::time::timeout(within, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => return e.into_response(),
        Err(_) => return Error::RequestTimeout { within }.into_response(),
    };
    let answered = match one {
        Some(raw_id) => push::push(raw_id, state, body).await,
        None => push::push_batch(state, body).await,
    };
    origin::allow(respond(answered), allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str, headers: &[(&str, &[u8])]) -> Request<()> {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("a valid request")
    }

    #[test]
    fn plain_generator_writes_are_taken_and_the_rest_left_to_the_routes() {
        let id = "0b6f1c5e-3f0e-4d7a-9a57-3c1f6c2d9e10";
        let push = format!("/api/tasks/{id}/progress");
        let json: &[(&str, &[u8])] = &[
            ("content-type", b"application/json"),
            ("content-length", b"16"),
            ("origin", b"http://localhost:3000"),
            ("authorization", b"Bearer k"),
        ];
        assert_eq!(
            plain_route(&request("POST", &push, json)),
            Some(Route::Push(id.to_string()))
        );
        assert_eq!(
            plain_route(&request("POST", "/api/progress", &[])),
            Some(Route::Batch)
        );
        // Odd ids are the handler's to refuse, as the filter tree passes them on.
        assert_eq!(
            plain_route(&request("POST", "/api/tasks/x%20y/progress", &[])),
            Some(Route::Push("x%20y".to_string()))
        );
        for (method, uri) in [
            ("GET", push.as_str()),
            ("PUT", "/api/progress"),
            ("POST", &format!("{push}?via=routes")),
            ("POST", "/api/progress?x"),
            ("POST", &format!("{push}/")),
            ("POST", "/api/tasks//progress"),
            ("POST", "/api/tasks/a/b/progress"),
            ("POST", "/api/tasks"),
            ("POST", "//api/progress"),
        ] {
            assert_eq!(
                plain_route(&request(method, uri, &[])),
                None,
                "{method} {uri}"
            );
        }
        for header in ["origin", "authorization", "content-type", "content-length"] {
            let odd = request("POST", &push, &[(header, b"caf\xc3\xa9")]);
            assert_eq!(plain_route(&odd), None, "a non-ASCII {header}");
        }
        let unreadable_length = request("POST", &push, &[("content-length", b"ten")]);
        assert_eq!(plain_route(&unreadable_length), None);
    }
}
