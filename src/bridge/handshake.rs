//! The handshake of a worker connection, bridge side: the upgrade (the
//! bearer token, compared in constant time, and the subprotocol), the hello
//! and the services its token may serve, the credentials a session is bound
//! to (token and, with mutual TLS, client certificate), the terms both sides
//! settle on, and the welcome that states them.

use std::{net::SocketAddr, time::Duration};

use http::{header, HeaderValue, StatusCode};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf};
use tokio_tungstenite::tungstenite::{
    handshake::server::{ErrorResponse, Request as WsRequest, Response as WsResponse},
    protocol::frame::coding::CloseCode,
};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{
    credentials::Credentials,
    wire::{self, FrameReader, FrameWriter, Incoming, ReadError},
    Settings,
};
use crate::{
    protocol::{self, Compression, Control, Hello, Welcome},
    transport::OutFrame,
};

/// The parameters of one worker connection, settled by hello and welcome.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Terms {
    /// Largest response body accepted.
    pub(crate) max_response: usize,
    /// The per-call flow-control window, if the worker does flow control.
    pub(crate) window: Option<usize>,
    /// Body compression both sides may use.
    pub(crate) compression: Compression,
    /// The worker sends `accepted` before it starts a call.
    pub(crate) acks: bool,
    /// The worker keeps its calls across a dropped connection (resume).
    pub(crate) resumable: bool,
    /// Largest message from the worker; also the most a compressed body may
    /// inflate to.
    pub(crate) max_frame: usize,
}

impl Terms {
    /// The terms of a new session with the worker that sent `hello`.
    pub(super) fn negotiate(hello: &Hello, settings: &Settings) -> Terms {
        let cfg = &settings.config.workers;
        Terms {
            max_response: settings.config.http.max_response_body.bytes(),
            window: hello.flow_control.then(|| cfg.flow_window.bytes()),
            compression: Compression::choose(&hello.compression, cfg.compression),
            acks: hello.accepted,
            resumable: hello.resumable && !cfg.resume_window.is_zero(),
            max_frame: cfg.max_frame.bytes(),
        }
    }
}

/// A worker connection past its upgrade and hello: the bridge's reader and
/// writer of its frames, the hello, and the credentials it authenticated
/// with.
pub(super) struct Accepted<S> {
    pub(super) reader: FrameReader<ReadHalf<S>>,
    pub(super) writer: FrameWriter<S>,
    pub(super) hello: Hello,
    pub(super) credentials: Credentials,
}

/// Takes a new worker connection through the upgrade and the hello, within
/// `handshake_timeout`. `None` if the handshake was refused or timed out
/// (both logged) or the bridge is shutting down. `cert`: the SHA-256 of
/// the client certificate's DER, with mutual TLS.
pub(super) async fn accept<S>(
    stream: S,
    peer: SocketAddr,
    cert: Option<[u8; 32]>,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Option<Accepted<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = &settings.config.workers;
    let handshake = upgrade_and_hello(stream, cert, settings);
    // Boxed, so that its state (most of this task's size) is freed once the
    // handshake is over instead of living as long as the connection.
    let handshake = tokio::time::timeout(cfg.handshake_timeout, Box::pin(handshake));
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => return None,
        outcome = handshake => outcome,
    };
    match outcome {
        Ok(Ok(done)) => Some(done),
        Ok(Err(reason)) => {
            info!(%peer, %reason, "worker handshake refused");
            None
        }
        Err(_) => {
            info!(%peer, timeout = ?cfg.handshake_timeout, "worker handshake timed out");
            None
        }
    }
}

