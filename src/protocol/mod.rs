//! The wire protocol between the bridge and its workers (version 1).
//!
//! Everything a worker in another language needs is also written down in
//! `docs/PROTOCOL.md`; this module is the reference implementation of it.
//!
//! * Control frames (`hello`, `welcome`, `cancel`, `error`, `drain`, `credit`,
//!   `accepted`, `start`) are JSON objects in WebSocket **text** frames,
//!   tagged by a `"type"` field.
//! * Calls travel in WebSocket **binary** frames laid out as
//!   `u32 big-endian header length | JSON header | raw body bytes`, so bodies
//!   are never base64-encoded. A message is a head (`request` or `response`)
//!   followed by zero or more `body` chunks; the frame with `"end": true`
//!   finishes it. Small bodies travel in the head frame itself.
//!
//! Unknown JSON fields are ignored everywhere so that both sides can grow.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub mod json;

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

/// Bodies shorter than this are never compressed: for small frames the CPU
/// and the latency cost more than the bytes saved.
pub const COMPRESS_MIN: usize = 16 * 1024;

/// The smallest body the `_split` encoders keep apart from its head (to be
/// written behind it without a copy): below this, the copy costs less than
/// holding the two parts.
pub const SPLIT_MIN: usize = 2048;

/// Whether a body is kept apart from its head: large enough, and not one
/// the codec compresses (compressing writes a new body anyway).
fn kept_apart(body: &[u8], codec: Compression) -> bool {
    body.len() >= SPLIT_MIN && !(codec == Compression::Lz4 && body.len() >= COMPRESS_MIN)
}

/// Flag bit in the top byte of a binary frame's length prefix: the body is
/// an LZ4 block preceded by its uncompressed length (u32 little-endian).
const FLAG_LZ4: u32 = 1 << 24;

/// Most call ids a `resume` may list (running and replied together).
pub const MAX_RESUME_IDS: usize = 2 * MAX_INFLIGHT as usize;

/// Most services a single worker may declare in `hello`.
pub const MAX_SERVICES: usize = 64;

/// Largest `max_inflight` a worker may declare; keeps one worker from
/// claiming the whole queue.
pub const MAX_INFLIGHT: u32 = 65_536;

/// Most entries in a hello's `metadata`.
pub const MAX_METADATA_KEYS: usize = 16;

/// Longest `metadata` key: 1 to 64 bytes of `A-Z a-z 0-9 _ - .`.
pub const MAX_METADATA_KEY: usize = 64;

/// Longest `metadata` value, in bytes of UTF-8.
pub const MAX_METADATA_VALUE: usize = 256;

/// A worker's `metadata`: a few strings that say who or where it is
/// (`{"user": "42", "region": "eu"}`), shown by presence and matched by
/// fan-out selectors.
pub type Metadata = std::collections::BTreeMap<String, String>;

/// Most bytes of a worker's `metadata`, keys and values together: every
/// announcement to the cluster carries it.
pub const MAX_METADATA_BYTES: usize = 1024;

/// Checks `metadata` against the limits of section 3.1.
pub fn check_metadata(metadata: &Metadata) -> Result<(), String> {
    if metadata.len() > MAX_METADATA_KEYS {
        return Err(format!(
            "metadata may hold at most {MAX_METADATA_KEYS} entries"
        ));
    }
    if let Some(key) = metadata.keys().find(|k| !metadata_key(k)) {
        return Err(format!(
            "metadata key {key:?} must be 1 to {MAX_METADATA_KEY} bytes of A-Z a-z 0-9 _ - ."
        ));
    }
    if let Some(key) = metadata
        .iter()
        .find_map(|(k, v)| (v.len() > MAX_METADATA_VALUE).then_some(k))
    {
        return Err(format!(
            "metadata value of {key:?} must be at most {MAX_METADATA_VALUE} bytes"
        ));
    }
    let bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_METADATA_BYTES {
        return Err(format!(
            "metadata must be at most {MAX_METADATA_BYTES} bytes, keys and values together"
        ));
    }
    Ok(())
}

