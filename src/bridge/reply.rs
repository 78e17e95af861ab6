//! What a caller's response carries: the reply body ([`CallBody`]), which
//! keeps a streamed call alive while the caller reads it ([`Held`]: the
//! upload and the call's attempt at its worker), and its accounting
//! ([`Trace`] and the access line and metrics written when it drops).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tracing::info;

use super::{caller::OpenCall, dispatch::Placed, session::Session, stall::StallWatch, Shared};
use crate::{
    body::{Body, BodyError},
    metrics::Active,
};

/// What the caller receives: the reply's body, holding the call's guard
/// and worker lease while a streamed body is still flowing.
pub(crate) struct CallBody {
    pub(super) body: Body,
    pub(super) _call: Option<Held>,
    /// Written as the access line when the body is done with.
    pub(super) log: Option<Box<AccessLog>>,
}

/// Who served a call, filled in as it proceeds, for its access line and
/// the metrics.
#[derive(Default)]
pub(crate) struct Trace {
    /// Workers the call was sent to.
    pub(super) attempts: u32,
    /// Shared with the route table: no copy per call.
    pub(super) service: Option<Arc<str>>,
    /// Counts the call as in flight for its service until it is logged.
    pub(super) active: Option<Active>,
    /// The worker connection of the last attempt.
    pub(super) session: Option<Arc<Session>>,
    /// The request body's size, when it was read whole.
    pub(super) bytes_in: Option<u64>,
    /// Body bytes a streamed upload has sent so far.
    pub(super) uploaded: Arc<AtomicU64>,
    /// The other bridge of the cluster the call ran on.
    pub(super) node: Option<Arc<str>>,
    /// The other bridge of the cluster the call came from.
    pub(super) from: Option<Arc<str>>,
}

impl Trace {
    /// The call was routed to `service`.
    pub(super) fn route(&mut self, shared: &Shared, service: &Arc<str>) {
        self.service = Some(service.clone());
        self.active = Some(shared.metrics.begin(service));
    }
}

/// One call's access line, logged (target `wsbridge::access`, level info)
/// when its response body has been sent or abandoned.
pub(super) struct AccessLog {
    /// Where the call is counted.
    pub(super) shared: Arc<Shared>,
    pub(super) request_id: String,
    pub(super) method: http::Method,
    pub(super) path: String,
    pub(super) trace: Trace,
    pub(super) status: u16,
    /// The error code, for failures the bridge produced.
    pub(super) error: Option<&'static str>,
    pub(super) bytes_out: u64,
    pub(super) started: Instant,
    /// The response body was sent to its end.
    pub(super) complete: bool,
    /// Keeps an HTTP/2 connection from being idle until the response ends.
    pub(super) _open: Option<OpenCall>,
}

impl AccessLog {
    /// The access line of a call that starts now; as it stands it logs a
    /// caller that hung up (499), until the call's outcome is filled in.
    pub(super) fn begin(
        shared: Arc<Shared>,
        request_id: String,
        method: http::Method,
        path: String,
        started: Instant,
        open: Option<OpenCall>,
    ) -> Box<AccessLog> {
        Box::new(AccessLog {
            shared,
            request_id,
            method,
            path,
            trace: Trace::default(),
            status: 499,
            error: Some("client_gone"),
            bytes_out: 0,
            started,
            complete: false,
            _open: open,
        })
    }
}

