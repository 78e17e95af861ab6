//! Fan-out: a call with `Wsbridge-Fanout: all` (or a metadata selector,
//! `region=eu,user=42`) goes once to every matching worker of its service,
//! on this bridge and at its peers, each as a call for that one worker
//! (`Wsbridge-Worker`) that is never retried. The replies are gathered
//! into one JSON document once all have answered or the deadline passed,
//! streamed one line per reply as they arrive (`Accept:
//! application/x-ndjson`), or, for a push (`Wsbridge-Fanout-Reply: none`),
//! dropped: the caller gets 202 once the calls are sent.

use std::{
    collections::{BTreeMap, HashSet},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use base64::Engine;
use bytes::Bytes;
use futures_util::{stream::FuturesUnordered, StreamExt};
use http::{header, request::Parts, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body as HttpBody, Frame, Incoming};
use serde::Serialize;
use tokio::{
    sync::{mpsc, Notify},
    time::Instant,
};
use tracing::warn;

use super::{
    call::{call_target, deadline_of, Ctx, WSBRIDGE_WORKER},
    caller::Caller,
    directory,
    idempotency::IDEMPOTENCY_KEY,
    reply::{json_response, CallBody, Trace},
    request_body::{read_error, RequestBody},
    routes::Target,
    Settings, Shared,
};
use crate::{
    body::{Body, BodyError},
    cluster::presence::Query,
    error::CallError,
    protocol,
};

/// `all`, or `key=value` pairs separated by commas.
pub(super) static FANOUT: HeaderName = HeaderName::from_static("wsbridge-fanout");

/// `none`: a push; the replies are not waited for.
pub(super) static FANOUT_REPLY: HeaderName = HeaderName::from_static("wsbridge-fanout-reply");

const NDJSON: &str = "application/x-ndjson";

/// Results in flight between the calls and the caller: a slow reader holds
/// the calls back (their workers' flow control bounds what waits there).
const LINES_QUEUED: usize = 16;

/// Whether a request asks for a fan-out.
pub(super) fn requested(headers: &http::HeaderMap) -> bool {
    headers.contains_key(&FANOUT)
}

/// What the caller gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One document once every worker answered or the deadline passed.
    Gather,
    /// One line per reply as it arrives, then a summary line.
    Stream,
    /// 202 once the calls are sent; replies dropped.
    Push,
}

/// How far the calls of a fan-out got: sent, or over without being sent.
#[derive(Default)]
struct Progress {
    sent: AtomicUsize,
    settled: AtomicUsize,
    changed: Notify,
}

/// One worker's call of a fan-out, told (through its [`Ctx`]) when its
/// frame goes to the worker or its bridge.
pub(super) struct Sent {
    progress: Arc<Progress>,
    counted: AtomicBool,
}

impl Sent {
    /// The call was handed to its worker (or the worker's bridge).
    pub(super) fn mark(&self) {
        if !self.counted.swap(true, Ordering::Relaxed) {
            self.progress.sent.fetch_add(1, Ordering::AcqRel);
            self.settle();
        }
    }

    /// The call is over; if it was never sent, it counts as settled.
    fn finish(&self) {
        if !self.counted.swap(true, Ordering::Relaxed) {
            self.settle();
        }
    }

    fn settle(&self) {
        self.progress.settled.fetch_add(1, Ordering::AcqRel);
        self.progress.changed.notify_one();
    }
}

/// One worker's result.
#[derive(Serialize)]
struct Row {
    worker_id: String,
    node: String,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_encoding: Option<&'static str>,
    /// The bridge's error, for `error` and `unavailable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<serde_json::Value>,
    ms: u64,
}

/// The counts that end a stream and head a document.
#[derive(Serialize)]
struct Summary {
    expected: usize,
    responded: usize,
    complete: bool,
}

/// A gathered fan-out.
#[derive(Serialize)]
struct Document {
    #[serde(flatten)]
    summary: Summary,
    results: Vec<Row>,
}

/// Reads `all` or `k=v,k2=v2` into the query for `service`.
fn selector(headers: &http::HeaderMap, service: &str) -> Result<Query, CallError> {
    let bad = |reason: &str| CallError::BadRequest {
        reason: format!("Wsbridge-Fanout: {reason}"),
    };
    let mut values = headers.get_all(&FANOUT).iter();
    let value = values.next().ok_or_else(|| bad("missing"))?;
    if values.next().is_some() {
        return Err(bad("give one value"));
    }
    let text = value.to_str().map_err(|_| bad("not ASCII"))?;
    Ok(Query {
        service: Some(service.to_owned()),
        meta: protocol::parse_selector(text).map_err(|e| bad(&e))?,
        ..Query::default()
    })
}

