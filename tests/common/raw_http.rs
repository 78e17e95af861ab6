//! A caller that writes exact bytes: one HTTP/1.x request over a fresh TCP
//! connection, read back to the end of the connection, so that malformed
//! input and the response's own framing can both be checked; or, while a
//! request is still being written, one response read as soon as its
//! `content-length` body is in ([`read_reply`]).

use std::{collections::HashMap, net::SocketAddr};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use super::with_timeout;

/// A response as it came off the wire.
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// Header names lowercased, values as raw bytes, in wire order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body as its framing delivered it: de-chunked, or the bytes after
    /// the head (up to the close for a body without length).
    pub body: Vec<u8>,
    /// `Some(false)` for a chunked body cut off before its last chunk.
    pub chunked_complete: Option<bool>,
}

impl std::fmt::Debug for RawResponse {
    /// Headers and body as text (bytes that are not UTF-8 escaped), so a
    /// failing assertion is readable.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = |b: &[u8]| b.escape_ascii().to_string();
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, v)| format!("{n}: {}", text(v)))
                    .collect::<Vec<_>>(),
            )
            .field("body", &text(&self.body))
            .field("chunked_complete", &self.chunked_complete)
            .finish()
    }
}

impl RawResponse {
    /// The first value of `name` as text ("" if absent).
    pub fn header(&self, name: &str) -> String {
        self.header_bytes(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }

    /// The first value of `name` as raw bytes.
    pub fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts a JSON error: `status`, `code`, and the request id both in
    /// `X-Request-Id` and in the body.
    pub fn assert_json_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type"), "application/json");
        let json = self.json();
        assert_eq!(json["error"]["code"], code, "{json}");
        let id = self.header("x-request-id");
        assert!(!id.is_empty(), "no X-Request-Id: {self:?}");
        assert_eq!(json["error"]["request_id"], id.as_str(), "{json}");
    }
}

/// Sends `request` (exact bytes) on a new connection to `addr` and reads
/// everything the server sends until it closes, then parses one response.
/// The request should ask for `Connection: close` (or be refused), so that
/// the server closes.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let wire = exchange_bytes(addr, request).await;
    parse_response(&wire, false)
}

/// [`exchange`] for a `HEAD` request: the response has no body whatever
/// its headers say.
pub async fn exchange_head(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let wire = exchange_bytes(addr, request).await;
    parse_response(&wire, true)
}

/// Everything the server sent in answer to `request`, up to its close.
pub async fn exchange_bytes(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut tcp = with_timeout(TcpStream::connect(addr))
        .await
        .expect("connect");
    with_timeout(tcp.write_all(request)).await.expect("write");
    let mut wire = Vec::new();
    // A reset after the response (the server closing with unread input) is
    // an end like any other: what arrived before it is the answer.
    let _ = with_timeout(tcp.read_to_end(&mut wire)).await;
    wire
}

/// Parses one HTTP/1.x response from `wire`.
pub fn parse_response(wire: &[u8], head_only: bool) -> RawResponse {
    let end = wire
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(wire)));
    let mut lines = wire[..end].split(|&b| b == b'\n');
    let status_line = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
    let headers: Vec<(String, Vec<u8>)> = lines
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|&b| b == b':')?;
            let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
            Some((name, line[colon + 1..].trim_ascii().to_vec()))
        })
        .collect();
    let rest = &wire[end + 4..];
    let mut resp = RawResponse {
        status,
        headers,
        body: Vec::new(),
        chunked_complete: None,
    };
    if head_only {
        resp.body = rest.to_vec();
        return resp;
    }
    if resp
        .header("transfer-encoding")
        .eq_ignore_ascii_case("chunked")
    {
        let (body, complete) = dechunk(rest);
        resp.body = body;
        resp.chunked_complete = Some(complete);
    } else if let Ok(len) = resp.header("content-length").parse::<usize>() {
        resp.body = rest[..len.min(rest.len())].to_vec();
    } else {
        resp.body = rest.to_vec();
    }
    resp
}

/// A chunked body's data, and whether its last chunk arrived.
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
        let Some(size) = size else {
            return (body, false);
        };
        rest = &rest[eol + 2..];
        if size == 0 {
            return (body, true);
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..size.min(rest.len())]);
            return (body, false);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// A raw HTTP/1.1 response.
pub struct RawReply {
    /// The status code.
    pub status: u16,
    /// Header names lowercased; the last value of each.
    pub headers: HashMap<String, String>,
    /// The body, `content-length` bytes of it.
    pub body: Vec<u8>,
}

impl RawReply {
    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header as text ("" if absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// Reads one response with a `content-length` body.
pub async fn read_reply(rd: impl AsyncRead + Unpin) -> RawReply {
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    rd.read_line(&mut line).await.expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {line:?}"));
    let mut headers = HashMap::new();
    loop {
        line.clear();
        rd.read_line(&mut line).await.expect("header line");
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    let mut body = vec![0; len];
    rd.read_exact(&mut body).await.expect("body");
    RawReply {
        status,
        headers,
        body,
    }
}
