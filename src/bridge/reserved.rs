//! The bridge's own endpoints on the caller listener: every path under
//! `/_wsbridge/` is the bridge's and never goes to a worker, whatever the
//! routes say: `GET /_wsbridge/workers` (presence, `directory.rs`) and
//! `/_wsbridge/jobs/<id>` (asynchronous calls, `jobs.rs`).

use http::{request::Parts, Method, Response, StatusCode};

use super::{
    call::Ctx,
    directory, jobs,
    reply::{json_response, CallBody},
};
use crate::{body::Body, error::CallError};

/// The reserved prefix.
pub(crate) const PREFIX: &str = "/_wsbridge/";

/// Whether a request path is one of the bridge's own.
pub(super) fn is_reserved(path: &str) -> bool {
    path.starts_with(PREFIX) || path == "/_wsbridge"
}

/// Answers a request for a reserved path.
pub(super) async fn answer(ctx: &Ctx<'_>, head: &Parts) -> Result<Response<CallBody>, CallError> {
    let path = head.uri.path();
    if jobs::is_jobs_path(path) {
        return jobs::endpoint(ctx.shared, ctx.shared.jobs.get(), head).await;
    }
    if path != directory::PATH && path != "/_wsbridge/workers/" {
        return Err(CallError::Reserved {
            path: path.to_owned(),
        });
    }
    if head.method != Method::GET && head.method != Method::HEAD {
        return Err(CallError::EndpointMethod {
            path: directory::PATH.to_owned(),
            allowed: "GET, HEAD",
        });
    }
    let query = directory::parse(head.uri.query())?;
    let json = directory::document(ctx.shared, &query).await;
    Ok(json_response(
        StatusCode::OK,
        "application/json",
        Body::full(json),
    ))
}
