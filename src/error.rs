//! Errors at the caller boundary and their one mapping to HTTP.
//!
//! Every failure a caller sees is a [`CallError`]: a status code plus a JSON
//! body `{"error":{"code","message","request_id"}}`. Internal detail (socket
//! errors, worker internals) goes to the log, not to the caller.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

/// Why a call failed, as the caller is told.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum CallError {
    /// No route matched and there is no `default_service`.
    #[error("no route matches path {path:?} and no default_service is configured")]
    NoRoute {
        /// The request path.
        path: String,
    },
    /// No worker of the service became free within `queue_timeout`.
    #[error(
        "no worker for service {service:?} became free within {waited:?} ({connected} connected)"
    )]
    NoWorker {
        /// The service.
        service: String,
        /// How long the call waited.
        waited: Duration,
        /// Workers of the service connected when it gave up.
        connected: usize,
    },
    /// The service's wait queue is full.
    #[error("the queue of service {service:?} is full ({limit} calls waiting)")]
    QueueFull {
        /// The service.
        service: String,
        /// The configured `queue_limit`.
        limit: usize,
    },
    /// The call exceeded its deadline; the worker was told to cancel.
    #[error("service {service:?} did not answer within {after:?}")]
    Timeout {
        /// The service.
        service: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The worker's connection ended before it replied.
    #[error("worker {worker:?} of service {service:?} disconnected before replying: {cause}")]
    WorkerLost {
        /// The service.
        service: String,
        /// The worker's self-declared id.
        worker: String,
        /// What ended the connection.
        cause: String,
    },
    /// The worker replied with something that is not a valid HTTP response.
    #[error("worker {worker:?} of service {service:?} sent an invalid reply: {reason}")]
    BadResponse {
        /// The service.
        service: String,
        /// The worker's self-declared id.
        worker: String,
        /// What was wrong.
        reason: String,
    },
    /// The request body is larger than `max_body`.
    #[error("request body exceeds the {limit}-byte limit")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request's headers would not fit in a frame header.
    #[error("request headers exceed the {limit}-byte limit")]
    HeadersTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request has more header lines than the bridge takes.
    #[error("more than {limit} request headers")]
    TooManyHeaders {
        /// The most header lines a request may have.
        limit: usize,
    },
    /// The caller's request could not be read.
    #[error("bad request: {reason}")]
    BadRequest {
        /// What was wrong.
        reason: String,
    },
    /// A method the bridge does not forward: `CONNECT` asks for a tunnel,
    /// which a request/reply frame cannot be.
    #[error(
        "method {method} is not supported: the bridge forwards requests, it does not open tunnels"
    )]
    MethodNotAllowed {
        /// The method.
        method: String,
    },
    /// The `Idempotency-Key` was first used by a request with another
    /// method, path or body.
    #[error("Idempotency-Key {key:?} was used for a request with another {differs}")]
    IdempotencyKeyMismatch {
        /// The key.
        key: String,
        /// What differs: "method or path", "body".
        differs: &'static str,
    },
    /// The `Idempotency-Key`'s first call ran, but its response could not be
    /// stored (streamed, or too large): it is not run again.
    #[error("the call with Idempotency-Key {key:?} already ran and its response cannot be replayed (it was streamed, too large to store, or sent before the request body ended)")]
    IdempotencyKeyNotReplayable {
        /// The key.
        key: String,
    },
    /// The call names a worker (`Wsbridge-Worker`) that no bridge has.
    #[error("no worker {worker:?} of service {service:?} is connected")]
    UnknownWorker {
        /// The service.
        service: String,
        /// The id the call asked for.
        worker: String,
    },
    /// No worker of the service is connected to this bridge, and the
    /// cluster, where other bridges' workers are, cannot be reached.
    #[error("no worker of service {service:?} is connected to this bridge, and the cluster is unreachable (NATS disconnected)")]
    ClusterUnavailable {
        /// The service.
        service: String,
    },
    /// A path under `/_wsbridge/` that the bridge does not serve: these
    /// paths are its own and never go to a worker.
    #[error("{path} is not a bridge endpoint: paths under /_wsbridge/ are reserved (GET /_wsbridge/workers lists the workers)")]
    Reserved {
        /// The path.
        path: String,
    },
    /// A bridge endpoint asked with a method it does not answer.
    #[error("{path} answers {allowed} only")]
    EndpointMethod {
        /// The endpoint.
        path: String,
        /// The methods it answers, as in `Allow`.
        allowed: &'static str,
    },
    /// No job has this id (never had, or it was purged after
    /// `jobs.retention`).
    #[error("no job {id:?} (unknown, or purged after jobs.retention)")]
    JobNotFound {
        /// The id asked for.
        id: String,
    },
    /// Storing the job would pass `jobs.max_bytes`; nothing was stored.
    #[error("the job store is full ({limit} bytes, jobs.max_bytes); nothing was stored")]
    JobsFull {
        /// The configured bound.
        limit: u64,
    },
    /// This bridge already holds `jobs.max_live` queued or running jobs.
    #[error("this bridge already holds {limit} queued or running jobs (jobs.max_live); nothing was stored")]
    JobsBusy {
        /// The configured bound.
        limit: usize,
    },
    /// The job store failed (disk, database); nothing was stored.
    #[error("the job store is unavailable: {reason}")]
    JobsUnavailable {
        /// What failed.
        reason: String,
    },
    /// `Wsbridge-Callback` names a URL outside `jobs.callback_allow`.
    #[error("Wsbridge-Callback {url:?} is not under any of jobs.callback_allow")]
    CallbackNotAllowed {
        /// The URL asked for.
        url: String,
    },
    /// The caller's address is not in `http.allow_from`.
    #[error("callers from {peer} are not allowed (http.allow_from)")]
    Forbidden {
        /// The caller's address.
        peer: std::net::IpAddr,
    },
}

