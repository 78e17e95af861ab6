//! Ready-made handlers for `wsbridge worker`: forward each call to an
//! upstream HTTP server, or echo it back.

use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use tracing::warn;

use super::{
    call::{CallInfo, Handler, HandlerFuture},
    pool::Pool,
};
use crate::body::Body;

/// Forwards calls to an upstream HTTP/1.1 server over pooled keep-alive
/// connections, the way a reverse proxy would (`pool.rs`).
#[derive(Clone)]
pub struct Upstream {
    base: Uri,
    /// The base URL's path without its trailing `/`, put before each call's.
    prefix: String,
    authority: HeaderValue,
    pool: Pool,
}

impl Upstream {
    /// An upstream at `base`, e.g. `http://127.0.0.1:9000`. Only `http` is
    /// supported: the upstream is meant to sit beside the agent.
    pub fn new(base: &str) -> Result<Upstream, String> {
        let base: Uri = base
            .parse()
            .map_err(|e| format!("invalid upstream URL {base:?}: {e}"))?;
        if base.scheme_str() != Some("http") {
            return Err(format!("upstream {base} must be an http:// URL"));
        }
        let authority = base
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .ok_or_else(|| format!("upstream {base} has no host"))?;
        // Host and port only: the authority may carry user info.
        let addr = format!(
            "{}:{}",
            base.host().unwrap_or_default(),
            base.port_u16().unwrap_or(80)
        );
        Ok(Upstream {
            prefix: base.path().trim_end_matches('/').to_owned(),
            base,
            authority,
            pool: Pool::new(addr),
        })
    }

    /// Forwards one call. Transport failures become a 502 with a JSON body,
    /// so the caller sees what a reverse proxy would show.
    pub fn forward(&self, req: Request<Body>) -> HandlerFuture {
        let this = self.clone();
        Box::pin(async move {
            let request_id = req
                .extensions()
                .get::<CallInfo>()
                .map(|c| c.request_id.clone())
                .unwrap_or_default();
            match this.try_forward(req).await {
                Ok(resp) => resp,
                Err(reason) => {
                    warn!(%request_id, %reason, "upstream request failed");
                    let body = serde_json::json!({"error": {
                        "code": "upstream_error",
                        "message": reason,
                        "request_id": request_id,
                    }});
                    let mut resp = Response::new(Body::from(body.to_string()));
                    *resp.status_mut() = StatusCode::BAD_GATEWAY;
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    resp
                }
            }
        })
    }

    /// Both bodies stream: the upload goes up as it arrives from the bridge,
    /// and the upstream's answer goes back as the upstream produces it (the
    /// worker library reads a small one of known length whole first).
    async fn try_forward(&self, req: Request<Body>) -> Result<Response<Body>, String> {
        let (mut parts, body) = req.into_parts();
        // Origin form: the connection is to the upstream already.
        parts.uri = if self.prefix.is_empty() {
            let mut origin = http::uri::Parts::default();
            origin.path_and_query = Some(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            Uri::from_parts(origin).map_err(|e| format!("cannot build upstream URI: {e}"))?
        } else {
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            Uri::try_from(format!("{}{path}", self.prefix))
                .map_err(|e| format!("cannot build upstream URI: {e}"))?
        };
        // No hop-by-hop stripping here: the wire carries none inbound, and the
        // reply is stripped again when it is encoded for the bridge.
        // Like nginx's default: the upstream sees its own name as Host and
        // the caller's in X-Forwarded-Host.
        if let Some(original) = parts.headers.remove(header::HOST) {
            parts.headers.insert("x-forwarded-host", original);
        }
        parts.headers.insert(header::HOST, self.authority.clone());
        let mut resp = self
            .pool
            .send(Request::from_parts(parts, body))
            .await
            .map_err(|e| format!("upstream {}: {e}", self.base))?;
        drop_overridden_length(resp.headers_mut());
        Ok(resp)
    }
}

/// RFC 9112 6.3: when a reply has `Transfer-Encoding`, its framing (which
/// hyper has already decoded) wins and any `Content-Length` beside it is
/// meaningless. Passed on, it would tell the caller a length the body does
/// not have (`Content-Length: 5` before 452 chunked bytes: a cut reply that
/// looks complete). Transfer-Encoding itself is hop-by-hop and dropped
/// later, so this is the last point where the two can be seen together.
fn drop_overridden_length(headers: &mut http::HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// [`echo`], naming the worker in `x-echo-worker` too: what a call with
/// `Wsbridge-Worker` (or a fan-out) checks it reached. `wsbridge worker
/// --echo` answers with this.
pub fn echo_as(worker_id: &str) -> impl Handler {
    let id = HeaderValue::from_str(worker_id).ok();
    move |req: Request<Body>| {
        let id = id.clone();
        async move {
            let mut resp = echo(req).await;
            if let Some(id) = id {
                resp.headers_mut().insert("x-echo-worker", id);
            }
            resp
        }
    }
}

/// Answers 200 with the request body and `x-echo-method` / `x-echo-path`.
/// The body streams back as it arrives.
pub async fn echo(req: Request<Body>) -> Response<Body> {
    let method = HeaderValue::from_str(req.method().as_str()).ok();
    let path = req
        .uri()
        .path_and_query()
        .and_then(|p| HeaderValue::from_str(p.as_str()).ok());
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let mut resp = Response::new(req.into_body());
    let headers = resp.headers_mut();
    if let Some(m) = method {
        headers.insert("x-echo-method", m);
    }
    if let Some(p) = path {
        headers.insert("x-echo-path", p);
    }
    if let Some(ct) = content_type {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    resp
}
