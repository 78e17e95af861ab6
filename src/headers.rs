//! HTTP header handling shared by the bridge and the agent: hop-by-hop
//! stripping (RFC 9110 section 7.6.1) and conversion to and from the wire's
//! `[name, value]` pairs.
//!
//! Values travel byte for byte. A value that is UTF-8 (nearly all) is a
//! JSON string as it is; one that is not (legal in HTTP: Latin-1 filenames,
//! cookies, signed values) goes as the string of its bytes read as Latin-1,
//! and the head lists its index in `"latin1"` (PROTOCOL 5.1). A worker that
//! ignores the list sees the Latin-1 reading, which is what such bytes
//! usually mean; nothing is ever replaced.

use std::borrow::Cow;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::protocol::{json::WireValue, Header};

/// Headers that describe one connection, never the message, so a proxy must
/// not forward them.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// True for a header a proxy must not forward.
fn is_hop_by_hop(name: &HeaderName, listed: &[String]) -> bool {
    HOP_BY_HOP.contains(name)
        || name.as_str().starts_with("proxy-")
        || listed.iter().any(|l| l == name.as_str())
}

/// Names listed in `Connection:` (which are hop-by-hop too), lowercased.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Removes hop-by-hop headers in place.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n, &listed))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// A header value on its way to the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum WireText<'a> {
    /// A UTF-8 value, as it is.
    Utf8(Cow<'a, str>),
    /// A value that is not UTF-8: each byte as the character of that code
    /// point (U+0000 to U+00FF), listed in the head's `"latin1"`.
    Latin1(String),
}

impl WireText<'_> {
    /// The value for `bytes`: borrowed when they are UTF-8.
    fn of(bytes: &[u8]) -> WireText<'_> {
        match std::str::from_utf8(bytes) {
            Ok(text) => WireText::Utf8(Cow::Borrowed(text)),
            Err(_) => WireText::Latin1(bytes.iter().map(|&b| char::from(b)).collect()),
        }
    }
}

impl AsRef<str> for WireText<'_> {
    fn as_ref(&self) -> &str {
        match self {
            WireText::Utf8(text) => text,
            WireText::Latin1(text) => text,
        }
    }
}

impl WireValue for WireText<'_> {
    fn is_latin1(&self) -> bool {
        matches!(self, WireText::Latin1(_))
    }
}

impl<'a> From<&'a str> for WireText<'a> {
    fn from(text: &'a str) -> Self {
        WireText::Utf8(Cow::Borrowed(text))
    }
}

/// Converts headers to wire pairs, dropping hop-by-hop ones, borrowing from
/// `headers`: no copy unless a value is not UTF-8.
pub fn to_wire_ref(headers: &HeaderMap) -> Vec<(&str, WireText<'_>)> {
    let listed = connection_listed(headers);
    // Room for what the bridge adds: `host` (from an HTTP/2 `:authority`)
    // and the three `X-Forwarded-*`/`X-Request-Id`.
    let mut out = Vec::with_capacity(headers.len() + 4);
    for (n, v) in headers {
        if !is_hop_by_hop(n, &listed) {
            out.push((n.as_str(), WireText::of(v.as_bytes())));
        }
    }
    out
}

/// The bytes a value listed in `"latin1"` stands for, or `None` if it has
/// a character above U+00FF.
fn latin1_bytes(text: &str) -> Option<Vec<u8>> {
    text.chars().map(|c| u8::try_from(c).ok()).collect()
}

/// The value of pair `i`: the bytes it stands for if `latin1` lists it,
/// else `text` as [`from_wire`]'s caller makes it. `None`: not a valid
/// value (a Latin-1 one with a character above U+00FF is not).
fn value_of(
    i: usize,
    text: &str,
    latin1: &[usize],
    as_text: impl FnOnce() -> Option<HeaderValue>,
) -> Option<HeaderValue> {
    // check_latin1 made the list strictly ascending: a binary search keeps
    // a head with thousands of listed values linear-logarithmic.
    if latin1.is_empty() || latin1.binary_search(&i).is_err() {
        return as_text();
    }
    HeaderValue::from_maybe_shared(Bytes::from(latin1_bytes(text)?)).ok()
}

