//! The signature on a job's callback: HMAC-SHA256 under
//! `jobs.callback_secret` over `"{t}.{job_id}.{state}.{status}."` followed
//! by the body, where `t` is the Unix time in seconds when it was sent.
//! Sent as `Wsbridge-Signature: t=<t>,v1=<hex>`; a receiver recomputes it,
//! compares in constant time and refuses a `t` too far from its clock,
//! which is what stops a captured callback from being replayed later.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The header's value for a callback sent at `t`.
pub(crate) fn signature(
    secret: &[u8],
    t: u64,
    id: &str,
    state: &str,
    status: u16,
    body: &[u8],
) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        // HMAC takes keys of any length; this cannot happen.
        Err(_) => return String::new(),
    };
    mac.update(format!("{t}.{id}.{state}.{status}.").as_bytes());
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(64);
    for b in digest.iter() {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("t={t},v1={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC 4231 test case 2 key and message, framed as a callback
    /// whose prefix is empty: the construction is plain HMAC-SHA256.
    #[test]
    fn matches_a_known_hmac() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").expect("key");
        mac.update(b"what do ya want for nothing?");
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            want,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let sig = signature(b"k", 10, "j", "succeeded", 200, b"x");
        assert!(sig.starts_with("t=10,v1="));
        assert_eq!(sig.len(), "t=10,v1=".len() + 64);
        assert_ne!(sig, signature(b"k", 11, "j", "succeeded", 200, b"x"));
        assert_ne!(sig, signature(b"k", 10, "j", "failed", 200, b"x"));
    }
}
