//! One caller request, from its head to its response: the request id, the
//! refusals (`allow_from`, conformance), then `call()`, which turns the
//! request into a call frame, sends it to a worker and waits (event-driven)
//! for the reply with the same id. The listener that feeds it requests is
//! `listener.rs`; a call with an `Idempotency-Key` goes through `keyed.rs`.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{header, request::Parts, HeaderName, HeaderValue, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body as HttpBody, Incoming};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::{
    conformance,
    keyed::{keyed, read_error, RequestBody},
    listener::{Caller, OpenCall},
    registry::AcquireError,
    reply::{lock, AccessLog, CallBody, Held, HeldCall, Trace},
    session::{EmptyReplyLength, Failure, Started},
    stall::StallWatch,
    upload::{reply_or_upload_failure, Settled, Upload, UploadError},
    Settings, Shared,
};
use crate::{
    body::{Body, BodyError},
    error::CallError,
    headers::{self, WireText},
    protocol::{self, json, json::RequestFields, Compression},
};

/// The header carrying the request id both ways.
pub(crate) static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// On every response: how many workers the call was sent to (0 when none
/// was, as for a refusal before dispatch or a replay; more than 1 when a
/// worker vanished and the call was retried).
pub(crate) static ATTEMPTS: HeaderName = HeaderName::from_static("x-bridge-attempts");

/// A caller's promise that repeating the request is safe.
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Methods that RFC 9110 defines as idempotent: sending one twice has the
/// effect of sending it once, so a call may go to a second worker.
fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

/// Longest caller-supplied request id we adopt; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// Answers one request; never fails at the hyper level.
pub(super) async fn handle(
    shared: Arc<Shared>,
    caller: Arc<Caller>,
    head: Box<Parts>,
    body: Incoming,
) -> Result<Response<CallBody>, Infallible> {
    let started = Instant::now();
    // The call keeps the settings it started with, whatever a reload does.
    let settings = shared.settings.load_full();
    // Made first, so that a call hyper drops before answering (the caller
    // hung up) is still logged and counted: as 499, like nginx.
    let mut log = Box::new(AccessLog {
        shared: shared.clone(),
        request_id: request_id(&head.headers),
        method: head.method.clone(),
        path: head.uri.path().to_owned(),
        trace: Trace::default(),
        status: 499,
        error: Some("client_gone"),
        bytes_out: 0,
        started,
        complete: false,
        _open: OpenCall::begin(&caller),
    });
    let AccessLog {
        request_id,
        method,
        path,
        trace,
        ..
    } = &mut *log;
    let ip = caller.addr.ip().to_canonical();
    let allowed = settings
        .config
        .http
        .allow_from
        .iter()
        .any(|n| n.contains(&ip));
    let ctx = Ctx {
        shared: &shared,
        settings: &settings,
        caller: &caller,
        request_id,
        started,
    };
    // Refusals come before anything else, stored responses included.
    let refused = match allowed {
        false => Err(CallError::Forbidden { peer: ip }),
        true => conformance::check(&head),
    };
    let is_head = head.method == http::Method::HEAD;
    // Boxed: hyper keeps room for this future in every connection, idle or
    // not, and moves it in per request; these two would be most of its size.
    // Boxed in a statement of its own: a temporary of the statement that
    // awaits keeps its room in this future even once moved into the box.
    let exchange: Pin<Box<dyn Future<Output = _> + Send + '_>> =
        match (refused, token_header(&head.headers, &IDEMPOTENCY_KEY)) {
            (Err(err), _) => Box::pin(std::future::ready(Err(err))),
            (Ok(()), Some(key)) => Box::pin(keyed(&ctx, head, body, trace, key)),
            (Ok(()), None) => Box::pin(call(&ctx, head, RequestBody::plain(body), trace)),
        };
    let outcome = exchange.await;
    let mut error = None;
    let mut resp = match outcome {
        Ok(mut resp) => {
            if is_head {
                head_length(&mut resp);
                // A HEAD reply has no body, whatever the worker streams (an
                // empty one, against a length it declares for the GET):
                // the call ends here, as hyper's HTTP/1 server would drop
                // the body unread, and no HTTP/2 stream is reset over it.
                if resp.body().body.as_full().is_none() {
                    resp.body_mut().body = Body::full(Bytes::new());
                    resp.body_mut()._call = None;
                }
            }
            resp
        }
        Err(err) => {
            info!(request_id = request_id.as_str(), %method, path = path.as_str(), code = err.code(), error = %err, "call failed");
            error = Some(err.code());
            err.into_response(request_id).map(|full| CallBody {
                body: Body::full(full),
                _call: None,
                log: None,
            })
        }
    };
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    // On every response, the bridge's own errors and replays included: 0
    // says no worker was sent the call this time.
    resp.headers_mut()
        .insert(ATTEMPTS.clone(), attempts_value(trace.attempts));
    log.status = resp.status().as_u16();
    log.error = error;
    // A streamed reply's call may be ended early (the stall watch): from
    // then on it no longer keeps its HTTP/2 connection from going idle.
    if let Some(held) = &resp.body()._call {
        if let Some(call) = lock(&held.call).as_mut() {
            call._open = log._open.take();
        }
    }
    resp.body_mut().log = Some(log);
    Ok(resp)
}

