//! Callbacks: when a job with `Wsbridge-Callback` ends, its result is
//! POSTed there, signed (`jobs::sign`), and sent again with backoff until
//! a 2xx answers or the job's retention ends: delivered at least once. A
//! receiver tells repeats apart by `Wsbridge-Job-Id`.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{
    job_run::{Jobs, Writer},
    Shared,
};
use crate::jobs::{now_ms, sign, Record, ResultBody, State};

/// The first pause after a failed delivery; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// One delivery, connection to answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Delivers `record`'s callback, storing each attempt through `writer`.
/// True when it is done with: delivered, given up at the end of the job's
/// retention, or the job is gone; false when the bridge stopped first (a
/// restart, or another bridge, takes it up again).
pub(super) async fn deliver(
    shared: Arc<Shared>,
    jobs: Arc<Jobs>,
    mut record: Record,
    writer: Writer,
) -> bool {
    let Some(url) = record.callback.clone() else {
        return true;
    };
    let mut pause = FIRST_PAUSE;
    loop {
        // A job purged meanwhile (DELETE, retention) is called back no more.
        if !writer.exists(&record.id).await {
            return true;
        }
        // Read for each attempt, not kept between them: a result may be
        // large, and the attempts may go on for hours.
        let (status, content_type, body) = match payload(&jobs, &record).await {
            Ok(p) => p,
            Err(e) => {
                warn!(job = record.id, error = %e, "the callback's body cannot be read; not sent");
                return true;
            }
        };
        let config = shared.settings.load_full();
        let jobs_config = &config.config.jobs;
        let retention = u64::try_from(jobs_config.retention.as_millis()).unwrap_or(u64::MAX);
        if record.purge_at(retention).is_some_and(|at| now_ms() >= at) {
            warn!(
                job = record.id,
                attempts = record.callback_attempts,
                "the callback was never acknowledged within jobs.retention; given up"
            );
            return true;
        }
        let secret = jobs_config
            .callback_secret
            .as_ref()
            .map_or(&b""[..], |s| s.expose().as_bytes());
        let t = now_ms() / 1000;
        let state = record.state.as_str();
        let signature = sign::signature(secret, t, &record.id, state, status, &body);
        let request = Signed {
            url: &url,
            id: &record.id,
            state,
            status,
            content_type: &content_type,
            signature: &signature,
            body: body.clone(),
        };
        record.callback_attempts += 1;
        let outcome = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            post(request, jobs_config.callback_ca.as_deref()),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")));
        record.callback_delivered = outcome.is_ok();
        let (delivered, attempts) = (record.callback_delivered, record.callback_attempts);
        let stored = writer
            .modify(&record.id, |r| {
                r.callback_delivered = delivered;
                r.callback_attempts = attempts;
            })
            .await;
        match stored {
            Ok(true) => {}
            // Purged meanwhile (DELETE, retention), or held by another
            // bridge now: not this delivery's any more.
            Ok(false) | Err(crate::jobs::StoreError::Conflict) => return true,
            Err(e) => warn!(job = record.id, error = %e, "could not store a callback's delivery"),
        }
        match outcome {
            Ok(()) => {
                info!(
                    job = record.id,
                    attempts = record.callback_attempts,
                    "callback delivered"
                );
                return true;
            }
            Err(e) => {
                info!(job = record.id, attempt = record.callback_attempts, error = %e, retry_in = ?pause, "callback failed")
            }
        }
        tokio::select! {
            _ = jobs.stop.cancelled() => return false,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// What the callback carries: the worker's status, content type and body,
/// or for a job without a reply, its error as the JSON a call would get.
async fn payload(jobs: &Jobs, record: &Record) -> Result<(u16, String, Bytes), String> {
    if let (State::Succeeded, Some(outcome)) = (record.state, &record.outcome) {
        let content_type = outcome
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-type"))
            .map(|h| String::from_utf8_lossy(&h.bytes()).into_owned())
            .unwrap_or_default();
        let body = match jobs.store.result(record).await.map_err(|e| e.to_string())? {
            ResultBody::Inline(bytes) => bytes,
            ResultBody::File(path) => tokio::fs::read(&path)
                .await
                .map(Bytes::from)
                .map_err(|e| e.to_string())?,
            ResultBody::Object(mut object) => {
                use tokio::io::AsyncReadExt;
                let mut bytes = Vec::new();
                object
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(|e| e.to_string())?;
                Bytes::from(bytes)
            }
        };
        return Ok((outcome.status, content_type, body));
    }
    let (status, body) = super::jobs::error_body(record);
    Ok((status, "application/json".into(), body))
}

/// One signed POST.
struct Signed<'a> {
    url: &'a str,
    id: &'a str,
    state: &'a str,
    status: u16,
    content_type: &'a str,
    signature: &'a str,
    body: Bytes,
}

/// Sends one POST; `Ok` on a 2xx.
async fn post(req: Signed<'_>, ca: Option<&std::path::Path>) -> Result<(), String> {
    let uri: Uri = req.url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let host = uri.host().ok_or("the URL has no host")?.to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host_header = match uri.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, host_header)
        .header(
            header::USER_AGENT,
            concat!("wsbridge/", env!("CARGO_PKG_VERSION")),
        )
        .header("wsbridge-job-id", req.id)
        .header("wsbridge-job-state", req.state)
        .header("wsbridge-job-status", req.status)
        .header("wsbridge-signature", req.signature);
    if !req.content_type.is_empty() {
        if let Ok(v) = HeaderValue::from_str(req.content_type) {
            builder = builder.header(header::CONTENT_TYPE, v);
        }
    }
    let request = builder
        .body(Full::new(req.body))
        .map_err(|e| e.to_string())?;
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let status = if https {
        let config = crate::tls::client_config(ca).map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(bare)
            .map_err(|e| format!("bad host name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(tls), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

async fn send<T>(io: T, request: Request<Full<Bytes>>) -> Result<http::StatusCode, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = http1::handshake(io).await.map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    // Read the answer's body so the exchange ends cleanly; its content
    // does not matter.
    let _ = resp.into_body().collect().await;
    conn.abort();
    Ok(status)
}
