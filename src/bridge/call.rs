//! One call's life, from a routed request to the reply it gets: `call()`
//! reads the start of the body, then runs attempts, each on a place the
//! dispatch seam (`dispatch.rs`) finds, until one is done: a reply, a
//! failure that cannot be retried, or the deadline. `http.rs` turns the
//! caller's request into a call and the outcome into a response.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{header, request::Parts, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body as HttpBody;
use tokio::time::{error::Elapsed, Instant};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, warn};

use super::{
    caller::Caller,
    dispatch::{AcquireError, Attempt, Dispatch, Placed, StartAs},
    fanout::Sent,
    idempotency::IDEMPOTENCY_KEY,
    job_run::JobHook,
    remote,
    reply::{lock, CallBody, Held, HeldCall, Trace},
    request_body::{read_error, RequestBody},
    routes::Target,
    session::Failure,
    stall::StallWatch,
    upload::{reply_or_upload_failure, Settled, Upload, UploadError},
    Settings, Shared,
};
use crate::{
    body::{Body, BodyError},
    error::CallError,
    headers::{self, WireText},
    protocol::{self, json, json::RequestFields, Compression},
    transport::OutFrame,
};

/// Methods that RFC 9110 defines as idempotent: sending one twice has the
/// effect of sending it once, so a call may go to a second worker.
pub(super) fn idempotent(method: &http::Method) -> bool {
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

/// `started + timeout`. Durations are capped by config validation; the
/// fallback only guards the arithmetic.
pub(super) fn deadline_of(started: Instant, timeout: Duration) -> Instant {
    started
        .checked_add(timeout)
        .unwrap_or(started + Duration::from_secs(86_400))
}

/// What every step of one call needs to know.
pub(super) struct Ctx<'a> {
    pub(super) shared: &'a Shared,
    /// The settings the call started with.
    pub(super) settings: &'a Settings,
    pub(super) caller: &'a Caller,
    pub(super) request_id: &'a str,
    pub(super) started: Instant,
    /// For a call another bridge sent this one: that bridge, and the
    /// call's deadline there. Its headers were forwarded there.
    pub(super) relayed: Option<Relayed>,
    /// For one worker's call of a fan-out: told when the call is sent;
    /// such a call is never retried.
    pub(super) fanout: Option<&'a Sent>,
    /// For a job's call: its queue deadline, and told (durably) when a
    /// worker has it, before the worker is sent anything.
    pub(super) job: Option<&'a JobHook>,
}

impl Ctx<'_> {
    /// How many more workers a lost call may go to.
    pub(super) fn max_retries(&self) -> u32 {
        match self.fanout {
            Some(_) => 0,
            None => self.settings.config.http.max_retries,
        }
    }
}

/// What a call another bridge sent this one keeps of its first bridge.
#[derive(Clone, Copy)]
pub(super) struct Relayed {
    /// The call's deadline, as the calling bridge set it.
    pub(super) deadline: Instant,
}

/// Routes, reads the start of the body, then runs attempts (each on a
/// place the dispatch finds) until one is done: a reply, a failure that
/// cannot be retried, or the deadline.
pub(super) async fn call(
    ctx: &Ctx<'_>,
    parts: Box<Parts>,
    body: RequestBody,
    trace: &mut Trace,
) -> Result<Response<CallBody>, CallError> {
    let target = ctx.settings.router.route(parts.uri.path())?;
    call_target(ctx, target, parts, body, trace).await
}

