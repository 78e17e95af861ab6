//! A worker connection's socket as the bridge uses it from the upgrade on:
//! the bridge reads the worker's frames ([`FrameReader`], in `reader.rs`)
//! and writes its own ([`FrameWriter`]), straight from the outbox into the
//! stream with one vectored write per batch. tungstenite does the HTTP
//! upgrade and nothing after it.
//!
//! A frame the bridge sends is never masked (RFC 6455 5.1: only clients
//! mask) and never fragmented, so writing one is a head of 2 to 10 bytes
//! before the payload. Written here, a frame is not first copied into
//! tungstenite's write buffer (a copy of every body the bridge sends, and a
//! buffer that kept the size of the largest batch for the connection's
//! life).

use std::{
    io::{self, IoSlice},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_tungstenite::tungstenite::{self, protocol::frame::coding::CloseCode};

use crate::transport::{self, Inbox, OutFrame, Outgoing, WriteError};

mod reader;

pub(crate) use reader::{FrameReader, Incoming, ReadError};

/// Splits a worker connection's stream, once upgraded, into the bridge's
/// frame reader (frames and messages of at most `max_frame` bytes) and
/// frame writer.
pub(crate) fn split<S: AsyncRead + AsyncWrite>(
    stream: S,
    max_frame: usize,
) -> (FrameReader<ReadHalf<S>>, FrameWriter<S>) {
    let (read, write) = tokio::io::split(stream);
    let writer = FrameWriter {
        io: write,
        cut: false,
    };
    (FrameReader::new(read, max_frame), writer)
}

/// The write half of a worker connection, writing WebSocket frames.
pub(crate) struct FrameWriter<S> {
    io: WriteHalf<S>,
    /// A write was given up part way (its future dropped, or failed): the
    /// stream may end inside a frame, where a close frame would be read as
    /// payload.
    cut: bool,
}

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// The length of a frame head for a payload of `len` bytes.
fn head_len(len: usize) -> usize {
    match len {
        0..126 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

/// Appends the head of an unmasked, final frame (RFC 6455 5.2).
fn head(opcode: u8, len: usize, out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

fn opcode(frame: &OutFrame) -> u8 {
    match frame {
        OutFrame::Text(_) => TEXT,
        OutFrame::Binary(_) | OutFrame::Split(_) => BINARY,
        OutFrame::Ping(_) => PING,
        OutFrame::Pong(_) => PONG,
    }
}

impl<S: AsyncWrite> FrameWriter<S> {
    /// Writes `frames` in order and flushes, each write step under the
    /// stall bound (a slow but live reader is fine; one that stopped is
    /// not).
    pub(crate) async fn write(
        &mut self,
        frames: &[OutFrame],
        stall: Duration,
    ) -> Result<(), WriteError> {
        let mut heads = Vec::with_capacity(frames.len() * 10);
        for frame in frames {
            head(opcode(frame), frame.len(), &mut heads);
        }
        let mut slices = Vec::with_capacity(frames.len() * 3);
        let mut at = 0;
        for frame in frames {
            let end = at + head_len(frame.len());
            slices.push(IoSlice::new(&heads[at..end]));
            at = end;
            for part in frame.payload() {
                if !part.is_empty() {
                    slices.push(IoSlice::new(part));
                }
            }
        }
        self.write_all(&mut slices, stall).await
    }

    /// Writes every byte of `slices` and flushes.
    async fn write_all(
        &mut self,
        slices: &mut [IoSlice<'_>],
        stall: Duration,
    ) -> Result<(), WriteError> {
        self.cut = true;
        let mut bufs = slices;
        while !bufs.is_empty() {
            let wrote = self.io.write_vectored(bufs);
            let n = transport::step(stall, async { wrote.await.map_err(tungstenite::Error::Io) })
                .await?;
            if n == 0 {
                let zero = io::Error::from(io::ErrorKind::WriteZero);
                return Err(WriteError::Failed(tungstenite::Error::Io(zero)));
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        self.cut = false;
        let flushed = self.io.flush();
        transport::step(stall, async {
            flushed.await.map_err(tungstenite::Error::Io)
        })
        .await
    }

    /// Sends a close frame with `code` and `reason`, then ends the stream's
    /// write side (TLS close_notify, then the TCP FIN). The reason is cut to
    /// the 123 bytes a close frame holds, at a character boundary. After a
    /// write given up part way, only the stream's write side is ended.
    pub(crate) async fn close(&mut self, code: CloseCode, reason: &str, stall: Duration) {
        if self.cut {
            let _ = tokio::time::timeout(stall, self.io.shutdown()).await;
            return;
        }
        let mut cut = reason.len().min(123);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut payload = Vec::with_capacity(2 + cut);
        payload.extend_from_slice(&u16::from(code).to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..cut]);
        let mut frame = Vec::with_capacity(4 + payload.len());
        head(CLOSE, payload.len(), &mut frame);
        frame.extend_from_slice(&payload);
        if self
            .write_all(&mut [IoSlice::new(&frame)], stall)
            .await
            .is_ok()
        {
            let _ = self.io.shutdown().await;
        }
    }
}

/// Writes `first` and whatever else is already queued (up to a batch,
/// urgent frames first) with one vectored write, then flushes; tells those
/// waiting for the frames once they are written. `busy`: see
/// [`transport::take_batch`].
pub(crate) async fn write_batch<S: AsyncWrite>(
    writer: &mut FrameWriter<S>,
    first: Outgoing,
    inbox: &mut Inbox,
    busy: bool,
    stall: Duration,
) -> Result<(), WriteError> {
    let batch = transport::take_batch(first, inbox, busy).await;
    writer.write(&batch.frames, stall).await?;
    batch.written();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_len_is_the_length_head_writes() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 1 << 32] {
            let mut out = Vec::new();
            head(BINARY, len, &mut out);
            assert_eq!(out.len(), head_len(len), "payload of {len} bytes");
        }
    }
}
