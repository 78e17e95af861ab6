//! The read half of a worker connection: WebSocket frames from the worker
//! (RFC 6455 5), checked and put together into messages.
//!
//! A worker is a client, so every frame it sends is masked; no extension is
//! ever negotiated, so no reserved bit may be set. Messages may come in
//! fragments, with control frames between them. A frame, and a message
//! put together from fragments, may be at most `workers.max_frame` bytes.
//!
//! What an idle connection holds here is this struct and nothing else.
//! Bytes are read into a buffer on the stack, and each message's payload
//! is copied out into an allocation of its own, handed on whole: exactly
//! its size up to [`FIRST_ALLOCATION`], grown as the bytes come beyond.
//! The rest of a large frame is read straight into that allocation. A payload handed on keeps no buffer of the reader's alive,
//! and a large frame leaves nothing behind once it is taken (tungstenite's
//! read buffer kept the largest frame's allocation for the connection's
//! life).

use std::{
    collections::VecDeque,
    fmt,
    future::poll_fn,
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Bytes read at a time while no large payload is under way: a full TLS
/// record's plaintext, so the TLS stream can decrypt one into it directly.
const STACK_READ: usize = 16 * 1024;

/// The rest of a payload from which it is read straight into the
/// payload's own allocation rather than through the stack.
const DIRECT_READ: usize = 4 * 1024;

/// How long, and for how many bytes at most, [`FrameReader::linger`] reads
/// on.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 8 << 20;

/// The most a payload's allocation starts with: a whole body chunk and the
/// largest head (the smallest `max_frame` there is). A larger payload's
/// allocation grows as its bytes come, so a peer that announces a large
/// frame and sends little holds little.
const FIRST_ALLOCATION: usize = crate::protocol::MIN_FRAME;

/// A message from the worker.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming {
    Text(String),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// A close frame: its code and reason, if it had any.
    Close(Option<(u16, String)>),
}

/// Why reading frames stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The stream ended without a close frame.
    Cut,
    Io(io::Error),
    /// A frame or a message over `workers.max_frame`.
    TooLarge {
        size: u64,
        max: usize,
    },
    /// Frames that break RFC 6455.
    Protocol(&'static str),
    /// A text message that is not UTF-8.
    NotUtf8,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Cut => f.write_str("the connection was cut (no close frame)"),
            ReadError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("the connection was cut (no close frame)")
            }
            ReadError::Io(e) => write!(f, "read failed: {}", e.kind()),
            ReadError::TooLarge { size, max } => write!(
                f,
                "read failed: a message of {size} bytes, over workers.max_frame ({max} bytes)"
            ),
            ReadError::Protocol(what) => write!(f, "read failed: protocol error: {what}"),
            ReadError::NotUtf8 => f.write_str("read failed: a text message that is not UTF-8"),
        }
    }
}

impl std::error::Error for ReadError {}

impl ReadError {
    /// The close frame that tells the worker what it did wrong, if it did:
    /// 1009 for a message too big, 1007 for text that is not UTF-8, 1002
    /// for a broken frame (RFC 6455 7.4.1).
    pub(crate) fn close(&self) -> Option<(CloseCode, String)> {
        match self {
            ReadError::TooLarge { size, max } => Some((
                CloseCode::Size,
                format!("a message of {size} bytes, over max_frame ({max})"),
            )),
            ReadError::Protocol(what) => Some((CloseCode::Protocol, (*what).to_owned())),
            ReadError::NotUtf8 => Some((
                CloseCode::Invalid,
                "a text message that is not UTF-8".into(),
            )),
            ReadError::Cut | ReadError::Io(_) => None,
        }
    }
}

/// The frame whose payload is being read.
struct Frame {
    opcode: u8,
    fin: bool,
    key: [u8; 4],
    len: usize,
    payload: BytesMut,
}

impl Frame {
    fn remaining(&self) -> usize {
        self.len - self.payload.len()
    }