/// Every index `latin1` lists must name a pair, in ascending order, each
/// once (PROTOCOL.md 5.1).
fn check_latin1(latin1: &[usize], len: usize) -> Result<(), String> {
    if let Some(w) = latin1.windows(2).find(|w| w[0] >= w[1]) {
        return Err(format!(
            "latin1 must list indices in ascending order, each once ({} then {})",
            w[0], w[1]
        ));
    }
    match latin1.last() {
        Some(&i) if i >= len => Err(format!("latin1 lists header {i}, past the {len} headers")),
        _ => Ok(()),
    }
}

/// Converts wire pairs back to a header map, dropping hop-by-hop headers.
/// `Content-Length` is kept only for a streamed body (`streamed`), where it
/// tells the next hop the size and lets HTTP catch a body cut short; a
/// complete body is framed from its own length. Fails on the first name or
/// value that is not valid HTTP.
/// Values whose index `latin1` lists are Latin-1 (see [`WireText`]).
pub fn from_wire(pairs: &[Header], latin1: &[usize], streamed: bool) -> Result<HeaderMap, String> {
    check_latin1(latin1, pairs.len())?;
    let values = pairs.iter().enumerate().map(|(i, (n, v))| {
        let value = value_of(i, v, latin1, || HeaderValue::from_str(v).ok());
        (n.as_str(), value)
    });
    build(values, pairs.len(), streamed)
}

/// [`from_wire`] for pairs that may borrow `frame`: a borrowed value
/// becomes a slice of it instead of a copy. With `frame` `None`, values are
/// copied (a frame padded with junk must not be kept alive by its headers).
pub fn from_wire_ref(
    pairs: &[(Cow<'_, str>, Cow<'_, str>)],
    latin1: &[usize],
    streamed: bool,
    frame: Option<&Bytes>,
) -> Result<HeaderMap, String> {
    check_latin1(latin1, pairs.len())?;
    let values = pairs.iter().enumerate().map(|(i, (n, v))| {
        let value = value_of(i, v, latin1, || match (v, frame) {
            (Cow::Borrowed(v), Some(frame)) => {
                HeaderValue::from_maybe_shared(frame.slice_ref(v.as_bytes())).ok()
            }
            _ => HeaderValue::from_str(v).ok(),
        });
        (n.as_ref(), value)
    });
    build(values, pairs.len(), streamed)
}

/// The length the pairs declare: their one `Content-Length`, if it is
/// valid (none when there are several, as [`from_wire`] decides).
pub fn declared_length<N: AsRef<str>, V: AsRef<str>>(pairs: &[(N, V)]) -> Option<u64> {
    let mut lengths = pairs
        .iter()
        .filter(|(n, _)| n.as_ref().eq_ignore_ascii_case("content-length"));
    match (lengths.next(), lengths.next()) {
        (Some((_, v)), None) => v.as_ref().parse().ok(),
        _ => None,
    }
}