fn mode(headers: &http::HeaderMap) -> Result<Mode, CallError> {
    match headers.get(&FANOUT_REPLY).map(|v| v.as_bytes()) {
        Some(b"none") => return Ok(Mode::Push),
        Some(b"all") | None => {}
        Some(_) => {
            return Err(CallError::BadRequest {
                reason: "Wsbridge-Fanout-Reply: `none` (a push) or `all`".into(),
            })
        }
    }
    let streamed = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with(NDJSON)));
    Ok(if streamed { Mode::Stream } else { Mode::Gather })
}

/// The workers a fan-out for `query` reaches: this bridge's, then (unless
/// `here_only`) the peers' as last announced. A worker is reached by its
/// id: one without an id cannot be (it cannot be addressed), and an id
/// listed twice is called once.
fn reach(shared: &Shared, query: &Query, here_only: bool) -> Vec<(String, String)> {
    let here = directory::node(shared).to_owned();
    let mut seen = HashSet::new();
    let mut list: Vec<(String, String)> = directory::local(&shared.registry, &here, query)
        .into_iter()
        .map(|w| (here.clone(), w.worker_id))
        .collect();
    if let Some(cluster) = shared.cluster.get().filter(|_| !here_only) {
        list.extend(cluster.fanout_targets(query));
    }
    list.retain(|(_, id)| !id.is_empty() && seen.insert(id.clone()));
    list
}

/// What a fan-out owns: it outlives the request's handler when it streams
/// or pushes.
pub(super) struct Owned {
    pub(super) shared: Arc<Shared>,
    pub(super) settings: Arc<Settings>,
    pub(super) caller: Arc<Caller>,
    pub(super) request_id: String,
    pub(super) started: Instant,
}

/// Answers a fan-out request.
pub(super) async fn fanout(
    own: Owned,
    head: Box<Parts>,
    body: Incoming,
    trace: &mut Trace,
) -> Result<Response<CallBody>, CallError> {
    for (other, why) in [
        (&WSBRIDGE_WORKER, "a call for one worker"),
        (
            &IDEMPOTENCY_KEY,
            "an idempotency key (a fan-out's replies are not stored)",
        ),
    ] {
        if head.headers.contains_key(other) {
            return Err(CallError::BadRequest {
                reason: format!("Wsbridge-Fanout cannot be combined with {other} ({why})"),
            });
        }
    }
    let target = own.settings.router.route(head.uri.path())?;
    trace.service = Some(target.service.clone());
    let query = selector(&head.headers, &target.service)?;
    let mode = mode(&head.headers)?;
    let deadline = deadline_of(own.started, target.request_timeout);
    let body = read_whole(body, &target, deadline).await?;
    trace.bytes_in = Some(body.len() as u64);
    let workers = reach(&own.shared, &query, false);
    let limit = own.settings.config.fanout.max_workers;
    if workers.len() > limit {
        return Err(CallError::BadRequest {
            reason: format!(
                "Wsbridge-Fanout matches {} workers, more than fanout.max_workers ({limit}): narrow it with metadata",
                workers.len()
            ),
        });
    }
    let expected = workers.len();
    let budget = own.settings.config.http.max_response_body.bytes();
    let calls = Run {
        pushed: mode == Mode::Push,
        ..Run::new(own, target, head, body, workers)
    };
    let (progress, rx) = calls.launch();
    let resp = match mode {
        Mode::Gather => gathered(expected, rx, budget).await,
        Mode::Stream => {
            wait_sent(expected, &progress, deadline).await;
            streamed(expected, rx)
        }
        Mode::Push => pushed(expected, &progress, deadline).await,
    };
    // `X-Bridge-Attempts` and the access line: the workers sent the call.
    let sent = progress.sent.load(Ordering::Acquire);
    trace.attempts = u32::try_from(sent).unwrap_or(u32::MAX);
    Ok(resp)
}

/// A push from inside the bridge (an ingress): `body` goes to every worker
/// of this bridge that `query` reaches, as a call `head` (every bridge of a
/// cluster runs the same ingress for its own workers). Returns once each
/// call is sent (or failed to be), with how many workers were reached and
/// how many sent; the calls run on, their replies dropped.
pub(super) async fn push(
    own: Owned,
    target: Target,
    query: &Query,
    head: Box<Parts>,
    body: Bytes,
) -> (usize, usize) {
    let deadline = deadline_of(own.started, target.request_timeout);
    let mut workers = reach(&own.shared, query, true);
    let limit = own.settings.config.fanout.max_workers;
    if workers.len() > limit {
        warn!(
            request_id = own.request_id,
            matched = workers.len(),
            "a push matches more workers than fanout.max_workers; the rest are left out"
        );
        workers.truncate(limit);
    }
    let expected = workers.len();
    let calls = Run {
        pushed: true,
        ..Run::new(own, target, head, body, workers)
    };
    let (progress, _) = calls.launch();
    wait_sent(expected, &progress, deadline).await;
    (expected, progress.sent.load(Ordering::Acquire))
}

