//! The admin listener: what an operator (or Prometheus) asks a running
//! bridge, on a port of its own so that caller traffic and limits never get
//! in its way.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition (format 0.0.4) |
//! | `GET /status` | [`Status`](super::status::Status) as JSON |
//! | `GET /` | the dashboard: one HTML page, no external assets |
//! | `POST /reload` | re-read the config file; JSON of what changed (needs the header `X-Wsbridge-Admin`) |
//! | `GET /healthz` | `{"status":"ok"}` |

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{directory, reload, status, Shared};
use crate::metrics::{Gauges, ServiceGauges};

/// The header `POST /reload` requires.
pub const ADMIN_HEADER: &str = "x-wsbridge-admin";

/// The dashboard page, compiled in.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Serves the admin API until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin listener ready (/metrics, /status, /, POST /reload)");
    }
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let Some((tcp, peer)) = super::accept(&listener, &shutdown, "admin").await else {
            break;
        };
        let shared = shared.clone();
        let service = service_fn(move |req| answer(shared.clone(), peer, req));
        let conn = builder.serve_connection(TokioIo::new(tcp), service);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                r = conn => if let Err(e) = r {
                    debug!(%peer, error = %e, "admin connection ended with an error");
                },
            }
        });
    }
}

type Reply = Response<Full<Bytes>>;

async fn answer(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Reply, Infallible> {
    let ip = peer.ip().to_canonical();
    let allowed = shared
        .settings
        .load()
        .config
        .admin
        .allow_from
        .iter()
        .any(|n| n.contains(&ip));
    if !allowed {
        return Ok(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("{ip} is not in admin.allow_from"),
        ));
    }
    let reply = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let text = shared.metrics.render(&gauges(&shared));
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            )
        }
        (&Method::GET | &Method::HEAD, "/status") => {
            json(StatusCode::OK, &status::collect(&shared))
        }
        (&Method::GET | &Method::HEAD, "/" | "/index.html") => {
            reply(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD)
        }
        (&Method::GET | &Method::HEAD, directory::PATH) => {
            match directory::parse(req.uri().query()) {
                Ok(query) => reply(
                    StatusCode::OK,
                    "application/json",
                    directory::document(&shared, &query).await,
                ),
                Err(e) => error(StatusCode::BAD_REQUEST, e.code(), &e.to_string()),
            }
        }
        (&Method::GET | &Method::HEAD, "/healthz") => {
            json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
        }
        // A custom header cannot be sent cross-origin without a CORS
        // preflight (which this listener never approves), so a web page in
        // a browser on this host cannot trigger a reload.
        (&Method::POST, "/reload") if !req.headers().contains_key(ADMIN_HEADER) => error(
            StatusCode::FORBIDDEN,
            "missing_admin_header",
            &format!("POST /reload needs the header {ADMIN_HEADER}: 1 (wsbridge reload sends it)"),
        ),
        (&Method::POST, "/reload") => {
            let worker = shared.clone();
            match tokio::task::spawn_blocking(move || reload::reload(&worker)).await {
                Ok(Ok(done)) => json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "reloaded": true,
                        "changed": done.changed,
                        "needs_restart": done.needs_restart,
                    }),
                ),
                Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, e.code(), &e.to_string()),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    &format!("the reload task failed: {e}"),
                ),
            }
        }
        (
            _,
            "/metrics" | "/status" | "/" | "/index.html" | "/healthz" | "/reload" | directory::PATH,
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{} is not allowed here", req.method()),
        ),
        (_, path) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!(
                "no admin page at {path}; try /, /status, /metrics, {}",
                directory::PATH
            ),
        ),
    };
    Ok(reply)
}

/// The live gauges `/metrics` reads from the registry.
fn gauges(shared: &Shared) -> Gauges {
    let snapshot = shared.registry.snapshot();
    Gauges {
        services: snapshot
            .services
            .iter()
            .map(|s| ServiceGauges {
                name: s.name.clone(),
                workers: s.workers,
                queued: s.queued,
            })
            .collect(),
        pending: snapshot.workers.iter().map(|w| w.session.pending()).sum(),
        // One atomic load in tokio (stable since 1.39), read only on a scrape.
        tasks: tokio::runtime::Handle::try_current()
            .ok()
            .map(|rt| rt.metrics().num_alive_tasks()),
        protocol_violations: shared.violations.load(Relaxed),
        reloads: (
            shared.reloads.load(Relaxed),
            shared.reload_failures.load(Relaxed),
        ),
        cluster: shared.cluster.get().map(|c| crate::metrics::ClusterGauges {
            connected: c.is_connected(),
            peers: c.peer_count(),
            calls: (c.calls_out.load(Relaxed), c.calls_in.load(Relaxed)),
            in_flight: (c.calls.outgoing_len(), c.calls.incoming_len()),
            out_done: (c.out_done.load(Relaxed), c.out_micros.load(Relaxed)),
        }),
        jobs: shared
            .jobs
            .get()
            .map(|j| (j.live() as u64, j.store.stored(), j.store.commits())),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    match serde_json::to_vec(value) {
        Ok(body) => reply(status, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot encode JSON: {e}"),
        ),
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Reply {
    json(
        status,
        &serde_json::json!({ "error": code, "message": message }),
    )
}
