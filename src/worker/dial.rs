//! Reaching the bridge, and reaching it again: a worker's configuration,
//! dialling (TCP, TLS, the upgrade, hello and welcome), and the reconnect
//! loop of [`Worker::run`]: at once after a drop, then with capped, jittered
//! exponential backoff (see [`super::backoff`]). Each connection is then
//! served by [`super::connection`].

use std::{sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Uri};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
    time::Instant,
};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::{
    client::IntoClientRequest, protocol::WebSocketConfig, Message,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::Secret,
    protocol::{self, Compression, Control, Hello},
    transport,
};

use super::{
    backoff::Backoff,
    call::Handler,
    connection::{serve, Terms, WorkerError},
    resume::Carry,
};

/// Time allowed for TCP, TLS, upgrade and welcome together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how a worker connects.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `wss://host:port` (or `ws://` for a plain loopback bridge).
    pub url: String,
    /// The bearer token the bridge expects.
    pub token: Secret,
    /// Name shown in the bridge's logs.
    pub worker_id: String,
    /// Services this worker answers.
    pub services: Vec<String>,
    /// Strings that say who or where this worker is (`{"user": "42"}`):
    /// shown by presence and matched by fan-out selectors (PROTOCOL 3.1).
    pub metadata: crate::protocol::Metadata,
    /// Calls accepted at once.
    pub max_inflight: u32,
    /// TLS trust for `wss`; `None` uses the system roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Largest message accepted from the bridge.
    pub max_frame: usize,
    /// Socket send buffer (0: the OS's autotuning, better on long, fast
    /// links); the default keeps small replies from queueing behind large
    /// ones on loopback and LANs.
    pub send_buffer: usize,
    /// On shutdown the worker asks the bridge for no new calls and waits this
    /// long for the calls in flight to finish before it gives them up.
    pub drain_timeout: Duration,
    /// Offer LZ4 compression of large body frames (the bridge may agree).
    /// Off by default: on loopback it costs CPU and saves nothing.
    pub compression: bool,
    /// Ask for the start gate (`"accepted": true`, PROTOCOL 3.7): each call
    /// waits one round trip for the bridge's `start`, and in exchange the
    /// bridge can resend a call this worker never started to another worker
    /// if the connection dies, whatever its method. On by default; turn it
    /// off when that round trip costs more than a `502 worker_lost` on a
    /// crash (far-away workers, latency-bound calls).
    pub start_gate: bool,
}

impl WorkerConfig {
    /// A config with defaults: worker id from the host name and pid, 64
    /// calls in flight, system roots, backoff from 100 ms up to 30 s.
    pub fn new(
        url: impl Into<String>,
        token: impl Into<String>,
        services: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        WorkerConfig {
            url: url.into(),
            token: Secret::new(token),
            worker_id: default_worker_id(),
            services: services.into_iter().map(Into::into).collect(),
            metadata: Default::default(),
            max_inflight: 64,
            tls: None,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            max_frame: 64 << 20,
            send_buffer: transport::SEND_BUFFER,
            compression: false,
            start_gate: true,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// `host-pid` for a process's first worker, `host-pid-2` and so on after:
/// a call can address each worker of a process by its id
/// (`Wsbridge-Worker`).
fn default_worker_id() -> String {
    static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    let pid = std::process::id();
    match MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
        0 => format!("{host}-{pid}"),
        n => format!("{host}-{pid}-{}", n + 1),
    }
}

/// The connection state, for readiness checks and status displays.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Dialling (first time or again).
    Connecting,
    /// Welcomed by the bridge; calls may arrive.
    Connected {
        /// The bridge's id for this connection.
        session_id: String,
    },
    /// Between attempts.
    Disconnected {
        /// Why the last attempt or connection ended.
        reason: String,
    },
}

/// A worker: a config plus a handler.
pub struct Worker {
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    status: watch::Sender<Status>,
}

impl Worker {
    /// Creates a worker; nothing happens until [`Worker::run`].
    pub fn new(config: WorkerConfig, handler: impl Handler) -> Self {
        Worker {
            config,
            handler: Arc::new(handler),
            status: watch::Sender::new(Status::Connecting),
        }
    }

