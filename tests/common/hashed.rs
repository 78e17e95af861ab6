//! Large bodies checked end to end: a body generated as it is read, whose
//! SHA-256 is known once it ends ([`generated`]), and a reader that hashes
//! what arrives ([`read_hashed`]). Blocks are stamped with their number,
//! so a block reordered, repeated or lost changes the hash.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body as HttpBody, Frame};
use sha2::{Digest, Sha256};
use wsbridge::body::Body;

use super::{noise, with_timeout};

/// The size of each generated block.
pub const BLOCK: usize = 256 * 1024;

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A body of `total` bytes (whole blocks), generated as it is read;
/// `hash` gets its SHA-256 (hex) at its end.
pub fn generated(total: usize, hash: Arc<Mutex<Option<String>>>) -> Body {
    let base = noise(BLOCK);
    let mut sha = Some(Sha256::new());
    let mut i = 0;
    let stream = futures_util::stream::poll_fn(move |_| {
        if i * BLOCK >= total {
            if let Some(sha) = sha.take() {
                *hash.lock().expect("lock") = Some(hex(&sha.finalize()));
            }
            return std::task::Poll::Ready(None);
        }
        let mut b = base.to_vec();
        b[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let b = Bytes::from(b);
        if let Some(sha) = sha.as_mut() {
            sha.update(&b);
        }
        i += 1;
        std::task::Poll::Ready(Some(Ok::<_, Infallible>(Frame::data(b))))
    });
    Body::wrap(StreamBody::new(stream))
}

/// Reads `body` to its end (each frame within the test timeout): its
/// length and SHA-256 (hex).
pub async fn read_hashed<B>(mut body: B) -> (usize, String)
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut sha = Sha256::new();
    let mut len = 0usize;
    while let Some(frame) = with_timeout(body.frame()).await {
        if let Ok(data) = frame.expect("a body chunk").into_data() {
            len += data.len();
            sha.update(&data);
        }
    }
    (len, hex(&sha.finalize()))
}