/// The upgrade (tungstenite's, checked by [`check_upgrade`]), then the
/// hello, read and checked by the bridge's own frame reader. tungstenite
/// refuses bytes sent after the upgrade request before its answer (RFC
/// 6455 4.1: a client waits for it), so it hands the stream back with
/// nothing read ahead.
#[allow(clippy::result_large_err)]
async fn upgrade_and_hello<S>(
    stream: S,
    cert: Option<[u8; 32]>,
    settings: &Settings,
) -> Result<Accepted<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = &settings.config.workers;
    let mut token = None;
    // Why the upgrade was refused, for the log: the peer (a browser shows
    // its page nothing but a failed connection) gets the same in the body.
    let mut refused = None;
    let callback = |req: &WsRequest, resp: WsResponse| {
        check_upgrade(settings, req, resp, &mut token).map_err(|(status, code, message)| {
            let response = refuse(status, code, &message);
            refused = Some(format!("{} {code}: {message}", status.as_u16()));
            response
        })
    };
    let accepted =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(settings.ws_config))
            .await;
    let ws = accepted.map_err(|e| match refused.take() {
        Some(why) => format!("refused {why}"),
        None => format!("upgrade failed: {e}"),
    })?;
    let (mut reader, mut writer) = wire::split(ws.into_inner(), cfg.max_frame.bytes());
    let stall = cfg.handshake_timeout;
    let hello = loop {
        match reader.next().await {
            Ok(Incoming::Text(text)) => match protocol::decode_control(&text) {
                Ok(Control::Hello(h)) => break h,
                Ok(_) => {
                    return Err(reject(
                        &mut writer,
                        "bad_hello",
                        "first frame must be hello",
                        stall,
                    )
                    .await)
                }
                Err(e) => return Err(reject(&mut writer, "bad_hello", &e.to_string(), stall).await),
            },
            // Some client libraries ping as soon as they connect.
            Ok(Incoming::Ping(payload)) => {
                let _ = writer.write(&[OutFrame::Pong(payload)], stall).await;
            }
            Ok(Incoming::Pong(_)) => {}
            Ok(Incoming::Close(_)) => {
                writer.close(CloseCode::Normal, "", stall).await;
                return Err("closed before hello".to_owned());
            }
            Err(ReadError::Cut) => return Err("closed before hello".to_owned()),
            Ok(Incoming::Binary(_)) => {
                let problem = "first frame must be a text hello";
                return Err(reject(&mut writer, "bad_hello", problem, stall).await);
            }
            Err(e) => {
                // A hello that breaks the protocol earns a close that says how.
                if let Some((code, reason)) = e.close() {
                    writer.close(code, &reason, stall).await;
                    reader.linger().await;
                }
                return Err(e.to_string());
            }
        }
    };
    let refusal = check_hello(hello, token, settings);
    match refusal {
        Ok(hello) => {
            // check_upgrade refuses a connection without a token.
            let token = token
                .and_then(|i| cfg.tokens.get(i))
                .map_or("", |t| t.secret().expose());
            Ok(Accepted {
                reader,
                writer,
                hello,
                credentials: Credentials::new(token, cert),
            })
        }
        Err((code, problem)) => Err(reject(&mut writer, code, &problem, stall).await),
    }
}

