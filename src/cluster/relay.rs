//! Calls that run on another bridge: the messages two bridges exchange for
//! one call, and the tables that route them to the call they belong to.
//!
//! Every bridge subscribes to one subject, `<name>.node.<node>`, and gets
//! on it both the calls other bridges send it and the replies to the calls
//! it sent. One subscription keeps each peer's messages in the order they
//! were published. A message is a JSON head, a newline, then raw body bytes
//! (docs/CLUSTER.md, "Calls through another bridge"). The table is
//! synchronous, and the format is unit-tested here.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    flow::Window,
    protocol::{
        json::{self, set},
        Header,
    },
};

/// Largest JSON head a bridge reads; a message whose head is longer is
/// dropped unread.
pub(crate) const MAX_HEAD: usize = 128 * 1024;

/// Body bytes per message (each way), whatever the server's `max_payload`
/// allows: small enough to interleave calls, large enough to amortise.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Body bytes one call may have in flight each way before the receiver
/// credits more.
pub(crate) const WINDOW: usize = 1024 * 1024;

/// Frames one call may have queued at its receiver before its task takes
/// them. Senders merge small chunks that are ready at once, so a window
/// rarely takes more than a few dozen frames; a peer that floods a call
/// past this has broken flow control and the call is failed. (Bytes are
/// bounded by the window, checked as the frames are taken.)
pub(crate) const QUEUE: usize = 1024;

/// One message of a cross-node call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum Frame {
    /// To the serving bridge, as a NATS request: a call, with the start of
    /// its body after the head. The reply is the [`Ack`].
    Call(CallHead),
    /// To the serving bridge: request body bytes at offset `off`; `end`
    /// marks the last.
    ReqData {
        from: String,
        call: u64,
        off: u64,
        #[serde(default)]
        end: bool,
    },
    /// To the serving bridge: the caller read `bytes` more of the reply.
    ResCredit { from: String, call: u64, bytes: u64 },
    /// To the serving bridge: the call is over for its caller; end it.
    Cancel {
        from: String,
        call: u64,
        reason: String,
    },
    /// To the calling bridge: the reply head, with the whole body after it
    /// when `end`.
    ResHead(ResHead),
    /// To the calling bridge: reply body bytes at offset `off`.
    ResData {
        call: u64,
        off: u64,
        #[serde(default)]
        end: bool,
    },
    /// To the calling bridge: the serving bridge read `bytes` more of the
    /// request body.
    ReqCredit { call: u64, bytes: u64 },
    /// To the calling bridge: the reply cannot be completed.
    Fail { call: u64, reason: String },
    /// To the calling bridge: the call is still running (every second).
    Alive { call: u64 },
}

/// A call as the calling bridge sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CallHead {
    /// The calling bridge's node name.
    pub(crate) from: String,
    /// The calling bridge's boot (its presence `epoch`): a call from an
    /// earlier boot of that node has nobody waiting for it.
    #[serde(default)]
    pub(crate) epoch: u64,
    /// The call's id at the calling bridge.
    pub(crate) call: u64,
    pub(crate) request_id: String,
    /// The service the calling bridge routed the request to.
    pub(crate) service: String,
    pub(crate) method: String,
    /// Path and query.
    pub(crate) path: String,
    /// Time left before the call's deadline, in ms.
    pub(crate) timeout_ms: u64,
    /// The route's `request_timeout` at the calling bridge, in ms: how long
    /// a streamed body may stay silent.
    #[serde(default)]
    pub(crate) idle_ms: u64,
    /// The route's `max_body` at the calling bridge.
    #[serde(default)]
    pub(crate) max_body: u64,
    /// The whole body follows the head.
    pub(crate) end: bool,
    /// The request's headers as a worker gets them (already forwarded).
    #[serde(default)]
    pub(crate) headers: Vec<Header>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) latin1: Vec<usize>,
}