impl CallError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            CallError::NoRoute { .. } => "no_route",
            CallError::Reserved { .. } => "not_found",
            CallError::JobNotFound { .. } => "job_not_found",
            CallError::JobsFull { .. } | CallError::JobsBusy { .. } => "jobs_full",
            CallError::JobsUnavailable { .. } => "jobs_unavailable",
            CallError::CallbackNotAllowed { .. } => "callback_not_allowed",
            CallError::EndpointMethod { .. } => "method_not_allowed",
            CallError::NoWorker { .. } => "no_worker",
            CallError::UnknownWorker { .. } => "unknown_worker",
            CallError::ClusterUnavailable { .. } => "cluster_unavailable",
            CallError::QueueFull { .. } => "queue_full",
            CallError::Timeout { .. } => "timeout",
            CallError::WorkerLost { .. } => "worker_lost",
            CallError::BadResponse { .. } => "bad_response",
            CallError::BodyTooLarge { .. } => "body_too_large",
            CallError::HeadersTooLarge { .. } | CallError::TooManyHeaders { .. } => {
                "headers_too_large"
            }
            CallError::BadRequest { .. } => "bad_request",
            CallError::Forbidden { .. } => "forbidden",
            CallError::MethodNotAllowed { .. } => "method_not_allowed",
            CallError::IdempotencyKeyMismatch { .. } => "idempotency_key_mismatch",
            CallError::IdempotencyKeyNotReplayable { .. } => "idempotency_key_not_replayable",
        }
    }

    /// The HTTP status the caller gets.
    pub fn status(&self) -> StatusCode {
        match self {
            CallError::NoRoute { .. }
            | CallError::UnknownWorker { .. }
            | CallError::Reserved { .. }
            | CallError::JobNotFound { .. } => StatusCode::NOT_FOUND,
            CallError::JobsFull { .. }
            | CallError::JobsBusy { .. }
            | CallError::JobsUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            CallError::CallbackNotAllowed { .. } => StatusCode::BAD_REQUEST,
            CallError::EndpointMethod { .. } => StatusCode::METHOD_NOT_ALLOWED,
            CallError::NoWorker { .. }
            | CallError::QueueFull { .. }
            | CallError::ClusterUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            CallError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            CallError::WorkerLost { .. } | CallError::BadResponse { .. } => StatusCode::BAD_GATEWAY,
            CallError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            CallError::HeadersTooLarge { .. } | CallError::TooManyHeaders { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            CallError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            CallError::Forbidden { .. } => StatusCode::FORBIDDEN,
            CallError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            CallError::IdempotencyKeyMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            CallError::IdempotencyKeyNotReplayable { .. } => StatusCode::CONFLICT,
        }
    }

    /// The JSON error body.
    pub fn body(&self, request_id: &str) -> Bytes {
        let value = json!({
            "error": {
                "code": self.code(),
                "message": self.to_string(),
                "request_id": request_id,
            }
        });
        Bytes::from(value.to_string())
    }

    /// The full HTTP response for this error.
    pub fn into_response(self, request_id: &str) -> Response<Bytes> {
        let mut resp = Response::new(self.body(request_id));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(
            self,
            CallError::QueueFull { .. }
                | CallError::NoWorker { .. }
                | CallError::ClusterUnavailable { .. }
                | CallError::JobsFull { .. }
                | CallError::JobsBusy { .. }
                | CallError::JobsUnavailable { .. }
        ) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let CallError::EndpointMethod { allowed, .. } = &self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allowed));
        }
        if matches!(self, CallError::MethodNotAllowed { .. }) {
            // RFC 9110 15.5.6: a 405 lists what is allowed. Every other
            // method is forwarded; these are the ones registered in RFC 9110
            // and 5789 (PATCH).
            headers.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_documented_json() {
        let err = CallError::Timeout {
            service: "orders".into(),
            after: Duration::from_secs(2),
        };
        let body: serde_json::Value = serde_json::from_slice(&err.body("r-1")).expect("json");
        assert_eq!(body["error"]["code"], "timeout");
        assert_eq!(body["error"]["request_id"], "r-1");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("orders")));
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
