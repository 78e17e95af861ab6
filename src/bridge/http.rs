//! One caller request, from its head to its response: the request id, the
//! refusals (`allow_from`, conformance), then the call (`call.rs`), which
//! sends the request to a worker as a frame and waits (event-driven) for
//! the reply with the same id; its outcome becomes the response, with the
//! request id and `X-Bridge-Attempts`. The listener that feeds it requests
//! is `listener.rs`; a call with an `Idempotency-Key` goes through `keyed.rs`.

use std::{convert::Infallible, future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use http::{header, request::Parts, HeaderName, HeaderValue, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::info;

use super::{
    call::{call, Ctx},
    caller::{Caller, OpenCall},
    conformance, fanout,
    idempotency::IDEMPOTENCY_KEY,
    jobs,
    keyed::keyed,
    reply::{lock, AccessLog, CallBody},
    request_body::RequestBody,
    reserved,
    session::EmptyReplyLength,
    Shared,
};
use crate::{body::Body, error::CallError};

/// The header carrying the request id both ways.
pub(crate) static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// On every response: how many workers the call was sent to (0 when none
/// was, as for a refusal before dispatch or a replay; more than 1 when a
/// worker vanished and the call was retried).
pub(crate) static ATTEMPTS: HeaderName = HeaderName::from_static("x-bridge-attempts");

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
    let mut log = AccessLog::begin(
        shared.clone(),
        request_id(&head.headers),
        head.method.clone(),
        head.uri.path().to_owned(),
        started,
        OpenCall::begin(&caller),
    );
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
        relayed: None,
        fanout: None,
        job: None,
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
    // What a fan-out or a job owns: they outlive this handler.
    let own = || fanout::Owned {
        shared: shared.clone(),
        settings: settings.clone(),
        caller: caller.clone(),
        request_id: request_id.clone(),
        started,
    };
    // A job, when there is a store to keep it; without one the preference
    // is ignored (RFC 7240 allows it).
    let job = shared
        .jobs
        .get()
        .cloned()
        .zip(jobs::requested(&head.headers));
    let exchange: Pin<Box<dyn Future<Output = _> + Send + '_>> =
        match (refused, token_header(&head.headers, &IDEMPOTENCY_KEY), job) {
            (Err(err), _, _) => Box::pin(std::future::ready(Err(err))),
            // The bridge's own paths never reach a worker.
            (Ok(()), _, _) if reserved::is_reserved(head.uri.path()) => {
                Box::pin(async { reserved::answer(&ctx, &head).await })
            }
            (Ok(()), _, _) if fanout::requested(&head.headers) => {
                Box::pin(fanout::fanout(own(), head, body, trace))
            }
            (Ok(()), _, Some((jobs, prefer))) => {
                Box::pin(jobs::submit(own(), jobs, prefer, head, body, trace))
            }
            (Ok(()), Some(key), None) => Box::pin(keyed(&ctx, head, body, trace, key)),
            (Ok(()), None, None) => Box::pin(call(&ctx, head, RequestBody::plain(body), trace)),
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

/// Header `name` if it is a sane token: 1 to 128 visible ASCII characters.
pub(super) fn token_header(headers: &http::HeaderMap, name: &HeaderName) -> Option<String> {
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
