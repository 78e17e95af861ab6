//! The upload of a long request body: after the request head, the rest of
//! the caller's body goes to the worker chunk by chunk in its own task
//! ([`Upload`]), waiting for credit when the worker does flow control; and
//! the wait for a reply head beside it ([`reply_or_upload_failure`]), which
//! decides which of the two ends the call.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use tokio::{sync::oneshot, task::JoinError};
use tokio_util::task::AbortOnDropHandle;

use super::{
    request_body::RequestBody,
    session::{Failure, Reply, Session},
};
use crate::{
    flow::Window,
    protocol::{self, BodyHead, Compression, DataHead},
    transport::OutFrame,
};

/// How the wait for a reply beside a running upload ended.
pub(super) enum Settled {
    /// The reply head came (or its channel closed); the upload may still run.
    Reply(Result<Reply, oneshot::error::RecvError>),
    /// The upload failed (or its task did) before the reply was taken, or
    /// as it was.
    UploadFailed(Result<UploadError, JoinError>),
}

/// The failure of a finished upload, if it did not send the whole body.
fn upload_failure(done: Result<Result<(), UploadError>, JoinError>) -> Option<Settled> {
    match done {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(Settled::UploadFailed(Ok(e))),
        Err(e) => Some(Settled::UploadFailed(Err(e))),
    }
}

/// Waits for the reply head to a call whose body is still being uploaded,
/// or for the upload to fail. An upload that has failed by the time the
/// reply is taken wins, whether both were in at the same poll (`biased`,
/// the upload first) or it finished while the reply was being taken: the
/// caller never gets a reply to a body that was cut short without the
/// failure, and the call's guard then tells the worker `cancel`. (An upload
/// that fails after the reply has gone to the caller cuts the reply off:
/// the watcher in `call`.)
pub(super) async fn reply_or_upload_failure(
    reply: &mut oneshot::Receiver<Reply>,
    pump: &mut AbortOnDropHandle<Result<(), UploadError>>,
) -> Settled {
    // Set once the upload's outcome has been taken: a finished task's
    // handle is not polled again.
    let mut uploaded = false;
    loop {
        tokio::select! {
            biased;
            done = &mut *pump, if !uploaded => match upload_failure(done) {
                None => uploaded = true,
                Some(failed) => return failed,
            },
            r = &mut *reply => {
                if !uploaded && pump.is_finished() {
                    if let Some(failed) = upload_failure((&mut *pump).await) {
                        return failed;
                    }
                }
                return Settled::Reply(r);
            }
        }
    }
}

/// Why an upload stopped.
pub(super) enum UploadError {
    /// The worker connection failed.
    Worker(Failure),
    /// Reading the caller's body failed (or it grew past `max_body`).
    Caller(Box<dyn std::error::Error + Send + Sync>),
    /// The worker granted no credit for this long.
    Stalled,
}

/// Streams a request body to the worker after its head, chunk by chunk,
/// waiting for credit when the worker does flow control.
pub(super) struct Upload {
    pub(super) session: Arc<Session>,
    pub(super) id: u64,
    pub(super) window: Option<Arc<Window>>,
    /// How body chunks are compressed.
    pub(super) codec: Compression,
    /// Longest silence from the caller mid-body.
    pub(super) idle_limit: Duration,
    /// Body bytes sent so far (the call's `Trace` reads it).
    pub(super) sent: Arc<AtomicU64>,
}

impl Upload {
    /// Takes `n` bytes of window, waiting for the worker's credit.
    async fn reserve(&self, n: usize) -> Result<(), UploadError> {
        let Some(window) = &self.window else {
            return Ok(());
        };
        // Waiting for credit counts as silence too: an echo whose caller
        // writes everything before reading would otherwise wait forever.
        match tokio::time::timeout(self.idle_limit, window.take(n)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(UploadError::Worker(Failure::Lost(
                "connection closed".into(),
            ))),
            Err(_) => Err(UploadError::Stalled),
        }
    }

    async fn chunk(&self, data: Bytes, end: bool) -> Result<(), UploadError> {
        self.reserve(data.len()).await?;
        let head = DataHead::Body(BodyHead { id: self.id, end });
        // A large chunk goes out behind its head, not copied into one
        // buffer with it (`wire` writes the two as one frame).
        let (head, body) = protocol::encode_frame_split(&head, &data, self.codec);
        let frame = OutFrame::binary_parts(head, body);
        self.session
            .send_chunk(frame)
            .await
            .map_err(UploadError::Worker)?;
        self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sends the head (carrying the first chunk of `start`), the rest of
    /// `start`, then the remaining body as it arrives, then the end marker.
    pub(super) async fn run(
        self,
        head: Bytes,
        start: Bytes,
        mut body: Limited<RequestBody>,
    ) -> Result<(), UploadError> {
        let first = protocol::CHUNK_SIZE.min(start.len());
        self.reserve(first).await?;
        // The head of a streamed body takes the bulk queue, in order with its
        // chunks: through the urgent queue a chunk could overtake it.
        self.session
            .send_chunk(OutFrame::Binary(head))
            .await
            .map_err(UploadError::Worker)?;
        self.sent.fetch_add(first as u64, Ordering::Relaxed);
        self.chunks(start.slice(first..)).await?;
        loop {
            // A caller that stops sending mid-body holds a worker slot; give
            // up after the route's request_timeout of silence.
            let next = tokio::time::timeout(self.idle_limit, body.frame())
                .await
                .map_err(|_| {
                    UploadError::Caller(
                        format!("no request body data for {:?}", self.idle_limit).into(),
                    )
                })?;
            let Some(frame) = next else { break };
            let frame = frame.map_err(UploadError::Caller)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.chunks(data).await?;
        }
        self.chunk(Bytes::new(), true).await
    }

    /// Sends `data` as body chunks of at most [`protocol::CHUNK_SIZE`].
    async fn chunks(&self, mut data: Bytes) -> Result<(), UploadError> {
        while !data.is_empty() {
            let piece = data.split_to(protocol::CHUNK_SIZE.min(data.len()));
            self.chunk(piece, false).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Response;

    use super::*;
    use crate::body::Body;

    #[tokio::test]
    async fn an_upload_failure_beats_a_reply_that_came_with_it() {
        // Unbiased, each round would go either way.
        for round in 0..64 {
            let (tx, mut reply) = oneshot::channel::<Reply>();
            let _ = tx.send(Ok(Response::new(Body::empty())));
            let mut pump =
                AbortOnDropHandle::new(tokio::spawn(async { Err::<(), _>(UploadError::Stalled) }));
            tokio::time::timeout(Duration::from_secs(10), async {
                while !pump.is_finished() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the upload task ends");
            let settled = reply_or_upload_failure(&mut reply, &mut pump).await;
            assert!(
                matches!(settled, Settled::UploadFailed(Ok(UploadError::Stalled))),
                "round {round}: the reply won"
            );
        }
    }

    #[tokio::test]
    async fn a_reply_beside_a_whole_upload_is_taken() {
        let (tx, mut reply) = oneshot::channel::<Reply>();
        let mut pump = AbortOnDropHandle::new(tokio::spawn(async { Ok(()) }));
        let settled = tokio::spawn(async move {
            let settled = reply_or_upload_failure(&mut reply, &mut pump).await;
            matches!(settled, Settled::Reply(Ok(Ok(_))))
        });
        let _ = tx.send(Ok(Response::new(Body::empty())));
        assert!(settled.await.expect("join"));
    }
}
