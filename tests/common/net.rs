//! Network stand-ins around the bridge: a plain HTTP server (an upstream,
//! a direct baseline) and a TCP proxy whose connections can be cut.

use std::future::Future;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;

/// A plain HTTP/1.1 server on a loopback port answering every request with
/// `answer` (an upstream for the agent, a direct baseline...).
pub async fn serve_http<F, Fut>(answer: F) -> std::net::SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let reply = answer(req);
                    async move { Ok::<_, std::convert::Infallible>(reply.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP proxy in front of the bridge's worker port whose open connections
/// can be cut at once (both sockets closed, as when a NAT or a proxy drops
/// them), while new connections still go through.
pub struct CutProxy {
    /// Where workers connect instead of the bridge.
    pub addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
}

impl CutProxy {
    /// Starts a proxy to `target`.
    pub async fn start(target: std::net::SocketAddr) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cuts = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        CutProxy { addr, cut }
    }

    /// Drops every connection open now.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}
