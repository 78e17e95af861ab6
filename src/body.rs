//! The body type shared by the bridge and the worker library: a message body
//! that is either complete (the common, small case: no channel, no task) or
//! arrives in chunks through a channel as frames come in.
//!
//! A chunked body reports each chunk its reader takes to an optional
//! `on_read` hook; flow control uses it to grant the sender more credit
//! only as fast as the final reader consumes.

use std::{
    fmt,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc;

/// Why a body ended before its last byte.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

impl BodyError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        BodyError(message.into())
    }
}

/// Called with the size of each chunk the reader takes.
type OnRead = Box<dyn FnMut(usize) + Send>;

/// An HTTP message body: complete, chunked, or any other `http_body::Body`.
pub struct Body {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Chunks {
        rx: mpsc::UnboundedReceiver<Result<Bytes, BodyError>>,
        on_read: Option<OnRead>,
        /// The length the body declared, if any, checked as it goes.
        length: Option<Declared>,
        /// The sender finished and every byte passed its checks: what is
        /// left to read (a held-back last chunk at most) ends the body.
        ended: bool,
    },
    Boxed(UnsyncBoxBody<Bytes, BodyError>),
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full(b) => write!(f, "Body::Full({} bytes)", b.as_ref().map_or(0, Bytes::len)),
            Kind::Chunks { .. } => f.write_str("Body::Chunks"),
            Kind::Boxed(_) => f.write_str("Body::Boxed"),
        }
    }
}

/// The sending half of a chunked [`Body`]. Call [`BodySender::finish`]
/// after the last chunk: a sender dropped without it ends the body with an
/// error, so a cut-off body can never pass for a complete one.
#[derive(Debug)]
pub struct BodySender {
    tx: mpsc::UnboundedSender<Result<Bytes, BodyError>>,
    finished: bool,
}

impl Drop for BodySender {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self
                .tx
                .send(Err(BodyError::new("the body was cut off before its end")));
        }
    }
}

impl BodySender {
    /// Queues a chunk; `false` if the reader is gone. Never waits: the
    /// protocol's flow control, not this channel, bounds what is queued.
    pub fn send(&self, chunk: Bytes) -> bool {
        chunk.is_empty() || self.tx.send(Ok(chunk)).is_ok()
    }

    /// Ends the body cleanly.
    pub fn finish(mut self) {
        self.finished = true;
    }

    /// Ends the body with an error, so the reader cannot mistake a cut-off
    /// body for a complete one.
    pub fn abort(mut self, error: BodyError) {
        self.finished = true;
        let _ = self.tx.send(Err(error));
    }
}

impl Body {
    /// An empty body.
    pub fn empty() -> Body {
        Body {
            kind: Kind::Full(None),
        }
    }

    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        Body {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    /// A body fed chunk by chunk through the returned sender.
    pub fn channel() -> (BodySender, Body) {
        let (tx, rx) = mpsc::unbounded_channel();
        let body = Body {
            kind: Kind::Chunks {
                rx,
                on_read: None,
                length: None,
                ended: false,
            },
        };
        (
            BodySender {
                tx,
                finished: false,
            },
            body,
        )
    }

    /// Wraps any body whose data is `Bytes`.
    pub fn wrap<B>(body: B) -> Body
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: fmt::Display,
    {
        Body {
            kind: Kind::Boxed(body.map_err(|e| BodyError(e.to_string())).boxed_unsync()),
        }
    }

    /// Calls `hook` with the size of every chunk the reader takes (chunked
    /// bodies only).
    pub(crate) fn on_read(mut self, hook: impl FnMut(usize) + Send + 'static) -> Body {
        if let Kind::Chunks { on_read, .. } = &mut self.kind {
            *on_read = Some(Box::new(hook));
        }
        self
    }

    /// Holds a chunked body to the `Content-Length` its sender declared:
    /// a body that turns out longer or shorter ends with an error instead.
    /// Its last bytes are held back until the end is known, so that a body
    /// that goes on past its length never delivers a length's worth of
    /// bytes that the reader could take for a complete message.
    pub(crate) fn declared_length(mut self, n: u64) -> Body {
        if let Kind::Chunks { length, .. } = &mut self.kind {
            *length = Some(Declared {
                left: n,
                held: None,
            });
        }
        self
    }

    /// The whole body when it is already complete in memory.
    pub fn as_full(&self) -> Option<Bytes> {
        match &self.kind {
            Kind::Full(b) => Some(b.clone().unwrap_or_default()),
            _ => None,
        }
    }

    /// Reads the whole body, failing if it is longer than `limit` bytes.
    pub async fn collect(self, limit: usize) -> Result<Bytes, BodyError> {
        if let Kind::Full(b) = self.kind {
            let b = b.unwrap_or_default();
            return if b.len() > limit {
                Err(BodyError(format!("body exceeds {limit} bytes")))
            } else {
                Ok(b)
            };
        }
        let mut body = self;
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(BodyError(format!("body exceeds {limit} bytes")));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf.freeze())
    }
}

