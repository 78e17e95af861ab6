//! The wire protocol between the bridge and its workers (version 1).
//!
//! Everything a worker in another language needs is also written down in
//! `docs/PROTOCOL.md`; this module is the reference implementation of it.
//!
//! * Control frames (`hello`, `welcome`, `cancel`, `error`, `drain`) are JSON
//!   objects in WebSocket **text** frames, tagged by a `"type"` field.
//! * Calls travel in WebSocket **binary** frames laid out as
//!   `u32 big-endian header length | JSON header | raw body bytes`, so bodies
//!   are never base64-encoded. A message is a head (`request` or `response`)
//!   followed by zero or more `body` chunks; the frame with `"end": true`
//!   finishes it. Small bodies travel in the head frame itself.
//!
//! Unknown JSON fields are ignored everywhere so that both sides can grow.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The WebSocket subprotocol that names this protocol version. A worker must
/// offer it in `Sec-WebSocket-Protocol`; a future v2 gets a new name.
pub const SUBPROTOCOL: &str = "wsbridge.v1";

/// Numeric protocol version, echoed in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest JSON header a binary frame may carry. Headers of real HTTP calls
/// are a few KiB; anything bigger is an attack or a bug.
pub const MAX_HEADER_LEN: usize = 64 * 1024;

/// Bodies larger than this are split into `body` chunk frames, so one large
/// call never holds a worker connection for long in a single frame.
pub const CHUNK_SIZE: usize = 256 * 1024;

/// The smallest frame limit either side may announce: one full chunk plus a
/// maximal header must always fit.
pub const MIN_FRAME: usize = CHUNK_SIZE + MAX_HEADER_LEN + 4;

/// Default per-call flow-control window (`[workers] flow_window`): the body
/// bytes of one call that may be on their way, sent but not yet consumed
/// by the receiver's reader. 256 KiB keeps a loopback or LAN link full
/// (measured: about 1 GB/s through TLS here) while small calls sharing the
/// connection wait behind little; high-latency links want more (the
/// bandwidth-delay product).
pub const WINDOW: usize = 256 * 1024;

/// Most services a single worker may declare in `hello`.
pub const MAX_SERVICES: usize = 64;

/// Largest `max_inflight` a worker may declare; keeps one worker from
/// claiming the whole queue.
pub const MAX_INFLIGHT: u32 = 65_536;

/// One HTTP header as it travels: `[name, value]`. Order and repeats are kept.
pub type Header = (String, String);

/// Frames sent as WebSocket text frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Control {
    /// Worker -> bridge, the first frame after the upgrade.
    Hello(Hello),
    /// Bridge -> worker, the answer to a valid `hello`.
    Welcome(Welcome),
    /// Bridge -> worker: stop working on call `id`; its caller is gone
    /// (timeout or hang-up) and any reply will be discarded.
    Cancel {
        /// The call to abandon.
        id: u64,
        /// Why: `timeout` or `client_gone`.
        reason: String,
    },
    /// Either direction: something went wrong. With an `id` it concerns one
    /// call (from a worker: the call failed and gets a 502); without one it
    /// concerns the connection (an unknown frame, a malformed frame).
    Error {
        /// The call concerned, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// A machine-readable code such as `unknown_frame`.
        code: String,
        /// A human-readable explanation.
        message: String,
    },
    /// Worker -> bridge: send me no new calls; the ones in flight will still
    /// be answered.
    Drain,
    /// Either direction, on connections with flow control: the receiver has
    /// consumed `bytes` more body bytes of call `id`, so the sender may send
    /// that many more.
    Credit {
        /// The call.
        id: u64,
        /// Bytes consumed since the last credit.
        bytes: u64,
    },
    /// Any `type` this version does not know; answered with an error frame.
    #[serde(other)]
    Unknown,
}

/// The worker's introduction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// A name for logs and status pages; need not be unique.
    pub worker_id: String,
    /// The services this worker answers, e.g. `["orders"]`.
    pub services: Vec<String>,
    /// How many calls the worker accepts at once; the bridge never exceeds it.
    pub max_inflight: u32,
    /// The worker takes part in per-call flow control (`credit` frames).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flow_control: bool,
}

