//! The one error type, and the one place it becomes an HTTP status and a JSON body.
//!
//! Variants are grouped by how the caller should react: fix the request (4xx), fix the
//! deployment (422), retry later (503), or report a bug (500). Every body is
//! `{"error": code, "message": what was wrong, "hint": what to do}`.

use std::convert::Infallible;

use serde::Serialize;
use warp::http::{StatusCode, header};
use warp::reply::Response;

use crate::telemetry::{self, Refusal};

/// A boxed error source, kept for the log line of a 5xx and never shown to clients.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the part to fix.
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("missing or wrong push key")]
    Unauthorized,
    #[error("a subscribe token is required to watch a task")]
    TokenRequired,
    #[error("the subscribe token is not valid (wrong signature, malformed, or not HS256)")]
    TokenInvalid,
    #[error("the subscribe token has expired")]
    TokenExpired,
    /// Authenticated, but not allowed: a token for another task, or another user's task.
    /// Never says whether the task exists.
    #[error("{0}")]
    Forbidden(String),
    /// A browser page whose origin is not allowed (at most 80 characters of it are kept).
    #[error(
        "origin {origin:?} is not allowed; add it to TASKCAST_ALLOWED_ORIGINS (or set \
         NEXT_PUBLIC_APP_URL or TASKCAST_PUBLIC_URL to it)"
    )]
    OriginRefused { origin: String },
    /// Task ids and statuses are held as text: this module sits below `domain`.
    #[error("task {0} does not exist")]
    NotFound(String),
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("task {task} is already {status}; a finished task accepts no more pushes")]
    Conflict { task: String, status: &'static str },
    /// A cancel request for a task that is already finished.
    #[error("task {task} is already {status}; a finished task cannot be cancelled")]
    CancelFinished { task: String, status: &'static str },
    /// A per-connection bound was reached (subscriptions, subscribe rate).
    #[error("{0}")]
    RateLimited(String),
    /// `setting` is the variable that sets `limit` for this route, so the message names
    /// the one to raise.
    #[error("the body is larger than the limit of {limit} bytes ({setting})")]
    PayloadTooLarge { limit: usize, setting: &'static str },
    /// The body did not arrive whole within TASKCAST_BODY_TIMEOUT_SECS.
    #[error("the request body did not arrive within {} s", within.as_secs_f64())]
    RequestTimeout { within: std::time::Duration },
    #[error("the body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("a push stream's body is newline-delimited JSON (Content-Type: application/x-ndjson)")]
    StreamMediaType,
    #[error("this endpoint speaks WebSocket; send an Upgrade: websocket request")]
    UpgradeRequired,
    /// The task's `taskcast_version` is at the bigint maximum: no newer version exists.
    #[error("task {0} has reached the largest taskcast_version; it cannot change any more")]
    VersionExhausted(String),
    /// The status column cannot hold this status (an enum without a label for it).
    #[error("image_tasks.status is {column}, which has no value for {status}")]
    StatusNotStorable {
        status: &'static str,
        column: String,
    },
    /// The table's shape is one taskcast cannot serve (say, an id of type `numeric`).
    #[error("{0}")]
    TableUnsupported(String),
    /// The task's row has no usable id or version (see `domain::StoredRow`).
    #[error("task {task}'s row cannot be read: image_tasks.{column} is {held}")]
    UnreadableRow {
        task: String,
        column: &'static str,
        held: &'static str,
    },
    /// `public.image_tasks` (or some of its columns) does not exist.
    #[error("public.image_tasks is missing {}", missing.join(", "))]
    SchemaMissing { missing: Vec<String> },
    /// A dependency (the database, a bounded queue) cannot take the request right now.
    #[error("{what} is unavailable")]
    Unavailable {
        what: &'static str,
        #[source]
        source: Option<BoxError>,
    },
    /// A push was sent but its commit was not confirmed (the database stopped answering):
    /// it may or may not be applied. 503 like `Unavailable`; a retry with the same `seq`
    /// is harmless.
    #[error(
        "the database did not confirm the commit in time; the push may or may not have been applied"
    )]
    CommitUnknown {
        #[source]
        source: Option<BoxError>,
    },
    #[error("internal error while {context}")]
    Internal {
        context: &'static str,
        #[source]
        source: BoxError,
    },
}

