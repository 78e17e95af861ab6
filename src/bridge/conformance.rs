//! What a caller's request head must be before the bridge forwards it, as
//! HTTP requires of a server and as a reverse proxy such as nginx enforces:
//! one unambiguous `Host`, no `CONNECT`, and at most [`MAX_HEADERS`]
//! header lines.
//!
//! An ambiguous `Host` is refused rather than guessed at: a worker that
//! routes or caches by host would otherwise see a different host from a
//! cache or proxy in front of the bridge that picked the other one.

use http::{header, request::Parts, Method, Version};

use crate::error::CallError;

/// The most header lines a request may have (as Envoy's
/// `max_headers_count`); more get a JSON 431 `headers_too_large`.
///
/// Over HTTP/1 hyper's parser stops at the same number, 100, and answers
/// 431 itself, without the JSON body (it writes that response in
/// `on_parse_error`, with no hook). Raising its limit
/// (`http1::Builder::max_headers`) would let this check answer instead,
/// but hyper then builds two header arrays of that size for every request
/// head it parses: with 1024, `scripts/profile` counted 70,179
/// instructions per call against 56,896 (+23%, nearly all of it
/// `SmallVec::from_elem`). A bare 431 for a request no ordinary client
/// sends is not worth that on every call.
pub(crate) const MAX_HEADERS: usize = 100;

/// `Ok` for a request head the bridge may forward; otherwise the error the
/// caller gets. Allocates nothing on the way to `Ok`.
pub(crate) fn check(head: &Parts) -> Result<(), CallError> {
    if head.method == Method::CONNECT {
        // A 2xx to CONNECT means "tunnel established" to the caller, and a
        // frame carries a request, not a tunnel.
        return Err(CallError::MethodNotAllowed {
            method: head.method.to_string(),
        });
    }
    if head.headers.len() > MAX_HEADERS {
        return Err(CallError::TooManyHeaders { limit: MAX_HEADERS });
    }
    check_host(head)
}

/// RFC 9112 3.2: a server must answer 400 to an HTTP/1.1 request without
/// `Host`, and to any request with more than one. An empty `Host` is only
/// meant for a target without an authority, which a proxied call never
/// has: it is refused too, as nginx does. HTTP/1.0 may omit `Host`;
/// HTTP/2 carries it as `:authority` (in the URI), so only repeats count.
fn check_host(head: &Parts) -> Result<(), CallError> {
    let mut hosts = head.headers.get_all(header::HOST).iter();
    let reason = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => "more than one Host header",
        (Some(host), None) if host.is_empty() && head.version == Version::HTTP_11 => {
            "the Host header is empty"
        }
        (None, _) if head.version == Version::HTTP_11 => "an HTTP/1.1 request needs a Host header",
        _ => return Ok(()),
    };
    Err(CallError::BadRequest {
        reason: reason.to_owned(),
    })
}