/// [`call`] for a request already routed to `target`.
pub(super) async fn call_target(
    ctx: &Ctx<'_>,
    target: Target,
    mut parts: Box<Parts>,
    body: RequestBody,
    trace: &mut Trace,
) -> Result<Response<CallBody>, CallError> {
    trace.route(ctx.shared, &target.service);
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
    let deadline = match ctx.relayed {
        Some(relayed) => relayed.deadline,
        None => deadline_of(ctx.started, target.request_timeout),
    };
    // Made an `Option` at once (the upload takes it): a body moved into
    // one later would be kept twice in this future.
    let mut body = Some(Limited::new(body, target.max_body));
    let (start, complete) = match body.as_mut() {
        Some(reading) => read_start(reading, deadline, &target).await?,
        None => (Bytes::new(), true),
    };
    if complete {
        trace.bytes_in = Some(start.len() as u64);
    }
    // Written straight into each attempt's frame; each attempt sets its own
    // id, `end` and `gate`.
    let mut fields = RequestFields {
        id: 0,
        request_id: ctx.request_id,
        service: &target.service,
        method: parts.method.as_str(),
        path: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        end: true,
        gate: true,
    };
    let plan = Plan {
        headers: wire_headers(ctx, &parts, &fields)?,
        target: &target,
        deadline,
        // Only a body that fits one chunk skips the upload path: anything
        // longer goes through it even when already read whole, so that it
        // respects the worker's flow-control window.
        single: complete && start.len() <= protocol::CHUNK_SIZE,
        start,
        // A call whose worker vanishes before replying may go to another
        // worker when it can be sent again (its body is whole in memory)
        // and doing so cannot do anything twice: the worker never accepted
        // it, or the method is idempotent, or the caller sent an
        // Idempotency-Key.
        replayable: idempotent(&parts.method) || parts.headers.contains_key(&IDEMPOTENCY_KEY),
        // A body that is already compressed (Content-Encoding) is sent as it is.
        precompressed: parts.headers.contains_key(header::CONTENT_ENCODING),
        version: parts.version,
        worker: target_worker(&parts.headers)?,
        await_worker: await_worker(&parts.headers)?,
    };
    // From here on the call keeps its headers as the JSON every attempt's
    // frame carries (`plan.headers`), not as the caller's header map (about
    // 900 bytes of a held call with a few headers).
    parts.headers = http::HeaderMap::new();
    // The failure that made the last attempt end, while a retry looks for a
    // worker: if none can be had, that failure is the answer.
    let mut lost: Option<Box<CallError>> = None;
    let mut n = 0;
    // The outcome is taken apart in a block of its own: nothing of it is
    // kept (in this future's room) across the rare wait below.
    let collect = loop {
        n += 1;
        let finished = match attempt(ctx, &plan, &mut fields, &mut body, n, trace).await {
            Step::Done(at, outcome) => finish(ctx, &plan, at, outcome),
            Step::Retry(why) => {
                lost = Some(why);
                continue;
            }
            Step::Unplaced(e) => return Err(lost.map_or(e, |lost| *lost)),
        };
        match finished {
            Finished::Now(response) => return response,
            Finished::Collect(collect) => break collect,
        }
    };
    let limit = ctx.settings.config.http.max_response_body.bytes();
    Box::pin(collect.run(&plan, limit)).await
}

/// What every attempt of a call shares, once the request is routed and
/// the start of its body read.
pub(super) struct Plan<'a> {
    pub(super) target: &'a Target,
    /// The whole call's deadline.
    pub(super) deadline: Instant,
    /// The body read so far: all of it when it fits one chunk.
    pub(super) start: Bytes,
    /// The whole body travels in the request frame (and may be sent again).
    pub(super) single: bool,
    /// Sending the call again cannot do anything twice.
    pub(super) replayable: bool,
    /// The body is already compressed: sent as it is.
    precompressed: bool,
    /// The request's headers as the JSON each attempt's frame carries.
    pub(super) headers: json::EncodedHeaders,
    /// The caller's HTTP version.
    version: http::Version,
    /// The one worker the call is for (`Wsbridge-Worker`), if any.
    pub(super) worker: Option<Box<str>>,
    /// That worker is waited for if it is not connected
    /// (`Wsbridge-Worker-Wait: true`), up to `queue_timeout`.
    pub(super) await_worker: bool,
}

