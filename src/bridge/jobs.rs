//! The HTTP side of asynchronous calls: a call with `Prefer:
//! respond-async` becomes a job (stored durably, then `202 Accepted` with
//! `Location: /_wsbridge/jobs/<id>`), and `/_wsbridge/jobs/<id>` answers
//! its state, its `/result`, and `DELETE`. Anyone `http.allow_from` lets
//! call may read a job whose id they know; ids are 128 random bits, so
//! knowing one is the credential. `job_run.rs` runs the jobs.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, request::Parts, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::io::ReaderStream;

use super::{
    call::{deadline_of, idempotent, target_worker, WSBRIDGE_WORKER_WAIT},
    fanout::{read_whole, Owned},
    http::token_header,
    idempotency::IDEMPOTENCY_KEY,
    job_run::{self, Jobs},
    keyed::scoped_key,
    reply::{json_response, CallBody, Trace},
    reserved::PREFIX,
    Shared,
};
use crate::{
    body::Body,
    error::CallError,
    jobs::{new_id, now_ms, record::Header, Backend, Record, ResultBody, State, StoreError},
};

/// Where jobs are found: `/_wsbridge/jobs/<id>`.
pub(super) const JOBS_PATH: &str = "/_wsbridge/jobs/";

/// Where to POST the result when the job ends.
static CALLBACK: HeaderName = HeaderName::from_static("wsbridge-callback");

/// The longest `?wait=` (and the `wait=` of `Prefer`) honoured: below
/// the 60 s that proxies commonly allow a response.
const MAX_WAIT: Duration = Duration::from_secs(50);

/// What `Prefer` asks for (RFC 7240).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Prefer {
    /// `wait=N`: a reply ready within N seconds is answered as usual.
    wait: Option<Duration>,
}

/// `Some` when `Prefer` holds `respond-async`; its `wait`, if any.
pub(super) fn requested(headers: &http::HeaderMap) -> Option<Prefer> {
    let mut respond_async = false;
    let mut wait = None;
    for value in headers.get_all(header::HeaderName::from_static("prefer")) {
        let Ok(text) = value.to_str() else { continue };
        for pref in text.split(',') {
            // Parameters after `;` do not matter for these two.
            let token = pref.split(';').next().unwrap_or("").trim();
            let (name, arg) = match token.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (token, None),
            };
            if name.eq_ignore_ascii_case("respond-async") {
                respond_async = true;
            } else if name.eq_ignore_ascii_case("wait") && wait.is_none() {
                // The first occurrence of a preference wins (RFC 7240 2).
                wait = arg
                    .and_then(|a| a.parse::<u64>().ok())
                    .map(Duration::from_secs);
            }
        }
    }
    respond_async.then_some(Prefer { wait })
}

fn unavailable(e: StoreError) -> CallError {
    match e {
        StoreError::Full { limit } => CallError::JobsFull { limit },
        other => CallError::JobsUnavailable {
            reason: other.to_string(),
        },
    }
}