/// The map of names and values (`None`: not a valid value), as
/// [`from_wire`] describes. Hop-by-hop headers and `Content-Length` are
/// sorted out as the pairs go in, so the common case takes no second pass
/// over the map; only a `Connection` header (which may name more headers to
/// drop) sends it through [`strip_hop_by_hop`].
fn build<'a>(
    pairs: impl Iterator<Item = (&'a str, Option<HeaderValue>)>,
    len: usize,
    streamed: bool,
) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(len);
    let mut connection = false;
    let (mut length, mut lengths) = (None, 0);
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value = value.ok_or_else(|| format!("invalid value for header {name}"))?;
        if name == header::CONTENT_LENGTH {
            lengths += 1;
            length = Some(value);
            continue;
        }
        if name == header::CONNECTION {
            connection = true;
        } else if is_hop_by_hop(&name, &[]) {
            continue;
        }
        map.append(name, value);
    }
    if connection {
        // Content-Length is held aside: if Connection names it, it goes too.
        if connection_listed(&map)
            .iter()
            .any(|l| l == "content-length")
        {
            length = None;
        }
        strip_hop_by_hop(&mut map);
    }
    let valid = |v: &HeaderValue| v.to_str().is_ok_and(|v| v.parse::<u64>().is_ok());
    if let Some(length) = length.filter(|v| streamed && lengths == 1 && valid(v)) {
        map.insert(header::CONTENT_LENGTH, length);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.append("x-keep", HeaderValue::from_static("a"));
        h.append("x-keep", HeaderValue::from_static("b"));
        let wire = to_wire_ref(&h);
        assert_eq!(
            wire,
            vec![
                ("x-keep", WireText::from("a")),
                ("x-keep", WireText::from("b"))
            ]
        );
    }

    #[test]
    fn a_latin1_list_must_be_ascending_and_in_range() {
        let pairs: Vec<Header> = vec![("a".into(), "caf\u{e9}".into()), ("b".into(), "x".into())];
        assert!(from_wire(&pairs, &[0], false).is_ok());
        assert!(from_wire(&pairs, &[0, 1], false).is_ok());
        assert!(from_wire(&pairs, &[1, 0], false).is_err());
        assert!(from_wire(&pairs, &[0, 0], false).is_err());
        assert!(from_wire(&pairs, &[2], false).is_err());
        let map = from_wire(&pairs, &[0], false).expect("valid");
        assert_eq!(map.get("a").map(|v| v.as_bytes()), Some(&b"caf\xe9"[..]));
    }

    #[test]
    fn from_wire_rejects_invalid_names() {
        assert!(from_wire(&[("bad name".into(), "v".into())], &[], false).is_err());
        assert!(from_wire(&[("x".into(), "line\nbreak".into())], &[], false).is_err());
        let streamed =
            from_wire(&[("content-length".into(), "99".into())], &[], true).expect("valid");
        assert_eq!(
            streamed.get("content-length").map(|v| v.as_bytes()),
            Some(&b"99"[..])
        );
        let map = from_wire(
            &[
                ("content-length".into(), "99".into()),
                ("upgrade".into(), "h2c".into()),
                ("x-ok".into(), "1".into()),
            ],
            &[],
            false,
        )
        .expect("valid");
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn from_wire_drops_connection_listed_headers_and_doubtful_lengths() {
        let pair = |n: &str, v: &str| (n.to_owned(), v.to_owned());
        let map = from_wire(
            &[
                pair("x-secret", "1"),
                pair("Connection", "x-secret, close"),
                pair("proxy-authenticate", "Basic"),
                pair("x-keep", "a"),
                pair("X-Keep", "b"),
            ],
            &[],
            false,
        )
        .expect("valid");
        let keep: Vec<_> = map.get_all("x-keep").iter().collect();
        assert_eq!(keep, ["a", "b"]);
        assert_eq!(map.len(), 2, "{map:?}");
        // Content-Length named in Connection is hop-by-hop like any other.
        let listed = from_wire(
            &[
                pair("connection", "content-length"),
                pair("content-length", "3"),
            ],
            &[],
            true,
        );
        assert!(listed.expect("valid").is_empty());
        // A streamed body keeps one valid Content-Length, and only that.
        let one = from_wire(&[pair("content-length", "5"), pair("x", "1")], &[], true);
        assert_eq!(
            one.expect("valid")
                .get("content-length")
                .map(|v| v.as_bytes()),
            Some(&b"5"[..])
        );
        for doubtful in [
            vec![pair("content-length", "5"), pair("content-length", "5")],
            vec![pair("content-length", "five")],
        ] {
            let map = from_wire(&doubtful, &[], true).expect("valid");
            assert!(map.get("content-length").is_none(), "{doubtful:?}");
        }
    }
}
