//! A minimal hyper 1 HTTP/1.1 echo server: the "ceiling" of the side-by-side
//! benchmark (`scripts/bench.sh`, scenario `a-echo`). Every request is
//! answered `200` with its own body, over keep-alive connections, with no
//! routing, logging or headers beyond what hyper writes itself.
//!
//! ```text
//! cargo run --release --example bench_echo -- 127.0.0.1:9000
//! ```
//!
//! The address defaults to `127.0.0.1:0` (any free port); the bound address
//! is printed on stdout as `listening on ADDR`.

use std::convert::Infallible;
use std::io::Write;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Answers one request with its own body (an empty one if reading it failed).
async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    Ok(Response::new(Full::new(body)))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    stdout.flush()?;
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(conn) => conn,
            // Out of file descriptors and the like: keep serving the others.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service_fn(echo))
                .await;
        });
    }
}