/// Submits a call as a job; see the module doc.
pub(super) async fn submit(
    own: Owned,
    jobs: Arc<Jobs>,
    prefer: Prefer,
    head: Box<Parts>,
    body: Incoming,
    trace: &mut Trace,
) -> Result<Response<CallBody>, CallError> {
    let target = own.settings.router.route(head.uri.path())?;
    trace.service = Some(target.service.clone());
    let jobs_config = &own.settings.config.jobs;
    let callback = callback(&head.headers, &jobs_config.callback_allow)?;
    let worker = target_worker(&head.headers)?;
    let deadline = deadline_of(own.started, target.request_timeout);
    let body = read_whole(body, &target, deadline).await?;
    trace.bytes_in = Some(body.len() as u64);
    let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let fingerprint = fingerprint(&head.method, path, &body);
    // A key as calls take it (1 to 128 visible ASCII characters); any
    // other value is no key.
    let key = token_header(&head.headers, &IDEMPOTENCY_KEY).map(|k| {
        let scoped = scoped_key(&k, head.headers.get(header::AUTHORIZATION));
        format!("{} {scoped}", target.service)
    });
    let id = new_id().map_err(unavailable)?;
    // One keyed submission at a time on this bridge: the lookup and the
    // insert are one. (In a cluster the key is taken atomically too.)
    let _serial = match &key {
        Some(key) => Some(jobs.keyed(key).lock().await),
        None => None,
    };
    // The job a key names already, on this bridge (in a cluster, the
    // store takes the key atomically as it inserts, below).
    if let (Some(key), Backend::Local(store)) = (&key, &jobs.store) {
        let held = match store.by_key(key).await.map_err(unavailable)? {
            Some(held) => store.get(&held).await.map_err(unavailable)?,
            None => None,
        };
        if let Some(record) = held {
            drop(_serial);
            return same_job(
                &own.shared,
                &jobs,
                record,
                &fingerprint,
                &head,
                prefer,
                &target,
            )
            .await;
        }
    }
    let mut headers = Header::lines(&head.headers);
    headers.retain(|h| {
        !h.name.eq_ignore_ascii_case("prefer")
            && !h.name.eq_ignore_ascii_case(CALLBACK.as_str())
            && !h.name.eq_ignore_ascii_case(WSBRIDGE_WORKER_WAIT.as_str())
    });
    if worker.is_some() {
        // A job for one worker waits for it to connect (until it expires).
        headers.push(Header::new(WSBRIDGE_WORKER_WAIT.as_str(), b"true"));
    }
    let now = now_ms();
    let queue_ms = u64::try_from(jobs_config.queue_timeout.as_millis()).unwrap_or(u64::MAX);
    let record = Record {
        id,
        state: State::Queued,
        request_id: own.request_id.clone(),
        caller: own.caller.ip.to_string(),
        service: target.service.to_string(),
        method: head.method.as_str().to_owned(),
        path: path.to_owned(),
        headers,
        worker: worker.map(String::from),
        replayable: idempotent(&head.method) || key.is_some(),
        callback,
        key,
        fingerprint: Some(fingerprint.clone()),
        body_len: body.len() as u64,
        body_spooled: body.len() > crate::jobs::store::SPOOL_OVER,
        created_ms: now,
        queue_deadline_ms: now.saturating_add(queue_ms),
        started_ms: None,
        finished_ms: None,
        attempts: 0,
        ran_by: None,
        node: None,
        outcome: None,
        error: None,
        owner: None,
        lease_ms: 0,
        callback_delivered: false,
        callback_attempts: 0,
    };
    match &jobs.store {
        Backend::Local(store) => {
            if jobs.live() >= jobs_config.max_live {
                return Err(CallError::JobsBusy {
                    limit: jobs_config.max_live,
                });
            }
            store.insert(&record, body).await.map_err(unavailable)?;
            job_run::start(&own.shared, &jobs, store, record.clone());
        }
        // A bridge of the cluster pulls it from the stream.
        Backend::Stream(stream) => {
            if let Some(held) = stream.insert(&record, body).await.map_err(unavailable)? {
                drop(_serial);
                return same_job(
                    &own.shared,
                    &jobs,
                    held,
                    &fingerprint,
                    &head,
                    prefer,
                    &target,
                )
                .await;
            }
        }
    }
    drop(_serial);
    own.shared.metrics.job_submitted();
    answer_submitted(&own.shared, &jobs, record, prefer, &target).await
}

/// A submission whose idempotency key names `record` already: that job,
/// if the request is the one the key was first used for.
async fn same_job(
    shared: &Shared,
    jobs: &Jobs,
    record: Record,
    fingerprint: &str,
    head: &Parts,
    prefer: Prefer,
    target: &super::routes::Target,
) -> Result<Response<CallBody>, CallError> {
    if record.fingerprint.as_deref() != Some(fingerprint) {
        return Err(CallError::IdempotencyKeyMismatch {
            key: token_header(&head.headers, &IDEMPOTENCY_KEY).unwrap_or_default(),
            differs: "method, path or body",
        });
    }
    answer_submitted(shared, jobs, record, prefer, target).await
}