impl warp::reject::Reject for Error {}

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Every JSON form of an error: the code, the public message and the hint, with the
/// fields of the form around them. `None` fields are left out, and the order of the fields
/// is each form's.
#[derive(Serialize, Default)]
struct Wire<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_id: Option<&'a str>,
    /// The client message a WebSocket error answers, when it is not about the
    /// subscription (`"cancel"`): a refused cancel must not end the task's subscription.
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    /// The code, as HTTP bodies and batch items name it.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    /// The code, as WebSocket messages name it.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    message: String,
    hint: &'static str,
}

impl Error {
    /// The same failure for one of several pushes it stopped: its kind and message; the
    /// cause is logged once by whoever logs the original.
    pub fn for_each_push(&self) -> Error {
        match self {
            Error::SchemaMissing { missing } => Error::SchemaMissing {
                missing: missing.clone(),
            },
            Error::Unavailable { what, .. } => Error::Unavailable { what, source: None },
            Error::TableUnsupported(message) => Error::TableUnsupported(message.clone()),
            Error::CommitUnknown { .. } => Error::CommitUnknown { source: None },
            other => Error::internal("committing a batch", other.to_string()),
        }
    }

    pub fn invalid(field: &'static str, message: String) -> Self {
        Error::Invalid { field, message }
    }