/// What is left of a chunked body's declared length.
struct Declared {
    /// Bytes still to come.
    left: u64,
    /// The chunk that brought `left` to zero, until the end is seen.
    held: Option<Bytes>,
}

impl Declared {
    /// A chunk that arrived: `Ok(Some)` to pass on now, `Ok(None)` if it is
    /// held back (it completes the length).
    fn check(&mut self, chunk: Bytes) -> Result<Option<Bytes>, BodyError> {
        let len = chunk.len() as u64;
        if self.held.is_some() || len > self.left {
            self.held = None;
            return Err(BodyError::new("the body is longer than its Content-Length"));
        }
        self.left -= len;
        if self.left == 0 {
            self.held = Some(chunk);
            return Ok(None);
        }
        Ok(Some(chunk))
    }

    /// The sender finished: the held chunk, if any, then the end.
    fn end(&mut self) -> Result<Option<Bytes>, BodyError> {
        if self.left > 0 {
            let left = self.left;
            self.left = 0;
            return Err(BodyError(format!(
                "the body ended {left} bytes short of its Content-Length"
            )));
        }
        Ok(self.held.take())
    }
}

impl Default for Body {
    fn default() -> Self {
        Body::empty()
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::full(b)
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Self {
        Body::full(v)
    }
}

impl From<String> for Body {
    fn from(s: String) -> Self {
        Body::full(s)
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Self {
        Body::full(Bytes::from_static(s.as_bytes()))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Chunks {
                rx,
                on_read,
                length,
                ended,
            } => loop {
                let next = match ready!(rx.poll_recv(cx)) {
                    Some(Ok(chunk)) => match length {
                        Some(declared) => declared.check(chunk),
                        None => Ok(Some(chunk)),
                    },
                    Some(Err(e)) => Err(e),
                    None => {
                        let end = match length {
                            Some(declared) => declared.end(),
                            None => Ok(None),
                        };
                        *ended = end.is_ok();
                        end
                    }
                };
                match next {
                    Ok(Some(chunk)) => {
                        if let Some(hook) = on_read {
                            hook(chunk.len());
                        }
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    // Held back until the end is known.
                    Ok(None) if length.as_ref().is_some_and(|d| d.held.is_some()) => {}
                    Ok(None) => return Poll::Ready(None),
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            },
            Kind::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            // Known only once the sender has finished and nothing is held
            // back: the access log's `complete` reads this after the caller
            // took the body, and HTTP/2 marks its last DATA frame with it.
            Kind::Chunks { ended, length, .. } => {
                *ended && length.as_ref().is_none_or(|d| d.held.is_none())
            }
            Kind::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Chunks { .. } => SizeHint::default(),
            Kind::Boxed(b) => b.size_hint(),
        }
    }
}

/// What [`next_batch`] took from a body.
pub(crate) struct Batch<E> {
    /// The data, possibly empty (a body that ended or failed at once).
    pub(crate) data: Bytes,
    /// Set when the body ended (`Ok`) or failed after `data`.
    pub(crate) end: Option<Result<(), E>>,
}

/// Waits for the next frame of `body`, then takes the frames that are
/// ready at once as well, up to about `room` bytes: a burst of small
/// chunks goes on as one message instead of one each.
pub(crate) async fn next_batch<B>(body: &mut B, room: usize) -> Batch<B::Error>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    use futures_util::FutureExt;
    let mut parts: Vec<Bytes> = Vec::new();
    let mut size = 0;
    let mut next = body.frame().await;
    let end = loop {
        match next {
            None => break Some(Ok(())),
            Some(Err(e)) => break Some(Err(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    if !data.is_empty() {
                        parts.push(data);
                    }
                }
            }
        }
        if size >= room {
            break None;
        }
        match body.frame().now_or_never() {
            Some(ready) => next = ready,
            None => break None,
        }
    };
    let data = match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(size);
            for part in &parts {
                all.extend_from_slice(part);
            }
            all.freeze()
        }
    };
    Batch { data, end }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn chunks_arrive_in_order_and_end_cleanly() {
        let (tx, body) = Body::channel();
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        let body = body.on_read(move |n| {
            counter.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        });
        assert!(tx.send(Bytes::from_static(b"ab")));
        assert!(tx.send(Bytes::from_static(b"cd")));
        tx.finish();
        assert_eq!(body.collect(10).await, Ok(Bytes::from_static(b"abcd")));
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn an_aborted_body_is_an_error_not_a_short_body() {
        let (tx, body) = Body::channel();
        tx.send(Bytes::from_static(b"partial"));
        tx.abort(BodyError::new("worker lost"));
        assert_eq!(body.collect(100).await, Err(BodyError::new("worker lost")));
        let (tx, body) = Body::channel();
        tx.send(Bytes::from_static(b"partial"));
        drop(tx);
        assert!(
            body.collect(100).await.is_err(),
            "a dropped sender is not a clean end"
        );
    }

    #[tokio::test]
    async fn a_declared_length_is_held_to_both_ways() {
        let chunks = |parts: &[&'static str], n: u64| {
            let (tx, body) = Body::channel();
            for p in parts {
                tx.send(Bytes::from_static(p.as_bytes()));
            }
            tx.finish();
            body.declared_length(n)
        };
        assert_eq!(
            chunks(&["hel", "lo"], 5).collect(100).await,
            Ok(Bytes::from_static(b"hello"))
        );
        assert!(chunks(&["hello", " world"], 5).collect(100).await.is_err());
        assert!(chunks(&["hel", "lo world"], 5).collect(100).await.is_err());
        assert!(chunks(&["hel"], 5).collect(100).await.is_err());
        // The chunk that completes the length waits for the end.
        let (tx, mut body) = Body::channel();
        body = body.declared_length(5);
        tx.send(Bytes::from_static(b"hello"));
        assert!(body.frame().now_or_never().is_none(), "held back");
        tx.send(Bytes::from_static(b"!"));
        let next = body.frame().await.expect("a frame");
        assert!(next.is_err(), "{next:?}");
    }

    #[tokio::test]
    async fn a_chunked_body_read_to_its_end_says_so_and_a_cut_one_does_not() {
        // Without a declared length: the end is known once the sender finished.
        let (tx, mut body) = Body::channel();
        tx.send(Bytes::from_static(b"abc"));
        assert!(!body.is_end_stream());
        assert!(body.frame().await.is_some());
        assert!(!body.is_end_stream(), "the sender may still send more");
        tx.finish();
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
        // With one: the held-back last chunk ends it.
        let (tx, body) = Body::channel();
        let mut body = body.declared_length(3);
        tx.send(Bytes::from_static(b"abc"));
        tx.finish();
        assert!(body.frame().await.is_some());
        assert!(body.is_end_stream(), "the last chunk completed the length");
        // A sender dropped without finish: never complete.
        let (tx, mut body) = Body::channel();
        tx.send(Bytes::from_static(b"abc"));
        drop(tx);
        assert!(body.frame().await.is_some());
        assert!(body.frame().await.expect("an error").is_err());
        assert!(!body.is_end_stream());
    }

    #[tokio::test]
    async fn collect_enforces_its_limit() {
        assert!(Body::full("12345").collect(4).await.is_err());
        assert_eq!(
            Body::full("1234").collect(4).await,
            Ok(Bytes::from_static(b"1234"))
        );
    }
}