impl Plan<'_> {
    pub(super) fn timeout(&self) -> CallError {
        CallError::Timeout {
            service: self.target.service.to_string(),
            after: self.target.request_timeout,
        }
    }

    pub(super) fn failure(&self, worker: &str, f: Failure) -> CallError {
        let service = self.target.service.to_string();
        let worker = worker.to_owned();
        match f {
            Failure::Lost(cause) | Failure::Unsent(cause) => CallError::WorkerLost {
                service,
                worker,
                cause,
            },
            Failure::Bad(reason) => CallError::BadResponse {
                service,
                worker,
                reason,
            },
        }
    }

    fn head_too_large() -> CallError {
        CallError::HeadersTooLarge {
            limit: protocol::MAX_HEADER_LEN,
        }
    }

    /// Whether a failure of attempt `n` lets the call go to another worker.
    pub(super) fn may_retry(&self, f: &Failure, n: u32, max_retries: u32) -> bool {
        self.single
            && n <= max_retries
            && Instant::now() < self.deadline
            && match f {
                Failure::Unsent(_) => true,
                Failure::Lost(_) => self.replayable,
                Failure::Bad(_) => false,
            }
    }
}

/// How one attempt ended.
// `Done` is the common case and is returned once per call: boxing it
// would cost an allocation per call to save a move.
#[allow(clippy::large_enum_variant)]
pub(super) enum Step {
    /// It ends the call: a reply (and the upload still running beside it),
    /// a failure, or the deadline passed.
    Done(Placed, Result<Result<Exchange, CallError>, Elapsed>),
    /// Its worker was lost in a way that lets the call go to another; the
    /// failure is the answer if none can be had.
    Retry(Box<CallError>),
    /// No worker could be had for it.
    Unplaced(CallError),
}

/// A reply head, and the watcher of an upload still running beside it.
pub(super) type Exchange = (Response<Body>, Option<AbortOnDropHandle<()>>);

/// Reads the start of the body: a body that ends within one chunk travels
/// in the request frame itself; a longer one streams after it. True when
/// the body is complete.
async fn read_start(
    body: &mut Limited<RequestBody>,
    deadline: Instant,
    target: &Target,
) -> Result<(Bytes, bool), CallError> {
    let mut start = Gathered::default();
    let complete = loop {
        if body.is_end_stream() {
            break true;
        }
        if start.len() >= protocol::CHUNK_SIZE {
            break false;
        }
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(CallError::Timeout {
                    service: target.service.to_string(),
                    after: target.request_timeout,
                })
            }
            Ok(None) => break true,
            Ok(Some(Err(e))) => return Err(read_error(e, target.max_body)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    start.push(data);
                }
            }
        }
    };
    Ok((start.into_bytes(), complete))
}

/// The start of a body as it is read. A first chunk of at least
/// [`KEEP_MIN`] bytes is kept as hyper gave it (a large body read in one
/// piece, the common case, is not copied: 16 KiB calls 243k -> 227k
/// instructions in `scripts/profile`); anything else is copied, since a
/// chunk is a slice of hyper's read buffer and would keep all of it for as
/// long as the call holds its body.
#[derive(Default)]
struct Gathered {
    first: Bytes,
    more: Option<BytesMut>,
}

/// The smallest first chunk kept without a copy.
const KEEP_MIN: usize = 4096;

impl Gathered {
    fn len(&self) -> usize {
        self.first.len() + self.more.as_ref().map_or(0, BytesMut::len)
    }

    fn push(&mut self, data: Bytes) {
        if self.first.is_empty() && self.more.is_none() && data.len() >= KEEP_MIN {
            self.first = data;
            return;
        }
        let more = self.more.get_or_insert_with(BytesMut::new);
        if !self.first.is_empty() {
            more.reserve(self.first.len() + data.len());
            more.extend_from_slice(&std::mem::take(&mut self.first));
        }
        more.extend_from_slice(&data);
    }

