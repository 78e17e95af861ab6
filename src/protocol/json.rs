//! The JSON of binary frame heads, written and read by hand.
//!
//! Every call crosses the bridge as a request head and a response head, so
//! their JSON is on the hot path: through serde it cost the bridge about 11k
//! instructions per call (`scripts/profile`), a fifth of all it did.
//!
//! * [`write_head`] produces exactly the bytes `serde_json::to_vec` produces
//!   for a [`DataHead`] (same field order, same escapes), so the wire does
//!   not change and the two can be compared in tests.
//! * [`read_head_ref`] is a fast path for the heads real workers send: the
//!   known fields, in any order, with any JSON whitespace and escapes. It
//!   returns `None` for anything else (an unknown field, `null`, a number
//!   with a fraction, a duplicate key, a missing field, ...), and the caller
//!   falls back to serde, which decides and words the error. Whenever it
//!   returns `Some`, the head ([`HeadRef::into_owned`]) is the one serde
//!   would have decoded.

use std::borrow::Cow;

use super::{BodyHead, DataHead, Header, RequestHead, ResponseHead};

/// A header value the writers take: text, or (`is_latin1`) a value that is
/// not UTF-8, whose characters, all U+0000 to U+00FF, each stand for one
/// byte (PROTOCOL 5.1). The head lists the latter in `"latin1"`.
pub trait WireValue: AsRef<str> {
    /// True for a value carried as Latin-1.
    fn is_latin1(&self) -> bool {
        false
    }
}

impl WireValue for String {}
impl WireValue for &str {}
impl WireValue for Cow<'_, str> {}

/// Appends the JSON of `head` to `out`.
pub fn write_head(head: &DataHead, out: &mut Vec<u8>) {
    match head {
        DataHead::Request(r) => write_request_with(&RequestFields::from(r), out, |out| {
            write_pairs(&r.headers, out);
            write_latin1(r.latin1.iter().copied(), out);
        }),
        DataHead::Response(r) => write_response_with(r.id, r.status, r.end, out, |out| {
            write_pairs(&r.headers, out);
            write_latin1(r.latin1.iter().copied(), out);
        }),
        DataHead::Body(b) => {
            out.extend_from_slice(br#"{"type":"body","id":"#);
            write_u64(b.id, out);
            write_end(b.end, out);
            out.push(b'}');
        }
        DataHead::Unknown => out.extend_from_slice(br#"{"type":"unknown"}"#),
    }
}

/// A request head's fields other than its headers, borrowed, so the bridge
/// can write a head straight from the caller's request (see
/// [`super::encode_request_encoded`]) without building a [`RequestHead`]
/// first.
#[derive(Debug, Clone, Copy)]
pub struct RequestFields<'a> {
    /// See [`RequestHead::id`].
    pub id: u64,
    /// See [`RequestHead::request_id`].
    pub request_id: &'a str,
    /// See [`RequestHead::service`].
    pub service: &'a str,
    /// See [`RequestHead::method`].
    pub method: &'a str,
    /// See [`RequestHead::path`].
    pub path: &'a str,
    /// See [`RequestHead::end`].
    pub end: bool,
    /// See [`RequestHead::gate`].
    pub gate: bool,
}

impl<'a> From<&'a RequestHead> for RequestFields<'a> {
    fn from(r: &'a RequestHead) -> Self {
        RequestFields {
            id: r.id,
            request_id: &r.request_id,
            service: &r.service,
            method: &r.method,
            path: &r.path,
            end: r.end,
            gate: r.gate,
        }
    }
}

impl RequestFields<'_> {
    /// An upper bound on the head's JSON before escaping, to size buffers.
    pub fn size_hint<N: AsRef<str>, V: WireValue>(&self, headers: &[(N, V)]) -> usize {
        self.fields_hint() + headers_len(headers)
    }

    /// [`RequestFields::size_hint`] with headers already encoded.
    pub fn size_hint_encoded(&self, headers: &EncodedHeaders) -> usize {
        self.fields_hint() + headers.0.len()
    }

    fn fields_hint(&self) -> usize {
        160 + self.request_id.len() + self.service.len() + self.method.len() + self.path.len()
    }
}