/// The request body, whole (a fan-out sends it to every worker).
pub(super) async fn read_whole(
    body: Incoming,
    target: &Target,
    deadline: Instant,
) -> Result<Bytes, CallError> {
    let limited = Limited::new(RequestBody::plain(body), target.max_body);
    match tokio::time::timeout_at(deadline, limited.collect()).await {
        Err(_) => Err(CallError::Timeout {
            service: target.service.to_string(),
            after: target.request_timeout,
        }),
        Ok(Err(e)) => Err(read_error(e, target.max_body)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// The calls of one fan-out.
struct Run {
    own: Owned,
    target: Target,
    head: Box<Parts>,
    body: Bytes,
    workers: Vec<(String, String)>,
    progress: Arc<Progress>,
    /// Nobody reads the results: run every call to its end regardless.
    pushed: bool,
}

impl Run {
    /// The calls of `head` and `body` to `workers`, results wanted.
    fn new(
        own: Owned,
        target: Target,
        head: Box<Parts>,
        body: Bytes,
        workers: Vec<(String, String)>,
    ) -> Run {
        Run {
            own,
            target,
            head,
            body,
            workers,
            progress: Arc::default(),
            pushed: false,
        }
    }

    /// Starts the calls in a task of their own, tracked like relayed calls
    /// (a stopping bridge lets them end), since a stream or a push outlives
    /// the request that made it.
    fn launch(self) -> (Arc<Progress>, mpsc::Receiver<Row>) {
        self.own.shared.metrics.fanout(self.workers.len());
        let progress = self.progress.clone();
        let (tx, rx) = mpsc::channel(LINES_QUEUED);
        let tracker = self.own.shared.relayed.clone();
        tracker.spawn(self.all(tx));
        (progress, rx)
    }

    /// Runs every call at once and sends each result on `tx` as it comes;
    /// stops (dropping the calls, which cancels them) if the reader left.
    async fn all(self, tx: mpsc::Sender<Row>) {
        let ctx = Ctx {
            shared: &self.own.shared,
            settings: &self.own.settings,
            caller: &self.own.caller,
            request_id: &self.own.request_id,
            started: self.own.started,
            relayed: None,
            fanout: None,
            job: None,
        };
        let mut calls: FuturesUnordered<_> = self
            .workers
            .iter()
            .map(|(node, id)| self.one(&ctx, node, id))
            .collect();
        loop {
            let row = tokio::select! {
                row = calls.next() => row,
                // The caller hung up: dropping the calls cancels them at
                // their workers. (A push has no caller to wait for.)
                _ = tx.closed(), if !self.pushed => return,
            };
            let Some(row) = row else { return };
            if tx.send(row).await.is_err() && !self.pushed {
                return;
            }
        }
    }

    /// One worker's call, as a result row.
    async fn one(&self, ctx: &Ctx<'_>, node: &str, id: &str) -> Row {
        let sent = Sent {
            progress: self.progress.clone(),
            counted: AtomicBool::new(false),
        };
        let ctx = Ctx {
            fanout: Some(&sent),
            ..*ctx
        };
        let mut trace = Trace::default();
        let outcome = match self.parts_for(id) {
            Ok(parts) => {
                let body = RequestBody::relayed(Body::full(self.body.clone()));
                call_target(&ctx, self.target.clone(), parts, body, &mut trace).await
            }
            Err(e) => Err(e),
        };
        sent.finish();
        let node = trace.node.as_deref().unwrap_or(node).to_owned();
        let mut row = Row {
            worker_id: id.to_owned(),
            node,
            outcome: "ok",
            status: None,
            headers: None,
            body: None,
            body_encoding: None,
            error: None,
            ms: 0,
        };
        match outcome {
            Ok(resp) => self.read_reply(resp, &mut row).await,
            Err(e) => failed(e, &mut row, ctx.request_id),
        }
        row.ms = u64::try_from(self.own.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        row
    }

    /// A request head for the call to worker `id`: the caller's, naming it.
    fn parts_for(&self, id: &str) -> Result<Box<Parts>, CallError> {
        let mut req = http::Request::builder()
            .method(self.head.method.clone())
            .uri(self.head.uri.clone())
            .version(self.head.version)
            .body(())
            .map_err(|e| CallError::BadRequest {
                reason: e.to_string(),
            })?;
        *req.headers_mut() = self.head.headers.clone();
        let value = HeaderValue::from_str(id).map_err(|_| CallError::BadRequest {
            reason: format!("worker id {id:?} cannot be a header value"),
        })?;
        req.headers_mut().insert(WSBRIDGE_WORKER.clone(), value);
        Ok(Box::new(req.into_parts().0))
    }

    /// Reads a reply into `row`, up to `fanout.max_reply` and the deadline.
    async fn read_reply(&self, resp: Response<CallBody>, row: &mut Row) {
        let (head, body) = resp.into_parts();
        row.status = Some(head.status.as_u16());
        row.headers = Some(header_map(&head.headers));
        let config = &self.own.settings.config;
        let cap = config
            .fanout
            .max_reply
            .min(config.http.max_response_body)
            .bytes();
        let deadline = deadline_of(self.own.started, self.target.request_timeout);
        match tokio::time::timeout_at(deadline, Limited::new(body, cap).collect()).await {
            Err(_) => row.outcome = "timeout",
            Ok(Err(e)) if e.is::<LengthLimitError>() => row.outcome = "too_large",
            Ok(Err(e)) => {
                row.outcome = "error";
                row.error =
                    Some(serde_json::json!({"code": "worker_lost", "message": e.to_string()}));
            }
            Ok(Ok(collected)) => {
                let bytes = collected.to_bytes();
                match std::str::from_utf8(&bytes) {
                    Ok(text) => row.body = Some(text.to_owned()),
                    Err(_) => {
                        row.body = Some(base64::engine::general_purpose::STANDARD.encode(&bytes));
                        row.body_encoding = Some("base64");
                    }
                }
            }
        }
    }
}

/// A call that got no reply, as its row.
fn failed(e: CallError, row: &mut Row, request_id: &str) {
    row.outcome = match e {
        CallError::Timeout { .. } => "timeout",
        CallError::UnknownWorker { .. }
        | CallError::NoWorker { .. }
        | CallError::QueueFull { .. }
        | CallError::ClusterUnavailable { .. } => "unavailable",
        CallError::BodyTooLarge { .. } => "too_large",
        _ => "error",
    };
    row.status = Some(e.status().as_u16());
    row.error = Some(serde_json::json!({
        "code": e.code(),
        "message": e.to_string(),
        "request_id": request_id,
    }));
}

/// Response headers as one string per name (repeated ones joined by ", ").
fn header_map(headers: &http::HeaderMap) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let text = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&text);
            })
            .or_insert_with(|| text.into_owned());
    }
    map
}