    /// Appends payload bytes as they came, unmasked.
    fn push(&mut self, masked: &[u8]) {
        let at = self.payload.len();
        self.payload.extend_from_slice(masked);
        unmask(&mut self.payload[at..], self.key, at);
    }
}

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// Reads WebSocket frames from a worker; see the module's documentation.
pub(crate) struct FrameReader<R> {
    io: R,
    max: usize,
    /// The head of the next frame, as far as it came.
    head: [u8; 14],
    head_len: usize,
    frame: Option<Frame>,
    /// A message in fragments: its opcode and its payload so far.
    message: Option<(u8, BytesMut)>,
    /// The first message parsed from a read, and the rest after it: most
    /// reads carry one, which then needs no queue.
    first: Option<Incoming>,
    ready: VecDeque<Incoming>,
    /// What went wrong after the messages in `first` and `ready`.
    failed: Option<ReadError>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of frames and messages of at most `max` bytes.
    pub(crate) fn new(io: R, max: usize) -> FrameReader<R> {
        FrameReader {
            io,
            max,
            head: [0; 14],
            head_len: 0,
            frame: None,
            message: None,
            first: None,
            ready: VecDeque::new(),
            failed: None,
        }
    }

    /// The next message. Cancel-safe: what was read stays here. After an
    /// error, every call fails.
    pub(crate) async fn next(&mut self) -> Result<Incoming, ReadError> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, ReadError>> {
        loop {
            if let Some(message) = self.first.take() {
                return Poll::Ready(Ok(message));
            }
            if let Some(message) = self.ready.pop_front() {
                if self.ready.is_empty() {
                    self.ready = VecDeque::new();
                }
                return Poll::Ready(Ok(message));
            }
            if let Some(e) = self.failed.take() {
                // Later calls fail too, without reading on.
                self.failed = Some(ReadError::Protocol("read after an error"));
                return Poll::Ready(Err(e));
            }
            let read = match self.frame.as_mut() {
                Some(frame) if frame.remaining() >= DIRECT_READ => {
                    let read = ready!(read_direct(&mut self.io, frame, cx));
                    if frame.remaining() == 0 {
                        if let Err(e) = self.end_frame() {
                            self.failed = Some(e);
                        }
                    }
                    read
                }
                _ => ready!(self.read_stack(cx)),
            };
            match read {
                Ok(0) => self.failed = Some(ReadError::Cut),
                Ok(_) => {}
                Err(e) => self.failed = Some(e),
            }
        }
    }

