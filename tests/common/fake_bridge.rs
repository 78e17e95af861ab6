//! The bridge's end of worker connections played by the test over plain
//! `ws://`, for tests of what a worker puts on the wire.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{self, Message},
    WebSocketStream,
};
use wsbridge::protocol::{self, Control, DataHead, Welcome};

use super::with_timeout;

/// The bridge's end of worker connections, played by the test over plain
/// `ws://`: for tests of what a worker puts on the wire.
pub struct FakeBridge {
    listener: tokio::net::TcpListener,
    /// Where workers dial.
    pub url: String,
}

/// A welcome with the given heartbeat and defaults for the rest.
pub fn welcome(ping_interval_ms: u64, ping_misses: u32) -> Welcome {
    Welcome {
        version: 1,
        session_id: "fake".into(),
        ping_interval_ms,
        ping_misses,
        max_frame: 1 << 20,
        max_response_body: 1 << 20,
        window: 0,
        compression: None,
        resume_window_ms: 0,
        resumed: false,
        resend: Vec::new(),
    }
}

impl FakeBridge {
    pub async fn bind() -> FakeBridge {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("ws://{}", listener.local_addr().expect("addr"));
        FakeBridge { listener, url }
    }

    /// Accepts the next connection and drops it at once (a dial that fails
    /// before the welcome).
    pub async fn refuse_next(&self) {
        let (tcp, _) = with_timeout(self.listener.accept()).await.expect("accept");
        drop(tcp);
    }

    /// Accepts the next worker, reads its hello and sends `welcome`.
    pub async fn accept(&self, welcome: Welcome) -> FakeLink {
        let (tcp, _) = with_timeout(self.listener.accept()).await.expect("accept");
        #[allow(clippy::result_large_err)]
        let cb = |_: &tungstenite::handshake::server::Request,
                  mut resp: tungstenite::handshake::server::Response| {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(protocol::SUBPROTOCOL),
            );
            Ok(resp)
        };
        let mut ws = with_timeout(tokio_tungstenite::accept_hdr_async(tcp, cb))
            .await
            .expect("upgrade");
        match with_timeout(ws.next()).await {
            Some(Ok(Message::Text(_))) => {}
            other => panic!("expected a hello, got {other:?}"),
        }
        let welcome = Control::Welcome(welcome);
        ws.send(Message::text(protocol::encode_control(&welcome)))
            .await
            .expect("welcome");
        FakeLink { ws }
    }
}

/// One worker connection to a [`FakeBridge`].
pub struct FakeLink {
    pub ws: WebSocketStream<TcpStream>,
}

impl FakeLink {
    /// Sends call `id`: a `GET` of `path` with no body.
    pub async fn get(&mut self, id: u64, path: &str) {
        let head = DataHead::Request(protocol::RequestHead {
            id,
            request_id: format!("fake-{id}"),
            service: "default".into(),
            method: "GET".into(),
            path: path.into(),
            headers: vec![],
            latin1: vec![],
            end: true,
            gate: false,
        });
        let frame = protocol::encode_data(&head, b"");
        self.ws
            .send(Message::Binary(frame))
            .await
            .expect("send request");
    }

    /// The next binary frame from the worker, decoded (control frames are
    /// skipped).
    pub async fn next_data(&mut self) -> (DataHead, Bytes) {
        loop {
            match with_timeout(self.ws.next()).await {
                Some(Ok(Message::Binary(b))) => {
                    return protocol::decode_data(&b, 0).expect("valid data frame")
                }
                Some(Ok(_)) => continue,
                other => panic!("worker connection ended: {other:?}"),
            }
        }
    }
}