/// The answer to a submission: the result if it is ready within `wait`,
/// else 202 with where to follow the job.
async fn answer_submitted(
    shared: &Shared,
    jobs: &Jobs,
    record: Record,
    prefer: Prefer,
    target: &super::routes::Target,
) -> Result<Response<CallBody>, CallError> {
    let mut record = record;
    if let Some(wait) = prefer.wait.filter(|w| !w.is_zero()) {
        let wait = wait.min(target.request_timeout);
        record = settled(jobs, record, wait).await?;
        if record.state.finished() {
            return result(shared, jobs, &record).await;
        }
    }
    let mut resp = document(shared, &record, StatusCode::ACCEPTED);
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("{JOBS_PATH}{}", record.id)) {
        headers.insert(header::LOCATION, v);
    }
    headers.insert(
        HeaderName::from_static("preference-applied"),
        HeaderValue::from_static("respond-async"),
    );
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Ok(resp)
}

/// The job's record once it has ended, or after `wait` (whichever is
/// first).
async fn settled(jobs: &Jobs, record: Record, wait: Duration) -> Result<Record, CallError> {
    awaited(jobs, record, wait, State::finished).await
}

/// The job's record once its state differs from `record`'s, or after
/// `wait`.
async fn changed(jobs: &Jobs, record: Record, wait: Duration) -> Result<Record, CallError> {
    let from = record.state;
    awaited(jobs, record, wait, move |s| s != from || s.finished()).await
}