/// The bridge's acceptance of a worker, with the connection's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version spoken on this connection.
    pub version: u32,
    /// Unique id of this connection, for logs on both sides.
    pub session_id: String,
    /// The bridge pings this often; a worker that hears nothing (no frame,
    /// no ping) for `ping_interval_ms * (ping_misses + 1)` should reconnect.
    pub ping_interval_ms: u64,
    /// Missed pongs in a row after which the bridge drops the worker.
    pub ping_misses: u32,
    /// Largest WebSocket message the bridge accepts from the worker.
    pub max_frame: u64,
    /// Largest reply body the bridge accepts (all chunks together); a
    /// bigger one fails the call with 502 `bad_response`.
    #[serde(default)]
    pub max_response_body: u64,
    /// With flow control: the body bytes of one call either side may send
    /// before the receiver's `credit` frames allow more (0: no flow control).
    #[serde(default)]
    pub window: u64,
}

/// The JSON header of a binary frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DataHead {
    /// Bridge -> worker: a call.
    Request(RequestHead),
    /// Worker -> bridge: the reply to call `id`.
    Response(ResponseHead),
    /// Either direction: more body bytes of call `id`.
    Body(BodyHead),
    /// Any other `type`; answered with an error frame.
    #[serde(other)]
    Unknown,
}

/// A call as the worker sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestHead {
    /// Correlation id, unique per connection; the reply must carry it.
    pub id: u64,
    /// The caller-visible request id (`X-Request-Id`), for logs.
    pub request_id: String,
    /// The service the call was routed to.
    pub service: String,
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path and query, exactly as the caller sent them.
    pub path: String,
    /// Request headers without hop-by-hop headers.
    pub headers: Vec<Header>,
    /// `true` when this frame carries the whole body.
    #[serde(default = "yes")]
    pub end: bool,
}

/// A reply as the worker sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// The `id` of the request being answered.
    pub id: u64,
    /// HTTP status code, 200..=599.
    pub status: u16,
    /// Response headers.
    #[serde(default)]
    pub headers: Vec<Header>,
    /// `true` (the default) when this frame carries the whole body.
    #[serde(default = "yes")]
    pub end: bool,
}

/// A body chunk that follows a head with `end: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BodyHead {
    /// The call the bytes belong to.
    pub id: u64,
    /// `true` on the last chunk.
    #[serde(default = "yes")]
    pub end: bool,
}

fn yes() -> bool {
    true
}

impl DataHead {
    /// The call id the frame belongs to, if it names one.
    pub fn id(&self) -> Option<u64> {
        match self {
            DataHead::Request(h) => Some(h.id),
            DataHead::Response(h) => Some(h.id),
            DataHead::Body(h) => Some(h.id),
            DataHead::Unknown => None,
        }
    }
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    /// Fewer than 4 bytes, or a length that points past the end.
    #[error("binary frame is truncated: {0}")]
    Truncated(&'static str),
    /// The JSON header is longer than [`MAX_HEADER_LEN`].
    #[error("frame header of {0} bytes exceeds the {MAX_HEADER_LEN}-byte limit")]
    HeaderTooLarge(usize),
    /// The header is not the JSON this version expects.
    #[error("malformed frame header: {0}")]
    Json(String),
}

/// Encodes a binary frame: `u32 BE len | JSON head | body`.
pub fn encode_data(head: &DataHead, body: &[u8]) -> Bytes {
    // Serialising a derived struct into a Vec cannot fail: every map key is a
    // string and there are no non-finite floats.
    let json = serde_json::to_vec(head).unwrap_or_default();
    let mut buf = BytesMut::with_capacity(4 + json.len() + body.len());
    buf.put_u32(json.len() as u32);
    buf.put_slice(&json);
    buf.put_slice(body);
    buf.freeze()
}

/// Decodes a binary frame into its head and its body (a zero-copy slice).
pub fn decode_data(frame: &Bytes) -> Result<(DataHead, Bytes), FrameError> {
    if frame.len() < 4 {
        return Err(FrameError::Truncated("no 4-byte length prefix"));
    }
    let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if len > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLarge(len));
    }
    let end = 4 + len;
    if frame.len() < end {
        return Err(FrameError::Truncated("header length exceeds frame"));
    }
    let head =
        serde_json::from_slice(&frame[4..end]).map_err(|e| FrameError::Json(e.to_string()))?;
    Ok((head, frame.slice(end..)))
}

