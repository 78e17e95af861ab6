//! A browser cannot set `Authorization` on a WebSocket: its token comes as
//! the subprotocol `base64url.bearer.wsbridge.<token>` beside `wsbridge.v1`,
//! and only `wsbridge.v1` is echoed. An `Origin` (every browser sends one)
//! must be in `workers.allowed_origins`, against cross-site WebSocket
//! hijacking. The token never shows in a log line, even at trace level.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use wsbridge::{protocol, worker::echo_as};

fn protocols(token: &str) -> String {
    format!("{}, {}", protocol::SUBPROTOCOL, token_protocol(token))
}

#[tokio::test]
async fn a_token_in_the_subprotocol_is_accepted_and_never_echoed() {
    let bridge = TestBridge::start(|c| {
        c.workers.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let tls = bridge.cert.client_config().expect("tls");
    let offered = protocols(TOKEN);
    let headers = [
        ("sec-websocket-protocol", offered.as_str()),
        ("origin", "https://app.example"),
    ];
    let (_ws, resp) = ws_connect_with(bridge.workers, tls.clone(), &headers)
        .await
        .expect("upgrade with the token in the subprotocol");
    let echoed: Vec<_> = resp
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .collect();
    assert_eq!(echoed, [protocol::SUBPROTOCOL]);

    // A wrong token there is a 401 like a wrong bearer header.
    let wrong = protocols("not-the-token");
    let (status, body) = refused_status(
        ws_connect_with(
            bridge.workers,
            tls.clone(),
            &[("sec-websocket-protocol", &wrong)],
        )
        .await,
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // The token alone, without wsbridge.v1, is no protocol to speak.
    let alone = token_protocol(TOKEN);
    let (status, _) = refused_status(
        ws_connect_with(bridge.workers, tls, &[("sec-websocket-protocol", &alone)]).await,
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    bridge.stop().await;
}

#[tokio::test]
async fn an_origin_outside_the_allowlist_is_refused() {
    let bridge = TestBridge::start(|c| {
        c.workers.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let tls = bridge.cert.client_config().expect("tls");
    let offered = protocols(TOKEN);
    let from = |origin: &'static str| {
        [
            ("sec-websocket-protocol", offered.clone()),
            ("origin", origin.to_owned()),
        ]
    };
    let connect = |headers: [(&'static str, String); 2]| {
        let tls = tls.clone();
        let addr = bridge.workers;
        async move {
            let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            ws_connect_with(addr, tls, &pairs).await
        }
    };
    let (status, body) = refused_status(connect(from("https://evil.example")).await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body.contains("forbidden_origin") && body.contains("evil.example"),
        "{body}"
    );
    // Origins compare without case.
    assert!(connect(from("HTTPS://APP.EXAMPLE")).await.is_ok());
    // A client that sends no Origin is not a browser page: not checked.
    assert!(
        raw_connect(&bridge, Some(TOKEN), Some(protocol::SUBPROTOCOL))
            .await
            .is_ok()
    );
    bridge.stop().await;

    // By default no page may connect at all.
    let closed = TestBridge::start(|_| {}).await;
    let tls = closed.cert.client_config().expect("tls");
    let headers = [
        ("sec-websocket-protocol", offered.as_str()),
        ("origin", "https://app.example"),
    ];
    let (status, _) = refused_status(ws_connect_with(closed.workers, tls, &headers).await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    closed.stop().await;
}

#[tokio::test]
async fn the_token_appears_in_no_log_line_even_at_trace_level() {
    let token_tail = r#"allowed_origins = ["https://app.example"]"#;
    let mut bridge = BridgeProcess::start_logging("", token_tail, "trace").await;
    // A browser-like worker connects with the token in the subprotocol...
    let tls = wsbridge::tls::client_config(Some(&bridge.cert_path)).expect("trust");
    let offered = protocols(TOKEN);
    let headers = [
        ("sec-websocket-protocol", offered.as_str()),
        ("origin", "https://app.example"),
    ];
    let (ws, _) = ws_connect_with(bridge.workers, tls.clone(), &headers)
        .await
        .expect("upgrade");
    let mut worker = RawWorker::hello_over(
        ws,
        wsbridge::protocol::Hello {
            worker_id: "tab-1".into(),
            services: vec!["browser".into()],
            max_inflight: 1,
            ..Default::default()
        },
    )
    .await;
    // ...a wrong one is refused, and a library worker serves a call.
    let wrong = protocols("wrong-secret-value");
    let _ = ws_connect_with(
        bridge.workers,
        tls.clone(),
        &[("sec-websocket-protocol", &wrong)],
    )
    .await;
    // ...and so is a page from elsewhere, with the token.
    let foreign = [
        ("sec-websocket-protocol", offered.as_str()),
        ("origin", "https://evil.example"),
    ];
    let _ = ws_connect_with(bridge.workers, tls, &foreign).await;
    let mut lib = TestWorker::start(bridge.worker_config(&["default"], 1), echo_as("lib")).await;
    lib.connected().await;
    let client = http_client();
    let reply = post(&client, &format!("http://{}/x", bridge.http), "hi").await;
    assert_eq!(reply.head.status, 200);
    let _ = worker.ws.close(None).await;
    lib.stop().await;
    bridge.signal("TERM");
    let _ = tokio::time::timeout(Duration::from_secs(10), bridge.wait()).await;
    let secrets = [
        TOKEN.to_owned(),
        token_protocol(TOKEN),
        token_protocol("wrong-secret-value"),
        "wrong-secret-value".into(),
    ];
    let encoded: Vec<String> = secrets
        .iter()
        .map(|s| s.rsplit('.').next().unwrap_or(s).to_owned())
        .collect();
    let mut lines = 0;
    // The operator's log says why each refused connection was refused.
    let (mut origin_logged, mut token_logged) = (false, false);
    while let Some(line) = bridge.next_log_line().await {
        lines += 1;
        origin_logged |=
            line.contains("refused 403 forbidden_origin") && line.contains("https://evil.example");
        token_logged |= line.contains("refused 401 unauthorized");
        for secret in secrets.iter().chain(&encoded) {
            assert!(
                !line.contains(secret.as_str()),
                "a log line shows a secret: {line}"
            );
        }
    }
    // Trace level logs plenty: the check read something.
    println!("{lines} log lines checked");
    assert!(
        origin_logged && token_logged,
        "refusals logged with their reason: {origin_logged} {token_logged}"
    );
    assert!(lines > 20, "only {lines} log lines");
}
