//! The caller's request body as a call reads it: plain, or hashed as it
//! streams past for a call with an `Idempotency-Key` ([`RequestBody`]), and
//! what a failure to read it tells the caller ([`read_error`]). Both the
//! call (`call.rs`, `upload.rs`) and the idempotency wrapper (`keyed.rs`)
//! read bodies through it.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::LengthLimitError;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use super::idempotency::{BodyHasher, BodySeal};
use crate::{body::Body, error::CallError};

/// What reading a caller's body failed with, as the caller is told.
pub(super) fn read_error(e: Box<dyn std::error::Error + Send + Sync>, limit: usize) -> CallError {
    if e.is::<LengthLimitError>() {
        CallError::BodyTooLarge { limit }
    } else {
        CallError::BadRequest {
            reason: format!("cannot read the request body: {e}"),
        }
    }
}

/// The caller's request body; for a call with an idempotency key, hashed as
/// it is read (whether whole, before dispatch, or streamed by the upload),
/// so that the key can be bound to it without the body being kept.
pub(super) struct RequestBody {
    inner: Inner,
    /// Set for a keyed call until the body has ended.
    hasher: Option<Box<BodyHasher>>,
}

/// Where the bytes come from.
enum Inner {
    /// A caller of this bridge.
    Caller(Incoming),
    /// Another bridge, for its caller (`relayed.rs`).
    Relayed(Body),
}

impl RequestBody {
    pub(super) fn plain(inner: Incoming) -> Self {
        RequestBody {
            inner: Inner::Caller(inner),
            hasher: None,
        }
    }

    /// A body another bridge sends for its caller.
    pub(super) fn relayed(inner: Body) -> Self {
        RequestBody {
            inner: Inner::Relayed(inner),
            hasher: None,
        }
    }

    pub(super) fn hashed(inner: Incoming, seal: &BodySeal) -> Self {
        let mut body = RequestBody {
            inner: Inner::Caller(inner),
            hasher: Some(Box::new(seal.hasher())),
        };
        // An empty body may never be polled.
        body.ended();
        body
    }

    /// Publishes the digest once the body is at its end.
    fn ended(&mut self) {
        if HttpBody::is_end_stream(self) {
            if let Some(hasher) = self.hasher.take() {
                hasher.finish();
            }
        }
    }
}

/// What reading a body fails with.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Caller(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Inner::Relayed(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
        };
        if let Some(hasher) = this.hasher.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        hasher.update(data);
                    }
                    this.ended();
                }
                Poll::Ready(None) => {
                    if let Some(hasher) = this.hasher.take() {
                        hasher.finish();
                    }
                }
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Caller(b) => b.is_end_stream(),
            Inner::Relayed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Caller(b) => b.size_hint(),
            Inner::Relayed(b) => b.size_hint(),
        }
    }
}
