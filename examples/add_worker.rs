//! A native Rust worker that implements the `add` call used by the PHP
//! example: `POST /add` with `{"a": 2, "b": 3}` answers `{"sum": 5}`.
//!
//! Run the bridge (`cargo run --release -- serve`, which creates a
//! self-signed certificate in `certs/` on first start), then:
//!
//! ```text
//! WSBRIDGE_URL=wss://localhost:8443 WSBRIDGE_TOKEN=change-me \
//! WSBRIDGE_CA=certs/server.crt cargo run --example add_worker
//! ```
//!
//! It uses only the public `wsbridge::worker` API.

use http::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use wsbridge::body::Body;
use wsbridge::worker::{CallInfo, Worker, WorkerConfig};

/// Answers one call.
async fn handle(req: Request<Body>) -> Response<Body> {
    let request_id = req
        .extensions()
        .get::<CallInfo>()
        .map(|c| c.request_id.clone())
        .unwrap_or_default();
    if req.uri().path() != "/add" {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "only /add is served here"}),
        );
    }
    // Calls are small JSON documents; anything over 64 KiB is refused.
    let body = match req.into_body().collect(64 * 1024).await {
        Ok(b) => b,
        Err(e) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": e.to_string()}),
            )
        }
    };
    let input: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("body is not JSON: {e}")}),
            )
        }
    };
    match (input["a"].as_f64(), input["b"].as_f64()) {
        (Some(a), Some(b)) => reply(
            StatusCode::OK,
            json!({"sum": a + b, "request_id": request_id}),
        ),
        _ => reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "need numbers \"a\" and \"b\""}),
        ),
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let env =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let mut config = WorkerConfig::new(
        env("WSBRIDGE_URL", "wss://localhost:8443"),
        env("WSBRIDGE_TOKEN", "change-me"),
        [env("WSBRIDGE_SERVICE", "default")],
    );
    config.worker_id = "add-worker".into();
    if let Ok(ca) = std::env::var("WSBRIDGE_CA") {
        config.tls = Some(wsbridge::tls::client_config(Some(ca.as_ref()))?);
    }
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    Worker::new(config, handle).run(shutdown).await?;
    Ok(())
}
