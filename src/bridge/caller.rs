//! One caller connection as the calls on it see it: its address
//! ([`Caller`]), and the count of its open HTTP/2 calls that keeps the
//! connection from going idle while a response is still being sent
//! ([`OpenCall`]). The listener (`listener.rs`) makes one per connection.

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::watch;

/// The peer of one caller connection.
pub(crate) struct Caller {
    pub(super) addr: SocketAddr,
    /// Its IP as text, for `X-Forwarded-For`.
    pub(super) ip: Box<str>,
    /// HTTP/2 only: how many of its calls are open (their responses not yet
    /// sent to their end), for the idle timeout.
    pub(super) calls: Option<watch::Sender<usize>>,
}

/// Counts an HTTP/2 call as open until its response ends or is dropped.
pub(super) struct OpenCall(Arc<Caller>);

impl OpenCall {
    pub(super) fn begin(caller: &Arc<Caller>) -> Option<OpenCall> {
        let calls = caller.calls.as_ref()?;
        calls.send_modify(|open| *open += 1);
        Some(OpenCall(caller.clone()))
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        if let Some(calls) = &self.0.calls {
            calls.send_modify(|open| *open = open.saturating_sub(1));
        }
    }
}

impl Caller {
    /// The caller a job runs for: the address that submitted it (for
    /// `X-Forwarded-For`), with no connection of its own.
    pub(super) fn for_job(ip: &str) -> Caller {
        let addr = ip.parse::<std::net::IpAddr>().map_or_else(
            |_| SocketAddr::from(([127, 0, 0, 1], 0)),
            |ip| SocketAddr::new(ip, 0),
        );
        Caller {
            addr,
            ip: Box::from(ip),
            calls: None,
        }
    }
}