/// Reads a metadata selector: `all` (no pairs) or `KEY=VALUE` pairs
/// separated by commas, every one of which a worker's metadata must hold.
pub fn parse_selector(text: &str) -> Result<Vec<(String, String)>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("all") {
        return Ok(Vec::new());
    }
    let mut pairs = Vec::new();
    for pair in text.split(',') {
        let (k, v) = pair
            .split_once('=')
            .ok_or("`all`, or KEY=VALUE pairs separated by commas")?;
        let (k, v) = (k.trim(), v.trim());
        if !metadata_key(k) {
            return Err(format!("{k:?} is not a metadata key"));
        }
        if pairs.len() == MAX_METADATA_KEYS {
            return Err(format!("at most {MAX_METADATA_KEYS} pairs"));
        }
        pairs.push((k.to_owned(), v.to_owned()));
    }
    Ok(pairs)
}

/// Whether `key` may be a `metadata` key (section 3.1).
pub fn metadata_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_METADATA_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

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
        /// Why: `timeout`, `client_gone` or `body_too_large`.
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
    /// Worker -> bridge, from workers that said `"accepted": true` in hello:
    /// call `id` has been read and its handler is about to start. Until
    /// then the bridge knows the call has had no effect, so if the
    /// connection is lost it may send the call to another worker.
    Accepted {
        /// The call.
        id: u64,
    },
    /// Bridge -> worker, the answer to `accepted`: the bridge has recorded
    /// that call `id` may start, so it will never send it elsewhere; the
    /// worker starts the call only now.
    Start {
        /// The call.
        id: u64,
    },
    /// Any `type` this version does not know; answered with an error frame.
    #[serde(other)]
    Unknown,
}

/// How a session is shown to anyone but its worker (the bridge's logs,
/// `/status`, the dashboard; PROTOCOL.md 8.5): the first 8 hex digits of
/// the SHA-256 of its id. Enough to tell sessions apart and to match a
/// worker's log with the bridge's, useless to resume with.
pub fn session_tag(session_id: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(session_id.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Control {
    /// The frame's `type`, as on the wire (for messages about it).
    pub fn kind(&self) -> &'static str {
        match self {
            Control::Hello(_) => "hello",
            Control::Welcome(_) => "welcome",
            Control::Cancel { .. } => "cancel",
            Control::Error { .. } => "error",
            Control::Drain => "drain",
            Control::Credit { .. } => "credit",
            Control::Accepted { .. } => "accepted",
            Control::Start { .. } => "start",
            Control::Unknown => "unknown",
        }
    }
}

/// The worker's introduction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The worker's address within its services (calls with
    /// `Wsbridge-Worker`), and its name in logs and status pages.
    pub worker_id: String,
    /// A few strings that say who or where the worker is, e.g.
    /// `{"user": "42"}`: shown by presence, matched by fan-out selectors.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    /// The services this worker answers, e.g. `["orders"]`.
    pub services: Vec<String>,
    /// How many calls the worker accepts at once; the bridge never exceeds it.
    pub max_inflight: u32,
    /// The worker takes part in per-call flow control (`credit` frames).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flow_control: bool,
    /// The worker sends `accepted` for every call before starting it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accepted: bool,
    /// Body codecs the worker can read and write, in order of preference;
    /// this version knows `"lz4"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compression: Vec<String>,
    /// The worker keeps its calls running when its connection drops and
    /// comes back with `resume` (section 8.5).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumable: bool,
    /// Coming back after a dropped connection: which session, and what the
    /// worker knows of its calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

/// The `resume` part of a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The `session_id` of the welcome of the connection that dropped.
    pub session_id: String,
    /// Calls still running, or whose reply is still queued to be sent.
    #[serde(default)]
    pub running: Vec<u64>,
    /// Calls whose reply was written to the dropped connection (it may not
    /// have arrived) and which the worker can send again.
    #[serde(default)]
    pub replied: Vec<u64>,
}