    fn into_bytes(self) -> Bytes {
        match self.more {
            Some(more) => more.freeze(),
            None => self.first,
        }
    }
}

/// The request's headers as workers get them (with the forwarding headers
/// and the host), encoded once for every attempt, if the head fits.
fn wire_headers(
    ctx: &Ctx<'_>,
    parts: &Parts,
    fields: &RequestFields<'_>,
) -> Result<json::EncodedHeaders, CallError> {
    let mut wire = headers::to_wire_ref(&parts.headers);
    if ctx.relayed.is_some() {
        // Forwarded by the bridge the caller called.
        if !head_fits(fields, &wire) {
            return Err(Plan::head_too_large());
        }
        return Ok(json::EncodedHeaders::new(&wire));
    }
    let xff = forwarded_for(&parts.headers, &ctx.caller.ip);
    // HTTP/2 carries the host in the URI (`:authority`), not in a header:
    // workers get it as `host`, as from an HTTP/1.1 caller.
    if !parts.headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            wire.insert(0, ("host", authority.as_str().into()));
        }
    }
    forwarded_headers(&mut wire, &xff, ctx.request_id);
    if !head_fits(fields, &wire) {
        return Err(Plan::head_too_large());
    }
    Ok(json::EncodedHeaders::new(&wire))
}

/// Attempt `n` of a call: finds a worker, sends it the call and awaits the
/// reply head (beside the upload of a long body).
async fn attempt(
    ctx: &Ctx<'_>,
    plan: &Plan<'_>,
    fields: &mut RequestFields<'_>,
    body: &mut Option<Limited<RequestBody>>,
    n: u32,
    trace: &mut Trace,
) -> Step {
    let http = &ctx.settings.config.http;
    let deadline = plan.deadline;
    let queued_at = Instant::now();
    // A job waits for its worker far longer than a call, and is not
    // counted against the queue's bound (`jobs.concurrency` bounds it).
    let (queue_deadline, queue_limit) = match ctx.job {
        Some(job) => (job.queue_deadline.min(deadline), usize::MAX),
        None => (
            queued_at
                .checked_add(http.queue_timeout)
                .map_or(deadline, |t| t.min(deadline)),
            http.queue_limit,
        ),
    };
    let retries_left = plan.single && n <= ctx.max_retries();
    let how = StartAs {
        upload: !plan.single,
        // The start gate (PROTOCOL 3.7) costs a round trip to the worker, so
        // it is asked for only when configured, and then only where it is
        // what makes a retry allowed: a call that would be retried anyway
        // (idempotent, keyed) or can't be (body not whole in memory, no
        // retries left) starts at once.
        gated: http.start_gate && retries_left && !plan.replayable,
        // A call that would be retried even after it started: if its worker's
        // connection drops, it moves on at once instead of waiting for a resume.
        movable: retries_left && plan.replayable,
        await_worker: plan.await_worker,
    };
    let service: &str = &plan.target.service;
    if let Some(step) = elsewhere(ctx, plan, fields, body, n, trace).await {
        return step;
    }
    let dispatch = Dispatch::Local(&ctx.shared.registry);
    let mut at = match dispatch
        .start(
            service,
            plan.worker.as_deref(),
            queued_at,
            queue_deadline,
            queue_limit,
            how,
        )
        .await
    {
        Ok(at) => at,
        Err(e) => return Step::Unplaced(unplaced(plan, e, queue_limit, queued_at)),
    };
    trace.attempts = n;
    trace.session = Some(at.session().clone());
    if let Some(sent) = ctx.fanout {
        sent.mark();
    }
    if let Some(job) = ctx.job {
        if !job.placed(at.worker(), None).await && !plan.replayable {
            // Not stored as running: sending it could make a restart run
            // it twice. The worker was sent nothing.
            return Step::Done(Placed::Local(at), Ok(Err(JobHook::unstored())));
        }
    }
    fields.id = at.id();
    fields.end = plan.single;
    // `"gate": false` is written only to a worker that gates its calls.
    fields.gate = how.gated || !at.gates();
    let codec = if plan.precompressed {
        Compression::None
    } else {
        at.compression()
    };
    if plan.single {
        // A large body goes out as it came, behind its head, not copied
        // into one buffer with it (`wire` writes the two as one frame).
        let split = protocol::encode_request_split(fields, &plan.headers, &plan.start, codec);
        let Ok(frame) = split.map(|(head, body)| OutFrame::binary_parts(head, body)) else {
            // wire_headers() checked this before a worker was chosen; this
            // is the backstop.
            return Step::Done(Placed::Local(at), Ok(Err(Plan::head_too_large())));
        };
        // The attempt stays here, lent: moved into the exchange, its room
        // would be kept twice in the call's future.
        return match exchange_whole(ctx, plan, &mut at, frame, n).await {
            Whole::Retry(why) => Step::Retry(why),
            Whole::Done(outcome) => Step::Done(Placed::Local(at), outcome),
        };
    }
    // A streamed body is sent once: a call that uploads is never retried.
    let Some(body) = body.take() else {
        let spent = Failure::Lost("the request body was already sent".into());
        let failed = plan.failure(at.worker(), spent);
        return Step::Done(Placed::Local(at), Ok(Err(failed)));
    };
    // The head carries the first chunk; the rest of what was read, and
    // everything after, follows as body chunks.
    let first = &plan.start[..protocol::CHUNK_SIZE.min(plan.start.len())];
    let Ok(head) = protocol::encode_request_encoded(fields, &plan.headers, first, codec) else {
        return Step::Done(Placed::Local(at), Ok(Err(Plan::head_too_large())));
    };
    let outcome = upload_exchange(plan, &mut at, head, body, codec, trace).await;
    Step::Done(Placed::Local(at), outcome)
}