/// A reply to `HEAD` has no body but tells the length a `GET` would get
/// (RFC 9110 9.3.2), and callers use it to learn a size. A whole reply's
/// `Content-Length` is dropped on the way in (the body is framed by its own
/// length); for an empty one the session keeps it aside, and it is put back
/// here, where the method is known.
fn head_length(resp: &mut Response<CallBody>) {
    if let Some(EmptyReplyLength(n)) = resp.extensions_mut().remove() {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// A streamed reply read whole (at most `limit` bytes, within `time`), for
/// an HTTP/1.0 caller.
async fn collect_whole(
    resp: Response<Body>,
    limit: usize,
    time: Duration,
) -> Result<Result<Response<CallBody>, BodyError>, tokio::time::error::Elapsed> {
    let (head, body) = resp.into_parts();
    let bytes = tokio::time::timeout(time, body.collect(limit)).await?;
    Ok(bytes.map(|bytes| {
        Response::from_parts(
            head,
            CallBody {
                body: Body::full(bytes),
                _call: None,
                log: None,
            },
        )
    }))
}

/// `X-Bridge-Attempts` for `n` attempts; the usual counts without an
/// allocation (`HeaderValue::from(u32)` formats into a new buffer).
fn attempts_value(n: u32) -> HeaderValue {
    match n {
        0 => HeaderValue::from_static("0"),
        1 => HeaderValue::from_static("1"),
        2 => HeaderValue::from_static("2"),
        3 => HeaderValue::from_static("3"),
        n => HeaderValue::from(n),
    }
}

/// `started + timeout`. Durations are capped by config validation; the
/// fallback only guards the arithmetic.
pub(super) fn deadline_of(started: Instant, timeout: Duration) -> Instant {
    started
        .checked_add(timeout)
        .unwrap_or(started + Duration::from_secs(86_400))
}

/// Header `name` if it is a sane token: 1 to 128 visible ASCII characters.
fn token_header(headers: &http::HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_owned)
}

/// The caller's `X-Request-Id` if it is a sane token, else a new UUID v7.
fn request_id(headers: &http::HeaderMap) -> String {
    token_header(headers, &REQUEST_ID).unwrap_or_else(|| {
        // Encoded straight into a buffer: `to_string()` goes through the
        // formatter and grows its `String` twice.
        let mut text = uuid::Uuid::encode_buffer();
        uuid::Uuid::now_v7()
            .hyphenated()
            .encode_lower(&mut text)
            .to_owned()
    })
}

/// What every step of one call needs to know.
pub(super) struct Ctx<'a> {
    pub(super) shared: &'a Shared,
    /// The settings the call started with.
    pub(super) settings: &'a Settings,
    pub(super) caller: &'a Caller,
    pub(super) request_id: &'a str,
    pub(super) started: Instant,
}