impl Hello {
    /// Checks the limits of section 3.1 of `docs/PROTOCOL.md`; the error is
    /// the message the bridge sends back in a `bad_hello` error frame.
    pub fn check(&self) -> Result<(), String> {
        if self.services.is_empty() || self.services.len() > MAX_SERVICES {
            return Err(format!("hello must name 1 to {MAX_SERVICES} services"));
        }
        if self.services.iter().any(|s| s.is_empty() || s.len() > 128) {
            return Err("service names must be 1 to 128 bytes".into());
        }
        if self.max_inflight == 0 || self.max_inflight > MAX_INFLIGHT {
            return Err(format!("max_inflight must be 1 to {MAX_INFLIGHT}"));
        }
        if self.worker_id.len() > 256 {
            return Err("worker_id must be at most 256 bytes".into());
        }
        check_metadata(&self.metadata)?;
        if let Some(r) = &self.resume {
            if r.session_id.len() > 128 || r.running.len() + r.replied.len() > MAX_RESUME_IDS {
                return Err(format!(
                    "resume must name a session id of at most 128 bytes and at most {MAX_RESUME_IDS} calls"
                ));
            }
        }
        Ok(())
    }
}

/// Per-frame body compression, chosen in `hello`/`welcome`.
///
/// LZ4 because the bridge's links are loopback and LANs, where CPU is the
/// scarce resource rather than bandwidth: LZ4 runs at several GB/s per core
/// and still halves text, JSON and logs. zstd or gzip compress more at many
/// times the CPU, which pays only on slow WAN links.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// Bodies travel as they are.
    #[default]
    None,
    /// Bodies of at least [`COMPRESS_MIN`] bytes may be LZ4 blocks.
    Lz4,
}

impl Compression {
    /// The codec to use when the worker offered `offered` and the bridge
    /// allows compression at all.
    pub fn choose(offered: &[String], allowed: bool) -> Self {
        if allowed && offered.iter().any(|c| c == "lz4") {
            Compression::Lz4
        } else {
            Compression::None
        }
    }

    /// The name used in `hello` and `welcome`, if any.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Lz4 => Some("lz4"),
        }
    }
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
    /// The body codec both sides may use on this connection (`"lz4"`), or
    /// absent for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// For a `resumable` worker: how long the bridge keeps its calls after
    /// the connection drops, waiting for it to come back (0: it does not).
    #[serde(default)]
    pub resume_window_ms: u64,
    /// The hello's `resume` was accepted: this connection continues the
    /// dropped one (same `session_id`), and its calls still stand.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
    /// With `resumed`: the calls among the hello's `replied` whose reply
    /// never arrived; the worker sends those replies again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resend: Vec<u64>,
}

/// The JSON header of a binary frame.
///
/// Read through [`FlatHead`]: serde's internally tagged enums buffer every
/// field into an intermediate tree before choosing the variant, which cost
/// the bridge about 5k instructions per reply (`scripts/profile`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", try_from = "FlatHead")]
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
    /// Indices into `headers` of values that are not UTF-8, carried as
    /// Latin-1 (section 5.1): each character, U+0000 to U+00FF, is one byte.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latin1: Vec<usize>,
    /// `true` when this frame carries the whole body.
    #[serde(default = "yes")]
    pub end: bool,
    /// `false`: this call skips the start gate (3.7) even though the hello
    /// asked for it: start at once and send no `accepted`. The bridge says
    /// so when the gate would buy nothing (the call is retried after a
    /// worker loss anyway, or can't be); absent means `true`.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub gate: bool,
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
    /// See [`RequestHead::latin1`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latin1: Vec<usize>,
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

fn is_yes(v: &bool) -> bool {
    *v
}