    /// After a close frame for a protocol error: reads and drops what the
    /// peer still sends, until its end, an error, [`LINGER_BYTES`] or
    /// [`LINGER`]. A socket closed with bytes unread is reset, and a reset
    /// can destroy the close frame on its way to the peer.
    pub(crate) async fn linger(&mut self) {
        let mut left = LINGER_BYTES;
        let drain = poll_fn(|cx| loop {
            let mut stack = [MaybeUninit::<u8>::uninit(); STACK_READ];
            let mut buf = ReadBuf::uninit(&mut stack);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() && buf.filled().len() < left => {
                    left -= buf.filled().len();
                }
                _ => return Poll::Ready(()),
            }
        });
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    /// Reads into a buffer on the stack and takes in what came.
    fn read_stack(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, ReadError>> {
        let mut stack = [MaybeUninit::<u8>::uninit(); STACK_READ];
        let mut buf = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)).map_err(ReadError::Io)?;
        let n = buf.filled().len();
        if let Err(e) = self.take_in(buf.filled()) {
            self.failed = Some(e);
        }
        Poll::Ready(Ok(n))
    }

    /// Parses `input`: heads, payloads, complete messages into `ready`.
    fn take_in(&mut self, mut input: &[u8]) -> Result<(), ReadError> {
        while !input.is_empty() {
            let Some(frame) = self.frame.as_mut() else {
                let need = head_needed(&self.head[..self.head_len]);
                let take = (need - self.head_len).min(input.len());
                self.head[self.head_len..self.head_len + take].copy_from_slice(&input[..take]);
                self.head_len += take;
                input = &input[take..];
                if self.head_len == head_needed(&self.head[..self.head_len]) {
                    self.start_frame()?;
                }
                continue;
            };
            let take = frame.remaining().min(input.len());
            frame.push(&input[..take]);
            input = &input[take..];
            if frame.remaining() == 0 {
                self.end_frame()?;
            }
        }
        Ok(())
    }

    /// The head is complete: checks it and starts the frame.
    fn start_frame(&mut self) -> Result<(), ReadError> {
        let head = &self.head[..self.head_len];
        self.head_len = 0;
        let (b0, b1) = (head[0], head[1]);
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
        if b0 & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set, with no extension"));
        }
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol(
                "an unmasked frame (a client masks every frame, RFC 6455 5.1)",
            ));
        }
        let (len, key_at) = match b1 & 0x7F {
            126 => (u64::from(u16::from_be_bytes([head[2], head[3]])), 4),
            127 => (
                u64::from_be_bytes(head[2..10].try_into().unwrap_or_default()),
                10,
            ),
            short => (u64::from(short), 2),
        };
        let key = [
            head[key_at],
            head[key_at + 1],
            head[key_at + 2],
            head[key_at + 3],
        ];
        match opcode {
            CLOSE | PING | PONG if !fin => {
                return Err(ReadError::Protocol("a fragmented control frame"))
            }
            CLOSE | PING | PONG if len > 125 => {
                return Err(ReadError::Protocol("a control frame over 125 bytes"))
            }
            CLOSE | PING | PONG => {}
            CONTINUATION if self.message.is_none() => {
                return Err(ReadError::Protocol(
                    "a continuation with no message to continue",
                ))
            }
            TEXT | BINARY if self.message.is_some() => {
                return Err(ReadError::Protocol(
                    "a new message before the last fragment of the one before",
                ))
            }
            CONTINUATION | TEXT | BINARY => {}
            _ => return Err(ReadError::Protocol("an unknown opcode")),
        }
        if len > i64::MAX as u64 {
            return Err(ReadError::Protocol("a frame length with its top bit set"));
        }
        // Control frames between fragments are not part of the message.
        let so_far = match (&self.message, opcode) {
            (Some((_, message)), CONTINUATION) => message.len() as u64,
            _ => 0,
        };
        let size = so_far.saturating_add(len);
        let len = match usize::try_from(len) {
            Ok(len) if size <= self.max as u64 => len,
            _ => {
                return Err(ReadError::TooLarge {
                    size,
                    max: self.max,
                })
            }
        };
        self.frame = Some(Frame {
            opcode,
            fin,
            key,
            len,
            payload: BytesMut::with_capacity(len.min(FIRST_ALLOCATION)),
        });
        if len == 0 {
            self.end_frame()?;
        }
        Ok(())
    }

    /// The frame's payload is complete: a message, a fragment of one, or a
    /// control frame.
    fn end_frame(&mut self) -> Result<(), ReadError> {
        let Some(frame) = self.frame.take() else {
            return Ok(());
        };
        let (opcode, payload) = match frame.opcode {
            CLOSE => {
                let close = Incoming::Close(close(frame.payload)?);
                self.queue(close);
                return Ok(());
            }
            PING | PONG => {
                let payload = frame.payload.freeze();
                let control = if frame.opcode == PING {
                    Incoming::Ping(payload)
                } else {
                    Incoming::Pong(payload)
                };
                self.queue(control);
                return Ok(());
            }
            CONTINUATION => {
                let Some((opcode, mut message)) = self.message.take() else {
                    return Err(ReadError::Protocol("a continuation with no message"));
                };
                message.extend_from_slice(&frame.payload);
                (opcode, message)
            }
            opcode => (opcode, frame.payload),
        };
        if !frame.fin {
            self.message = Some((opcode, payload));
            return Ok(());
        }
        let message = match opcode {
            TEXT => Incoming::Text(
                String::from_utf8(Vec::from(payload)).map_err(|_| ReadError::NotUtf8)?,
            ),
            _ => Incoming::Binary(payload.freeze()),
        };
        self.queue(message);
        Ok(())
    }

    /// Queues a complete message behind those before it. Reads happen only
    /// once every message is taken, so the first of a read goes in `first`.
    fn queue(&mut self, message: Incoming) {
        if self.first.is_none() && self.ready.is_empty() {
            self.first = Some(message);
        } else {
            self.ready.push_back(message);
        }
    }
}

/// Reads the rest of a large payload into its own allocation.
fn read_direct<R: AsyncRead + Unpin>(
    io: &mut R,
    frame: &mut Frame,
    cx: &mut Context<'_>,
) -> Poll<Result<usize, ReadError>> {
    let remaining = frame.remaining();
    if frame.payload.capacity() == frame.payload.len() {
        frame
            .payload
            .reserve(remaining.min(frame.payload.capacity()));
    }
    let at = frame.payload.len();
    let mut limited = (&mut frame.payload).limit(remaining);
    let n = ready!(tokio_util::io::poll_read_buf(
        Pin::new(io),
        cx,
        &mut limited
    ))
    .map_err(ReadError::Io)?;
    unmask(&mut frame.payload[at..], frame.key, at);
    Poll::Ready(Ok(n))
}

