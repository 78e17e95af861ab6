//! Which HTTP a new caller connection speaks, from its first bytes: the
//! HTTP/2 connection preface (prior knowledge, RFC 9113 section 3.4) starts
//! with `PRI`, which no HTTP/1 method does. The bytes read to decide are
//! handed back, ahead of the rest of the stream, by [`Replay`].

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The first bytes of the HTTP/2 preface; enough to tell it from HTTP/1.
const PREFACE_START: &[u8; 3] = b"PRI";

/// Reads a connection's first bytes until they decide (at most three, and
/// fewer as soon as they stop matching `PRI`), waiting on the socket, never
/// polling it. Returns whether it speaks HTTP/2 and the connection with
/// those bytes put back. A peer that closes first is HTTP/1: its server sees
/// what came and then the end.
pub(crate) async fn sniff<T: AsyncRead + Unpin>(mut io: T) -> io::Result<(bool, Replay<T>)> {
    let mut first = [0u8; PREFACE_START.len()];
    let mut len = 0;
    while len < first.len() {
        let got = io.read(&mut first[len..]).await?;
        if got == 0 {
            break;
        }
        len += got;
        if first[..len] != PREFACE_START[..len] {
            break;
        }
    }
    let h2 = first[..len] == PREFACE_START[..];
    Ok((h2, Replay::new(io, first, len)))
}

/// A connection whose first `len` bytes were already read into `first`:
/// reads return those before anything from the socket. Writes go straight
/// through.
pub(crate) struct Replay<T> {
    inner: T,
    first: [u8; PREFACE_START.len()],
    /// `first[at..len]` is still to be returned.
    at: usize,
    len: usize,
}

impl<T> Replay<T> {
    /// `inner` with the `len` bytes of `first` put back in front.
    pub(crate) fn new(inner: T, first: [u8; PREFACE_START.len()], len: usize) -> Replay<T> {
        Replay {
            inner,
            first,
            at: 0,
            len: len.min(PREFACE_START.len()),
        }
    }

    /// `inner` with nothing put back.
    pub(crate) fn plain(inner: T) -> Replay<T> {
        Replay::new(inner, [0; PREFACE_START.len()], 0)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.len {
            let n = (this.len - this.at).min(buf.remaining());
            buf.put_slice(&this.first[this.at..this.at + n]);
            this.at += n;
            // Read on into the same buffer: handed only these bytes, hyper
            // would reserve a whole read's room again for the rest, doubling
            // its 8 KiB buffer. What the socket has not got yet (pending)
            // waits for the next read; so does an error (a reset surfaces
            // then as the error or as an early end).
            if this.at == this.len && buf.remaining() > 0 {
                let _ = Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Feeds `chunks` one write at a time (each a separate read for the
    /// sniffer), then reads everything back through the replay.
    async fn sniffed(chunks: &[&[u8]]) -> (bool, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.expect("write");
                // Each chunk must arrive as its own read.
                tokio::task::yield_now().await;
            }
        });
        let (h2, mut replay) = sniff(server).await.expect("sniff");
        writer.await.expect("writer");
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.expect("read");
        (h2, all)
    }

    #[tokio::test]
    async fn the_preface_is_http2_and_every_byte_comes_back() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(sniffed(&[preface]).await, (true, preface.to_vec()));
        // Split anywhere in its first three bytes: the same.
        assert_eq!(
            sniffed(&[b"P", b"R", &preface[2..]]).await,
            (true, preface.to_vec())
        );
    }

    #[tokio::test]
    async fn the_first_read_returns_the_replayed_bytes_with_what_followed() {
        let (mut client, server) = tokio::io::duplex(64);
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let (h2, mut replay) = sniff(server).await.expect("sniff");
        assert!(!h2);
        let mut buf = [0u8; 64];
        let n = replay.read(&mut buf).await.expect("read");
        assert_eq!(
            &buf[..n],
            b"GET / HTTP/1.1\r\n\r\n",
            "one read, not three bytes"
        );
    }

    #[tokio::test]
    async fn anything_else_is_http1_and_every_byte_comes_back() {
        for (chunks, whole) in [
            (
                &[&b"GET / HTTP/1.1\r\n\r\n"[..]][..],
                &b"GET / HTTP/1.1\r\n\r\n"[..],
            ),
            (
                &[&b"P"[..], &b"OST / HTTP/1.1\r\n\r\n"[..]][..],
                &b"POST / HTTP/1.1\r\n\r\n"[..],
            ),
            (
                &[&b"PR"[..], &b"OPFIND / HTTP/1.1\r\n\r\n"[..]][..],
                &b"PROPFIND / HTTP/1.1\r\n\r\n"[..],
            ),
            (&[&b"PR"[..]][..], &b"PR"[..]),
            (&[][..], &b""[..]),
        ] {
            assert_eq!(sniffed(chunks).await, (false, whole.to_vec()), "{whole:?}");
        }
    }
}