    pub fn unavailable(what: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            what,
            source: Some(source.into()),
        }
    }

    pub fn internal(context: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Internal {
            context,
            source: source.into(),
        }
    }

    /// The stable machine-readable code, used in HTTP bodies and WebSocket error messages.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid { .. } => "invalid_input",
            Error::Unauthorized => "unauthorized",
            Error::TokenRequired => "token_required",
            Error::TokenInvalid => "token_invalid",
            Error::TokenExpired => "token_expired",
            Error::Forbidden(_) | Error::OriginRefused { .. } => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::RouteNotFound => "route_not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::Conflict { .. } | Error::CancelFinished { .. } => "task_finished",
            Error::RateLimited(_) => "limit_exceeded",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::RequestTimeout { .. } => "request_timeout",
            Error::UnsupportedMediaType | Error::StreamMediaType => "unsupported_media_type",
            Error::UpgradeRequired => "upgrade_required",
            Error::SchemaMissing { .. } => "schema_missing",
            Error::VersionExhausted(_) => "version_exhausted",
            Error::StatusNotStorable { .. } => "status_not_storable",
            Error::TableUnsupported(_) => "schema_unsupported",
            Error::UnreadableRow { .. } => "unreadable_row",
            Error::Unavailable { .. } | Error::CommitUnknown { .. } => "unavailable",
            Error::Internal { .. } => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Invalid { .. } => StatusCode::BAD_REQUEST,
            Error::Unauthorized
            | Error::TokenRequired
            | Error::TokenInvalid
            | Error::TokenExpired => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) | Error::OriginRefused { .. } => StatusCode::FORBIDDEN,
            Error::NotFound(_) | Error::RouteNotFound => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::Conflict { .. } | Error::CancelFinished { .. } => StatusCode::CONFLICT,
            Error::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Error::UnsupportedMediaType | Error::StreamMediaType => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Error::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Error::SchemaMissing { .. }
            | Error::StatusNotStorable { .. }
            | Error::TableUnsupported(_)
            | Error::UnreadableRow { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::VersionExhausted(_) => StatusCode::CONFLICT,
            Error::Unavailable { .. } | Error::CommitUnknown { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            Error::Invalid { field: "body", .. } => {
                "send a JSON object with the fields README.md lists for this route, with \
                 Content-Type: application/json"
            }
            Error::Invalid { .. } => "fix the named field and send the request again",
            Error::Unauthorized => {
                "send Authorization: Bearer <key>, and check that TASK_PROCESS_SECRET_KEY is \
                 identical in the generator and in taskcast (no extra spaces or newlines); \
                 restart a service after changing its environment"
            }
            Error::TokenRequired | Error::TokenInvalid => {
                "pass the token from POST /api/tasks (or `taskcast token`) as ?token= on the \
                 /ws URL, as \"token\" in the subscribe message, or as Authorization: Bearer"
            }
            Error::TokenExpired => {
                "get a fresh token from the app and subscribe again: \
                 {\"type\":\"subscribe\",\"task_id\":...,\"token\":...}"
            }
            Error::Forbidden(_) => "use a token issued for this task",
            Error::OriginRefused { .. } => {
                "connect from an allowed origin (NEXT_PUBLIC_APP_URL, TASKCAST_PUBLIC_URL, \
                 TASKCAST_ALLOWED_ORIGINS)"
            }
            Error::NotFound(_) => {
                "create the task first (POST /api/tasks or an INSERT into public.image_tasks)"
            }
            Error::RouteNotFound => "see README.md for the API routes",
            Error::MethodNotAllowed => "see README.md for the methods each route accepts",
            Error::Conflict { .. } => {
                "completed, failed and cancelled are final; create a new task to generate again"
            }
            Error::CancelFinished { .. } => {
                "nothing to cancel: the task already ended; its state says how"
            }
            Error::RateLimited(_) => "stay within the limit named in the message",
            Error::PayloadTooLarge { .. } => {
                "send a smaller body, or raise the setting the message names"
            }
            Error::RequestTimeout { .. } => {
                "send the whole body promptly, or raise TASKCAST_BODY_TIMEOUT_SECS"
            }
            Error::UnsupportedMediaType => "set Content-Type: application/json",
            Error::StreamMediaType => {
                "set Content-Type: application/x-ndjson, one JSON object per line"
            }
            Error::UpgradeRequired => "connect with a WebSocket client, e.g. new WebSocket(url)",
            Error::SchemaMissing { .. } => {
                "run `taskcast migrate` (or apply schema.sql in the Supabase SQL editor); \
                 taskcast picks the change up without a restart"
            }
            Error::VersionExhausted(_) => {
                "create a new task; resetting taskcast_version in SQL would hide later changes \
                 from subscribers that are connected"
            }
            Error::StatusNotStorable { .. } => {
                "add the value to the enum (ALTER TYPE ... ADD VALUE '...'), or map one of its \
                 labels to this status with TASKCAST_STATUS_MAP; `taskcast doctor` shows the map"
            }
            Error::TableUnsupported(_) => {
                "run `taskcast doctor`: it shows the table's columns and the SQL that fixes them"
            }
            Error::UnreadableRow { .. } => {
                "fix the named column of this row in SQL; every other task is unaffected"
            }
            Error::Unavailable { .. } => "retry after the Retry-After delay",
            Error::CommitUnknown { .. } => {
                "retry after the Retry-After delay with the same seq: if the push was applied, \
                 the retry is answered 200 with \"applied\": false"
            }
            Error::Internal { .. } => "retry later; if it persists, report it with the server log",
        }
    }

    /// The client-facing message: specific for 4xx, opaque for 5xx (no SQL, no causes).
    fn public_message(&self) -> String {
        match self {
            Error::SchemaMissing { missing } => format!(
                "public.image_tasks is missing {}; run `taskcast migrate`",
                missing.join(", ")
            ),
            Error::Internal { .. } => "internal error".to_string(),
            other => other.to_string(),
        }
    }

    /// The whole cause chain on one line, for logs.
    pub fn chain(&self) -> String {
        cause_chain(self)
    }

    /// Encodes one form: `form` sets the fields around code, message and hint.
    fn encode<'a>(&self, form: impl FnOnce(&mut Wire<'a>, &'static str)) -> String {
        let mut wire = Wire {
            message: self.public_message(),
            hint: self.hint(),
            ..Wire::default()
        };
        form(&mut wire, self.code());
        serde_json::to_string(&wire).expect("a struct of strings always serializes")
    }

    /// The HTTP body: `{"error":..,"message":..,"hint":..}`.
    fn body(&self) -> String {
        self.encode(|wire, code| wire.error = Some(code))
    }

    /// One failed item of a batch: `{"status":N,"error":..,"message":..,"hint":..}`.
    pub fn to_item_json(&self) -> String {
        self.log();
        self.encode(|wire, code| {
            wire.status = Some(self.status().as_u16());
            wire.error = Some(code);
        })
    }

    /// The WebSocket form: `{"type":"error","code":...,"message":...,"hint":...}`.
    pub fn to_ws_json(&self, task_id: Option<&str>) -> String {
        self.log();
        self.encode(|wire, code| {
            wire.kind = Some("error");
            wire.task_id = task_id;
            wire.code = Some(code);
        })
    }

    /// [`Error::to_ws_json`] for the answer to a client `request` (`"cancel"`), which
    /// says so in `request`.
    pub fn to_ws_reply_json(&self, task_id: &str, request: &'static str) -> String {
        self.log();
        self.encode(|wire, code| {
            wire.kind = Some("error");
            wire.task_id = Some(task_id);
            wire.request = Some(request);
            wire.code = Some(code);
        })
    }

    /// 5xx at error with the cause chain; a refused push key or origin at warn (throttled,
    /// see [`telemetry::admit_refusal`]) with what to change, never the credential; other
    /// 4xx at debug.
    fn log(&self) {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code(), error = %self.chain(), "request failed");
            return;
        }
        match self {
            Error::Unauthorized => {
                if let Some(held_back) = telemetry::admit_refusal(Refusal::PushKey) {
                    tracing::warn!(
                        status = 401,
                        similar_refusals_not_logged = held_back,
                        "push refused: missing or wrong push key. The generator must send \
                         Authorization: Bearer <key> with the same TASK_PROCESS_SECRET_KEY as \
                         taskcast (no extra spaces or newlines); restart a service after \
                         changing its environment"
                    );
                }
            }
            Error::OriginRefused { origin } => {
                if let Some(held_back) = telemetry::admit_refusal(Refusal::Origin) {
                    tracing::warn!(
                        status = 403,
                        similar_refusals_not_logged = held_back,
                        "origin {origin:?} refused: add it to TASKCAST_ALLOWED_ORIGINS \
                         (or set NEXT_PUBLIC_APP_URL or TASKCAST_PUBLIC_URL to it)"
                    );
                }
            }
            _ => tracing::debug!(code = self.code(), error = %self, "request refused"),
        }
    }

    /// The single mapping from an error to an HTTP response.
    pub fn into_response(self) -> Response {
        self.log();
        let status = self.status();
        let mut response = json_response(status, self.body());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
        }
        // These are answered before the body is read; the connection cannot be reused,
        // so say so instead of letting the client's next request hit a closed socket.
        if matches!(
            self,
            Error::PayloadTooLarge { .. }
                | Error::RequestTimeout { .. }
                | Error::UnsupportedMediaType
                | Error::StreamMediaType
                | Error::Unauthorized
        ) {
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        response
    }

    /// Turns warp's own rejections into our error, so they get the same body shape.
    fn from_rejection(rejection: warp::Rejection) -> Self {
        if let Some(err) = rejection.find::<Error>() {
            return clone_rejected(err);
        }
        if rejection.is_not_found() {
            Error::RouteNotFound
        } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
            Error::MethodNotAllowed
        } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
            Error::invalid(
                "query",
                "the query string is malformed; expected e.g. ?task_id=<uuid>".to_string(),
            )
        } else if let Some(h) = rejection.find::<warp::reject::InvalidHeader>() {
            Error::invalid("header", format!("header {} is malformed", h.name()))
        } else {
            Error::internal("routing", format!("unhandled rejection: {rejection:?}"))
        }
    }
}