impl Drop for CallBody {
    fn drop(&mut self) {
        if let Some(log) = self.log.as_mut() {
            log.complete = self.body.is_end_stream();
        }
        // The access line and the metrics are written as `log` drops.
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let log = self;
        let complete = log.complete;
        // One clock read for both the duration and the metrics' window.
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(log.started);
        // Bytes actually read, never a Content-Length the caller claimed.
        let bytes_in = log
            .trace
            .bytes_in
            .unwrap_or_else(|| log.trace.uploaded.load(Ordering::Relaxed));
        let status = log.status;
        let metrics = &log.shared.metrics;
        // A caller that hung up (499) cut its own call short; only a body
        // that ended short otherwise is a failure.
        let truncated = !complete && status != 499;
        let finished = crate::metrics::Finished {
            status,
            truncated,
            elapsed,
            bytes_in,
            bytes_out: log.bytes_out,
        };
        match &log.trace.active {
            Some(active) => metrics.record(active.stats(), &finished, now.into_std()),
            None => metrics.record(&metrics.service("-"), &finished, now.into_std()),
        }
        if let Some(session) = &log.trace.session {
            session.stats.finished(status >= 500 || truncated);
        }
        if log.trace.node.is_some() {
            if let Some(cluster) = log.shared.cluster.get() {
                cluster.finished_out(elapsed);
            }
        }
        // The request id and the path are the caller's: recorded as strings
        // they are quoted and escaped in the text format (and are JSON
        // strings in the JSON one), so `a"b=c` cannot pass for more fields.
        info!(
            target: "wsbridge::access",
            request_id = log.request_id.as_str(),
            method = %log.method,
            path = log.path.as_str(),
            service = log.trace.service.as_deref().unwrap_or("-"),
            worker = log.trace.session.as_ref().map_or("-", |s| s.worker_id.as_str()),
            node = log.trace.node.as_deref().unwrap_or("-"),
            from = log.trace.from.as_deref().unwrap_or("-"),
            status = log.status,
            error = log.error.unwrap_or("-"),
            attempts = log.trace.attempts,
            bytes_in,
            bytes_out = log.bytes_out,
            // Whole microseconds over 1000: at most three decimals
            // (`0.264`, not `0.26431099999999996`), and still a number.
            duration_ms = elapsed.as_micros() as f64 / 1e3,
            complete,
            "access"
        );
    }
}

/// What a streamed reply holds on to.
pub(super) struct Held {
    /// The call; taken (ended) early by the stall watch.
    pub(super) call: Arc<Mutex<Option<HeldCall>>>,
    /// A streamed reply that goes quiet for the route's `request_timeout`
    /// is cut off (and the worker told `timeout`), like a proxy read timeout.
    pub(super) idle_limit: Duration,
    pub(super) idle: Pin<Box<tokio::time::Sleep>>,
    /// HTTP/2 callers only: see [`StallWatch`].
    pub(super) stall: Option<StallWatch>,
}

/// A streamed reply's call, dropped in field order: the upload stops, then
/// the call is removed (and cancelled if unfinished), then the worker's slot
/// is freed.
pub(super) struct HeldCall {
    pub(super) _upload: Option<AbortOnDropHandle<()>>,
    /// The call at its worker: cancelled (if unfinished) and its slot
    /// freed when dropped.
    pub(super) attempt: Placed,
    /// HTTP/2: counts the call as open on its connection (moved here from
    /// the access log once the reply is streamed).
    pub(super) _open: Option<OpenCall>,
}

pub(super) fn lock(call: &Mutex<Option<HeldCall>>) -> MutexGuard<'_, Option<HeldCall>> {
    // Nothing is left half-done under this lock: a poisoned one is usable.
    call.lock().unwrap_or_else(|p| p.into_inner())
}

impl HttpBody for CallBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(log)) = (&polled, this.log.as_mut()) {
            log.bytes_out += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        let Some(held) = this._call.as_mut() else {
            return polled;
        };
        if let Some(stall) = &held.stall {
            stall.polled(polled.is_pending());
        }
        match polled {
            Poll::Pending => {
                if held.idle.as_mut().poll(cx).is_ready() {
                    if let Some(call) = lock(&held.call).as_mut() {
                        call.attempt.set_reason("timeout");
                    }
                    let limit = held.idle_limit;
                    return Poll::Ready(Some(Err(BodyError::new(format!(
                        "the worker sent nothing for {limit:?}"
                    )))));
                }
                Poll::Pending
            }
            ready => {
                let deadline = tokio::time::Instant::now() + held.idle_limit;
                held.idle.as_mut().reset(deadline);
                ready
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response the bridge itself writes: `body` as `content_type`, never
/// cached.
pub(super) fn json_response(
    status: http::StatusCode,
    content_type: &'static str,
    body: Body,
) -> http::Response<CallBody> {
    let mut resp = http::Response::new(CallBody {
        body,
        _call: None,
        log: None,
    });
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}