/// The attempt on another bridge of the cluster, when no worker here has
/// room (local workers first) and a peer takes the call; boxed, as only
/// clustered bridges come here. `None` leaves the call to this bridge's
/// queue; a service with no worker here at all may queue at a peer
/// instead, and with the cluster unreachable it fails at once.
async fn elsewhere(
    ctx: &Ctx<'_>,
    plan: &Plan<'_>,
    fields: &RequestFields<'_>,
    body: &mut Option<Limited<RequestBody>>,
    n: u32,
    trace: &mut Trace,
) -> Option<Step> {
    let cluster = ctx.shared.cluster.get()?;
    let registry = &ctx.shared.registry;
    let service: &str = &plan.target.service;
    // A call another bridge sent runs here or nowhere: no relaying on.
    if ctx.relayed.is_some() {
        return None;
    }
    if let Some(id) = plan.worker.as_deref() {
        // A call for one worker waits for it here if it is here; else it
        // goes to the bridge that announces it, or is for nobody.
        if registry.hosts(service, id) {
            return None;
        }
        let step = Box::pin(remote::attempt(ctx, plan, fields, body, n, trace, true)).await;
        if step.is_none() && plan.await_worker {
            // Nobody has it: wait here for it to connect.
            return None;
        }
        return Some(step.unwrap_or_else(|| {
            Step::Unplaced(match cluster.is_connected() {
                true => CallError::UnknownWorker {
                    service: service.to_owned(),
                    worker: id.to_owned(),
                },
                false => CallError::ClusterUnavailable {
                    service: service.to_owned(),
                },
            })
        }));
    }
    if registry.has_room(service) {
        return None;
    }
    let local = registry.accepting(service) > 0;
    let step = Box::pin(remote::attempt(ctx, plan, fields, body, n, trace, !local)).await;
    if step.is_some() || local || cluster.is_connected() {
        return step;
    }
    let cause = CallError::ClusterUnavailable {
        service: service.to_owned(),
    };
    Some(Step::Unplaced(cause))
}

