//! Mutual TLS for workers (`workers.client_ca`): a worker must present a
//! certificate issued by the configured CA, on top of its token.

mod common;

use std::{net::SocketAddr, path::Path, sync::Arc};

use common::*;
use http::{header, HeaderValue, Request, Response};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::{CancellationToken, DropGuard};
use wsbridge::{
    body::Body,
    bridge::{self, Bridge, Listeners},
    protocol::{self, Control, Resume},
    tls::SelfSigned,
    worker::{Status, Worker},
};

/// A CA that signs client certificates.
struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wsbridge test workers CA");
        let cert = params.self_signed(&key).expect("CA cert");
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate and key signed by this CA, as PEM files in `dir`.
    fn client(&self, dir: &Path, name: &str) {
        client_cert(dir, name, Some(&self.issuer));
    }
}

/// Writes `name.crt`/`name.key`: signed by `issuer`, or self-signed.
fn client_cert(dir: &Path, name: &str, issuer: Option<&Issuer<'static, KeyPair>>) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = match issuer {
        Some(issuer) => params.signed_by(&key, issuer),
        None => params.self_signed(&key),
    }
    .expect("client cert");
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write cert");
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write key");
}

/// Waits for the worker's first outcome: connected, or the reason it was not.
async fn first_outcome(worker: Worker) -> (Result<(), String>, CancellationToken) {
    let mut status = worker.subscribe();
    let stop = CancellationToken::new();
    tokio::spawn(worker.run(stop.clone()));
    let outcome = with_timeout(
        status.wait_for(|s| matches!(s, Status::Connected { .. } | Status::Disconnected { .. })),
    )
    .await
    .expect("status")
    .clone();
    let result = match outcome {
        Status::Connected { .. } => Ok(()),
        Status::Disconnected { reason } => Err(reason),
        Status::Connecting => Err("still connecting".into()),
    };
    (result, stop)
}

/// A bridge that wants client certificates from `ca.crt` in `dir` (its own
/// certificate is `server.crt` there); stopped when the guard drops.
struct MtlsBridge {
    http: SocketAddr,
    workers: SocketAddr,
    handle: bridge::Handle,
    _stop: DropGuard,
}

impl MtlsBridge {
    fn start(dir: &Path) -> MtlsBridge {
        let server = SelfSigned::generate(&["localhost".into(), "127.0.0.1".into()]).expect("cert");
        server
            .write(&dir.join("server.crt"), &dir.join("server.key"))
            .expect("write server cert");
        let mut config = test_config();
        config.workers.tls_cert = Some(dir.join("server.crt"));
        config.workers.tls_key = Some(dir.join("server.key"));
        config.workers.client_ca = Some(dir.join("ca.crt"));
        let tls = bridge::server_tls(&config.workers).expect("server tls");
        let listeners = Listeners::bind(&config).expect("bind");
        let (http, workers) = (
            listeners.http.local_addr().expect("addr"),
            listeners.workers.local_addr().expect("addr"),
        );
        let shutdown = CancellationToken::new();
        let bridge = Bridge::new(config, tls).expect("bridge");
        let handle = bridge.handle();
        tokio::spawn(bridge.serve(listeners, shutdown.clone()));
        MtlsBridge {
            http,
            workers,
            handle,
            _stop: shutdown.drop_guard(),
        }
    }

    /// A raw worker presenting the client certificate `name` (from `dir`).
    async fn raw(&self, dir: &Path, name: &str, hello: protocol::Hello) -> RawWorker {
        let tls = wsbridge::tls::client_config_with_identity(
            Some(&dir.join("server.crt")),
            &dir.join(format!("{name}.crt")),
            &dir.join(format!("{name}.key")),
        )
        .expect("tls");
        let tcp = with_timeout(TcpStream::connect(self.workers))
            .await
            .expect("tcp");
        let name = ServerName::try_from("localhost").expect("name");
        let tls = with_timeout(TlsConnector::from(tls).connect(name, tcp))
            .await
            .expect("tls handshake");
        let mut req = format!("wss://localhost:{}", self.workers.port())
            .into_client_request()
            .expect("request");
        let headers = req.headers_mut();
        let bearer = HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header");
        headers.insert(header::AUTHORIZATION, bearer);
        let subprotocol = HeaderValue::from_static(protocol::SUBPROTOCOL);
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, subprotocol);
        let (ws, _) = with_timeout(tokio_tungstenite::client_async(req, tls))
            .await
            .expect("upgrade");
        RawWorker::hello_over(ws, hello).await
    }
}