fn yes() -> bool {
    true
}

/// Every field any [`DataHead`] may have, read in one pass.
#[derive(Deserialize)]
struct FlatHead {
    #[serde(rename = "type")]
    kind: HeadKind,
    id: Option<u64>,
    request_id: Option<String>,
    service: Option<String>,
    method: Option<String>,
    path: Option<String>,
    headers: Option<Vec<Header>>,
    latin1: Option<Vec<usize>>,
    status: Option<u16>,
    end: Option<bool>,
    gate: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum HeadKind {
    Request,
    Response,
    Body,
    #[serde(other)]
    Unknown,
}

impl TryFrom<FlatHead> for DataHead {
    type Error = String;

    fn try_from(f: FlatHead) -> Result<DataHead, String> {
        fn need<T>(v: Option<T>, field: &str) -> Result<T, String> {
            v.ok_or_else(|| format!("missing field `{field}`"))
        }
        let end = f.end.unwrap_or(true);
        Ok(match f.kind {
            HeadKind::Request => DataHead::Request(RequestHead {
                id: need(f.id, "id")?,
                request_id: need(f.request_id, "request_id")?,
                service: need(f.service, "service")?,
                method: need(f.method, "method")?,
                path: need(f.path, "path")?,
                headers: need(f.headers, "headers")?,
                latin1: f.latin1.unwrap_or_default(),
                end,
                gate: f.gate.unwrap_or(true),
            }),
            HeadKind::Response => DataHead::Response(ResponseHead {
                id: need(f.id, "id")?,
                status: need(f.status, "status")?,
                headers: f.headers.unwrap_or_default(),
                latin1: f.latin1.unwrap_or_default(),
                end,
            }),
            HeadKind::Body => DataHead::Body(BodyHead {
                id: need(f.id, "id")?,
                end,
            }),
            HeadKind::Unknown => DataHead::Unknown,
        })
    }
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
    /// A text frame that is not JSON at all.
    #[error("invalid JSON in a text frame: {0}")]
    TextJson(String),
    /// A text frame that is JSON but not a control frame: no `type`, a
    /// missing field, a field of the wrong type.
    #[error("invalid control frame: {0}")]
    Control(String),
    /// The length prefix sets flag bits this version does not know.
    #[error("unknown frame flags 0x{0:02x}")]
    Flags(u32),
    /// A compressed body that is corrupt, was not negotiated, or inflates
    /// past the receiver's limit.
    #[error("bad compressed body: {0}")]
    Compressed(String),
}

/// Encodes a binary frame: `u32 BE len | JSON head | body`.
pub fn encode_data(head: &DataHead, body: &[u8]) -> Bytes {
    encode_frame(head, body, Compression::None)
}

/// Encodes a binary frame, compressing a body of at least [`COMPRESS_MIN`]
/// bytes with `codec` when that saves at least an eighth of it.
pub fn encode_frame(head: &DataHead, body: &[u8], codec: Compression) -> Bytes {
    let write = |out: &mut Vec<u8>| json::write_head(head, out);
    frame_with(json::size_hint(head), write, body, codec).0
}

/// [`encode_frame`] without copying a large body, as
/// [`encode_request_split`] does.
pub fn encode_frame_split(head: &DataHead, body: &Bytes, codec: Compression) -> (Bytes, Bytes) {
    if !kept_apart(body, codec) {
        return (encode_frame(head, body, codec), Bytes::new());
    }
    (encode_frame(head, &[], Compression::None), body.clone())
}

/// Builds a frame in one buffer: the prefix, the head written in place by
/// `write` (about `hint` bytes) and the body after it. Also returns the
/// head's length, which the caller checks against [`MAX_HEADER_LEN`].
fn frame_with(
    hint: usize,
    write: impl FnOnce(&mut Vec<u8>),
    body: &[u8],
    codec: Compression,
) -> (Bytes, usize) {
    let compress = codec == Compression::Lz4 && body.len() >= COMPRESS_MIN;
    let tail = if compress { 0 } else { body.len() };
    let mut buf = Vec::with_capacity(4 + hint + tail);
    buf.extend_from_slice(&[0; 4]);
    write(&mut buf);
    let len = buf.len() - 4;
    if compress {
        if let Some(frame) = lz4_frame(&buf[4..], body) {
            return (frame, len);
        }
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    buf.extend_from_slice(body);
    (Bytes::from(buf), len)
}

/// The frame with an LZ4 body, if compressing pays.
fn lz4_frame(json: &[u8], body: &[u8]) -> Option<Bytes> {
    let raw_len = u32::try_from(body.len()).ok()?;
    let at = 4 + json.len() + 4;
    let mut buf = vec![0u8; at + lz4_flex::block::get_maximum_output_size(body.len())];
    buf[..4].copy_from_slice(&(json.len() as u32 | FLAG_LZ4).to_be_bytes());
    buf[4..at - 4].copy_from_slice(json);
    buf[at - 4..at].copy_from_slice(&raw_len.to_le_bytes());
    let n = lz4_flex::block::compress_into(body, &mut buf[at..]).ok()?;
    if 4 + n > body.len() - body.len() / 8 {
        return None;
    }
    buf.truncate(at + n);
    Some(Bytes::from(buf))
}

/// Splits a length prefix into its flags and the header length.
fn prefix(frame: &[u8]) -> Option<(u32, usize)> {
    let word = u32::from_be_bytes(frame.get(..4)?.try_into().ok()?);
    Some((word & 0xff00_0000, (word & 0x00ff_ffff) as usize))
}

/// Decodes a binary frame into its head and its body (a zero-copy slice of
/// the frame unless the body was compressed). A compressed body may inflate
/// to at most `inflate_limit` bytes; 0 means compression was not agreed.
pub fn decode_data(frame: &Bytes, inflate_limit: usize) -> Result<(DataHead, Bytes), FrameError> {
    decode_data_ref(frame, inflate_limit).map(|(head, body)| (head.into_owned(), body))
}

/// [`decode_data`], with a response head's header strings borrowing the
/// frame (see [`json::HeadRef`]).
pub fn decode_data_ref(
    frame: &Bytes,
    inflate_limit: usize,
) -> Result<(json::HeadRef<'_>, Bytes), FrameError> {
    let Some((flags, len)) = prefix(frame) else {
        return Err(FrameError::Truncated("no 4-byte length prefix"));
    };
    if flags & !FLAG_LZ4 != 0 {
        return Err(FrameError::Flags(flags >> 24));
    }
    if len > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLarge(len));
    }
    let end = 4 + len;
    if frame.len() < end {
        return Err(FrameError::Truncated("header length exceeds frame"));
    }
    let json = &frame[4..end];
    let head = match json::read_head_ref(json) {
        Some(head) => head,
        None => match serde_json::from_slice(json) {
            Ok(DataHead::Response(r)) => json::HeadRef::Response(r.into()),
            Ok(other) => json::HeadRef::Other(other),
            Err(e) => return Err(FrameError::Json(e.to_string())),
        },
    };
    let body = frame.slice(end..);
    if flags & FLAG_LZ4 == 0 {
        return Ok((head, body));
    }
    Ok((head, inflate(&body, inflate_limit)?))
}