/// The job's record once `until` holds for its state, or after `wait`,
/// read again from the store. Event-driven: the runner's signal on this
/// bridge; in a cluster, a watch on the job's key (the runner may be
/// another bridge).
async fn awaited(
    jobs: &Jobs,
    record: Record,
    wait: Duration,
    until: impl Fn(State) -> bool,
) -> Result<Record, CallError> {
    if until(record.state) || wait.is_zero() {
        return Ok(record);
    }
    match &jobs.store {
        Backend::Local(_) => {
            if let Some(mut rx) = jobs.watch(&record.id) {
                let _ = tokio::time::timeout(wait, rx.wait_for(|s| until(*s))).await;
            }
        }
        Backend::Stream(stream) => {
            use futures_util::StreamExt;
            let mut changes = stream.watch(&record.id).await.map_err(unavailable)?;
            let watched = async {
                while let Some(Ok(entry)) = changes.next().await {
                    let state = serde_json::from_slice::<Record>(&entry.value).map(|r| r.state);
                    // A purged job ends the wait too.
                    if state.is_ok_and(&until) || entry.value.is_empty() {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(wait, watched).await;
        }
    }
    Ok(jobs
        .store
        .get(&record.id)
        .await
        .map_err(unavailable)?
        .unwrap_or(record))
}

/// Hex SHA-256 of what an idempotency key binds: method, path, body.
fn fingerprint(method: &Method, path: &str, body: &[u8]) -> String {
    let mut sha = Sha256::new();
    sha.update(method.as_str().as_bytes());
    sha.update(b"\n");
    sha.update(path.as_bytes());
    sha.update(b"\n");
    sha.update(body);
    sha.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The `Wsbridge-Callback` URL, if any and allowed.
fn callback(headers: &http::HeaderMap, allow: &[String]) -> Result<Option<String>, CallError> {
    let Some(value) = headers.get(&CALLBACK) else {
        return Ok(None);
    };
    let url = value.to_str().map_err(|_| CallError::BadRequest {
        reason: "Wsbridge-Callback: not ASCII".into(),
    })?;
    let parsed: http::Uri = url.parse().map_err(|_| CallError::BadRequest {
        reason: "Wsbridge-Callback: not a URL".into(),
    })?;
    if !allow.iter().any(|prefix| allows(prefix, &parsed)) {
        return Err(CallError::CallbackNotAllowed {
            url: url.to_owned(),
        });
    }
    Ok(Some(url.to_owned()))
}

/// Whether `url` is under the allowed `prefix`: the same scheme, host and
/// port exactly, and a path that starts with the prefix's. A URL with
/// user information (`https://allowed@elsewhere/`) never is.
fn allows(prefix: &str, url: &http::Uri) -> bool {
    let Ok(prefix) = prefix.parse::<http::Uri>() else {
        return false;
    };
    let port = |u: &http::Uri| {
        u.port_u16().unwrap_or(if u.scheme_str() == Some("https") {
            443
        } else {
            80
        })
    };
    let userinfo = url.authority().is_some_and(|a| a.as_str().contains('@'));
    matches!(url.scheme_str(), Some("http" | "https"))
        && !userinfo
        && url.scheme_str() == prefix.scheme_str()
        && url.host().is_some_and(|h| Some(h) == prefix.host())
        && port(url) == port(&prefix)
        && url.path().starts_with(prefix.path())
}

fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime_serde::re::humantime::format_rfc3339_millis(t).to_string()
}

/// The job as JSON.
fn document(shared: &Shared, record: &Record, status: StatusCode) -> Response<CallBody> {
    let retention = shared.settings.load().config.jobs.retention;
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let mut doc = json!({
        "id": record.id,
        "state": record.state.as_str(),
        "service": record.service,
        "method": record.method,
        "path": record.path,
        "request_id": record.request_id,
        "created_at": rfc3339(record.created_ms),
        "attempts": record.attempts,
        "location": format!("{JOBS_PATH}{}", record.id),
    });
    let fields = [
        ("worker", record.worker.clone().map(Into::into)),
        ("ran_by", record.ran_by.clone().map(Into::into)),
        ("node", record.node.clone().map(Into::into)),
        ("started_at", record.started_ms.map(|t| rfc3339(t).into())),
        ("finished_at", record.finished_ms.map(|t| rfc3339(t).into())),
        (
            "expires_at",
            Some(
                rfc3339(match record.purge_at(retention_ms) {
                    Some(purge) => purge,
                    None => record.queue_deadline_ms,
                })
                .into(),
            ),
        ),
        (
            "status",
            record.outcome.as_ref().map(|o| o.status.into()),
        ),
        (
            "error",
            record
                .error
                .as_ref()
                .map(|e| json!({"code": e.code, "message": e.message})),
        ),
        (
            "result",
            record
                .state
                .finished()
                .then(|| format!("{JOBS_PATH}{}/result", record.id).into()),
        ),
        (
            "callback",
            record.callback.as_ref().map(|_| {
                json!({"delivered": record.callback_delivered, "attempts": record.callback_attempts})
            }),
        ),
    ];
    if let Some(map) = doc.as_object_mut() {
        for (name, value) in fields {
            if let Some(value) = value {
                map.insert(name.to_owned(), value);
            }
        }
    }
    json_response(status, "application/json", Body::full(doc.to_string()))
}

/// A job without a reply: its status and the error JSON a call would
/// have got, naming the job.
pub(super) fn error_body(record: &Record) -> (u16, Bytes) {
    let (status, code, message) = match &record.error {
        Some(e) => (e.status, e.code.as_str(), e.message.as_str()),
        None => (500, "job_failed", "the job has no result"),
    };
    let body = json!({"error": {
        "code": code,
        "message": message,
        "request_id": record.request_id,
        "job_id": record.id,
    }});
    (status, Bytes::from(body.to_string()))
}

/// A finished job's result: the worker's status, headers and body
/// (streamed from its file when spooled), or the bridge's error.
async fn result(
    shared: &Shared,
    jobs: &Jobs,
    record: &Record,
) -> Result<Response<CallBody>, CallError> {
    let _ = shared;
    let (status, headers, body) = match (&record.outcome, record.state) {
        (Some(outcome), State::Succeeded) => {
            let body = match jobs.store.result(record).await.map_err(unavailable)? {
                ResultBody::Inline(bytes) => Body::full(bytes),
                ResultBody::File(path) => {
                    let file = tokio::fs::File::open(&path).await.map_err(|e| {
                        CallError::JobsUnavailable {
                            reason: format!("the result file cannot be read: {e}"),
                        }
                    })?;
                    let frames = futures_util::StreamExt::map(ReaderStream::new(file), |chunk| {
                        chunk.map(Frame::data)
                    });
                    Body::wrap(StreamBody::new(frames))
                }
                ResultBody::Object(object) => {
                    let frames = futures_util::StreamExt::map(ReaderStream::new(object), |chunk| {
                        chunk.map(Frame::data)
                    });
                    Body::wrap(StreamBody::new(frames))
                }
            };
            let mut headers = Header::map(&outcome.headers);
            // A body streamed from a file or an object still says how long
            // it is.
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(outcome.len));
            (outcome.status, headers, body)
        }
        _ => {
            let (status, body) = error_body(record);
            let mut headers = http::HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            (status, headers, Body::full(body))
        }
    };
    let mut resp = Response::new(CallBody {
        body,
        _call: None,
        log: None,
    });
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = headers;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("{JOBS_PATH}{}", record.id)) {
        h.insert(header::CONTENT_LOCATION, v);
    }
    h.insert(
        HeaderName::from_static("wsbridge-job-state"),
        HeaderValue::from_static(record.state.as_str()),
    );
    Ok(resp)
}

/// `?wait=N` (seconds, capped at [`MAX_WAIT`]); other parameters are 400.
fn wait_param(query: Option<&str>) -> Result<Duration, CallError> {
    let mut wait = Duration::ZERO;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "wait" => {
                let secs: u64 = v.parse().map_err(|_| CallError::BadRequest {
                    reason: format!("wait={v:?}: a number of seconds"),
                })?;
                wait = Duration::from_secs(secs).min(MAX_WAIT);
            }
            other => {
                return Err(CallError::BadRequest {
                    reason: format!("unknown parameter {other:?} (only `wait`)"),
                })
            }
        }
    }
    Ok(wait)
}