/// Routes, reads the body, dispatches to a worker and awaits the reply.
pub(super) async fn call(
    ctx: &Ctx<'_>,
    mut parts: Box<Parts>,
    body: RequestBody,
    trace: &mut Trace,
) -> Result<Response<CallBody>, CallError> {
    let Ctx {
        shared,
        settings,
        caller,
        request_id,
        started,
    } = *ctx;
    let target = settings
        .router
        .resolve(parts.uri.path())
        .ok_or_else(|| CallError::NoRoute {
            path: parts.uri.path().to_owned(),
        })?
        .clone();
    trace.route(shared, &target.service);
    let service: &str = &target.service;
    let deadline = deadline_of(started, target.request_timeout);
    let timeout = || CallError::Timeout {
        service: service.to_owned(),
        after: target.request_timeout,
    };

    let caller_version = parts.version;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > target.max_body as u64) {
        return Err(CallError::BodyTooLarge {
            limit: target.max_body,
        });
    }
    // Read the start of the body: a body that ends within one chunk travels
    // in the request frame itself; a longer one streams after it.
    let mut body = Limited::new(body, target.max_body);
    let read_error = |e| read_error(e, target.max_body);
    let mut start = BytesMut::new();
    let complete = loop {
        if body.is_end_stream() {
            break true;
        }
        if start.len() >= protocol::CHUNK_SIZE {
            break false;
        }
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(timeout()),
            Ok(None) => break true,
            Ok(Some(Err(e))) => return Err(read_error(e)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    start.extend_from_slice(&data);
                }
            }
        }
    };
    let start = start.freeze();
    if complete {
        trace.bytes_in = Some(start.len() as u64);
    }

    let xff = forwarded_for(&parts.headers, &caller.ip);
    let mut wire_headers = headers::to_wire_ref(&parts.headers);
    // HTTP/2 carries the host in the URI (`:authority`), not in a header:
    // workers get it as `host`, as from an HTTP/1.1 caller.
    if !parts.headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            wire_headers.insert(0, ("host", authority.as_str().into()));
        }
    }
    forwarded_headers(&mut wire_headers, &xff, request_id);
    // Written straight into each attempt's frame; each attempt sets its own
    // id, `end` and `gate`.
    let mut fields = RequestFields {
        id: 0,
        request_id,
        service,
        method: parts.method.as_str(),
        path: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        end: true,
        gate: true,
    };
    let head_too_large = || CallError::HeadersTooLarge {
        limit: protocol::MAX_HEADER_LEN,
    };
    if !head_fits(&fields, &wire_headers) {
        return Err(head_too_large());
    }

    let http = &settings.config.http;
    // Only a body that fits one chunk skips the upload path: anything longer
    // goes through it even when already read whole, so that it respects the
    // worker's flow-control window.
    let single = complete && start.len() <= protocol::CHUNK_SIZE;
    // A call whose worker vanishes before replying may go to another worker
    // when it can be sent again (its body is whole in memory) and doing so
    // cannot do anything twice: the worker never accepted it, or the method
    // is idempotent, or the caller sent an Idempotency-Key.
    let replayable = idempotent(&parts.method) || parts.headers.contains_key(&IDEMPOTENCY_KEY);
    // A body that is already compressed (Content-Encoding) is sent as it is.
    let precompressed = parts.headers.contains_key(header::CONTENT_ENCODING);
    // From here on the call keeps its headers as the JSON every attempt's
    // frame carries, not as the caller's header map (about 900 bytes of a
    // held call with a few headers, for the map and the list made from it).
    // (Dropped explicitly: a shadowed local would keep its heap until the
    // call ends.)
    let encoded = json::EncodedHeaders::new(&wire_headers);
    drop(wire_headers);
    drop(xff);
    let wire_headers = encoded;
    parts.headers = http::HeaderMap::new();
    let may_retry = |f: &Failure, attempt: u32| {
        single
            && attempt <= http.max_retries
            && Instant::now() < deadline
            && match f {
                Failure::Unsent(_) => true,
                Failure::Lost(_) => replayable,
                Failure::Bad(_) => false,
            }
    };
    let failure = |worker: &str, f: Failure| match f {
        Failure::Lost(cause) | Failure::Unsent(cause) => CallError::WorkerLost {
            service: service.to_owned(),
            worker: worker.to_owned(),
            cause,
        },
        Failure::Bad(reason) => CallError::BadResponse {
            service: service.to_owned(),
            worker: worker.to_owned(),
            reason,
        },
    };
    let mut attempt = 0;
    // The failure that made the last attempt end, while a retry looks for a
    // worker: if none can be had, that failure is the answer.
    let mut lost: Option<Box<CallError>> = None;
    let (lease, mut guard, outcome) = loop {
        attempt += 1;
        let queued_at = Instant::now();
        let queue_deadline = queued_at
            .checked_add(http.queue_timeout)
            .map_or(deadline, |t| t.min(deadline));
        // The clock is read again only if a worker connection closes under
        // the lease and another must be found.
        let mut now = queued_at;
        // Set when a connection closed under a lease: the next lease is
        // asked for only while the queue deadline has not passed, so that
        // no order of events can make this loop spin.
        let mut closed_under_lease = false;
        // The start gate (PROTOCOL 3.7) costs a round trip to the worker and
        // only pays when it is what makes a retry allowed: a call that would
        // be retried anyway (idempotent, keyed) or can't be (body not whole
        // in memory, no retries left) starts at once.
        let gated = single && !replayable && attempt <= http.max_retries;
        // A call that would be retried even after it started: if its worker's
        // connection drops, it moves on at once instead of waiting for a resume.
        let movable = single && replayable && attempt <= http.max_retries;
        let (lease, started) = loop {
            let acquired = if closed_under_lease && now >= queue_deadline {
                Err(AcquireError::NoWorker {
                    connected: shared.registry.connected(service),
                })
            } else {
                let wait = queue_deadline.saturating_duration_since(now);
                shared
                    .registry
                    .acquire(service, wait, http.queue_limit)
                    .await
            };
            let lease = acquired.map_err(|e| {
                if let Some(lost) = lost.take() {
                    return *lost;
                }
                match e {
                    AcquireError::QueueFull => CallError::QueueFull {
                        service: service.to_owned(),
                        limit: http.queue_limit,
                    },
                    // The call's own deadline ran out while queueing: a timeout.
                    AcquireError::NoWorker { .. } if Instant::now() >= deadline => timeout(),
                    AcquireError::NoWorker { connected } => CallError::NoWorker {
                        service: service.to_owned(),
                        waited: queued_at.elapsed(),
                        connected,
                    },
                }
            })?;
            // A connection that closed after handing out this lease never saw
            // the call, so choosing another worker is safe.
            if let Ok(started) = lease.session().start_call(!single, gated, movable) {
                break (lease, started);
            }
            now = Instant::now();
            closed_under_lease = true;
        };
        let Started {
            guard,
            reply,
            window,
        } = started;
        trace.attempts = attempt;
        trace.session = Some(lease.session().clone());
        let session = lease.session().clone();
        let failed = |f: Failure| failure(&session.worker_id, f);
        let id = guard.id();
        fields.id = id;
        fields.end = single;
        // `"gate": false` is written only to a worker that gates its calls.
        fields.gate = gated || !session.gates();
        let codec = if precompressed {
            Compression::None
        } else {
            session.compression()
        };
        if single {
            // head_fits() checked this before a worker was chosen; this is the backstop.
            let frame = protocol::encode_request_encoded(&fields, &wire_headers, &start, codec)
                .map_err(|_| head_too_large())?;
            // Two awaits, not one over an async block: the call waits for
            // its reply far longer than for the queue, and this way that
            // wait keeps no room for the send's future.
            let exchange = match tokio::time::timeout_at(deadline, session.send_whole(frame)).await
            {
                Ok(Ok(())) => tokio::time::timeout_at(deadline, reply)
                    .await
                    .map(|r| r.unwrap_or_else(|_| Err(Failure::Lost("connection closed".into())))),
                Ok(Err(f)) => Ok(Err(f)),
                Err(elapsed) => Err(elapsed),
            };
            let outcome = match exchange {
                Ok(Err(f)) if may_retry(&f, attempt) => {
                    warn!(%request_id, worker = %session.worker_id, attempt, failure = ?f, "worker lost before replying; trying another");
                    lost = Some(Box::new(failed(f)));
                    continue;
                }
                Ok(result) => Ok(result.map(|resp| (resp, None)).map_err(failed)),
                Err(elapsed) => Err(elapsed),
            };
            break (lease, guard, outcome);
        }
        // The head carries the first chunk; the rest of what was read, and
        // everything after, follows as body chunks.
        let head_frame = protocol::encode_request_encoded(
            &fields,
            &wire_headers,
            &start[..protocol::CHUNK_SIZE.min(start.len())],
            codec,
        )
        .map_err(|_| head_too_large())?;
        // The upload runs in its own task: it must go on after the reply
        // head arrives (an echo, say, answers while still reading), and it
        // stops when the call is dropped.
        let upload = Upload {
            session: session.clone(),
            id,
            window,
            codec,
            idle_limit: target.request_timeout,
            sent: trace.uploaded.clone(),
        };
        let exchange = async {
            let mut pump =
                AbortOnDropHandle::new(tokio::spawn(upload.run(head_frame, start.clone(), body)));
            let mut reply = reply;
            let resp = match reply_or_upload_failure(&mut reply, &mut pump).await {
                Settled::UploadFailed(done) => {
                    return Err(match done {
                        Ok(UploadError::Worker(f)) => failed(f),
                        Ok(UploadError::Caller(e)) => read_error(e),
                        Ok(UploadError::Stalled) => timeout(),
                        Err(_) => failed(Failure::Lost("upload task failed".into())),
                    })
                }
                Settled::Reply(r) => r
                    .unwrap_or_else(|_| Err(Failure::Lost("connection closed".into())))
                    .map_err(failed)?,
            };
            // An upload still running goes on beside the reply; if
            // it fails now, the call is aborted both ways.
            let watcher = (!pump.is_finished()).then(|| {
                let session = session.clone();
                AbortOnDropHandle::new(tokio::spawn(async move {
                    let reason = match pump.await {
                        Ok(Err(UploadError::Caller(e))) if e.is::<LengthLimitError>() => {
                            "body_too_large"
                        }
                        Ok(Err(UploadError::Caller(_))) => "client_gone",
                        Ok(Err(UploadError::Stalled)) => "timeout",
                        _ => return,
                    };
                    session.abort_call(id, reason);
                }))
            });
            Ok((resp, watcher))
        };
        // Boxed: only calls with a long body come here, and unboxed it
        // would make every call's future larger.
        let outcome = Box::pin(tokio::time::timeout_at(deadline, exchange)).await;
        break (lease, guard, outcome);
    };
    match outcome {
        Ok(Err(e)) => {
            // A body cut off for its size tells the worker why.
            if matches!(e, CallError::BodyTooLarge { .. }) {
                guard.reason = "body_too_large";
            }
            Err(e)
        }
        Ok(Ok((resp, upload))) => {
            let streamed = resp.body().as_full().is_none();
            if streamed
                && caller_version == http::Version::HTTP_10
                && !resp.headers().contains_key(header::CONTENT_LENGTH)
            {
                // HTTP/1.0 has no chunked encoding: a body of unknown length
                // ends by closing the connection, which looks the same
                // whether it is complete or cut off. Collect it (the call
                // stays alive meanwhile) so a cut-off becomes a 502.
                let limit = http.max_response_body.bytes();
                // Boxed, with the response moved in: a rare path that would
                // otherwise be the largest state of this future, which
                // every call makes room for.
                let collected = Box::pin(collect_whole(resp, limit, target.request_timeout)).await;
                let Ok(collected) = collected else {
                    // A worker that stalls mid-body is cancelled, as for
                    // HTTP/1.1 callers.
                    guard.reason = "timeout";
                    return Err(timeout());
                };
                drop((upload, guard));
                return match collected {
                    Ok(resp) => Ok(resp),
                    Err(e) => Err(failure(
                        &lease.session().worker_id,
                        Failure::Bad(e.to_string()),
                    )),
                };
            }
            // A streamed reply keeps the call (its cancel-on-drop guard, its
            // worker slot and any upload still running) alive until the
            // caller has read it all or hung up; a complete one is done.
            let call = streamed.then(|| {
                let call = Arc::new(Mutex::new(Some(HeldCall {
                    _upload: upload,
                    guard,
                    _lease: lease,
                    _open: None,
                })));
                // HTTP/2: the socket's send timeout cannot see one stalled
                // stream; the stall watch can.
                let stall = (caller_version == http::Version::HTTP_2).then(|| {
                    let call = Arc::downgrade(&call);
                    StallWatch::spawn(http.send_timeout, move || {
                        if let Some(call) = call.upgrade() {
                            if let Some(mut held) = lock(&call).take() {
                                debug!(
                                    call = held.guard.id(),
                                    "HTTP/2 caller stopped reading this reply for send_timeout; call ended"
                                );
                                held.guard.reason = "timeout";
                            }
                        }
                    })
                });
                Held {
                    call,
                    idle_limit: target.request_timeout,
                    idle: Box::pin(tokio::time::sleep(target.request_timeout)),
                    stall,
                }
            });
            Ok(resp.map(|body| CallBody {
                body,
                _call: call,
                log: None,
            }))
        }
        Err(_) => {
            guard.reason = "timeout";
            Err(timeout())
        }
    }
    // Otherwise `guard` drops here: a call still pending is removed and
    // cancelled; `lease` drops after it and frees the worker's slot.
}

