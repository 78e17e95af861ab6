//! 1 GiB up and 1 GiB down through the real bridge and the real agent to a
//! local upstream: the bytes arrive intact (SHA-256 on both ends) and the
//! bridge's memory stays bounded while they stream.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use wsbridge::body::Body;

const GIB: usize = 1 << 30;

/// An upstream that hashes uploads (`POST /upload` answers the SHA-256 and
/// length) and streams 1 GiB downloads (`GET /download`), recording the
/// hash of what it sent.
async fn upstream(sent: Arc<Mutex<Option<String>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let sent = sent.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let sent = sent.clone();
                    async move {
                        if req.uri().path() == "/download" {
                            return Ok::<_, Infallible>(Response::new(generated(GIB, sent)));
                        }
                        let mut body = req.into_body();
                        let mut sha = Sha256::new();
                        let mut len = 0usize;
                        while let Some(frame) = body.frame().await {
                            if let Ok(data) = frame.expect("upload chunk").into_data() {
                                len += data.len();
                                sha.update(&data);
                            }
                        }
                        let answer = format!("{} {len}", hex(&sha.finalize()));
                        Ok(Response::new(Body::from(answer)))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_arrives_intact_in_bounded_memory() {
    let bridge = BridgeProcess::start(
        r#"request_timeout = "600s"
        max_body = "2GiB""#,
    )
    .await;
    let sent = Arc::new(Mutex::new(None));
    let up = upstream(sent.clone()).await;
    let url = format!("wss://localhost:{}", bridge.workers.port());
    let _agent = spawn_agent(
        &url,
        &bridge.cert_path,
        &["--upstream", &format!("http://{up}")],
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());

    // Upload: 1 GiB generated on the fly, hashed as it is sent.
    let uploaded = Arc::new(Mutex::new(None));
    let req = Request::post(format!("http://{}/upload", bridge.http))
        .body(generated(GIB, uploaded.clone()))
        .expect("request");
    let resp = with_timeout(client.request(req))
        .await
        .expect("upload response");
    assert_eq!(resp.status(), StatusCode::OK);
    let answer = with_timeout(resp.into_body().collect())
        .await
        .expect("answer")
        .to_bytes();
    let expected = uploaded
        .lock()
        .expect("lock")
        .clone()
        .expect("upload hashed");
    assert_eq!(
        String::from_utf8_lossy(&answer),
        format!("{expected} {GIB}")
    );
    let after_upload = bridge.peak_rss();

    // Download: 1 GiB streamed by the upstream, hashed as it arrives.
    let req = Request::get(format!("http://{}/download", bridge.http))
        .body(Body::empty())
        .expect("request");
    let resp = with_timeout(client.request(req))
        .await
        .expect("download response");
    assert_eq!(resp.status(), StatusCode::OK);
    let (len, hash) = read_hashed(resp.into_body()).await;
    assert_eq!(len, GIB);
    let expected = sent.lock().expect("lock").clone().expect("download hashed");
    assert_eq!(hash, expected);

    let peak = bridge.peak_rss();
    eprintln!(
        "bridge peak RSS: {:.1} MiB after the upload, {:.1} MiB after both",
        after_upload as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    assert!(peak < 64 << 20, "bridge peak RSS {peak} bytes");
}