/// Encodes a control frame as JSON text.
pub fn encode_control(frame: &Control) -> String {
    serde_json::to_string(frame).unwrap_or_default()
}

/// Decodes a control frame.
pub fn decode_control(text: &str) -> Result<Control, FrameError> {
    serde_json::from_str(text).map_err(|e| FrameError::Json(e.to_string()))
}

/// Encodes a head frame, refusing a JSON header the receiver would refuse.
pub fn encode_head(head: &DataHead, body: &[u8]) -> Result<Bytes, FrameError> {
    let frame = encode_data(head, body);
    let head_len = frame.len() - 4 - body.len();
    if head_len > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLarge(head_len));
    }
    Ok(frame)
}

/// The `id` of a binary frame whose header is valid JSON with a numeric
/// `id` but otherwise malformed, so the call it names can be failed at once
/// instead of at its deadline.
pub fn peek_id(frame: &Bytes) -> Option<u64> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
    }
    let len = u32::from_be_bytes(frame.get(..4)?.try_into().ok()?) as usize;
    let json = frame.get(4..4usize.checked_add(len)?)?;
    serde_json::from_slice::<IdOnly>(json).ok().map(|h| h.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(end: bool) -> DataHead {
        DataHead::Response(ResponseHead {
            id: 7,
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            end,
        })
    }

    #[test]
    fn data_frame_round_trip_keeps_binary_body() {
        let body = Bytes::from_static(&[0, 159, 146, 150, 255]);
        let frame = encode_data(&response(true), &body);
        let (head, got) = decode_data(&frame).expect("decodes");
        assert_eq!(head, response(true));
        assert_eq!(got, body);
    }

    #[test]
    fn byte_layout_matches_protocol_doc() {
        let frame = encode_data(&DataHead::Body(BodyHead { id: 1, end: true }), b"hi");
        let json = br#"{"type":"body","id":1,"end":true}"#;
        assert_eq!(&frame[..4], &(json.len() as u32).to_be_bytes());
        assert_eq!(&frame[4..4 + json.len()], json);
        assert_eq!(&frame[4 + json.len()..], b"hi");
    }

    #[test]
    fn missing_end_means_complete_and_unknown_fields_are_ignored() {
        let json = br#"{"type":"response","id":3,"status":204,"future":1}"#;
        let mut frame = (json.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(json);
        let (head, body) = decode_data(&Bytes::from(frame)).expect("decodes");
        assert!(body.is_empty());
        match head {
            DataHead::Response(r) => assert!(r.end && r.headers.is_empty() && r.status == 204),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn hostile_frames_are_errors_not_panics() {
        assert!(matches!(
            decode_data(&Bytes::from_static(b"\0\0")),
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            decode_data(&Bytes::from_static(&[0xff, 0xff, 0xff, 0xff])),
            Err(FrameError::HeaderTooLarge(_))
        ));
        assert!(matches!(
            decode_data(&Bytes::from_static(&[0, 0, 0, 9, b'{'])),
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            decode_data(&Bytes::from_static(&[0, 0, 0, 1, b'{'])),
            Err(FrameError::Json(_))
        ));
    }

    #[test]
    fn oversized_heads_are_refused_when_encoding() {
        let huge = DataHead::Response(ResponseHead {
            id: 9,
            status: 200,
            headers: vec![("x-big".into(), "v".repeat(MAX_HEADER_LEN))],
            end: true,
        });
        assert!(matches!(
            encode_head(&huge, &[]),
            Err(FrameError::HeaderTooLarge(_))
        ));
    }

    #[test]
    fn the_id_of_a_malformed_head_can_be_recovered() {
        let json = br#"{"type":"response","id":12,"status":"two hundred"}"#;
        let mut frame = (json.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(json);
        let frame = Bytes::from(frame);
        assert!(decode_data(&frame).is_err());
        assert_eq!(peek_id(&frame), Some(12));
        assert_eq!(
            peek_id(&Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, b'{'])),
            None
        );
    }

    #[test]
    fn unknown_types_decode_as_unknown() {
        assert_eq!(
            decode_control(r#"{"type":"teleport"}"#),
            Ok(Control::Unknown)
        );
        let json = br#"{"type":"teleport","id":1}"#;
        let mut frame = (json.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(json);
        assert_eq!(
            decode_data(&Bytes::from(frame)).map(|f| f.0),
            Ok(DataHead::Unknown)
        );
    }
}
