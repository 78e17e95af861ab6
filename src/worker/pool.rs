//! Keep-alive HTTP/1.1 connections from the agent to its one upstream.
//!
//! A stack of idle connections, newest on top. A call takes one (or dials a
//! new one), and its connection goes back on the stack when the upstream's
//! reply body has been read to the end. There is one upstream, so there is
//! no per-host map, and no task per call: only one per connection.
//! Connections idle for `IDLE_TIMEOUT` are closed, as hyper-util's pool
//! does, so an upstream that never closes them is not left holding them.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{
    body::{Body as HttpBody, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::body::Body;

/// Idle connections kept at most; more are closed when their call ends.
const MAX_IDLE: usize = 256;

/// An idle connection older than this is closed rather than used.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Connections to one upstream address.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port` to dial.
    addr: String,
    /// `IDLE_TIMEOUT`, shorter in tests.
    idle_timeout: Duration,
    /// Newest at the back, each with the time it went idle.
    idle: Mutex<VecDeque<(SendRequest<Body>, Instant)>>,
}

impl Pool {
    pub(crate) fn new(addr: String) -> Pool {
        Pool::with_idle_timeout(addr, IDLE_TIMEOUT)
    }

    fn with_idle_timeout(addr: String, idle_timeout: Duration) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                addr,
                idle_timeout,
                idle: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) and returns the response;
    /// its connection is reused once the body has been read to the end.
    pub(crate) async fn send(&self, mut req: Request<Body>) -> Result<Response<Body>, String> {
        loop {
            let (mut sender, reused) = match self.checkout().await {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.give_back_after(resp, sender)),
                Err(mut e) => match e.take_message() {
                    // The upstream closed an idle connection before the
                    // request went out (none of it was written): try again,
                    // as the next idle connection or a new one.
                    Some(back) if reused => req = back,
                    _ => return Err(e.into_error().to_string()),
                },
            }
        }
    }

    /// The newest idle connection that is still open, if any.
    async fn checkout(&self) -> Option<SendRequest<Body>> {
        loop {
            let (mut sender, since) = self.inner.lock().pop_back()?;
            if since.elapsed() > self.inner.idle_timeout {
                // Every older one has expired too.
                self.inner.lock().clear();
                return None;
            }
            // Ready at once unless closed: a connection goes back on the
            // stack only when its previous exchange is over.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Body>, String> {
        let addr = &self.inner.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        // Calls are small request-reply exchanges: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("cannot start HTTP/1.1 with {addr}: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Wraps the response body so that reading it to the end returns the
    /// connection to the stack. A body dropped before its end takes the
    /// connection with it (hyper closes it).
    fn give_back_after(
        &self,
        resp: Response<Incoming>,
        sender: SendRequest<Body>,
    ) -> Response<Body> {
        let (parts, body) = resp.into_parts();
        let mut body = Returning {
            body,
            back: Some((sender, self.clone())),
        };
        if body.body.is_end_stream() {
            body.give_back();
        }
        Response::from_parts(parts, Body::wrap(body))
    }

    fn put(&self, mut sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        if sender.is_ready() {
            self.inner.push(sender);
            return;
        }
        // Still finishing the exchange (an upload the upstream answered
        // before reading it all, say): back on the stack once it is over.
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.inner.push(sender);
            }
        });
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(SendRequest<Body>, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, sender: SendRequest<Body>) {
        let now = Instant::now();
        let mut idle = self.lock();
        // The oldest are at the front: those past their time go now, not
        // only when a burst reaches down to them.
        while idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) > self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((sender, now));
        }
    }
}

/// An upstream response body that returns its connection at its end.
struct Returning {
    body: Incoming,
    back: Option<(SendRequest<Body>, Pool)>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.put(sender);
        }
    }
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            Some(Ok(_)) if self.body.is_end_stream() => self.give_back(),
            // An error leaves the connection unusable: it is dropped.
            Some(Err(_)) => self.back = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// An upstream answering every request head with "ok", keeping its
    /// connections open; counts the connections.
    async fn upstream() -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let mut seen = Vec::new();
                    while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if tcp.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn get(pool: &Pool, addr: &str) -> Bytes {
        let req = Request::get("/")
            .header(http::header::HOST, addr)
            .body(Body::empty())
            .expect("request");
        let resp = pool.send(req).await.expect("response");
        // Read to the end: that is what returns the connection.
        resp.into_body().collect(1024).await.expect("body")
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_until_it_has_been_idle_too_long() {
        let (addr, accepted) = upstream().await;
        let idle_timeout = Duration::from_millis(200);
        let pool = Pool::with_idle_timeout(addr.clone(), idle_timeout);
        for _ in 0..3 {
            assert_eq!(get(&pool, &addr).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Time passing is what is tested here: nothing else can be awaited.
        tokio::time::sleep(idle_timeout * 2).await;
        assert_eq!(get(&pool, &addr).await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the expired one is not used"
        );
        assert_eq!(pool.inner.lock().len(), 1, "only the new one is kept");
    }

    #[tokio::test]
    async fn a_connection_left_idle_under_a_busy_one_is_closed_in_time() {
        let (addr, accepted) = upstream().await;
        let idle_timeout = Duration::from_millis(200);
        let pool = Pool::with_idle_timeout(addr.clone(), idle_timeout);
        // Two at once: two connections, both then idle.
        let (a, b) = tokio::join!(get(&pool, &addr), get(&pool, &addr));
        assert_eq!((a, b), (Bytes::from("ok"), Bytes::from("ok")));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // One call at a time takes the newest each time; the other one
        // stays at the bottom of the stack until its time is up.
        let start = Instant::now();
        while start.elapsed() < idle_timeout * 2 {
            assert_eq!(get(&pool, &addr).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.inner.lock().len(), 1, "the unused one is gone");
    }
}
