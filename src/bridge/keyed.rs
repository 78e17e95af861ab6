//! Calls that carry an `Idempotency-Key`: the wrapper around `call()` that
//! replays a stored response, waits for a running first call, or runs the
//! call and stores its whole response ([`keyed`]); the key's scope
//! ([`scoped_key`]). The body is hashed as it streams past
//! (`request_body.rs`), so the key binds it without keeping it. The store
//! itself is `idempotency.rs`.

use http::{header, request::Parts, HeaderName, HeaderValue, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use super::{
    call::{call, deadline_of, Ctx},
    idempotency::{Begin, BodyDigest, BodySeal, Stored},
    reply::{CallBody, Trace},
    request_body::{read_error, RequestBody},
};
use crate::{body::Body, error::CallError};

/// On a response served from the idempotency store rather than a worker.
static REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The key an `Idempotency-Key` is stored under: the caller's key, scoped by
/// the SHA-256 of its `Authorization` header when it sends one (the IETF
/// draft's "scoped per client"). Callers that authenticate as someone else
/// then have keys of their own, so no caller is ever handed a response that
/// was made for another one's credentials, whatever key it guesses.
pub(super) fn scoped_key(key: &str, authorization: Option<&HeaderValue>) -> String {
    let Some(auth) = authorization else {
        return key.to_owned();
    };
    let digest = super::credentials::sha256(auth.as_bytes());
    let mut scoped = String::with_capacity(key.len() + 33);
    scoped.push_str(key);
    // A space cannot occur in a key (visible ASCII only), so no key can
    // pose as another key's scoped form.
    scoped.push(' ');
    for b in &digest[..16] {
        scoped.push_str(&format!("{b:02x}"));
    }
    scoped
}

/// A call with an idempotency key: the stored response if there is one, the
/// running first call's if there is one (after waiting for it), else the
/// call itself, whose whole response is then stored. A key used before for
/// another request (method, path with query, or body) is refused with 422;
/// one whose first call ran but could not be stored, with 409.
pub(super) async fn keyed(
    ctx: &Ctx<'_>,
    head: Box<Parts>,
    body: Incoming,
    trace: &mut Trace,
    key: String,
) -> Result<Response<CallBody>, CallError> {
    let (shared, request_id) = (ctx.shared, ctx.request_id);
    // Keys are per service; a path without a route fails in `call`.
    let Some(target) = ctx.settings.router.resolve(head.uri.path()).cloned() else {
        return call(ctx, head, RequestBody::plain(body), trace).await;
    };
    let deadline = deadline_of(ctx.started, target.request_timeout);
    let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let mismatch = |differs| CallError::IdempotencyKeyMismatch {
        key: key.clone(),
        differs,
    };
    // Counted under its service even when it only waits or replays.
    trace.route(shared, &target.service);
    let scoped = scoped_key(&key, head.headers.get(header::AUTHORIZATION));
    loop {
        match shared
            .idempotency
            .begin(&target.service, &scoped, &head.method, path)
        {
            Begin::Mismatch => return Err(mismatch("method or path")),
            Begin::Kept(kept) => {
                // The body is read (and hashed, not kept) only to compare it.
                if let Some(first) = kept.fingerprint.body {
                    let (digest, read) =
                        body_digest(body, target.max_body, deadline, || CallError::Timeout {
                            service: target.service.to_string(),
                            after: target.request_timeout,
                        })
                        .await?;
                    trace.bytes_in = Some(read);
                    if digest != first {
                        return Err(mismatch("body"));
                    }
                }
                let Some(stored) = &kept.response else {
                    return Err(CallError::IdempotencyKeyNotReplayable { key });
                };
                debug!(%request_id, %key, "replaying the stored response");
                let mut resp = Response::new(CallBody {
                    body: Body::full(stored.body.clone()),
                    _call: None,
                    log: None,
                });
                *resp.status_mut() = stored.status;
                *resp.headers_mut() = stored.headers.clone();
                resp.headers_mut()
                    .insert(REPLAYED.clone(), HeaderValue::from_static("true"));
                return Ok(resp);
            }
            Begin::Wait(mut running) => {
                // Wakes when the first call ends, either way; then look again.
                if tokio::time::timeout_at(deadline, running.changed())
                    .await
                    .is_err()
                {
                    return Err(CallError::Timeout {
                        service: target.service.to_string(),
                        after: target.request_timeout,
                    });
                }
            }
            Begin::Lead(ticket) => {
                let seal = BodySeal::default();
                let body = RequestBody::hashed(body, &seal);
                // A failure of the bridge's own returns here: the ticket
                // drops and frees the key.
                let resp = call(ctx, head, body, trace).await?;
                // Only a whole response can be stored; a streamed one is
                // passed on and the key keeps a tombstone.
                let whole = resp.body().body.as_full().map(|body| Stored {
                    status: resp.status(),
                    headers: resp.headers().clone(),
                    body: body.clone(),
                });
                ticket.complete(whole, seal.digest());
                return Ok(resp);
            }
        }
    }
}

/// Reads a repeat's body to its end (at most `limit` bytes, by `deadline`)
/// for its digest and length; the bytes themselves are dropped as they come.
async fn body_digest(
    body: Incoming,
    limit: usize,
    deadline: Instant,
    timeout: impl Fn() -> CallError,
) -> Result<(BodyDigest, u64), CallError> {
    let seal = BodySeal::default();
    let mut body = Limited::new(RequestBody::hashed(body, &seal), limit);
    let mut read = 0;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(timeout()),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(read_error(e, limit)),
            Ok(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
        }
    }
    let digest = seal.digest().ok_or_else(|| CallError::BadRequest {
        reason: "the request body ended early".into(),
    })?;
    Ok((digest, read))
}
