//! Per-call handling: the handler API, and running one call on the worker
//! (its request body in, its reply out under the bridge's credit), from the
//! request frame to the last reply chunk.
//!
//! Each call runs in its own task; a `cancel` frame aborts it, and so does
//! the connection ending.

use std::{
    collections::HashMap,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use foldhash::fast::RandomState;
use futures_util::{future::OptionFuture, FutureExt};
use http::{header, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::{sync::oneshot, task::AbortHandle, time::Instant};
use tracing::warn;

use crate::{
    body::{Body, BodyError, BodySender},
    flow::Window,
    headers,
    protocol::{self, BodyHead, Compression, Control, DataHead, RequestHead, CHUNK_SIZE},
    transport::{OutFrame, Outbox},
};

use super::replied::Replied;

/// Facts about a call, found in the request's extensions.
#[derive(Debug, Clone)]
pub struct CallInfo {
    /// The caller-visible request id.
    pub request_id: String,
    /// The service the call was routed to.
    pub service: String,
}

/// A boxed future returned by a [`Handler`].
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// Serves calls. Implemented for every `Fn(Request<Body>) -> Future`. The
/// request body may still be arriving (read it with `Body::collect` or as a
/// stream); the response body may be complete or streamed.
pub trait Handler: Send + Sync + 'static {
    /// Answers one call.
    fn call(&self, req: Request<Body>) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request<Body>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    fn call(&self, req: Request<Body>) -> HandlerFuture {
        Box::pin(self(req))
    }
}

/// One call in flight on the worker side.
pub(super) struct CallEntry {
    /// Aborts the call's task (cancel, or the connection ending).
    pub(super) abort: AbortHandle,
    /// With flow control: response body bytes this call may still send.
    pub(super) window: Option<Arc<Window>>,
    /// Its reply is being streamed (cannot survive a dropped connection).
    pub(super) streaming: Arc<AtomicBool>,
}

pub(super) type Calls = Arc<Mutex<HashMap<u64, CallEntry, RandomState>>>;

/// Calls that said `accepted` and wait for the bridge's `start`, by id.
pub(super) type Starts = Arc<Mutex<HashMap<u64, oneshot::Sender<()>, RandomState>>>;

/// Request bodies still arriving, by call id. Shared with the call tasks:
/// a handler that answers before its body has ended drops the rest.
pub(super) type Partials = Arc<Mutex<HashMap<u64, BodySender, RandomState>>>;

pub(super) fn lock<T>(map: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stops a call: its handler task is aborted and a request body still
/// arriving ends with an error.
pub(super) fn abandon(calls: &Calls, partial: &Partials, id: u64, reason: &str) {
    let body = lock(partial).remove(&id);
    if let Some(tx) = body {
        tx.abort(BodyError::new(format!("call cancelled: {reason}")));
    }
    if let Some(entry) = lock(calls).remove(&id) {
        entry.abort.abort();
    }
}

/// A reply body of a known length up to this size is read whole before the
/// reply is sent, so it goes out as one frame rather than a head, a chunk
/// and an end (a proxied upstream's small answer, typically)...
const BUFFER_KNOWN_UP_TO: u64 = 64 << 10;

/// ...if it arrives within this time. A slower one is not held back: its
/// head and what has come go out, and the rest streams.
const WHOLE_WAIT: Duration = Duration::from_millis(10);

/// What each call task needs.
pub(super) struct CallCtx {
    pub(super) handler: Arc<dyn Handler>,
    pub(super) outbox: Outbox,
    pub(super) calls: Calls,
    pub(super) partial: Partials,
    pub(super) starts: Starts,
    /// Where replies written to the connection are recorded.
    pub(super) replied: Arc<Mutex<Replied>>,
    /// The per-call flow-control window, when the bridge grants one.
    pub(super) window: Option<usize>,
    /// How reply bodies are compressed.
    pub(super) codec: Compression,
    /// Whether calls wait for the bridge's `start` (the hello asked for it).
    pub(super) gate: bool,
}

impl CallCtx {
    /// Runs the handler for one call in its own task; `body` is complete or
    /// still arriving.
    pub(super) fn start(&self, head: RequestHead, body: Body) {
        let id = head.id;
        let gated = self.gate && head.gate;
        let (handler, outbox, calls, partial) = (
            self.handler.clone(),
            self.outbox.clone(),
            self.calls.clone(),
            self.partial.clone(),
        );
        let window = self.window.map(|w| Arc::new(Window::new(w)));
        let send_window = window.clone();
        let codec = self.codec;
        let replied = self.replied.clone();
        let streaming = Arc::new(AtomicBool::new(false));
        let streaming_flag = streaming.clone();
        // The handler runs only once the bridge has recorded `accepted` and
        // answered `start`: a call the bridge has no `accepted` for is one
        // it may send to another worker if this connection dies.
        // Without the gate the call is free to start at once.
        let start = gated.then(|| {
            let (go, start) = oneshot::channel();
            lock(&self.starts).insert(id, go);
            let accepted = Control::Accepted { id };
            outbox.control(OutFrame::text(protocol::encode_control(&accepted)));
            start
        });
        // The map lock is held across the spawn so the task's own removal
        // (which takes the same lock) cannot run before the insert.
        let mut map = lock(&self.calls);
        let task = tokio::spawn(async move {
            if let Some(Err(_)) = OptionFuture::from(start).await {
                // Abandoned before the bridge said start (a new session, or
                // the worker stopping): the call never runs here.
                lock(&calls).remove(&id);
                lock(&partial).remove(&id);
                return;
            }
            let resp = match build_request(head, body) {
                Ok(req) => match AssertUnwindSafe(handler.call(req)).catch_unwind().await {
                    Ok(resp) => resp,
                    Err(_) => {
                        warn!(id, "handler panicked");
                        plain(StatusCode::INTERNAL_SERVER_ERROR, "worker handler panicked")
                    }
                },
                Err(reason) => plain(StatusCode::BAD_REQUEST, &reason),
            };
            let sender = ReplySender {
                id,
                outbox: &outbox,
                window: send_window.as_deref(),
                codec,
                replied: &replied,
                streaming: &streaming_flag,
            };
            if let Err(reason) = sender.send(resp).await {
                warn!(id, %reason, "cannot send the handler's response");
                // Not best effort: this error is what ends the call on the bridge.
                let frame = Control::Error {
                    id: Some(id),
                    code: "bad_response".into(),
                    message: reason,
                };
                outbox.control(OutFrame::text(protocol::encode_control(&frame)));
            }
            // A cancel may abort the task until here: while a streamed
            // reply is being sent, it means "stop sending".
            lock(&calls).remove(&id);
            // The call is over: whatever of its request body has not
            // arrived is no longer wanted (the bridge stops sending it).
            lock(&partial).remove(&id);
        });
        map.insert(
            id,
            CallEntry {
                abort: task.abort_handle(),
                window,
                streaming,
            },
        );
    }
}

/// Sends one call's response.
struct ReplySender<'a> {
    id: u64,
    outbox: &'a Outbox,
    window: Option<&'a Window>,
    codec: Compression,
    /// Replies written to the connection, for a resume.
    replied: &'a Mutex<Replied>,
    /// Set once a streamed reply starts.
    streaming: &'a AtomicBool,
}

impl ReplySender<'_> {
    /// Takes `n` bytes of window, waiting for the bridge's credit.
    async fn reserve(&self, n: usize) -> Result<(), String> {
        let Some(window) = self.window else {
            return Ok(());
        };
        window
            .take(n)
            .await
            .map_err(|_| "connection closed".to_owned())
    }

    async fn chunk(&self, data: &[u8], end: bool) -> Result<(), String> {
        self.reserve(data.len()).await?;
        let head = DataHead::Body(BodyHead { id: self.id, end });
        let frame = protocol::encode_frame(&head, data, self.codec);
        self.outbox
            .bulk(OutFrame::Binary(frame))
            .await
            .map_err(|_| "connection closed".to_owned())
    }

    /// Sends a response: a small complete one in a single frame; anything
    /// else as a head (at once, so the caller sees the status and the first
    /// bytes without waiting for the rest) followed by chunks as the body
    /// produces them. `Err` means the reply could not be fully sent.
    async fn send(mut self, resp: Response<Body>) -> Result<(), String> {
        let (parts, mut body) = resp.into_parts();
        // A body that is already compressed (Content-Encoding) is sent as it is.
        if parts.headers.contains_key(header::CONTENT_ENCODING) {
            self.codec = Compression::None;
        }
        // Bytes already read from a body that then streams.
        let mut early = Bytes::new();
        let known_small = hyper::body::Body::size_hint(&body)
            .exact()
            .is_some_and(|n| n <= BUFFER_KNOWN_UP_TO);
        if known_small && body.as_full().is_none() {
            let (read, ended) = read_soon(&mut body).await?;
            if ended {
                body = Body::full(read);
            } else {
                early = read;
            }
        }
        let full = body.as_full().filter(|b| b.len() <= CHUNK_SIZE);
        let first = full.clone().unwrap_or_default();
        let frame = protocol::encode_response(
            (self.id, parts.status.as_u16()),
            &headers::to_wire_ref(&parts.headers),
            full.is_some(),
            &first,
            self.codec,
        )
        .map_err(|e| e.to_string())?;
        self.reserve(first.len()).await?;
        if full.is_some() {
            // A whole small reply overtakes queued chunks of other calls. The
            // call counts as running until the frame is written: if the
            // connection drops first, it goes out on the resumed one.
            let written = self
                .outbox
                .urgent_written(OutFrame::Binary(frame.clone()))
                .await
                .map_err(|_| "connection closed".to_owned())?;
            // Written, or lost with a broken connection: either way it is
            // kept, so a resume can send it again if it never arrived.
            let _ = written.await;
            lock(self.replied).push(self.id, frame);
            return Ok(());
        }
        self.streaming.store(true, Ordering::Relaxed);
        // A streamed head stays in order with its own chunks.
        self.outbox
            .bulk(OutFrame::Binary(frame))
            .await
            .map_err(|_| "connection closed".to_owned())?;
        for piece in early.chunks(CHUNK_SIZE) {
            self.chunk(piece, false).await?;
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the response body failed: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for piece in data.chunks(CHUNK_SIZE) {
                self.chunk(piece, false).await?;
            }
        }
        self.chunk(&[], true).await
    }
}