/// Answers `/_wsbridge/jobs/<id>` and `/_wsbridge/jobs/<id>/result`.
pub(super) async fn endpoint(
    shared: &Shared,
    jobs: Option<&Arc<Jobs>>,
    head: &Parts,
) -> Result<Response<CallBody>, CallError> {
    let path = head.uri.path();
    let rest = path.strip_prefix(JOBS_PATH).unwrap_or("");
    let (id, is_result) = match rest.strip_suffix("/result") {
        Some(id) => (id, true),
        None => (rest, false),
    };
    let not_found = || CallError::JobNotFound { id: id.to_owned() };
    // Without a store there are no jobs; an id of another form was never one.
    let Some(jobs) = jobs else {
        return Err(not_found());
    };
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    let allowed = if is_result {
        "GET, HEAD"
    } else {
        "GET, HEAD, DELETE"
    };
    let method = &head.method;
    if !(method == Method::GET
        || method == Method::HEAD
        || (method == Method::DELETE && !is_result))
    {
        return Err(CallError::EndpointMethod {
            path: format!("{JOBS_PATH}<id>{}", if is_result { "/result" } else { "" }),
            allowed,
        });
    }
    let wait = wait_param(head.uri.query())?;
    let record = find(shared, jobs, id).await?.ok_or_else(not_found)?;
    if method == Method::DELETE {
        return delete(shared, jobs, record).await;
    }
    if is_result {
        let record = settled(jobs, record, wait).await?;
        if !record.state.finished() {
            let mut resp = document(shared, &record, StatusCode::ACCEPTED);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Ok(resp);
        }
        return result(shared, jobs, &record).await;
    }
    let record = changed(jobs, record, wait).await?;
    Ok(document(shared, &record, StatusCode::OK))
}