/// True when a request head with these fields fits in [`protocol::MAX_HEADER_LEN`].
/// JSON escaping can grow a byte to six (`\u00XX`), so heads that might be
/// near the limit are measured exactly, and the common small head is not
/// written twice.
fn head_fits(fields: &RequestFields<'_>, headers: &[(&str, WireText<'_>)]) -> bool {
    if fields.size_hint(headers) * 6 <= protocol::MAX_HEADER_LEN {
        return true;
    }
    // The longest form: the largest id, and `end` and `gate` both false
    // (`"gate":true` is not written).
    let longest = RequestFields {
        id: u64::MAX,
        end: false,
        gate: false,
        ..*fields
    };
    let mut json = Vec::new();
    json::write_request(&longest, headers, &mut json);
    json.len() <= protocol::MAX_HEADER_LEN
}

/// The `X-Forwarded-For` to send: what the caller sent, plus its address.
fn forwarded_for(original: &http::HeaderMap, peer_ip: &str) -> String {
    let mut xff = String::new();
    let prior = original
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok());
    for (i, value) in prior.enumerate() {
        if i > 0 {
            xff.push_str(", ");
        }
        xff.push_str(value);
    }
    // An empty list (or only empty values) gets no separator.
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    xff.push_str(peer_ip);
    xff
}

/// Adds `X-Forwarded-For` (made by [`forwarded_for`]), `X-Forwarded-Proto`
/// and `X-Request-Id` (replacing any the caller sent), so the worker sees
/// what a reverse proxy would show.
fn forwarded_headers<'a>(
    wire: &mut Vec<(&'a str, WireText<'a>)>,
    xff: &'a str,
    request_id: &'a str,
) {
    wire.retain(|(n, _)| !matches!(*n, "x-forwarded-for" | "x-forwarded-proto" | "x-request-id"));
    wire.push(("x-forwarded-for", xff.into()));
    wire.push(("x-forwarded-proto", "http".into()));
    wire.push(("x-request-id", request_id.into()));
}