/// A request's header list written as JSON once (`,"headers":[...]`): a
/// call keeps this instead of the caller's header map, which it can then
/// drop, and still writes its frame again for a retry.
pub struct EncodedHeaders(Box<[u8]>);

impl EncodedHeaders {
    /// The JSON [`write_request`] writes for `headers`.
    pub fn new<N: AsRef<str>, V: WireValue>(headers: &[(N, V)]) -> EncodedHeaders {
        let mut out = Vec::with_capacity(headers_len(headers) + 16);
        write_headers(headers, &mut out);
        EncodedHeaders(out.into_boxed_slice())
    }

    /// The JSON as written: `,"headers":[...]` and any `,"latin1":[...]`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Appends the JSON of a request head; the same bytes as [`write_head`]
/// writes for the [`RequestHead`] with these fields and headers.
pub fn write_request<N: AsRef<str>, V: WireValue>(
    r: &RequestFields<'_>,
    headers: &[(N, V)],
    out: &mut Vec<u8>,
) {
    write_request_with(r, out, |out| write_headers(headers, out));
}

/// [`write_request`] with the headers already encoded: the same bytes.
pub fn write_request_encoded(r: &RequestFields<'_>, headers: &EncodedHeaders, out: &mut Vec<u8>) {
    write_request_with(r, out, |out| out.extend_from_slice(&headers.0));
}

fn write_request_with(
    r: &RequestFields<'_>,
    out: &mut Vec<u8>,
    write_headers: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(br#"{"type":"request","id":"#);
    write_u64(r.id, out);
    out.extend_from_slice(br#","request_id":"#);
    write_str(r.request_id, out);
    out.extend_from_slice(br#","service":"#);
    write_str(r.service, out);
    out.extend_from_slice(br#","method":"#);
    write_str(r.method, out);
    out.extend_from_slice(br#","path":"#);
    write_str(r.path, out);
    write_headers(out);
    write_end(r.end, out);
    if !r.gate {
        out.extend_from_slice(br#","gate":false"#);
    }
    out.push(b'}');
}

/// Appends the JSON of a response head; the same bytes as [`write_head`]
/// writes for the [`ResponseHead`] with these fields.
pub fn write_response<N: AsRef<str>, V: WireValue>(
    id: u64,
    status: u16,
    headers: &[(N, V)],
    end: bool,
    out: &mut Vec<u8>,
) {
    write_response_with(id, status, end, out, |out| write_headers(headers, out));
}

fn write_response_with(
    id: u64,
    status: u16,
    end: bool,
    out: &mut Vec<u8>,
    write_headers: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(br#"{"type":"response","id":"#);
    write_u64(id, out);
    out.extend_from_slice(br#","status":"#);
    write_u64(u64::from(status), out);
    write_headers(out);
    write_end(end, out);
    out.push(b'}');
}

/// The size hint of a response head with these headers.
pub fn response_size_hint<N: AsRef<str>, V: WireValue>(headers: &[(N, V)]) -> usize {
    96 + headers_len(headers)
}

/// An upper bound on the JSON bytes of a head before escaping, to size the
/// buffer it is written into.
pub fn size_hint(head: &DataHead) -> usize {
    match head {
        DataHead::Request(r) => {
            RequestFields::from(r).size_hint(&r.headers) + latin1_len(r.latin1.len())
        }
        DataHead::Response(r) => response_size_hint(&r.headers) + latin1_len(r.latin1.len()),
        DataHead::Body(_) => 64,
        DataHead::Unknown => 24,
    }
}

/// The JSON bytes of headers before escaping, with room for the index of
/// each value listed in `"latin1"`.
fn headers_len<N: AsRef<str>, V: WireValue>(headers: &[(N, V)]) -> usize {
    headers
        .iter()
        .map(|(n, v)| {
            let index = if v.is_latin1() { latin1_len(1) } else { 0 };
            n.as_ref().len() + v.as_ref().len() + 6 + index
        })
        .sum()
}

/// An upper bound on the bytes of a `"latin1"` list of `n` indices: a
/// head's indices have at most 5 digits (a pair takes at least 8 bytes of
/// the 64 KiB), each with its comma, and the key.
fn latin1_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        12 + 6 * n
    }
}

/// `,"headers":[...]`, then `,"latin1":[...]` if a value is Latin-1.
fn write_headers<N: AsRef<str>, V: WireValue>(headers: &[(N, V)], out: &mut Vec<u8>) {
    write_pairs(headers, out);
    let marked = headers
        .iter()
        .enumerate()
        .filter(|(_, (_, v))| v.is_latin1());
    write_latin1(marked.map(|(i, _)| i), out);
}

/// `,"latin1":[...]` with these indices; nothing for none (the field is
/// then absent, as serde skips an empty one).
fn write_latin1(indices: impl Iterator<Item = usize>, out: &mut Vec<u8>) {
    let mut any = false;
    for i in indices {
        out.extend_from_slice(if any { b"," } else { br#","latin1":["# });
        write_u64(i as u64, out);
        any = true;
    }
    if any {
        out.push(b']');
    }
}

fn write_pairs<N: AsRef<str>, V: AsRef<str>>(headers: &[(N, V)], out: &mut Vec<u8>) {
    out.extend_from_slice(br#","headers":["#);
    for (i, (name, value)) in headers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'[');
        write_str(name.as_ref(), out);
        out.push(b',');
        write_str(value.as_ref(), out);
        out.push(b']');
    }
    out.push(b']');
}

pub(crate) fn write_end(end: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(if end {
        br#","end":true"#
    } else {
        br#","end":false"#
    });
}

pub(crate) fn write_u64(mut n: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// A JSON string, escaped as serde_json escapes: `"` and `\` with a
/// backslash, control characters as `\b \t \n \f \r` or `\u00xx`, and
/// everything else (`/`, DEL, non-ASCII) as it is.
pub(crate) fn write_str(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut rest = s.as_bytes();
    out.reserve(rest.len() + 2);
    out.push(b'"');
    loop {
        let plain = plain_prefix(rest);
        out.extend_from_slice(&rest[..plain]);
        let Some(&b) = rest.get(plain) else { break };
        let hex;
        out.extend_from_slice(match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            _ => {
                hex = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 0xf) as usize],
                ];
                &hex
            }
        });
        rest = &rest[plain + 1..];
    }
    out.push(b'"');
}

/// How many leading bytes of `s` can stand in a JSON string as they are:
/// the index of the first `"`, `\` or control character, or `s.len()`.
/// Eight bytes at a time (SWAR): heads are mostly such plain runs.
fn plain_prefix(s: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Flags bytes equal to zero; exact for the lowest flagged byte.
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut at = 0;
    for chunk in s.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let flagged = (x.wrapping_sub(ONES * 0x20) & !x & HIGH)
            | zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')));
        if flagged != 0 {
            return at + (flagged.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    at + s[at..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(s.len() - at)
}

/// A head as [`read_head_ref`] reads it: a response's header names and
/// values borrow the JSON unless they were escaped, so the bridge can turn
/// them into HTTP headers without copying them twice.
#[derive(Debug, PartialEq)]
pub enum HeadRef<'a> {
    /// A response head, borrowed.
    Response(ResponseRef<'a>),
    /// Any other head.
    Other(DataHead),
}

/// A [`ResponseHead`] whose header strings may borrow the frame.
#[derive(Debug, PartialEq)]
pub struct ResponseRef<'a> {
    /// See [`ResponseHead::id`].
    pub id: u64,
    /// See [`ResponseHead::status`].
    pub status: u16,
    /// See [`ResponseHead::headers`].
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// See [`ResponseHead::latin1`].
    pub latin1: Vec<usize>,
    /// See [`ResponseHead::end`].
    pub end: bool,
}

impl From<ResponseHead> for ResponseRef<'_> {
    fn from(h: ResponseHead) -> Self {
        ResponseRef {
            id: h.id,
            status: h.status,
            headers: h
                .headers
                .into_iter()
                .map(|(n, v)| (Cow::Owned(n), Cow::Owned(v)))
                .collect(),
            latin1: h.latin1,
            end: h.end,
        }
    }
}

impl HeadRef<'_> {
    /// The owned head.
    pub fn into_owned(self) -> DataHead {
        match self {
            HeadRef::Response(r) => DataHead::Response(ResponseHead {
                id: r.id,
                status: r.status,
                headers: owned(r.headers),
                latin1: r.latin1,
                end: r.end,
            }),
            HeadRef::Other(head) => head,
        }
    }
}

/// The pairs [`Reader::headers`] read, as owned strings.
pub(crate) fn owned(pairs: Vec<(Cow<'_, str>, Cow<'_, str>)>) -> Vec<Header> {
    pairs
        .into_iter()
        .map(|(n, v)| (n.into_owned(), v.into_owned()))
        .collect()
}

/// Reads the common heads; `None` means "ask serde" (see the module doc).
/// A response's header strings borrow `json` unless they were escaped.
pub fn read_head_ref(json: &[u8]) -> Option<HeadRef<'_>> {
    let mut f = Fields::default();
    read_object(json, |r, key| match key {
        "type" => set(&mut f.kind, r.string()?),
        "id" => set(&mut f.id, r.number()?),
        "request_id" => set(&mut f.request_id, r.string()?),
        "service" => set(&mut f.service, r.string()?),
        "method" => set(&mut f.method, r.string()?),
        "path" => set(&mut f.path, r.string()?),
        "headers" => set(&mut f.headers, r.headers()?),
        "latin1" => set(&mut f.latin1, r.indices()?),
        "status" => set(&mut f.status, u16::try_from(r.number()?).ok()?),
        "end" => set(&mut f.end, r.boolean()?),
        "gate" => set(&mut f.gate, r.boolean()?),
        _ => None,
    })?;
    let end = f.end.unwrap_or(true);
    Some(match &*f.kind? {
        "request" => HeadRef::Other(DataHead::Request(RequestHead {
            id: f.id?,
            request_id: f.request_id?.into_owned(),
            service: f.service?.into_owned(),
            method: f.method?.into_owned(),
            path: f.path?.into_owned(),
            headers: owned(f.headers?),
            latin1: f.latin1.unwrap_or_default(),
            end,
            gate: f.gate.unwrap_or(true),
        })),
        "response" => HeadRef::Response(ResponseRef {
            id: f.id?,
            status: f.status?,
            headers: f.headers.unwrap_or_default(),
            latin1: f.latin1.unwrap_or_default(),
            end,
        }),
        "body" => HeadRef::Other(DataHead::Body(BodyHead { id: f.id?, end })),
        _ => return None,
    })
}

/// Reads `json` as one non-empty object, handing each key to `field` with
/// the reader at its value, which `field` reads. `None` as soon as anything
/// is not as expected (`field` returning `None` included): the caller then
/// asks serde. Other heads than the protocol's (the cluster's relay) use it
/// for the same reason.
pub(crate) fn read_object<'a>(
    json: &'a [u8],
    mut field: impl FnMut(&mut Reader<'a>, &str) -> Option<()>,
) -> Option<()> {
    // Valid JSON is UTF-8 throughout; a head that is not goes to serde.
    let s = std::str::from_utf8(json).ok()?;
    let mut r = Reader {
        s,
        b: s.as_bytes(),
        at: 0,
    };
    r.ws();
    r.eat(b'{')?;
    r.ws();
    if r.peek()? == b'}' {
        return None;
    }
    loop {
        let key = r.string()?;
        r.ws();
        r.eat(b':')?;
        r.ws();
        field(&mut r, &key)?;
        r.ws();
        match r.next()? {
            b',' => r.ws(),
            b'}' => break,
            _ => return None,
        }
    }
    r.ws();
    (r.at == r.b.len()).then_some(())
}

/// Sets a field seen for the first time; a repeated key is left to serde
/// (which refuses it).
pub(crate) fn set<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

#[derive(Default)]
struct Fields<'a> {
    kind: Option<Cow<'a, str>>,
    id: Option<u64>,
    request_id: Option<Cow<'a, str>>,
    service: Option<Cow<'a, str>>,
    method: Option<Cow<'a, str>>,
    path: Option<Cow<'a, str>>,
    headers: Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
    latin1: Option<Vec<usize>>,
    status: Option<u16>,
    end: Option<bool>,
    gate: Option<bool>,
}

/// A cursor over one head's JSON (see [`read_object`]).
pub(crate) struct Reader<'a> {
    /// The whole head, checked to be UTF-8 once, so that a string between
    /// two quotes is a slice of it rather than a validation of its own.
    s: &'a str,
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.at += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    pub(crate) fn boolean(&mut self) -> Option<bool> {
        let rest = self.b.get(self.at..)?;
        if rest.starts_with(b"true") {
            self.at += 4;
            Some(true)
        } else if rest.starts_with(b"false") {
            self.at += 5;
            Some(false)
        } else {
            None
        }
    }

    /// A non-negative integer without fraction or exponent that fits a u64.
    pub(crate) fn number(&mut self) -> Option<u64> {
        let start = self.at;
        let mut n: u64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        // No digits, or a leading zero (not JSON), or a fraction/exponent
        // next: not ours.
        if digits == 0 || (digits > 1 && self.b[start] == b'0') {
            return None;
        }
        match self.peek() {
            Some(b'.' | b'e' | b'E') => None,
            _ => Some(n),
        }
    }

    /// `[["name","value"], ...]`.
    pub(crate) fn headers(&mut self) -> Option<Vec<(Cow<'a, str>, Cow<'a, str>)>> {
        self.list(|p| {
            p.eat(b'[')?;
            p.ws();
            let name = p.string()?;
            p.ws();
            p.eat(b',')?;
            p.ws();
            let value = p.string()?;
            p.ws();
            p.eat(b']')?;
            Some((name, value))
        })
    }

    /// `[n, ...]`: a `"latin1"` list of header indices.
    pub(crate) fn indices(&mut self) -> Option<Vec<usize>> {
        self.list(|p| usize::try_from(p.number()?).ok())
    }

    /// `[item, ...]`, each element read by `item`.
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        self.eat(b'[')?;
        self.ws();
        let mut out = Vec::new();
        if self.peek()? == b']' {
            self.at += 1;
            return Some(out);
        }
        loop {
            out.push(item(self)?);
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b']' => return Some(out),
                _ => return None,
            }
        }
    }