/// A reply head as the serving bridge sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ResHead {
    pub(crate) call: u64,
    pub(crate) status: u16,
    /// The whole body follows the head.
    pub(crate) end: bool,
    /// The error code when the serving bridge produced the reply itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// The worker that answered, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) worker: Option<String>,
    #[serde(default)]
    pub(crate) headers: Vec<Header>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) latin1: Vec<usize>,
}

/// The serving bridge's answer to a [`Frame::Call`], at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    /// It took the call: the reply comes as frames.
    Accepted,
    /// All its workers of the service are at capacity and its queue is full.
    Busy,
    /// It has no worker of the service that takes calls.
    NoWorker,
    /// It could not read the call (or is shutting down).
    Refused,
}

impl Ack {
    pub(crate) fn as_bytes(self) -> &'static [u8] {
        match self {
            Ack::Accepted => b"accepted",
            Ack::Busy => b"busy",
            Ack::NoWorker => b"no_worker",
            Ack::Refused => b"refused",
        }
    }

    pub(crate) fn parse(payload: &[u8]) -> Ack {
        match payload {
            b"accepted" => Ack::Accepted,
            b"busy" => Ack::Busy,
            b"no_worker" => Ack::NoWorker,
            _ => Ack::Refused,
        }
    }
}

/// A message: the frame's JSON, a newline, and `body`. Headers a caller
/// controls are inside the JSON (escaped), so the first newline ends it.
pub(crate) fn encode(frame: &Frame, body: &[u8]) -> Bytes {
    let mut out = serde_json::to_vec(frame).unwrap_or_default();
    out.reserve(1 + body.len());
    out.push(b'\n');
    out.extend_from_slice(body);
    out.into()
}

/// [`encode`] for a [`Frame::Call`] or [`Frame::ResHead`] whose headers
/// are already JSON (`,"headers":[...]` and any `,"latin1":[...]`, as
/// `protocol::json::EncodedHeaders` holds them): the frame's own header
/// list must be empty, and the JSON is put in its place. Written by hand,
/// byte for byte what serde writes (one of each per call).
pub(crate) fn encode_with_headers(frame: &Frame, headers: &[u8], body: &[u8]) -> Bytes {
    let (size, write): (usize, fn(&Frame, &mut Vec<u8>)) = match frame {
        Frame::Call(h) if h.headers.is_empty() && h.latin1.is_empty() => {
            let strings = h.from.len() + h.request_id.len() + h.service.len();
            (strings + h.method.len() + h.path.len() + 200, write_call)
        }
        Frame::ResHead(h) if h.headers.is_empty() && h.latin1.is_empty() => {
            let strings = h.error.as_ref().map_or(0, String::len);
            (
                strings + h.worker.as_ref().map_or(0, String::len) + 100,
                write_res_head,
            )
        }
        _ => return encode(frame, body),
    };
    let mut out = Vec::with_capacity(size + headers.len() + 2 + body.len());
    write(frame, &mut out);
    out.extend_from_slice(headers);
    out.extend_from_slice(b"}\n");
    out.extend_from_slice(body);
    out.into()
}