/// The exchange of a call whose body streams after its head, boxed: only
/// calls with a long body come here, and unboxed (or built in `attempt`)
/// it would make every call's future larger.
fn upload_exchange<'a>(
    plan: &'a Plan<'_>,
    at: &'a mut Attempt,
    head: Bytes,
    body: Limited<RequestBody>,
    codec: Compression,
    trace: &Trace,
) -> BoxedExchange<'a> {
    let upload = at.upload(codec, plan.target.request_timeout, trace.uploaded.clone());
    Box::pin(tokio::time::timeout_at(
        plan.deadline,
        exchange_streamed(plan, at, upload, head, body),
    ))
}

/// [`exchange_streamed`] under the call's deadline, boxed.
type BoxedExchange<'a> =
    Pin<Box<dyn Future<Output = Result<Result<Exchange, CallError>, Elapsed>> + Send + 'a>>;

/// How the exchange of a whole call ended.
// Like `Step`, returned once per call.
#[allow(clippy::large_enum_variant)]
enum Whole {
    /// The reply, a failure that ends the call, or the deadline.
    Done(Result<Result<Exchange, CallError>, Elapsed>),
    /// The worker was lost in a way that lets the call go to another.
    Retry(Box<CallError>),
}

/// The error for an attempt that found no worker.
fn unplaced(plan: &Plan<'_>, e: AcquireError, limit: usize, queued_at: Instant) -> CallError {
    let service = plan.target.service.to_string();
    match e {
        AcquireError::QueueFull => CallError::QueueFull { service, limit },
        // The call's own deadline ran out while queueing: a timeout.
        AcquireError::NoWorker { .. } if Instant::now() >= plan.deadline => plan.timeout(),
        AcquireError::NoWorker { connected } => CallError::NoWorker {
            service,
            waited: queued_at.elapsed(),
            connected,
        },
        AcquireError::UnknownWorker => CallError::UnknownWorker {
            service,
            worker: plan.worker.as_deref().unwrap_or_default().to_owned(),
        },
    }
}

/// Sends a call whose whole body is in its frame, and awaits the reply.
async fn exchange_whole(
    ctx: &Ctx<'_>,
    plan: &Plan<'_>,
    at: &mut Attempt,
    frame: OutFrame,
    n: u32,
) -> Whole {
    let deadline = plan.deadline;
    // Two awaits, not one over an async block: the call waits for its reply
    // far longer than for the queue, and this way that wait keeps no room
    // for the send's future.
    let exchange = match tokio::time::timeout_at(deadline, at.send_whole(frame)).await {
        Ok(Ok(())) => tokio::time::timeout_at(deadline, at.reply()).await,
        Ok(Err(f)) => Ok(Err(f)),
        Err(elapsed) => Err(elapsed),
    };
    match exchange {
        Ok(Err(f)) if plan.may_retry(&f, n, ctx.max_retries()) => {
            warn!(request_id = %ctx.request_id, worker = %at.worker(), attempt = n, failure = ?f, "worker lost before replying; trying another");
            Whole::Retry(Box::new(plan.failure(at.worker(), f)))
        }
        Ok(result) => {
            let result = result
                .map(|resp| (resp, None))
                .map_err(|f| plan.failure(at.worker(), f));
            Whole::Done(Ok(result))
        }
        Err(elapsed) => Whole::Done(Err(elapsed)),
    }
}