    /// A JSON string, borrowed when it has no escapes.
    pub(crate) fn string(&mut self) -> Option<Cow<'a, str>> {
        self.eat(b'"')?;
        let start = self.at;
        self.at += plain_prefix(self.b.get(start..)?);
        if self.next()? == b'"' {
            // Both ends are ASCII quotes, so both are char boundaries.
            return self.s.get(start..self.at - 1).map(Cow::Borrowed);
        }
        // An escape or a control character: decode from here, the slow way.
        self.at -= 1;
        let mut out = self.b[start..self.at].to_vec();
        loop {
            match self.next()? {
                b'"' => return String::from_utf8(out).ok().map(Cow::Owned),
                b'\\' => {
                    let c = match self.next()? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return None,
                    };
                    let mut utf8 = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                }
                0x00..=0x1f => return None,
                c => out.push(c),
            }
        }
    }

    /// The character of a `\uXXXX` escape (after the `u`), joining a
    /// surrogate pair; a lone surrogate is left to serde.
    fn unicode_escape(&mut self) -> Option<char> {
        let hi = self.hex4()?;
        if !(0xd800..0xe000).contains(&hi) {
            return char::from_u32(hi);
        }
        if hi >= 0xdc00 || self.next()? != b'\\' || self.next()? != b'u' {
            return None;
        }
        let lo = self.hex4()?;
        if !(0xdc00..0xe000).contains(&lo) {
            return None;
        }
        char::from_u32(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00))
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.b.get(self.at..self.at + 4)?;
        self.at += 4;
        let s = std::str::from_utf8(digits).ok()?;
        if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(s, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_prefix_finds_the_first_byte_to_escape_at_any_offset() {
        let naive = |s: &[u8]| {
            s.iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .unwrap_or(s.len())
        };
        for len in 0..20 {
            for at in 0..len {
                for special in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    // Bytes that sit next to the specials in value, and
                    // non-ASCII, must not be flagged.
                    for filler in [b' ', b'!', b'#', b'[', b']', 0x7f, 0x80, 0xff] {
                        let mut s = vec![filler; len];
                        s[at] = special;
                        if at + 1 < len {
                            s[at + 1] = special;
                        }
                        assert_eq!(plain_prefix(&s), naive(&s), "{s:?}");
                        assert_eq!(plain_prefix(&s), at);
                    }
                }
            }
            assert_eq!(plain_prefix(&vec![b'a'; len]), len);
        }
    }
}
