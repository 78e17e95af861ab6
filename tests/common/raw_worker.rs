//! A worker played by hand over real TLS, frame by frame, for tests of
//! what the bridge does with each frame a worker sends (or does not send).

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_tungstenite::{
    tungstenite::{self, client::IntoClientRequest, Message},
    WebSocketStream,
};
use wsbridge::protocol::{self, Control, DataHead, Hello, ResponseHead, Welcome};

use super::{http_client, spawn_get, with_timeout, TestBridge, TOKEN};

/// A `response` head.
pub fn response_head(id: u64, status: u16, end: bool) -> DataHead {
    DataHead::Response(ResponseHead {
        id,
        status,
        headers: vec![],
        latin1: vec![],
        end,
    })
}

/// A hand-driven worker connection for protocol-level tests.
pub struct RawWorker {
    /// The WebSocket.
    pub ws: WebSocketStream<TlsStream<TcpStream>>,
    /// The bridge's welcome.
    pub welcome: Welcome,
    /// Bytes of binary frames received, as they travelled (compressed).
    pub wire_bytes: usize,
    /// The ids of the `start` frames received (answers to `accepted`).
    pub started: Vec<u64>,
}

/// Opens a TLS WebSocket to the bridge with the given headers; returns the
/// socket or the handshake error (e.g. the HTTP 401 response).
pub async fn raw_connect(
    bridge: &TestBridge,
    token: Option<&str>,
    subprotocol: Option<&str>,
) -> Result<WebSocketStream<TlsStream<TcpStream>>, tungstenite::Error> {
    let tcp = with_timeout(TcpStream::connect(bridge.workers))
        .await
        .expect("tcp");
    let connector = TlsConnector::from(bridge.cert.client_config().expect("tls"));
    let name = ServerName::try_from("localhost").expect("name");
    let tls = with_timeout(connector.connect(name, tcp))
        .await
        .expect("tls handshake");
    let mut req = bridge.url().into_client_request().expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).expect("header"),
        );
    }
    if let Some(p) = subprotocol {
        req.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(p).expect("header"),
        );
    }
    with_timeout(tokio_tungstenite::client_async(req, tls))
        .await
        .map(|(ws, _)| ws)
}

/// Opens a TLS WebSocket to the worker listener at `addr` (trusting
/// `tls`) with exactly the headers given; returns the socket and the
/// upgrade response, or the handshake error (e.g. an HTTP 403).
pub async fn ws_connect_with(
    addr: std::net::SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    headers: &[(&str, &str)],
) -> Result<
    (
        WebSocketStream<TlsStream<TcpStream>>,
        tungstenite::handshake::client::Response,
    ),
    tungstenite::Error,
> {
    let tcp = with_timeout(TcpStream::connect(addr)).await.expect("tcp");
    let name = ServerName::try_from("localhost").expect("name");
    let stream = with_timeout(TlsConnector::from(tls).connect(name, tcp))
        .await
        .expect("tls handshake");
    let mut req = format!("wss://localhost:{}", addr.port())
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        req.headers_mut().append(
            header::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            HeaderValue::from_str(value).expect("value"),
        );
    }
    with_timeout(tokio_tungstenite::client_async(req, stream)).await
}