/// How long the head that starts with `head` is: 2 bytes until those are
/// known, then the extended length and the masking key.
fn head_needed(head: &[u8]) -> usize {
    if head.len() < 2 {
        return 2;
    }
    let extended = match head[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let key = if head[1] & 0x80 != 0 { 4 } else { 0 };
    2 + extended + key
}

/// A close frame's code and reason (RFC 6455 5.5.1). A code no endpoint
/// may send, or a reason that is not UTF-8, still means the worker is
/// closing: it is taken as such (as tungstenite did), shown as it came.
fn close(payload: BytesMut) -> Result<Option<(u16, String)>, ReadError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ReadError::Protocol("a close frame of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
            Ok(Some((code, reason)))
        }
    }
}

/// Unmasks `data`, which starts `offset` bytes into its frame's payload
/// (RFC 6455 5.3), eight bytes at a time.
fn unmask(data: &mut [u8], key: [u8; 4], offset: usize) {
    let mut key = key;
    key.rotate_left(offset % 4);
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use proptest::prelude::*;
    use tokio_tungstenite::tungstenite::protocol::frame::{
        coding::{Control, Data, OpCode},
        Frame as WsFrame, FrameHeader,
    };

    /// A stream that hands out `data` in reads of the sizes in `sizes`, in
    /// turn, and then ends.
    struct Chunks {
        data: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
        turn: usize,
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let size = self.sizes[self.turn % self.sizes.len()].max(1);
            self.turn += 1;
            let n = size.min(buf.remaining()).min(self.data.len() - self.at);
            buf.put_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn reader(data: Vec<u8>, sizes: Vec<usize>, max: usize) -> FrameReader<Chunks> {
        let io = Chunks {
            data,
            at: 0,
            sizes,
            turn: 0,
        };
        FrameReader::new(io, max)
    }

    /// A masked frame as tungstenite's client writes it.
    fn frame(opcode: OpCode, fin: bool, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let header = FrameHeader {
            is_final: fin,
            opcode,
            mask: Some(key),
            ..FrameHeader::default()
        };
        let frame = WsFrame::from_payload(header, Bytes::copy_from_slice(payload));
        let mut out = Vec::new();
        frame.format(&mut out).expect("a frame formats into a Vec");
        out
    }

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// Every message until the stream fails or ends.
    fn read_all(r: &mut FrameReader<Chunks>) -> (Vec<Incoming>, ReadError) {
        let mut got = Vec::new();
        loop {
            match r.next().now_or_never().expect("the stream never waits") {
                Ok(m) => got.push(m),
                Err(e) => return (got, e),
            }
        }
    }

    #[test]
    fn reads_each_kind_of_message() {
        let mut data = frame(OpCode::Data(Data::Text), true, "héllo".as_bytes(), KEY);
        data.extend(frame(OpCode::Data(Data::Binary), true, &[1, 2, 3], KEY));
        data.extend(frame(OpCode::Control(Control::Ping), true, b"p", KEY));
        data.extend(frame(OpCode::Control(Control::Pong), true, b"", KEY));
        let mut close = 1001u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        data.extend(frame(OpCode::Control(Control::Close), true, &close, KEY));
        let (got, end) = read_all(&mut reader(data, vec![1], 1024));
        assert_eq!(
            got,
            vec![
                Incoming::Text("héllo".into()),
                Incoming::Binary(Bytes::from_static(&[1, 2, 3])),
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Pong(Bytes::new()),
                Incoming::Close(Some((1001, "bye".into()))),
            ]
        );
        assert!(matches!(end, ReadError::Cut), "{end}");
    }

    #[test]
    fn puts_fragments_together_around_control_frames() {
        let mut data = frame(OpCode::Data(Data::Binary), false, b"ab", KEY);
        data.extend(frame(OpCode::Control(Control::Ping), true, b"x", KEY));
        data.extend(frame(OpCode::Data(Data::Continue), false, b"", KEY));
        data.extend(frame(OpCode::Data(Data::Continue), true, b"cd", KEY));
        let (got, _) = read_all(&mut reader(data, vec![3, 1, 7], 1024));
        assert_eq!(
            got,
            vec![
                Incoming::Ping(Bytes::from_static(b"x")),
                Incoming::Binary(Bytes::from_static(b"abcd")),
            ]
        );
    }

    #[test]
    fn a_large_frame_leaves_nothing_behind() {
        let payload: Vec<u8> = (0..3 * 1024 * 1024 + 7)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut data = frame(OpCode::Data(Data::Binary), true, &payload, KEY);
        data.extend(frame(OpCode::Data(Data::Text), true, b"after", KEY));
        let mut r = reader(data, vec![5000, 16 * 1024, 64 * 1024], 4 * 1024 * 1024);
        let first = r.next().now_or_never().expect("ready");
        assert!(matches!(&first, Ok(Incoming::Binary(b)) if b[..] == payload[..]));
        let second = r.next().now_or_never().expect("ready");
        assert!(matches!(&second, Ok(Incoming::Text(t)) if t == "after"));
        assert!(r.frame.is_none() && r.message.is_none());
        assert_eq!(r.ready.capacity(), 0, "an idle reader holds no queue");
    }

    /// The first error reading `data` (in one read), after what came before.
    fn error_of(data: Vec<u8>, max: usize) -> String {
        read_all(&mut reader(data, vec![usize::MAX], max))
            .1
            .to_string()
    }

    #[test]
    fn refuses_what_rfc_6455_forbids() {
        let text = |fin, p: &[u8]| frame(OpCode::Data(Data::Text), fin, p, KEY);
        let ping = frame(OpCode::Control(Control::Ping), true, &[0; 126], KEY);
        let mut unmasked = text(true, b"hi");
        unmasked[1] &= 0x7f;
        unmasked.truncate(2);
        let mut reserved = text(true, b"hi");
        reserved[0] |= 0x40;
        let mut unknown = text(true, b"hi");
        unknown[0] = 0x80 | 0x3;
        let fragmented_ping = frame(OpCode::Control(Control::Ping), false, b"", KEY);
        let orphan = frame(OpCode::Data(Data::Continue), true, b"x", KEY);
        let mut interrupted = text(false, b"a");
        interrupted.extend(text(true, b"b"));
        let cases = [
            (unmasked, "unmasked"),
            (reserved, "reserved bits"),
            (unknown, "unknown opcode"),
            (ping, "control frame over 125"),
            (fragmented_ping, "fragmented control"),
            (orphan, "no message to continue"),
            (interrupted, "a new message before"),
            (text(true, &[0xff, 0xfe]), "not UTF-8"),
            (
                frame(OpCode::Control(Control::Close), true, &[3], KEY),
                "one byte",
            ),
        ];
        for (data, expected) in cases {
            let error = error_of(data, 1024);
            assert!(
                error.contains(expected),
                "{error:?} should say {expected:?}"
            );
        }
    }

    #[test]
    fn refuses_a_frame_over_the_limit_from_its_head() {
        // The head alone: no payload is waited for, or allocated.
        let mut head = frame(OpCode::Data(Data::Binary), true, &[0; 2000], KEY);
        head.truncate(8);
        let error = error_of(head, 1000);
        assert!(
            error.contains("2000 bytes, over workers.max_frame (1000"),
            "{error}"
        );
        let mut fragments = frame(OpCode::Data(Data::Binary), false, &[0; 600], KEY);
        fragments.extend(frame(OpCode::Data(Data::Continue), true, &[0; 600], KEY));
        let error = error_of(fragments, 1000);
        assert!(error.contains("1200 bytes"), "{error}");
    }

    #[test]
    fn control_frames_between_fragments_do_not_count_toward_the_limit() {
        // 950 + 50 bytes of message, and a 100-byte ping between.
        let mut data = frame(OpCode::Data(Data::Binary), false, &[1; 950], KEY);
        data.extend(frame(OpCode::Control(Control::Ping), true, &[2; 100], KEY));
        data.extend(frame(OpCode::Data(Data::Continue), true, &[3; 50], KEY));
        let (got, end) = read_all(&mut reader(data, vec![usize::MAX], 1000));
        assert_eq!(got.len(), 2, "{end}");
        assert!(matches!(&got[1], Incoming::Binary(b) if b.len() == 1000));
    }

    #[test]
    fn any_close_code_closes() {
        let mut payload = 1005u16.to_be_bytes().to_vec();
        payload.extend_from_slice(&[b'a', 0xff]);
        let data = frame(OpCode::Control(Control::Close), true, &payload, KEY);
        let (got, _) = read_all(&mut reader(data, vec![1], 1000));
        assert_eq!(got, vec![Incoming::Close(Some((1005, "a\u{fffd}".into())))]);
    }

    #[test]
    fn a_stream_cut_mid_frame_is_cut() {
        let mut data = frame(OpCode::Data(Data::Binary), true, &[7; 100], KEY);
        data.truncate(50);
        assert_eq!(
            error_of(data, 1024),
            "the connection was cut (no close frame)"
        );
    }

    /// A message as a test sends it: its payload, and how many fragments.
    fn messages() -> impl Strategy<Value = Vec<(bool, Vec<u8>, usize, bool)>> {
        let message = (
            any::<bool>(),
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..200),
                proptest::collection::vec(any::<u8>(), 0..70_000),
            ],
            1usize..4,
            any::<bool>(),
        );
        proptest::collection::vec(message, 1..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the messages, fragments, masks and read sizes, the
        /// reader gives back exactly the messages tungstenite's client sent.
        #[test]
        fn reads_back_what_tungstenite_sent(
            sent in messages(),
            sizes in proptest::collection::vec(1usize..40_000, 1..6),
            key in any::<[u8; 4]>(),
        ) {
            let mut data = Vec::new();
            let mut expected = Vec::new();
            for (text, payload, parts, ping) in &sent {
                let payload = if *text {
                    String::from_utf8_lossy(payload).into_owned().into_bytes()
                } else {
                    payload.clone()
                };
                let step = payload.len().div_ceil(*parts).max(1);
                let pieces: Vec<&[u8]> = if payload.is_empty() {
                    vec![&[]]
                } else {
                    payload.chunks(step).collect()
                };
                let whole = pieces.len() == 1;
                for (i, piece) in pieces.iter().enumerate() {
                    let opcode = match (i, text) {
                        (0, true) => OpCode::Data(Data::Text),
                        (0, false) => OpCode::Data(Data::Binary),
                        _ => OpCode::Data(Data::Continue),
                    };
                    data.extend(frame(opcode, i + 1 == pieces.len(), piece, key));
                    // A ping between fragments comes out first; one after
                    // a whole message, after it.
                    if *ping && i == 0 && !whole {
                        data.extend(frame(OpCode::Control(Control::Ping), true, b"p", key));
                        expected.push(Incoming::Ping(Bytes::from_static(b"p")));
                    }
                }
                expected.push(if *text {
                    Incoming::Text(String::from_utf8(payload).expect("lossy is UTF-8"))
                } else {
                    Incoming::Binary(Bytes::from(payload))
                });
                if *ping && whole {
                    data.extend(frame(OpCode::Control(Control::Ping), true, b"p", key));
                    expected.push(Incoming::Ping(Bytes::from_static(b"p")));
                }
            }
            let (got, end) = read_all(&mut reader(data, sizes, 1 << 20));
            prop_assert!(got.len() == expected.len(), "{} messages of {}, then {}", got.len(), expected.len(), end);
            prop_assert_eq!(got, expected);
            prop_assert!(matches!(end, ReadError::Cut));
        }
    }

    /// Frames whose payload ends in reads straight into its allocation,
    /// whatever the read sizes.
    #[test]
    fn payloads_read_straight_into_their_allocation_end_their_frame() {
        for sizes in [vec![1], vec![100], vec![5000], vec![20000], vec![39999]] {
            for len in [4095, 4096, 5000, 16384, 20000, 70000] {
                let payload = vec![9u8; len];
                let data = frame(OpCode::Data(Data::Binary), true, &payload, KEY);
                let (got, end) = read_all(&mut reader(data, sizes.clone(), 1 << 20));
                assert_eq!(got.len(), 1, "{sizes:?} {len}: {end}");
            }
        }
    }

    #[test]
    fn unmasking_at_any_offset_matches_byte_by_byte() {
        let data: Vec<u8> = (0..=255).collect();
        for offset in 0..8 {
            for len in [0, 1, 7, 8, 9, 100] {
                let mut fast = data[..len].to_vec();
                unmask(&mut fast, KEY, offset);
                let slow: Vec<u8> = (0..len).map(|i| data[i] ^ KEY[(offset + i) % 4]).collect();
                assert_eq!(fast, slow, "offset {offset}, {len} bytes");
            }
        }
    }
}