/// True when a binary frame's prefix says its body is LZ4-compressed.
pub fn is_compressed(frame: &[u8]) -> bool {
    prefix(frame).is_some_and(|(flags, _)| flags & FLAG_LZ4 != 0)
}

/// Decompresses an LZ4 body (`u32 LE size | block`) of at most `limit` bytes.
fn inflate(data: &[u8], limit: usize) -> Result<Bytes, FrameError> {
    let bad = |m: String| FrameError::Compressed(m);
    if limit == 0 {
        return Err(bad("compression was not negotiated".into()));
    }
    let (size, block) = lz4_flex::block::uncompressed_size(data).map_err(|e| bad(e.to_string()))?;
    if size > limit {
        return Err(bad(format!(
            "inflates to {size} bytes, over the {limit}-byte limit"
        )));
    }
    let mut out = vec![0u8; size];
    let n = lz4_flex::block::decompress_into(block, &mut out).map_err(|e| bad(e.to_string()))?;
    if n != size {
        return Err(bad(format!("inflated to {n} bytes, announced {size}")));
    }
    Ok(Bytes::from(out))
}

/// Encodes a control frame as JSON text.
pub fn encode_control(frame: &Control) -> String {
    serde_json::to_string(frame).unwrap_or_default()
}

/// Decodes a control frame.
pub fn decode_control(text: &str) -> Result<Control, FrameError> {
    // The frames sent once per call (`accepted`, `start`) or per chunk
    // (`credit`) are read through a small flat struct: serde's tagged-enum
    // path buffers every field first, which made them the costliest part of
    // a call's control traffic. Anything else, or anything unusual (escapes
    // in `type`, a missing field), takes the full path and its errors.
    #[derive(Deserialize)]
    struct Small<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
        id: Option<u64>,
        bytes: Option<u64>,
    }
    if let Ok(small) = serde_json::from_str::<Small>(text) {
        match (small.kind, small.id, small.bytes) {
            ("accepted", Some(id), _) => return Ok(Control::Accepted { id }),
            ("start", Some(id), _) => return Ok(Control::Start { id }),
            ("credit", Some(id), Some(bytes)) => return Ok(Control::Credit { id, bytes }),
            _ => {}
        }
    }
    serde_json::from_str(text).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            FrameError::TextJson(e.to_string())
        } else {
            FrameError::Control(e.to_string())
        }
    })
}