/// Reads a reply body for as long as it keeps coming within `WHOLE_WAIT`
/// (and `BUFFER_KNOWN_UP_TO`): the bytes read, and whether the body ended.
/// The clock is read only if the body is not already there.
async fn read_soon(body: &mut Body) -> Result<(Bytes, bool), String> {
    let mut read: Vec<Bytes> = Vec::new();
    let mut len = 0;
    let mut deadline = None;
    let ended = loop {
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None => {
                let until = *deadline.get_or_insert_with(|| Instant::now() + WHOLE_WAIT);
                match tokio::time::timeout_at(until, body.frame()).await {
                    Ok(next) => next,
                    Err(_) => break false,
                }
            }
        };
        let Some(frame) = next else {
            break true;
        };
        let frame = frame.map_err(|e| format!("the response body failed: {e}"))?;
        if let Ok(data) = frame.into_data() {
            len += data.len();
            read.push(data);
        }
        if len as u64 > BUFFER_KNOWN_UP_TO {
            // More than it said: streamed from here.
            break false;
        }
    };
    let read = match read.len() {
        0 => Bytes::new(),
        1 => read.swap_remove(0),
        _ => read.concat().into(),
    };
    Ok((read, ended))
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(Body::from(text.to_owned()));
    *resp.status_mut() = status;
    resp
}