    /// Follows the connection state.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Serves calls until `shutdown`, reconnecting whenever the connection
    /// ends. Returns an error only for a config that can never work.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let target = Target::parse(&self.config.url)?;
        let tls = match (&target.tls, &self.config.tls) {
            (false, _) => None,
            (true, Some(cfg)) => Some(TlsConnector::from(cfg.clone())),
            (true, None) => Some(TlsConnector::from(
                crate::tls::client_config(None).map_err(|e| WorkerError::Connect(e.to_string()))?,
            )),
        };
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut carry = Carry::new();
        // Until when the bridge keeps this worker's session after a drop.
        let mut held_until: Option<Instant> = None;
        loop {
            self.status.send_replace(Status::Connecting);
            // Shutdown is handled inside: a connected worker drains first.
            let outcome = self
                .connect_and_serve(&target, tls.as_ref(), &shutdown, &mut carry)
                .await;
            match &outcome {
                // Calls survive a dropped connection if the bridge keeps
                // them for a resume; bodies in flight cannot.
                Err(_) if carry.session.is_some() => carry.drop_streams(),
                _ => carry.abandon_all(),
            }
            let reason = match outcome {
                Ok(()) => return Ok(()),
                Err(e @ WorkerError::Replaced(_)) => {
                    warn!(url = %self.config.url, error = %e, "worker stopped");
                    self.status.send_replace(Status::Disconnected {
                        reason: e.to_string(),
                    });
                    return Err(e);
                }
                Err(e) => e.to_string(),
            };
            let up = carry.connected_at.take().map(|at| at.elapsed());
            let dropped = !std::mem::take(&mut carry.closed_by_bridge);
            if up.is_some() {
                // Only a drop is held for a resume: a connection the bridge
                // closed (it may be restarting) keeps nothing, and its
                // workers must keep their jittered backoff.
                held_until = (dropped && carry.session.is_some())
                    .then(|| Instant::now() + carry.resume_window);
            }
            let held = held_until
                .filter(|until| Instant::now() < *until)
                .map(|_| carry.resume_window);
            let wait = backoff.next(up, dropped, held);
            warn!(url = %self.config.url, %reason, retry_in = ?wait, "worker disconnected");
            self.status.send_replace(Status::Disconnected { reason });
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One connection, from dial to end. `Ok` only on shutdown.
    async fn connect_and_serve(
        &self,
        target: &Target,
        tls: Option<&TlsConnector>,
        shutdown: &CancellationToken,
        carry: &mut Carry,
    ) -> Result<(), WorkerError> {
        let connect = async {
            let tcp = TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(|e| {
                    WorkerError::Connect(format!("{}:{}: {e}", target.host, target.port))
                })?;
            crate::transport::tune(&tcp, self.config.send_buffer);
            Ok::<_, WorkerError>(tcp)
        };
        let within =
            |what: &'static str| move |_| WorkerError::Connect(format!("{what} timed out"));
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(within("connect"))??;
        match tls {
            None => self.handshake_and_serve(tcp, target, shutdown, carry).await,
            Some(connector) => {
                let name = ServerName::try_from(target.host.clone())
                    .map_err(|e| WorkerError::Url(self.config.url.clone(), e.to_string()))?;
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(within("TLS handshake"))?
                    .map_err(|e| WorkerError::Connect(format!("TLS: {e}")))?;
                self.handshake_and_serve(stream, target, shutdown, carry)
                    .await
            }
        }
    }

    async fn handshake_and_serve<S>(
        &self,
        stream: S,
        target: &Target,
        shutdown: &CancellationToken,
        carry: &mut Carry,
    ) -> Result<(), WorkerError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut request = target
            .ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| WorkerError::Url(self.config.url.clone(), e.to_string()))?;
        let auth = HeaderValue::from_str(&format!("Bearer {}", self.config.token.expose()))
            .map_err(|_| {
                WorkerError::Connect("the token contains characters not allowed in a header".into())
            })?;
        request.headers_mut().insert(header::AUTHORIZATION, auth);
        request.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol::SUBPROTOCOL),
        );
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(crate::transport::READ_BUFFER)
            .max_message_size(Some(self.config.max_frame))
            .max_frame_size(Some(self.config.max_frame));
        let handshake = async {
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config))
                    .await
                    .map_err(|e| match e {
                        tokio_tungstenite::tungstenite::Error::Http(resp) => {
                            let body = resp
                                .body()
                                .as_ref()
                                .map(|b| String::from_utf8_lossy(b).into_owned())
                                .unwrap_or_default();
                            WorkerError::Rejected(format!("HTTP {} {body}", resp.status()))
                        }
                        other => WorkerError::Connect(other.to_string()),
                    })?;
            let hello = Control::Hello(Hello {
                worker_id: self.config.worker_id.clone(),
                metadata: self.config.metadata.clone(),
                services: self.config.services.clone(),
                max_inflight: self.config.max_inflight,
                flow_control: true,
                accepted: self.config.start_gate,
                compression: if self.config.compression {
                    vec!["lz4".to_owned()]
                } else {
                    Vec::new()
                },
                resumable: true,
                resume: carry.resume(),
            });
            ws.send(Message::text(protocol::encode_control(&hello)))
                .await
                .map_err(|e| WorkerError::Lost(e.to_string()))?;
            let welcome = match ws.next().await {
                Some(Ok(Message::Text(t))) => match protocol::decode_control(&t) {
                    Ok(Control::Welcome(w)) if w.version == protocol::PROTOCOL_VERSION => w,
                    Ok(Control::Welcome(w)) => {
                        return Err(WorkerError::Rejected(format!(
                            "the bridge speaks protocol version {}, this worker {}",
                            w.version,
                            protocol::PROTOCOL_VERSION
                        )))
                    }
                    Ok(Control::Error { code, message, .. }) => {
                        return Err(WorkerError::Rejected(format!("{code}: {message}")))
                    }
                    other => {
                        return Err(WorkerError::Rejected(format!(
                            "expected welcome, got {other:?}"
                        )))
                    }
                },
                Some(Ok(other)) => {
                    return Err(WorkerError::Rejected(format!(
                        "expected welcome, got {other:?}"
                    )))
                }
                Some(Err(e)) => return Err(WorkerError::Lost(e.to_string())),
                None => return Err(WorkerError::Lost("closed during handshake".into())),
            };
            Ok((ws, welcome))
        };
        let (ws, welcome) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = tokio::time::timeout(CONNECT_TIMEOUT, handshake) => {
                r.map_err(|_| WorkerError::Connect("handshake timed out".into()))??
            }
        };
        info!(url = %self.config.url, session = %protocol::session_tag(&welcome.session_id), resumed = welcome.resumed, services = ?self.config.services, "connected to bridge");
        if !welcome.resumed {
            // A new session: whatever the old one had is void.
            carry.abandon_all();
        }
        carry.resend(&welcome.resend);
        carry.session = (welcome.resume_window_ms > 0).then(|| welcome.session_id.clone());
        carry.resume_window = Duration::from_millis(welcome.resume_window_ms.min(86_400_000));
        carry.connected_at = Some(Instant::now());
        self.status.send_replace(Status::Connected {
            session_id: welcome.session_id.clone(),
        });
        let codec = match welcome.compression.as_deref() {
            Some("lz4") if self.config.compression => Compression::Lz4,
            _ => Compression::None,
        };
        let terms = Terms {
            codec,
            max_frame: self.config.max_frame,
            drain_timeout: self.config.drain_timeout,
            start_gate: self.config.start_gate,
        };
        serve(ws, &welcome, terms, self.handler.clone(), shutdown, carry).await
    }
}

/// A parsed bridge URL.
struct Target {
    tls: bool,
    host: String,
    port: u16,
    ws_url: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, WorkerError> {
        let bad = |why: &str| WorkerError::Url(url.to_owned(), why.to_owned());
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => return Err(bad("the scheme must be wss:// or ws://")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        // `[::1]` in a URL is `::1` to DNS and to certificate names.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
        let ws_url = format!("{}://{authority}{path}", if tls { "wss" } else { "ws" });
        Ok(Target {
            tls,
            host,
            port,
            ws_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports() {
        let t = Target::parse("wss://bridge.example").expect("valid");
        assert!(t.tls && t.port == 443 && t.host == "bridge.example");
        let t = Target::parse("ws://127.0.0.1:9000/x").expect("valid");
        assert!(!t.tls && t.port == 9000 && t.ws_url == "ws://127.0.0.1:9000/x");
        let t = Target::parse("wss://[::1]:8443").expect("valid");
        assert_eq!(t.host, "::1");
        assert!(Target::parse("http://x").is_err());
    }
}
