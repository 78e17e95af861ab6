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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_differ_by_token_and_by_certificate() {
        let a = Credentials::new("token-a", None);
        assert!(a == Credentials::new("token-a", None));
        assert!(a != Credentials::new("token-b", None));
        assert!(a != Credentials::new("token-a", Some([1; 32])));
    }
}