#[tokio::test]
async fn workers_need_a_certificate_from_client_ca() {
    let dir = TempDir::new("mtls");
    let ca = Ca::new();
    std::fs::write(dir.0.join("ca.crt"), &ca.cert_pem).expect("write ca");
    ca.client(&dir.0, "worker");
    client_cert(&dir.0, "rogue", None);
    let MtlsBridge {
        http,
        workers,
        handle,
        _stop,
    } = MtlsBridge::start(&dir.0);

    let url = format!("wss://localhost:{}", workers.port());
    let worker = |tls: Arc<rustls::ClientConfig>| {
        let mut cfg = wsbridge::worker::WorkerConfig::new(&url, TOKEN, ["default"]);
        cfg.tls = Some(tls);
        Worker::new(cfg, |_req: Request<Body>| async {
            Response::new(Body::from("mutual"))
        })
    };
    let server_ca = dir.0.join("server.crt");

    // Without a client certificate, or with one the CA did not sign: refused.
    let no_identity = wsbridge::tls::client_config(Some(&server_ca)).expect("tls");
    let rogue = wsbridge::tls::client_config_with_identity(
        Some(&server_ca),
        &dir.0.join("rogue.crt"),
        &dir.0.join("rogue.key"),
    )
    .expect("tls");
    for (name, tls, alert) in [
        ("no certificate", no_identity, "CertificateRequired"),
        ("rogue certificate", rogue, "UnknownCA"),
    ] {
        let (outcome, stop) = first_outcome(worker(tls)).await;
        stop.cancel();
        let reason = outcome.expect_err(name);
        assert!(reason.contains(alert), "{name}: {reason}");
        assert_eq!(handle.workers("default"), 0, "{name}");
    }

    // With the CA's certificate: welcomed, and calls flow.
    let good = wsbridge::tls::client_config_with_identity(
        Some(&server_ca),
        &dir.0.join("worker.crt"),
        &dir.0.join("worker.key"),
    )
    .expect("tls");
    let (outcome, _stop) = first_outcome(worker(good)).await;
    outcome.expect("a worker with a CA-signed certificate connects");
    let r = get(&http_client(), &format!("http://{http}/x")).await;
    assert_eq!(r.body, "mutual");
}

#[tokio::test]
async fn a_resume_with_another_client_certificate_is_a_new_session() {
    let dir = TempDir::new("mtls-resume");
    let ca = Ca::new();
    std::fs::write(dir.0.join("ca.crt"), &ca.cert_pem).expect("write ca");
    ca.client(&dir.0, "worker");
    ca.client(&dir.0, "other");
    let bridge = MtlsBridge::start(&dir.0);

    let mut a = bridge.raw(&dir.0, "worker", resumable_hello(None)).await;
    let session_id = a.welcome.session_id.clone();
    let url = format!("http://{}/pay", bridge.http);
    let call = tokio::spawn(async move { post(&http_client(), &url, "x").await });
    let (req, _) = a.next_request().await;
    a.send_text(&protocol::encode_control(&Control::Accepted { id: req.id }))
        .await;
    drop(a); // the link dies without a close frame: the session waits

    // The same token and worker_id, another certificate from the same CA.
    let resume = || {
        Some(Resume {
            session_id: session_id.clone(),
            running: vec![req.id],
            replied: vec![],
        })
    };
    let other = bridge.raw(&dir.0, "other", resumable_hello(resume())).await;
    assert!(
        !other.welcome.resumed,
        "another certificate resumed the session"
    );
    assert_ne!(other.welcome.session_id, session_id);

    let mut back = bridge
        .raw(&dir.0, "worker", resumable_hello(resume()))
        .await;
    assert!(back.welcome.resumed);
    back.reply(req.id, 200, &[], b"paid").await;
    assert_eq!(with_timeout(call).await.expect("join").body, "paid");
    assert_eq!(bridge.handle.workers("default"), 2);
}