/// Encodes a head frame, refusing a JSON header the receiver would refuse.
pub fn encode_head(head: &DataHead, body: &[u8], codec: Compression) -> Result<Bytes, FrameError> {
    let write = |out: &mut Vec<u8>| json::write_head(head, out);
    checked(frame_with(json::size_hint(head), write, body, codec))
}

/// Encodes a request head frame from borrowed fields and headers already
/// encoded: the frame [`encode_head`] builds for the [`RequestHead`] they
/// describe, without building one (the bridge's hot path).
pub fn encode_request_encoded(
    fields: &json::RequestFields<'_>,
    headers: &json::EncodedHeaders,
    body: &[u8],
    codec: Compression,
) -> Result<Bytes, FrameError> {
    let write = |out: &mut Vec<u8>| json::write_request_encoded(fields, headers, out);
    checked(frame_with(
        fields.size_hint_encoded(headers),
        write,
        body,
        codec,
    ))
}

/// [`encode_request_encoded`] without copying a large body: the frame as
/// its head (the length prefix and the JSON) and its body, to be written one
/// after the other as one WebSocket frame. A body under [`SPLIT_MIN`], or
/// one the codec compresses, comes back inside the whole frame, with an
/// empty body.
pub fn encode_request_split(
    fields: &json::RequestFields<'_>,
    headers: &json::EncodedHeaders,
    body: &Bytes,
    codec: Compression,
) -> Result<(Bytes, Bytes), FrameError> {
    if !kept_apart(body, codec) {
        let frame = encode_request_encoded(fields, headers, body, codec)?;
        return Ok((frame, Bytes::new()));
    }
    let write = |out: &mut Vec<u8>| json::write_request_encoded(fields, headers, out);
    let hint = fields.size_hint_encoded(headers);
    let head = checked(frame_with(hint, write, &[], Compression::None))?;
    Ok((head, body.clone()))
}