/// Checks a hello against the token it came with (`token`: its index in
/// `workers.tokens`): its services, its worker id, the metadata the token
/// pins. The hello as it stands, or the refusal's code and message.
fn check_hello(
    hello: Hello,
    token: Option<usize>,
    settings: &Settings,
) -> Result<Hello, (&'static str, String)> {
    let cfg = &settings.config.workers;
    hello.check().map_err(|problem| ("bad_hello", problem))?;
    let token = token.and_then(|i| cfg.tokens.get(i));
    // A scoped token registers only for its own services.
    if let Some(allowed) = token.and_then(|t| t.services()) {
        if let Some(other) = hello.services.iter().find(|s| !allowed.contains(s)) {
            let problem = format!("this token may not serve {other:?}");
            return Err(("forbidden_service", problem));
        }
    }
    // A token may be bound to ids with a prefix: one user's worker cannot
    // claim another's id.
    if let Some(prefix) = token.and_then(|t| t.worker_id_prefix()) {
        if hello.worker_id.len() <= prefix.len() || !hello.worker_id.starts_with(prefix) {
            let problem = format!(
                "this token may claim only worker ids that start with {prefix:?} (got {:?})",
                hello.worker_id
            );
            return Err(("forbidden_worker_id", problem));
        }
    }
    // What the token pins wins over what the hello says.
    let mut hello = hello;
    if let Some(pinned) = token.and_then(|t| t.metadata()) {
        hello
            .metadata
            .extend(pinned.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Err(problem) = protocol::check_metadata(&hello.metadata) {
            return Err((
                "bad_hello",
                format!("with this token's metadata: {problem}"),
            ));
        }
    }
    Ok(hello)
}

/// The welcome for a connection of session `session_id` on `terms`;
/// `resumed`: it continues that session, whose calls of `resend` the
/// worker is to answer again.
pub(super) fn welcome(
    settings: &Settings,
    terms: &Terms,
    session_id: String,
    resumed: bool,
    resend: Vec<u64>,
) -> Control {
    let cfg = &settings.config.workers;
    Control::Welcome(Welcome {
        version: protocol::PROTOCOL_VERSION,
        session_id,
        ping_interval_ms: cfg.ping_interval.as_millis() as u64,
        ping_misses: cfg.ping_misses,
        max_frame: cfg.max_frame.0,
        max_response_body: settings.config.http.max_response_body.0,
        window: terms.window.map_or(0, |w| w as u64),
        compression: terms.compression.name().map(str::to_owned),
        resume_window_ms: if terms.resumable {
            cfg.resume_window.as_millis() as u64
        } else {
            0
        },
        resumed,
        resend,
    })
}

/// A handshake refusal with a JSON reason.
fn refuse(status: StatusCode, code: &str, message: &str) -> ErrorResponse {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut resp = ErrorResponse::new(Some(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// Why an upgrade is refused: the status, a code and a message.
type Refusal = (StatusCode, &'static str, String);

/// Checks the upgrade request's origin, token and subprotocol.
// A refusal is built at most once per refused connection: its size does
// not matter.
#[allow(clippy::result_large_err)]
fn check_upgrade(
    settings: &Settings,
    req: &WsRequest,
    mut resp: WsResponse,
    token: &mut Option<usize>,
) -> Result<WsResponse, Refusal> {
    foreign_origin(settings, req)?;
    // A browser cannot set `Authorization` on a WebSocket: it may send the
    // token as a subprotocol instead, which is never echoed back.
    let in_protocol = protocol_token(req);
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .or(in_protocol.as_deref())
        .unwrap_or("");
    // Compare against every token without stopping early or branching, so
    // the time taken says nothing about which token (or how much of one)
    // matched. `found` is the matching token's index + 1, or 0.
    let mut found = 0u64;
    for (i, t) in settings.config.workers.tokens.iter().enumerate() {
        let eq = t.secret().expose().as_bytes().ct_eq(presented.as_bytes());
        found.conditional_assign(&(i as u64 + 1), eq);
    }
    *token = usize::try_from(found).ok().and_then(|f| f.checked_sub(1));
    if presented.is_empty() || token.is_none() {
        return Err((
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token (in the Authorization header, or as the subprotocol base64url.bearer.wsbridge.<token>)".into(),
        ));
    }
    let offered = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == protocol::SUBPROTOCOL);
    if !offered {
        return Err((
            StatusCode::BAD_REQUEST,
            "bad_subprotocol",
            format!(
                "Sec-WebSocket-Protocol must offer {}",
                protocol::SUBPROTOCOL
            ),
        ));
    }
    resp.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol::SUBPROTOCOL),
    );
    Ok(resp)
}

/// The subprotocol that carries a token, before its unpadded base64url.
pub(crate) const TOKEN_PROTOCOL: &str = "base64url.bearer.wsbridge.";

/// The token a browser sent as the subprotocol
/// `base64url.bearer.wsbridge.<unpadded base64url of the token>`.
fn protocol_token(req: &WsRequest) -> Option<String> {
    use base64::Engine;
    let encoded = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(TOKEN_PROTOCOL))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// A refusal for a connection whose `Origin` (sent by every browser) is
/// not in `workers.allowed_origins`: a page from another site must not
/// borrow a browser's credentials (a client certificate) to connect.
fn foreign_origin(settings: &Settings, req: &WsRequest) -> Result<(), Refusal> {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return Ok(());
    };
    let allowed = &settings.config.workers.allowed_origins;
    let ok = origin.to_str().is_ok_and(|o| {
        allowed
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(o))
    });
    if ok {
        return Ok(());
    }
    let shown = String::from_utf8_lossy(origin.as_bytes());
    Err((
        StatusCode::FORBIDDEN,
        "forbidden_origin",
        format!("Origin {shown:?} is not in workers.allowed_origins"),
    ))
}

/// Sends an error frame and a policy close; returns the reason for the log.
pub(super) async fn reject<S>(
    writer: &mut FrameWriter<S>,
    code: &str,
    reason: &str,
    stall: Duration,
) -> String
where
    S: AsyncWrite,
{
    let frame = Control::Error {
        id: None,
        code: code.to_owned(),
        message: reason.to_owned(),
    };
    let error = OutFrame::text(protocol::encode_control(&frame));
    if writer.write(&[error], stall).await.is_ok() {
        writer.close(CloseCode::Policy, "bad hello", stall).await;
    }
    reason.to_owned()
}
