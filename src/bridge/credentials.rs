//! Who opened a session: the fingerprints of the credentials its worker
//! authenticated with. A session belongs to them (PROTOCOL.md 8.5): a
//! `resume` that presents anything else is a new session, so knowing a
//! session id is never enough to take over another worker's calls.
//!
//! Only SHA-256 fingerprints are kept, never a token: a fingerprint stays
//! valid across a config reload that reorders the token list (an index
//! would not), and a memory dump shows no secret.

use sha2::{Digest, Sha256};

/// The credentials a worker connection authenticated with.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// SHA-256 of the bearer token presented.
    token: [u8; 32],
    /// SHA-256 of the DER of the client certificate, with mutual TLS.
    cert: Option<[u8; 32]>,
}

impl Credentials {
    /// The fingerprints of `token` and, with mutual TLS, of the client
    /// certificate's SHA-256 `cert`.
    pub(crate) fn new(token: &str, cert: Option<[u8; 32]>) -> Self {
        Credentials {
            token: sha256(token.as_bytes()),
            cert,
        }
    }
}

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// How a session is shown to anyone but its worker (logs, `/status`, the
/// dashboard): the first 8 hex digits of the SHA-256 of its id. Enough to
/// tell sessions apart and to match a worker's own log (it can compute the
/// same from the id it was welcomed with), useless to resume with.
pub(crate) fn session_tag(session_id: &str) -> String {
    sha256(session_id.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_is_a_stable_short_hash_that_does_not_contain_the_id() {
        let id = "0190f0c2-8a4e-7c3b-9d2f-1e5a6b7c8d9e";
        let tag = session_tag(id);
        assert_eq!(tag.len(), 8);
        assert_eq!(tag, session_tag(id));
        assert!(!id.replace('-', "").contains(&tag));
        // The SHA-256 of "abc" starts with ba7816bf (FIPS 180-2, B.1).
        assert_eq!(session_tag("abc"), "ba7816bf");
    }

    #[test]
    fn credentials_differ_by_token_and_by_certificate() {
        let a = Credentials::new("token-a", None);
        assert!(a == Credentials::new("token-a", None));
        assert!(a != Credentials::new("token-b", None));
        assert!(a != Credentials::new("token-a", Some([1; 32])));
    }
}