/// Turns a request frame into an `http::Request`.
fn build_request(head: RequestHead, body: Body) -> Result<Request<Body>, String> {
    let headers = headers::from_wire(&head.headers, &head.latin1, body.as_full().is_none())?;
    let invalid = |e: &dyn std::fmt::Display| format!("invalid request frame: {e}");
    let method = http::Method::from_bytes(head.method.as_bytes()).map_err(|e| invalid(&e))?;
    // The path's own buffer becomes the URI's: no copy.
    let uri = Uri::try_from(head.path).map_err(|e| invalid(&e))?;
    // Set in place rather than through `Request::builder()`, whose every
    // step moves the whole request head.
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req.extensions_mut().insert(CallInfo {
        request_id: head.request_id,
        service: head.service,
    });
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, path: &str) -> RequestHead {
        RequestHead {
            id: 7,
            request_id: "r-1".into(),
            service: "orders".into(),
            method: method.into(),
            path: path.into(),
            headers: vec![("x-a".into(), "1".into())],
            latin1: vec![],
            end: true,
            gate: true,
        }
    }

    #[test]
    fn request_frames_become_requests_and_bad_ones_say_why() {
        let req = build_request(
            head("PATCH", "/a/b?c=1"),
            Body::full(Bytes::from_static(b"x")),
        )
        .expect("valid");
        assert_eq!(req.method(), http::Method::PATCH);
        assert_eq!(req.uri().path(), "/a/b");
        assert_eq!(req.uri().query(), Some("c=1"));
        assert_eq!(req.headers()["x-a"], "1");
        let info = req.extensions().get::<CallInfo>().expect("call info");
        assert_eq!(
            (info.request_id.as_str(), info.service.as_str()),
            ("r-1", "orders")
        );
        for (method, path) in [("GE T", "/"), ("GET", "/a b"), ("GET", "")] {
            let err = build_request(head(method, path), Body::empty()).expect_err(path);
            assert!(
                err.starts_with("invalid request frame: "),
                "{method} {path}: {err}"
            );
        }
    }
}