/// The status and body of an upgrade the bridge refused; panics if it was
/// accepted or failed otherwise.
pub fn refused_status(result: Result<impl Sized, tungstenite::Error>) -> (StatusCode, String) {
    match result {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            (resp.status(), body)
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

/// The subprotocol a browser sends its token in.
pub fn token_protocol(token: &str) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
    format!("base64url.bearer.wsbridge.{encoded}")
}

/// What a raw worker read.
#[derive(Debug)]
pub enum Frame {
    /// A text frame.
    Control(Control),
    /// A binary frame.
    Data(DataHead, Bytes),
    /// A close frame or the end of the stream.
    Closed,
}

impl RawWorker {
    /// Connects, says hello and reads the welcome.
    pub async fn connect(bridge: &TestBridge, services: &[&str], max_inflight: u32) -> RawWorker {
        Self::connect_with(bridge, services, max_inflight, false).await
    }

    /// Like [`RawWorker::connect`], optionally asking for flow control.
    pub async fn connect_with(
        bridge: &TestBridge,
        services: &[&str],
        max_inflight: u32,
        flow_control: bool,
    ) -> RawWorker {
        // Each its own id: a second connection claiming an id replaces
        // the first (`workers.duplicate_ids`).
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hello = Hello {
            worker_id: format!("raw-{n}"),
            metadata: Default::default(),
            services: services.iter().map(|s| s.to_string()).collect(),
            max_inflight,
            flow_control,
            accepted: false,
            compression: Vec::new(),
            resumable: false,
            resume: None,
        };
        Self::connect_hello(bridge, hello).await
    }

    /// Connects with the given hello and reads the welcome.
    pub async fn connect_hello(bridge: &TestBridge, hello: Hello) -> RawWorker {
        Self::connect_as(bridge, TOKEN, hello).await
    }

    /// Like [`RawWorker::connect_hello`], presenting `token`.
    pub async fn connect_as(bridge: &TestBridge, token: &str, hello: Hello) -> RawWorker {
        let ws = raw_connect(bridge, Some(token), Some(protocol::SUBPROTOCOL))
            .await
            .expect("upgrade");
        Self::hello_over(ws, hello).await
    }

    /// Says hello on an upgraded connection and reads the welcome.
    pub async fn hello_over(
        mut ws: WebSocketStream<TlsStream<TcpStream>>,
        hello: Hello,
    ) -> RawWorker {
        let hello = Control::Hello(hello);
        with_timeout(ws.send(Message::text(protocol::encode_control(&hello))))
            .await
            .expect("send hello");
        let mut raw = RawWorker {
            ws,
            welcome: Welcome {
                version: 0,
                session_id: String::new(),
                ping_interval_ms: 0,
                ping_misses: 0,
                max_frame: 0,
                max_response_body: 0,
                window: 0,
                compression: None,
                resume_window_ms: 0,
                resumed: false,
                resend: Vec::new(),
            },
            wire_bytes: 0,
            started: Vec::new(),
        };
        match raw.next().await {
            Frame::Control(Control::Welcome(w)) => raw.welcome = w,
            other => panic!("expected welcome, got {other:?}"),
        }
        raw
    }

    /// The next text or binary frame (pings are answered by tungstenite).
    pub async fn next(&mut self) -> Frame {
        // One bound for the whole wait: pings alone must not keep it going.
        with_timeout(self.next_unbounded()).await
    }

    async fn next_unbounded(&mut self) -> Frame {
        loop {
            match self.ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Frame::Closed,
                Some(Ok(Message::Text(t))) => {
                    match protocol::decode_control(&t).expect("valid control frame") {
                        // The answers to `accepted` are recorded, not returned.
                        Control::Start { id } => self.started.push(id),
                        other => return Frame::Control(other),
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    self.wire_bytes += b.len();
                    let inflate = if self.welcome.compression.is_some() {
                        64 << 20
                    } else {
                        0
                    };
                    let (head, body) =
                        protocol::decode_data(&b, inflate).expect("valid data frame");
                    return Frame::Data(head, body);
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads frames until a complete request arrives; returns its head and body.
    pub async fn next_request(&mut self) -> (protocol::RequestHead, Bytes) {
        let mut pending: Option<(protocol::RequestHead, Vec<u8>)> = None;
        loop {
            match self.next().await {
                Frame::Data(DataHead::Request(h), body) if h.end => return (h, body),
                Frame::Data(DataHead::Request(h), body) => pending = Some((h, body.to_vec())),
                Frame::Data(DataHead::Body(b), chunk) => {
                    let (_, buf) = pending.as_mut().expect("body after head");
                    buf.extend_from_slice(&chunk);
                    if b.end {
                        let (h, buf) = pending.take().expect("pending");
                        return (h, Bytes::from(buf));
                    }
                }
                other => panic!("expected a request, got {other:?}"),
            }
        }
    }

    /// Has the bridge call `path`, answers with a streamed reply head
    /// carrying `first`, and returns the call's head and the caller's
    /// response (its body still open).
    pub async fn streamed_reply(
        &mut self,
        bridge: &TestBridge,
        path: &str,
        first: &[u8],
    ) -> (protocol::RequestHead, Response<hyper::body::Incoming>) {
        let req = Request::get(bridge.at(path))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let client = http_client();
        let call = tokio::spawn(async move { client.request(req).await });
        let (req, _) = self.next_request().await;
        self.send_binary(protocol::encode_data(
            &response_head(req.id, 200, false),
            first,
        ))
        .await;
        let resp = with_timeout(call).await.expect("join").expect("head");
        (req, resp)
    }

    /// Sends a raw binary frame.
    pub async fn send_binary(&mut self, frame: Bytes) {
        with_timeout(self.ws.send(Message::Binary(frame)))
            .await
            .expect("send");
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: &str) {
        with_timeout(self.ws.send(Message::text(text)))
            .await
            .expect("send");
    }

    /// Replies to call `id` in one frame.
    pub async fn reply(&mut self, id: u64, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let head = DataHead::Response(ResponseHead {
            id,
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            latin1: vec![],
            end: true,
        });
        self.send_binary(protocol::encode_data(&head, body)).await;
    }
}

/// A hello for a raw worker of `default` that sends `accepted` and may
/// resume (with `resume`, it comes back to a session).
pub fn resumable_hello(resume: Option<protocol::Resume>) -> Hello {
    Hello {
        worker_id: "resumer".into(),
        metadata: Default::default(),
        services: vec!["default".into()],
        max_inflight: 8,
        flow_control: false,
        accepted: true,
        compression: Vec::new(),
        resumable: true,
        resume,
    }
}

/// Has `raw` answer one call to `path` and checks the caller got it.
pub async fn served_by_raw(bridge: &TestBridge, raw: &mut RawWorker, path: &str) {
    let call = spawn_get(bridge, path);
    let (req, _) = raw.next_request().await;
    assert_eq!(req.path, path);
    raw.reply(req.id, 200, &[], path.as_bytes()).await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, path.as_bytes())
    );
}