/// A [`Frame::Call`]'s JSON up to its headers, in serde's field order.
fn write_call(frame: &Frame, out: &mut Vec<u8>) {
    let Frame::Call(h) = frame else { return };
    out.extend_from_slice(br#"{"t":"call""#);
    texts(out, &[(r#","from":"#, h.from.as_str())]);
    numbers(out, &[(r#","epoch":"#, h.epoch), (r#","call":"#, h.call)]);
    texts(
        out,
        &[
            (r#","request_id":"#, h.request_id.as_str()),
            (r#","service":"#, h.service.as_str()),
            (r#","method":"#, h.method.as_str()),
            (r#","path":"#, h.path.as_str()),
        ],
    );
    numbers(
        out,
        &[
            (r#","timeout_ms":"#, h.timeout_ms),
            (r#","idle_ms":"#, h.idle_ms),
            (r#","max_body":"#, h.max_body),
        ],
    );
    json::write_end(h.end, out);
}

/// A [`Frame::ResHead`]'s JSON up to its headers, in serde's field order.
fn write_res_head(frame: &Frame, out: &mut Vec<u8>) {
    let Frame::ResHead(h) = frame else { return };
    out.extend_from_slice(br#"{"t":"res_head""#);
    numbers(
        out,
        &[
            (r#","call":"#, h.call),
            (r#","status":"#, u64::from(h.status)),
        ],
    );
    json::write_end(h.end, out);
    for (key, value) in [(r#","error":"#, &h.error), (r#","worker":"#, &h.worker)] {
        if let Some(value) = value {
            texts(out, &[(key, value.as_str())]);
        }
    }
}

/// `,"key":"value"` for each pair (the key as written, with its comma).
fn texts(out: &mut Vec<u8>, fields: &[(&str, &str)]) {
    for (key, value) in fields {
        out.extend_from_slice(key.as_bytes());
        json::write_str(value, out);
    }
}

/// `,"key":n` for each pair.
fn numbers(out: &mut Vec<u8>, fields: &[(&str, u64)]) {
    for (key, n) in fields {
        out.extend_from_slice(key.as_bytes());
        json::write_u64(*n, out);
    }
}

/// Why a message could not be read.
#[derive(Debug, PartialEq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("no head within {MAX_HEAD} bytes")]
    NoHead,
    #[error("unreadable head: {0}")]
    Json(String),
}

/// Splits a message into its frame and its body (a slice of `payload`).
pub(crate) fn decode(payload: &Bytes) -> Result<(Frame, Bytes), DecodeError> {
    let scan = &payload[..payload.len().min(MAX_HEAD + 1)];
    let nl = scan
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(DecodeError::NoHead)?;
    let json = &payload[..nl];
    let json_error = |e: serde_json::Error| DecodeError::Json(e.to_string());
    // The two frames with headers, one of each per call, as this crate
    // writes them (the tag first): read by hand, or failing that straight
    // into their struct, which ignores the tag. The generic path buffers the
    // whole head before reading it again.
    let frame = if json.starts_with(br#"{"t":"call","#) {
        match read_call(json) {
            Some(head) => Frame::Call(head),
            None => Frame::Call(serde_json::from_slice(json).map_err(json_error)?),
        }
    } else if json.starts_with(br#"{"t":"res_head","#) {
        match read_res_head(json) {
            Some(head) => Frame::ResHead(head),
            None => Frame::ResHead(serde_json::from_slice(json).map_err(json_error)?),
        }
    } else {
        serde_json::from_slice(json).map_err(json_error)?
    };
    Ok((frame, payload.slice(nl + 1..)))
}

/// A [`CallHead`] read by hand, as `protocol::json` reads the worker
/// protocol's heads: `None` for anything it does not expect, and serde then
/// decides. What it returns is what serde would have.
fn read_call(json: &[u8]) -> Option<CallHead> {
    let mut tag = None;
    let (mut from, mut epoch, mut call, mut request_id) = (None, None, None, None);
    let (mut service, mut method, mut path, mut timeout_ms) = (None, None, None, None);
    let (mut idle_ms, mut max_body, mut end, mut headers, mut latin1) =
        (None, None, None, None, None);
    json::read_object(json, |r, key| match key {
        // Once, as the whole frame's serde would have it.
        "t" if r.string()? == "call" => set(&mut tag, ()),
        "from" => set(&mut from, r.string()?.into_owned()),
        "epoch" => set(&mut epoch, r.number()?),
        "call" => set(&mut call, r.number()?),
        "request_id" => set(&mut request_id, r.string()?.into_owned()),
        "service" => set(&mut service, r.string()?.into_owned()),
        "method" => set(&mut method, r.string()?.into_owned()),
        "path" => set(&mut path, r.string()?.into_owned()),
        "timeout_ms" => set(&mut timeout_ms, r.number()?),
        "idle_ms" => set(&mut idle_ms, r.number()?),
        "max_body" => set(&mut max_body, r.number()?),
        "end" => set(&mut end, r.boolean()?),
        "headers" => set(&mut headers, json::owned(r.headers()?)),
        "latin1" => set(&mut latin1, r.indices()?),
        _ => None,
    })?;
    Some(CallHead {
        from: from?,
        epoch: epoch.unwrap_or_default(),
        call: call?,
        request_id: request_id?,
        service: service?,
        method: method?,
        path: path?,
        timeout_ms: timeout_ms?,
        idle_ms: idle_ms.unwrap_or_default(),
        max_body: max_body.unwrap_or_default(),
        end: end?,
        headers: headers.unwrap_or_default(),
        latin1: latin1.unwrap_or_default(),
    })
}

/// A [`ResHead`] read by hand; see [`read_call`].
fn read_res_head(json: &[u8]) -> Option<ResHead> {
    let mut tag = None;
    let (mut call, mut status, mut end, mut error) = (None, None, None, None);
    let (mut worker, mut headers, mut latin1) = (None, None, None);
    json::read_object(json, |r, key| match key {
        "t" if r.string()? == "res_head" => set(&mut tag, ()),
        "call" => set(&mut call, r.number()?),
        "status" => set(&mut status, u16::try_from(r.number()?).ok()?),
        "end" => set(&mut end, r.boolean()?),
        "error" => set(&mut error, r.string()?.into_owned()),
        "worker" => set(&mut worker, r.string()?.into_owned()),
        "headers" => set(&mut headers, json::owned(r.headers()?)),
        "latin1" => set(&mut latin1, r.indices()?),
        _ => None,
    })?;
    Some(ResHead {
        call: call?,
        status: status?,
        end: end?,
        error,
        worker,
        headers: headers.unwrap_or_default(),
        latin1: latin1.unwrap_or_default(),
    })
}

/// A frame routed to the call it belongs to, with its body bytes.
pub(crate) type Routed = (Frame, Bytes);

/// One call's end of the routing table: where its frames go, and the
/// window the peer's credit refills.
pub(crate) struct Route {
    pub(crate) frames: mpsc::Sender<Routed>,
    pub(crate) window: Arc<Window>,
}

/// Where frames for calls in progress go: this bridge's calls running
/// elsewhere (by call id), and other bridges' calls running here (by
/// their node and call id).
#[derive(Default)]
pub(crate) struct Table {
    outgoing: Mutex<HashMap<u64, Route>>,
    incoming: Mutex<HashMap<(String, u64), Route>>,
}

/// What became of a routed frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// Queued for its call, or a credit applied.
    Yes,
    /// No such call (any more): a late frame, dropped.
    Unknown,
    /// The call's queue is full: its peer broke flow control. The call
    /// is removed (its receiver sees the end of its frames).
    Overflow,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Table {
    /// Registers one of this bridge's calls; its frames come on the receiver.
    pub(crate) fn add_outgoing(&self, call: u64) -> (mpsc::Receiver<Routed>, Arc<Window>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let window = Arc::new(Window::new(WINDOW));
        let route = Route {
            frames: tx,
            window: window.clone(),
        };
        lock(&self.outgoing).insert(call, route);
        (rx, window)
    }

    pub(crate) fn remove_outgoing(&self, call: u64) {
        if let Some(route) = lock(&self.outgoing).remove(&call) {
            route.window.close();
        }
    }

    /// Registers a peer's call running here.
    pub(crate) fn add_incoming(
        &self,
        from: &str,
        call: u64,
    ) -> (mpsc::Receiver<Routed>, Arc<Window>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let window = Arc::new(Window::new(WINDOW));
        let route = Route {
            frames: tx,
            window: window.clone(),
        };
        lock(&self.incoming).insert((from.to_owned(), call), route);
        (rx, window)
    }

    pub(crate) fn remove_incoming(&self, from: &str, call: u64) {
        if let Some(route) = lock(&self.incoming).remove(&(from.to_owned(), call)) {
            route.window.close();
        }
    }

    /// Calls of peers running here, for status.
    pub(crate) fn incoming_len(&self) -> usize {
        lock(&self.incoming).len()
    }

    /// Calls of this bridge running elsewhere, for status.
    pub(crate) fn outgoing_len(&self) -> usize {
        lock(&self.outgoing).len()
    }

    /// Routes a frame that is not a new call to its call.
    pub(crate) fn deliver(&self, frame: Frame, body: Bytes) -> Delivered {
        match &frame {
            Frame::Call(_) => Delivered::Unknown,
            Frame::ReqData { from, call, .. } | Frame::Cancel { from, call, .. } => {
                let key = (from.clone(), *call);
                let mut table = lock(&self.incoming);
                push(&mut table, key, frame, body)
            }
            Frame::ResCredit { from, call, bytes } => {
                let table = lock(&self.incoming);
                credit(table.get(&(from.clone(), *call)), *bytes)
            }
            Frame::ReqCredit { call, bytes } => credit(lock(&self.outgoing).get(call), *bytes),
            Frame::ResHead(ResHead { call, .. })
            | Frame::ResData { call, .. }
            | Frame::Fail { call, .. }
            | Frame::Alive { call } => {
                let call = *call;
                let mut table = lock(&self.outgoing);
                push(&mut table, call, frame, body)
            }
        }
    }
}

fn credit(route: Option<&Route>, bytes: u64) -> Delivered {
    match route {
        Some(route) => {
            route.window.credit(bytes);
            Delivered::Yes
        }
        None => Delivered::Unknown,
    }
}

fn push<K: std::hash::Hash + Eq>(
    table: &mut HashMap<K, Route>,
    key: K,
    frame: Frame,
    body: Bytes,
) -> Delivered {
    let Some(route) = table.get(&key) else {
        return Delivered::Unknown;
    };
    match route.frames.try_send((frame, body)) {
        Ok(()) => Delivered::Yes,
        Err(mpsc::error::TrySendError::Closed(_)) => {
            table.remove(&key);
            Delivered::Unknown
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            if let Some(route) = table.remove(&key) {
                route.window.close();
            }
            Delivered::Overflow
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> CallHead {
        CallHead {
            from: "a".into(),
            epoch: 1,
            call: 7,
            request_id: "r1".into(),
            service: "echo".into(),
            method: "POST".into(),
            path: "/x?y=1".into(),
            timeout_ms: 30_000,
            idle_ms: 30_000,
            max_body: 1 << 20,
            end: true,
            headers: vec![("x-a".into(), "line\nbreak".into())],
            latin1: vec![],
        }
    }

    #[test]
    fn a_message_is_its_head_a_newline_and_its_body_byte_for_byte() {
        let body = b"\n{\"t\":\"alive\"}\n\x00\xff".to_vec();
        let msg = encode(&Frame::Call(head()), &body);
        let (frame, got) = decode(&msg).expect("decodes");
        assert_eq!(frame, Frame::Call(head()));
        assert_eq!(&got[..], &body[..]);
    }

    #[test]
    fn headers_written_once_are_spliced_into_the_head() {
        let pairs = vec![("x-a", "1"), ("x-b", "two")];
        let encoded = crate::protocol::json::EncodedHeaders::new(&pairs);
        let mut bare = head();
        bare.headers.clear();
        let msg = encode_with_headers(&Frame::Call(bare.clone()), encoded.as_bytes(), b"body");
        let (frame, body) = decode(&msg).expect("decodes");
        bare.headers = vec![("x-a".into(), "1".into()), ("x-b".into(), "two".into())];
        assert_eq!(frame, Frame::Call(bare));
        assert_eq!(&body[..], b"body");
    }

    #[test]
    fn heads_with_their_tag_first_or_elsewhere_read_the_same() {
        let reply = Frame::ResHead(ResHead {
            call: 3,
            status: 201,
            end: true,
            error: None,
            worker: Some("w".into()),
            headers: vec![("a".into(), "b".into())],
            latin1: vec![],
        });
        let fast = encode(&reply, b"x");
        assert!(fast.starts_with(br#"{"t":"res_head","#));
        assert_eq!(decode(&fast).expect("decodes").0, reply);
        let moved =
            br#"{"call":3,"status":201,"t":"res_head","end":true,"worker":"w","headers":[["a","b"]]}"#;
        let mut message = moved.to_vec();
        message.push(b'\n');
        assert_eq!(decode(&Bytes::from(message)).expect("decodes").0, reply);
    }

    #[test]
    fn heads_written_by_hand_are_the_bytes_serde_writes() {
        // The last value is not UTF-8 (PROTOCOL 5.1): `"latin1"` follows.
        let mut map = http::HeaderMap::new();
        map.insert("x-a", http::HeaderValue::from_static("1"));
        map.insert("x-b", http::HeaderValue::from_static("t\two"));
        map.insert(
            "x-l",
            http::HeaderValue::from_bytes(b"\xe9").expect("a value"),
        );
        let pairs = crate::headers::to_wire_ref(&map);
        let encoded = crate::protocol::json::EncodedHeaders::new(&pairs);
        let owned: Vec<Header> = pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_ref().to_owned()))
            .collect();
        let latin1 = vec![2];
        let mut call = head();
        call.request_id = "r\"\\\n".into();
        call.headers.clear();
        let replies = [
            (None, None),
            (None, Some("w")),
            (Some("no_worker"), Some("w\u{7f}\u{e9}")),
        ];
        let mut frames = vec![Frame::Call(call)];
        for (error, worker) in replies {
            frames.push(Frame::ResHead(ResHead {
                call: u64::MAX,
                status: 200,
                end: error.is_some(),
                error: error.map(str::to_owned),
                worker: worker.map(str::to_owned),
                headers: Vec::new(),
                latin1: Vec::new(),
            }));
        }
        for bare in frames {
            let mut full = bare.clone();
            match &mut full {
                Frame::Call(h) => (h.headers, h.latin1) = (owned.clone(), latin1.clone()),
                Frame::ResHead(h) => (h.headers, h.latin1) = (owned.clone(), latin1.clone()),
                _ => {}
            }
            let by_hand = encode_with_headers(&bare, encoded.as_bytes(), b"\nbody");
            assert_eq!(
                String::from_utf8_lossy(&by_hand),
                String::from_utf8_lossy(&encode(&full, b"\nbody"))
            );
        }
    }

    #[test]
    fn heads_read_by_hand_are_the_ones_serde_reads_or_left_to_it() {
        let reply = ResHead {
            call: 3,
            status: 502,
            end: false,
            error: Some("worker_lost".into()),
            worker: Some("w\"1".into()),
            headers: vec![("x-\u{e9}".into(), "a\tb\\c".into())],
            latin1: vec![0],
        };
        let mut minimal = head();
        (minimal.epoch, minimal.idle_ms, minimal.max_body) = (0, 0, 0);
        minimal.headers.clear();
        let written = [
            serde_json::to_vec(&Frame::Call(head())),
            serde_json::to_vec(&Frame::ResHead(reply.clone())),
            serde_json::to_vec(&Frame::Call(minimal)),
        ];
        for json in written {
            let json = json.expect("serialises");
            let by_hand = read_call(&json)
                .map(Frame::Call)
                .or_else(|| read_res_head(&json).map(Frame::ResHead));
            let by_serde: Frame = serde_json::from_slice(&json).expect("serde reads it");
            assert_eq!(
                by_hand,
                Some(by_serde),
                "{}",
                String::from_utf8_lossy(&json)
            );
        }
        // Whitespace, another order and absent defaults are still read by hand.
        let spaced = br#" { "status" : 200 , "t" : "res_head", "call":1, "end":true } "#;
        let serde_reads: ResHead = serde_json::from_slice(spaced).expect("serde reads it");
        assert_eq!(read_res_head(spaced), Some(serde_reads));
        let bare = br#"{"t":"call","from":"a","call":1,"request_id":"r","service":"s","method":"GET","path":"/","timeout_ms":5,"end":true}"#;
        let serde_reads: CallHead = serde_json::from_slice(bare).expect("serde reads it");
        assert_eq!(read_call(bare), Some(serde_reads));
        // Anything unexpected goes to serde, which decides: a null, an
        // unknown or repeated field, a missing one, another frame's tag.
        for odd in [
            &br#"{"t":"res_head","call":1,"status":200,"end":true,"error":null}"#[..],
            br#"{"t":"res_head","call":1,"status":200,"end":true,"new":1}"#,
            br#"{"t":"res_head","call":1,"call":2,"status":200,"end":true}"#,
            br#"{"t":"res_head","call":1,"end":true}"#,
            br#"{"t":"call","call":1,"status":200,"end":true}"#,
            br#"{"t":"res_head","call":1,"status":200,"end":true} x"#,
            br#"{"t":"res_head","call":1,"status":200,"end":true,"t":"res_head"}"#,
            br#"{"t":"res_head","call":1,"status":70000,"end":true}"#,
        ] {
            assert_eq!(read_res_head(odd), None, "{}", String::from_utf8_lossy(odd));
        }
        assert_eq!(read_call(br#"{"t":"call","from":"a","call":1}"#), None);
    }

    #[test]
    fn a_message_without_a_head_or_with_a_bad_one_is_an_error() {
        assert_eq!(
            decode(&Bytes::from_static(b"{\"t\":\"alive\",\"call\":1}")),
            Err(DecodeError::NoHead)
        );
        assert!(matches!(
            decode(&Bytes::from_static(b"{\"t\":\"nope\"}\n")),
            Err(DecodeError::Json(_))
        ));
        let long = Bytes::from(vec![b' '; MAX_HEAD + 10]);
        assert_eq!(decode(&long), Err(DecodeError::NoHead));
    }

    #[test]
    fn frames_reach_their_call_and_late_ones_are_dropped() {
        let table = Table::default();
        let (mut rx, _window) = table.add_outgoing(1);
        let alive = Frame::Alive { call: 1 };
        assert_eq!(table.deliver(alive.clone(), Bytes::new()), Delivered::Yes);
        assert_eq!(rx.try_recv().map(|r| r.0), Ok(alive));
        // Another node's call 1 is not this bridge's call 1.
        let cancel = Frame::Cancel {
            from: "b".into(),
            call: 1,
            reason: "client_gone".into(),
        };
        assert_eq!(table.deliver(cancel, Bytes::new()), Delivered::Unknown);
        table.remove_outgoing(1);
        assert_eq!(
            table.deliver(Frame::Alive { call: 1 }, Bytes::new()),
            Delivered::Unknown
        );
    }

    #[test]
    fn a_peer_that_floods_a_call_past_its_queue_ends_it() {
        let table = Table::default();
        let (_rx, window) = table.add_incoming("a", 3);
        let data = |off| Frame::ReqData {
            from: "a".into(),
            call: 3,
            off,
            end: false,
        };
        for i in 0..QUEUE {
            assert_eq!(table.deliver(data(i as u64), Bytes::new()), Delivered::Yes);
        }
        assert_eq!(table.deliver(data(0), Bytes::new()), Delivered::Overflow);
        assert!(window.is_closed(), "the call's window is closed");
        assert_eq!(table.deliver(data(0), Bytes::new()), Delivered::Unknown);
    }

    #[test]
    fn credit_refills_the_calls_window_never_past_its_size() {
        let table = Table::default();
        let (_rx, window) = table.add_outgoing(9);
        let credit = Frame::ReqCredit {
            call: 9,
            bytes: u64::MAX,
        };
        assert_eq!(table.deliver(credit, Bytes::new()), Delivered::Yes);
        let full = futures_util::FutureExt::now_or_never(window.take(WINDOW));
        assert_eq!(full, Some(Ok(())));
        let more = futures_util::FutureExt::now_or_never(window.take(1));
        assert!(more.is_none(), "no more than one window");
    }

    #[test]
    fn acks_read_back_and_anything_else_is_a_refusal() {
        for ack in [Ack::Accepted, Ack::Busy, Ack::NoWorker, Ack::Refused] {
            assert_eq!(Ack::parse(ack.as_bytes()), ack);
        }
        assert_eq!(Ack::parse(b"yes please"), Ack::Refused);
    }
}