/// A job that is still retained.
async fn find(shared: &Shared, jobs: &Jobs, id: &str) -> Result<Option<Record>, CallError> {
    let record = jobs.store.get(id).await.map_err(unavailable)?;
    let retention = shared.settings.load().config.jobs.retention;
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    // Past its retention a job is gone, even before the sweeper purges it.
    Ok(record.filter(|r| r.purge_at(retention_ms).is_none_or(|at| now_ms() < at)))
}

/// `DELETE`: cancels a live job (the cancel reaches its worker) and
/// answers its final state; purges a finished one (204).
async fn delete(
    shared: &Shared,
    jobs: &Jobs,
    record: Record,
) -> Result<Response<CallBody>, CallError> {
    if record.state.finished() {
        jobs.store.purge(&record.id).await.map_err(unavailable)?;
        let mut resp = Response::new(CallBody {
            body: Body::empty(),
            _call: None,
            log: None,
        });
        *resp.status_mut() = StatusCode::NO_CONTENT;
        return Ok(resp);
    }
    if !jobs.cancel(&record.id) {
        if let Backend::Stream(stream) = &jobs.store {
            if record.state == State::Queued {
                // Not pulled (or waiting in the stream): it ends here; the
                // bridge that pulls it next finds it ended.
                let mut ended = record.clone();
                ended.state = State::Cancelled;
                ended.finished_ms = Some(now_ms());
                ended.error = Some(crate::jobs::JobError {
                    status: 409,
                    code: "job_cancelled".into(),
                    message: "the job was cancelled (DELETE)".into(),
                });
                stream.end_unheld(&ended).await.map_err(unavailable)?;
            }
            // Running at another bridge: it is told.
            stream.cancel(&record.id).await.map_err(unavailable)?;
        }
    }
    let record = settled(jobs, record, Duration::from_secs(5)).await?;
    Ok(document(shared, &record, StatusCode::OK))
}

/// Whether a reserved path is a job's.
pub(super) fn is_jobs_path(path: &str) -> bool {
    path.starts_with(JOBS_PATH) && path.len() > JOBS_PATH.len() && path.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callback_must_be_under_an_allowed_prefix_exactly() {
        let ok = |prefix: &str, url: &str| allows(prefix, &url.parse().expect("url"));
        assert!(ok(
            "https://app.internal/hooks/",
            "https://app.internal/hooks/job?x=1"
        ));
        assert!(ok("https://app.internal", "https://app.internal:443/x"));
        assert!(!ok(
            "https://app.internal",
            "https://app.internal.evil.tld/x"
        ));
        assert!(!ok(
            "https://app.internal",
            "https://app.internal@10.0.0.5/x"
        ));
        assert!(!ok("https://app.internal", "http://app.internal/x"));
        assert!(!ok("https://app.internal", "https://app.internal:8443/x"));
        assert!(!ok(
            "https://app.internal/hooks/",
            "https://app.internal/other"
        ));
    }

    #[test]
    fn prefer_takes_respond_async_and_the_first_wait() {
        let prefer = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("prefer", HeaderValue::from_str(v).expect("value"));
            requested(&h)
        };
        assert_eq!(prefer("respond-async"), Some(Prefer { wait: None }));
        assert_eq!(
            prefer("Respond-Async, wait=10, wait=20"),
            Some(Prefer {
                wait: Some(Duration::from_secs(10))
            })
        );
        assert_eq!(prefer("return=minimal"), None);
        assert_eq!(
            prefer("respond-async; foo=bar, wait=\"5\""),
            Some(Prefer {
                wait: Some(Duration::from_secs(5))
            })
        );
    }
}