/// Encodes a response head frame from borrowed headers: the frame
/// [`encode_head`] builds for the [`ResponseHead`] they describe (the
/// worker's hot path).
pub fn encode_response<N: AsRef<str>, V: json::WireValue>(
    (id, status): (u64, u16),
    headers: &[(N, V)],
    end: bool,
    body: &[u8],
    codec: Compression,
) -> Result<Bytes, FrameError> {
    let write = |out: &mut Vec<u8>| json::write_response(id, status, headers, end, out);
    checked(frame_with(
        json::response_size_hint(headers),
        write,
        body,
        codec,
    ))
}

/// The frame, unless its head is longer than [`MAX_HEADER_LEN`]. The length
/// prefix holds only 24 bits, so a header of 16 MiB or more would wrap into
/// the flag byte: checked before the frame leaves.
fn checked((frame, head_len): (Bytes, usize)) -> Result<Bytes, FrameError> {
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
    let (_, len) = prefix(frame)?;
    let json = frame.get(4..4 + len)?;
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
            latin1: vec![],
            end,
        })
    }

    #[test]
    fn data_frame_round_trip_keeps_binary_body() {
        let body = Bytes::from_static(&[0, 159, 146, 150, 255]);
        let frame = encode_data(&response(true), &body);
        let (head, got) = decode_data(&frame, 0).expect("decodes");
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
        let (head, body) = decode_data(&Bytes::from(frame), 0).expect("decodes");
        assert!(body.is_empty());
        match head {
            DataHead::Response(r) => assert!(r.end && r.headers.is_empty() && r.status == 204),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn hostile_frames_are_errors_not_panics() {
        assert!(matches!(
            decode_data(&Bytes::from_static(b"\0\0"), 0),
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            decode_data(&Bytes::from_static(&[0, 1, 0, 1]), 0),
            Err(FrameError::HeaderTooLarge(65537))
        ));
        assert!(matches!(
            decode_data(&Bytes::from_static(&[0xff, 0, 0, 2, b'{', b'}']), 0),
            Err(FrameError::Flags(0xff))
        ));
        assert!(matches!(
            decode_data(&Bytes::from_static(&[0, 0, 0, 9, b'{']), 0),
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            decode_data(&Bytes::from_static(&[0, 0, 0, 1, b'{']), 0),
            Err(FrameError::Json(_))
        ));
    }

    #[test]
    fn a_session_tag_is_a_stable_short_hash_that_does_not_contain_the_id() {
        let id = "0190f0c2-8a4e-7c3b-9d2f-1e5a6b7c8d9e";
        let tag = session_tag(id);
        assert_eq!(tag.len(), 8);
        assert_eq!(tag, session_tag(id));
        assert!(!id.replace('-', "").contains(&tag));
        // The SHA-256 of "abc" starts with ba7816bf (FIPS 180-2, B.1).
        assert_eq!(session_tag("abc"), "ba7816bf");
    }

    #[test]
    fn text_frames_that_are_not_json_are_told_from_json_that_is_not_a_frame() {
        assert!(matches!(
            decode_control("{not json"),
            Err(FrameError::TextJson(_))
        ));
        assert!(matches!(
            decode_control(r#"{"type":"credit","id":1}"#),
            Err(FrameError::Control(_))
        ));
        assert!(matches!(
            decode_control(r#"{"id":1}"#),
            Err(FrameError::Control(_))
        ));
        assert_eq!(Control::Start { id: 1 }.kind(), "start");
    }

    #[test]
    fn oversized_heads_are_refused_when_encoding() {
        let huge = DataHead::Response(ResponseHead {
            id: 9,
            status: 200,
            headers: vec![("x-big".into(), "v".repeat(MAX_HEADER_LEN))],
            latin1: vec![],
            end: true,
        });
        assert!(matches!(
            encode_head(&huge, &[], Compression::None),
            Err(FrameError::HeaderTooLarge(_))
        ));
        // Past 16 MiB the 24-bit length would wrap into the flag byte.
        let wraps = DataHead::Response(ResponseHead {
            id: 9,
            status: 200,
            headers: vec![("x-big".into(), "v".repeat((1 << 24) + 5))],
            latin1: vec![],
            end: true,
        });
        assert!(matches!(
            encode_head(&wraps, &[], Compression::None),
            Err(FrameError::HeaderTooLarge(n)) if n > 1 << 24
        ));
    }

    #[test]
    fn the_id_of_a_malformed_head_can_be_recovered() {
        let json = br#"{"type":"response","id":12,"status":"two hundred"}"#;
        let mut frame = (json.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(json);
        let frame = Bytes::from(frame);
        assert!(decode_data(&frame, 0).is_err());
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
            decode_data(&Bytes::from(frame), 0).map(|f| f.0),
            Ok(DataHead::Unknown)
        );
    }

    fn chunk(body: &[u8], codec: Compression) -> Bytes {
        encode_frame(&DataHead::Body(BodyHead { id: 5, end: false }), body, codec)
    }

    /// Text-like data that LZ4 shrinks a lot.
    fn compressible(len: usize) -> Vec<u8> {
        (0..len).map(|i| b"abcdefgh{}\"\n"[i % 12]).collect()
    }

    #[test]
    fn compressible_bodies_shrink_and_round_trip() {
        let body = compressible(CHUNK_SIZE);
        let frame = chunk(&body, Compression::Lz4);
        assert!(frame.len() < body.len() / 4, "{} bytes", frame.len());
        assert_eq!(frame[0], 0x01, "the lz4 flag is set");
        let (head, got) = decode_data(&frame, CHUNK_SIZE).expect("decodes");
        assert_eq!(head, DataHead::Body(BodyHead { id: 5, end: false }));
        assert_eq!(got, body);
    }

    #[test]
    fn small_or_incompressible_bodies_travel_plain() {
        let small = compressible(COMPRESS_MIN - 1);
        assert_eq!(
            chunk(&small, Compression::Lz4),
            chunk(&small, Compression::None)
        );
        // xorshift noise: LZ4 cannot shrink it by an eighth.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..COMPRESS_MIN * 4)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(
            chunk(&noise, Compression::Lz4),
            chunk(&noise, Compression::None)
        );
    }

    #[test]
    fn compressed_bodies_are_checked_before_they_are_inflated() {
        let body = compressible(CHUNK_SIZE);
        let frame = chunk(&body, Compression::Lz4);
        // Not negotiated, or over the receiver's limit (a decompression bomb):
        // refused before any memory is set aside for the body.
        assert!(matches!(
            decode_data(&frame, 0),
            Err(FrameError::Compressed(_))
        ));
        assert!(matches!(
            decode_data(&frame, CHUNK_SIZE - 1),
            Err(FrameError::Compressed(m)) if m.contains("limit")
        ));
        // A corrupt block is an error, not a panic; so is a lying size.
        let mut corrupt = frame.to_vec();
        let n = corrupt.len();
        corrupt.truncate(n - 10);
        assert!(decode_data(&Bytes::from(corrupt), CHUNK_SIZE).is_err());
        let json_end = 4 + (frame[3] as usize) + (frame[2] as usize) * 256;
        let mut lying = frame.to_vec();
        lying[json_end..json_end + 4].copy_from_slice(&(CHUNK_SIZE as u32 + 1).to_le_bytes());
        assert!(decode_data(&Bytes::from(lying), 2 * CHUNK_SIZE).is_err());
    }

    #[test]
    fn compression_is_chosen_only_when_offered_and_allowed() {
        let lz4 = vec!["zstd".to_owned(), "lz4".to_owned()];
        assert_eq!(Compression::choose(&lz4, true), Compression::Lz4);
        assert_eq!(Compression::choose(&lz4, false), Compression::None);
        assert_eq!(
            Compression::choose(&["zstd".into()], true),
            Compression::None
        );
        assert_eq!(Compression::Lz4.name(), Some("lz4"));
    }
}