/// Every result in one document, the replies' bodies together bounded by
/// `http.max_response_body` (beyond it, results say `too_large`).
async fn gathered(
    expected: usize,
    mut rx: mpsc::Receiver<Row>,
    mut budget: usize,
) -> Response<CallBody> {
    let mut results = Vec::with_capacity(expected);
    while let Some(mut row) = rx.recv().await {
        let size = row.body.as_ref().map_or(0, String::len);
        if size > budget {
            row.outcome = "too_large";
            row.body = None;
            row.body_encoding = None;
        } else {
            budget -= size;
        }
        results.push(row);
    }
    let responded = results.iter().filter(|r| r.outcome == "ok").count();
    let doc = Document {
        summary: Summary {
            expected,
            responded,
            complete: responded == expected,
        },
        results,
    };
    let json = serde_json::to_vec(&doc).unwrap_or_default();
    json_response(StatusCode::OK, "application/json", Body::full(json))
}

/// One line per result as it comes, then the summary line.
fn streamed(expected: usize, rx: mpsc::Receiver<Row>) -> Response<CallBody> {
    let lines = Lines {
        rx,
        expected,
        responded: 0,
        done: false,
    };
    json_response(StatusCode::OK, NDJSON, Body::wrap(lines))
}

/// 202 once every call is sent (or failed to be), or at the deadline.
async fn pushed(expected: usize, progress: &Progress, deadline: Instant) -> Response<CallBody> {
    wait_sent(expected, progress, deadline).await;
    let sent = progress.sent.load(Ordering::Acquire);
    let json = serde_json::json!({"expected": expected, "sent": sent}).to_string();
    json_response(StatusCode::ACCEPTED, "application/json", Body::full(json))
}

/// Until every call is sent or over, or the deadline.
async fn wait_sent(expected: usize, progress: &Progress, deadline: Instant) {
    loop {
        let waited = progress.changed.notified();
        if progress.settled.load(Ordering::Acquire) >= expected || Instant::now() >= deadline {
            return;
        }
        let _ = tokio::time::timeout_at(deadline, waited).await;
    }
}

/// The ndjson body: results as they arrive, then the summary.
struct Lines {
    rx: mpsc::Receiver<Row>,
    expected: usize,
    responded: usize,
    done: bool,
}

impl HttpBody for Lines {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let line = match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(row) => {
                self.responded += usize::from(row.outcome == "ok");
                serde_json::to_vec(&row)
            }
            None => {
                self.done = true;
                serde_json::to_vec(&Summary {
                    expected: self.expected,
                    responded: self.responded,
                    complete: self.responded == self.expected,
                })
            }
        };
        let mut line = line.unwrap_or_default();
        line.push(b'\n');
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
