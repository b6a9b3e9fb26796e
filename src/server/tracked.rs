//! The two hooks that tell a connection's [`Track`] where it is: the socket (bytes
//! arrived) and the service (a request started, a response is ready).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use warp::http::{HeaderValue, Request, StatusCode, header};
use warp::hyper::body::Incoming;
use warp::hyper::service::Service;
use warp::reply::Response;

use super::slots::Track;
use crate::error::Error;

/// A socket that reports reads to its track. It stays under a WebSocket after the
/// upgrade; its first read there lets go of the track, so an idle WebSocket does not
/// keep one alive (about 100 bytes each).
pub struct TrackedIo {
    stream: TcpStream,
    /// `None` once the connection is detached.
    track: Option<Arc<Track>>,
}

impl TrackedIo {
    pub fn new(stream: TcpStream, track: Arc<Track>) -> Self {
        TrackedIo {
            stream,
            track: Some(track),
        }
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before;
        match &self.track {
            Some(track) if track.is_detached() => self.track = None,
            Some(track) if read => track.on_read(),
            _ => {}
        }
        polled
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The routes, reporting each request's start and its response to the track. Requests
/// the shortcut takes skip the routes.
pub struct TrackedService<S> {
    inner: S,
    shortcut: Option<Arc<dyn Shortcut>>,
    connection: Connection,
}

impl<S> TrackedService<S> {
    pub fn new(inner: S, shortcut: Option<Arc<dyn Shortcut>>, track: Arc<Track>) -> Self {
        TrackedService {
            inner,
            shortcut,
            connection: Connection { track },
        }
    }
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Requests answered without the filter tree: the hot ones, in their plain form. Its
/// answers are plain responses, or a push stream (see [`StreamDeadline::start`]); never
/// upgrades.
pub trait Shortcut: Send + Sync + 'static {
    /// The answer when this request is one the shortcut serves; else the request back,
    /// untouched, for the routes (moved back as it is: boxing it would cost every request
    /// an allocation).
    #[allow(clippy::result_large_err)]
    fn serve(
        &self,
        request: Request<Incoming>,
        connection: &Connection,
    ) -> Result<BoxFuture<Response>, Request<Incoming>>;
}

/// The connection a shortcut's request came on.
pub struct Connection {
    track: Arc<Track>,
}

/// A streaming answer's hold on its connection's deadline (see [`StreamDeadline::start`]).
pub struct StreamDeadline {
    track: Arc<Track>,
}

impl Connection {
    /// A handle on this connection's deadline, for an answer that may stream.
    pub fn stream_deadline(&self) -> StreamDeadline {
        StreamDeadline {
            track: self.track.clone(),
        }
    }
}

impl StreamDeadline {
    /// The answer streams while the request body is still read: the connection stays in
    /// flight (never evicted, no keep-alive deadline) and is closed once no byte arrived
    /// and [`StreamDeadline::moved`] was not called for twice the keep-alive timeout. The
    /// answer must say `Connection: close`: the stream is the connection's last request.
    pub fn start(&self) {
        self.track.stream_started();
    }

    /// The answer sent more of itself.
    pub fn moved(&self) {
        self.track.stream_moved();
    }
}

impl<S> Service<Request<Incoming>> for TrackedService<S>
where
    S: Service<Request<Incoming>, Response = Response>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response, S::Error>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        if !self.connection.track.request_started() {
            // Evicted between parsing the header and here: the socket is closing.
            let refused = Error::Unavailable {
                what: "an HTTP connection slot (TASKCAST_MAX_HTTP_CONNECTIONS reached)",
                source: None,
            };
            return Box::pin(std::future::ready(Ok(refused.into_response())));
        }
        let track = self.connection.track.clone();
        let request = match &self.shortcut {
            Some(shortcut) => match shortcut.serve(request, &self.connection) {
                Ok(answer) => {
                    return Box::pin(async move {
                        let response = answer.await;
                        // A push stream stays in its phase: this only moves its deadline.
                        track.response_ready();
                        Ok(response)
                    });
                }
                Err(request) => request,
            },
            None => request,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if is_stream(&response) {
                if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                    // An SSE connection serves one stream: when it ends, the connection
                    // closes rather than idling outside the cap.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                track.detach();
            } else {
                track.response_ready();
            }
            Ok(response)
        })
    }
}

/// A WebSocket upgrade or an SSE stream: long-lived, counted in TASKCAST_MAX_CONNECTIONS.
fn is_stream(response: &Response) -> bool {
    response.status() == StatusCode::SWITCHING_PROTOCOLS
        || response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::super::slots::Slots;
    use super::*;

    #[tokio::test]
    async fn a_detached_connection_lets_go_of_its_track_on_its_next_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let slots = Slots::new(4, Duration::from_secs(10), Duration::from_secs(60));
        let lease = slots.admit().expect("a free slot");
        let track = lease.track();
        let mut io = TrackedIo::new(server, track.clone());
        let mut byte = [0u8; 1];
        client.write_all(b"a").await.unwrap();
        io.read_exact(&mut byte).await.unwrap();
        assert!(
            io.track.is_some(),
            "a plain HTTP connection keeps its track"
        );
        // The upgrade: the request started, its response detaches the connection, and
        // hyper's side (the lease) ends.
        assert!(track.request_started());
        track.detach();
        drop(lease);
        client.write_all(b"b").await.unwrap();
        io.read_exact(&mut byte).await.unwrap();
        assert!(io.track.is_none());
        assert_eq!(Arc::strong_count(&track), 1, "only the test holds it");
    }
}