/// Starts the upload of a long body in its own task (it must go on after
/// the reply head arrives: an echo, say, answers while still reading; it
/// stops when the call is dropped) and awaits the reply head beside it.
async fn exchange_streamed(
    plan: &Plan<'_>,
    at: &mut Attempt,
    upload: Upload,
    head: Bytes,
    body: Limited<RequestBody>,
) -> Result<Exchange, CallError> {
    let mut reply = at.take_reply();
    let failed = |f: Failure| plan.failure(at.worker(), f);
    let mut pump = AbortOnDropHandle::new(tokio::spawn(upload.run(head, plan.start.clone(), body)));
    let resp = match reply_or_upload_failure(&mut reply, &mut pump).await {
        Settled::UploadFailed(done) => {
            return Err(match done {
                Ok(UploadError::Worker(f)) => failed(f),
                Ok(UploadError::Caller(e)) => read_error(e, plan.target.max_body),
                Ok(UploadError::Stalled) => plan.timeout(),
                Err(_) => failed(Failure::Lost("upload task failed".into())),
            })
        }
        Settled::Reply(r) => r
            .unwrap_or_else(|_| Err(Failure::Lost("connection closed".into())))
            .map_err(failed)?,
    };
    // An upload still running goes on beside the reply; if it fails now,
    // the call is aborted both ways.
    let watcher = (!pump.is_finished()).then(|| {
        let call = at.aborter();
        AbortOnDropHandle::new(tokio::spawn(async move {
            let reason = match pump.await {
                Ok(Err(UploadError::Caller(e))) if e.is::<LengthLimitError>() => "body_too_large",
                Ok(Err(UploadError::Caller(_))) => "client_gone",
                Ok(Err(UploadError::Stalled)) => "timeout",
                _ => return,
            };
            call.abort(reason);
        }))
    });
    Ok((resp, watcher))
}

/// How the attempt that ended the call becomes the caller's response.
// `Now` is the common case, taken apart at once: boxing it would cost an
// allocation per call.
#[allow(clippy::large_enum_variant)]
enum Finished {
    /// The response (or the error), now.
    Now(Result<Response<CallBody>, CallError>),
    /// An HTTP/1.0 caller's streamed reply of unknown length, to be read
    /// whole first. Boxed: a rare path that would otherwise make room in
    /// every call's future.
    Collect(Box<Collect>),
}

/// Turns the attempt that ended the call into the caller's response: a
/// streamed reply keeps the attempt alive until the caller has read it.
/// Synchronous, so that the call's future keeps no room for it.
fn finish(
    ctx: &Ctx<'_>,
    plan: &Plan<'_>,
    mut at: Placed,
    outcome: Result<Result<Exchange, CallError>, Elapsed>,
) -> Finished {
    let http = &ctx.settings.config.http;
    let (resp, upload) = match outcome {
        Ok(Ok(exchange)) => exchange,
        Ok(Err(e)) => {
            // A body cut off for its size tells the worker why.
            if matches!(e, CallError::BodyTooLarge { .. }) {
                at.set_reason("body_too_large");
            }
            return Finished::Now(Err(e));
        }
        Err(_) => {
            at.set_reason("timeout");
            return Finished::Now(Err(plan.timeout()));
        }
    };
    let streamed = resp.body().as_full().is_none();
    if streamed
        && plan.version == http::Version::HTTP_10
        && !resp.headers().contains_key(header::CONTENT_LENGTH)
    {
        return Finished::Collect(Box::new(Collect { at, resp, upload }));
    }
    // A streamed reply keeps the call (its attempt: cancel-on-drop and the
    // worker's slot, and any upload still running) alive until the caller
    // has read it all or hung up; a complete one is done.
    let call = streamed.then(|| held(at, upload, http.send_timeout, plan));
    Finished::Now(Ok(resp.map(|body| CallBody {
        body,
        _call: call,
        log: None,
    })))
    // Otherwise the attempt drops here: a call still pending is removed and
    // cancelled, and the worker's slot is freed.
}

/// A streamed reply to an HTTP/1.0 caller, without a length. HTTP/1.0 has
/// no chunked encoding: a body of unknown length ends by closing the
/// connection, which looks the same whether it is complete or cut off. It
/// is collected (the call stays alive meanwhile) so a cut-off becomes a 502.
struct Collect {
    at: Placed,
    resp: Response<Body>,
    upload: Option<AbortOnDropHandle<()>>,
}