/// Errors raised inside filters travel as rejections by reference; only plain 4xx variants
/// are raised there, so a lossless copy is possible.
fn clone_rejected(err: &Error) -> Error {
    match err {
        Error::Invalid { field, message } => Error::invalid(field, message.clone()),
        Error::Unauthorized => Error::Unauthorized,
        Error::Forbidden(message) => Error::Forbidden(message.clone()),
        Error::OriginRefused { origin } => Error::OriginRefused {
            origin: origin.clone(),
        },
        Error::PayloadTooLarge { limit, setting } => Error::PayloadTooLarge {
            limit: *limit,
            setting,
        },
        Error::RequestTimeout { within } => Error::RequestTimeout { within: *within },
        Error::UnsupportedMediaType => Error::UnsupportedMediaType,
        Error::UpgradeRequired => Error::UpgradeRequired,
        other => Error::internal("routing", other.chain()),
    }
}

/// A bad task id is a 400 naming the `task_id` field.
impl From<taskcast_wire::InvalidId> for Error {
    fn from(e: taskcast_wire::InvalidId) -> Self {
        Error::invalid("task_id", e.0)
    }
}

/// The one walker of a cause chain (`error: cause: cause`), shared with the HTTP client.
pub use taskcast_wire::cause_chain;

/// warp's `recover` hook: every rejection goes through [`Error::into_response`].
pub async fn recover(rejection: warp::Rejection) -> Result<Response, Infallible> {
    Ok(Error::from_rejection(rejection).into_response())
}

/// A response with a JSON body that is already encoded.
pub fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