impl Collect {
    async fn run(self, plan: &Plan<'_>, limit: usize) -> Result<Response<CallBody>, CallError> {
        let Collect {
            mut at,
            resp,
            upload,
        } = self;
        let collected = collect_whole(resp, limit, plan.target.request_timeout).await;
        let Ok(collected) = collected else {
            // A worker that stalls mid-body is cancelled, as for HTTP/1.1
            // callers.
            at.set_reason("timeout");
            return Err(plan.timeout());
        };
        drop(upload);
        collected.map_err(|e| plan.failure(&at.worker(), Failure::Bad(e.to_string())))
    }
}

/// What a streamed reply's body holds while the caller reads it.
fn held(
    at: Placed,
    upload: Option<AbortOnDropHandle<()>>,
    send_timeout: Duration,
    plan: &Plan<'_>,
) -> Held {
    let call = Arc::new(Mutex::new(Some(HeldCall {
        _upload: upload,
        attempt: at,
        _open: None,
    })));
    // HTTP/2: the socket's send timeout cannot see one stalled stream; the
    // stall watch can.
    let stall = (plan.version == http::Version::HTTP_2).then(|| {
        let call = Arc::downgrade(&call);
        StallWatch::spawn(send_timeout, move || {
            if let Some(call) = call.upgrade() {
                if let Some(mut held) = lock(&call).take() {
                    debug!(
                        call = held.attempt.id(),
                        "HTTP/2 caller stopped reading this reply for send_timeout; call ended"
                    );
                    held.attempt.set_reason("timeout");
                }
            }
        })
    });
    Held {
        call,
        idle_limit: plan.target.request_timeout,
        idle: Box::pin(tokio::time::sleep(plan.target.request_timeout)),
        stall,
    }
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

/// The header that addresses a call to one worker by its hello's
/// `worker_id`.
pub(super) static WSBRIDGE_WORKER: header::HeaderName =
    header::HeaderName::from_static("wsbridge-worker");

/// Longest worker id a call may name (the hello's limit).
const MAX_WORKER_ID: usize = 256;

/// The worker a call names in `Wsbridge-Worker`, if any: one value of 1 to
/// 256 bytes of UTF-8.
pub(super) fn target_worker(headers: &http::HeaderMap) -> Result<Option<Box<str>>, CallError> {
    let mut values = headers.get_all(&WSBRIDGE_WORKER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = |reason: &str| CallError::BadRequest {
        reason: format!("Wsbridge-Worker: {reason}"),
    };
    if values.next().is_some() {
        return Err(bad("name one worker"));
    }
    let id = std::str::from_utf8(value.as_bytes()).map_err(|_| bad("not UTF-8"))?;
    if id.is_empty() || id.len() > MAX_WORKER_ID {
        return Err(bad("1 to 256 bytes"));
    }
    Ok(Some(id.into()))
}

/// `Wsbridge-Worker-Wait`: `true` (or `1`) lets a call for a worker that
/// is not connected wait for it; `false` (or `0`, or no header) does not.
pub(super) static WSBRIDGE_WORKER_WAIT: header::HeaderName =
    header::HeaderName::from_static("wsbridge-worker-wait");

fn await_worker(headers: &http::HeaderMap) -> Result<bool, CallError> {
    match headers.get(&WSBRIDGE_WORKER_WAIT).map(|v| v.as_bytes()) {
        None | Some(b"false" | b"0") => Ok(false),
        Some(b"true" | b"1") if headers.contains_key(&WSBRIDGE_WORKER) => Ok(true),
        Some(b"true" | b"1") => Err(CallError::BadRequest {
            reason: "Wsbridge-Worker-Wait needs a Wsbridge-Worker to wait for".into(),
        }),
        Some(_) => Err(CallError::BadRequest {
            reason: "Wsbridge-Worker-Wait: `true` or `false`".into(),
        }),
    }
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
