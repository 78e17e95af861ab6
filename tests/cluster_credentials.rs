//! A bridge joins its cluster with exactly the NATS credentials it is
//! given: a token, a user and password, or TLS verified against a CA. Wrong
//! or missing credentials leave it degraded (serving its own workers),
//! never connected, and no secret shows in `/status`.

mod common;

use std::time::Duration;

use common::*;
use wsbridge::{bridge::status::Status, config::ClusterConfig, tls::SelfSigned};

/// A `[cluster]` section of cluster `creds`, without credentials yet.
fn cluster(nats: &str, node: &str) -> ClusterConfig {
    ClusterConfig {
        name: "creds".to_owned(),
        ..cluster_config(nats, node, Duration::from_millis(500))
    }
}

fn connected(s: &Status) -> bool {
    s.cluster.as_ref().is_some_and(|c| c.connected)
}

/// Waits until the bridge at `admin` shows a NATS error naming `cause`
/// while not connected, and returns that status.
async fn until_refused(admin: std::net::SocketAddr, cause: &str) -> Status {
    until_status(admin, &format!("a NATS error naming {cause:?}"), |s| {
        s.cluster.as_ref().is_some_and(|c| {
            !c.connected
                && c.error
                    .as_deref()
                    .is_some_and(|e| e.to_lowercase().contains(cause))
        })
    })
    .await
}

#[tokio::test]
async fn a_token_opens_the_cluster_and_a_wrong_one_does_not() {
    let nats = NatsCluster::start_with(1, "authorization { token: \"s3cret-token\" }").await;
    let url = nats.url(0);
    let good = TestBridge::start(|c| {
        let mut cl = cluster(&url, "good");
        cl.token = Some(wsbridge::config::Secret::new("s3cret-token"));
        c.cluster = Some(cl);
    })
    .await;
    let bad = TestBridge::start(|c| {
        let mut cl = cluster(&url, "bad");
        cl.token = Some(wsbridge::config::Secret::new("guessed"));
        c.cluster = Some(cl);
    })
    .await;
    let status = until_status(good.admin.expect("admin"), "connected", connected).await;
    let bad_status = until_refused(bad.admin.expect("admin"), "authorization").await;
    // Neither the token nor the wrong guess is shown.
    for s in [&status, &bad_status] {
        let json = serde_json::to_string(s).expect("status json");
        assert!(
            !json.contains("s3cret") && !json.contains("guessed"),
            "{json}"
        );
    }
    good.stop().await;
    bad.stop().await;
}

#[tokio::test]
async fn a_user_and_password_open_the_cluster_and_a_wrong_password_does_not() {
    let nats = NatsCluster::start_with(
        1,
        "authorization { user: \"bridge\", password: \"pw-right\" }",
    )
    .await;
    let url = nats.url(0);
    let with = |node: &'static str, password: &'static str| {
        let url = url.clone();
        move |c: &mut wsbridge::config::Config| {
            let mut cl = cluster(&url, node);
            cl.user = Some("bridge".to_owned());
            cl.password = Some(wsbridge::config::Secret::new(password));
            c.cluster = Some(cl);
        }
    };
    let good = TestBridge::start(with("good", "pw-right")).await;
    let bad = TestBridge::start(with("bad", "pw-wrong")).await;
    until_status(good.admin.expect("admin"), "connected", connected).await;
    until_refused(bad.admin.expect("admin"), "authorization").await;
    good.stop().await;
    bad.stop().await;
}

#[tokio::test]
async fn tls_verified_against_the_ca_opens_the_cluster_and_another_ca_does_not() {
    let dir = TempDir::new("nats-tls");
    let cert = SelfSigned::generate(&["127.0.0.1".into(), "localhost".into()]).expect("cert");
    let (cert_path, key_path) = (dir.0.join("nats.crt"), dir.0.join("nats.key"));
    cert.write(&cert_path, &key_path).expect("write cert");
    let tls = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        cert_path.display(),
        key_path.display()
    );
    let nats = NatsCluster::start_with(1, &tls).await;
    let url = nats.url(0);
    let good = TestBridge::start(|c| {
        let mut cl = cluster(&url, "good");
        cl.tls_ca = Some(cert_path.clone());
        c.cluster = Some(cl);
    })
    .await;
    // Trusts another CA: the server's certificate does not verify.
    let other = SelfSigned::generate(&["127.0.0.1".into()]).expect("cert");
    let other_path = dir.0.join("other.crt");
    other
        .write(&other_path, &dir.0.join("other.key"))
        .expect("write cert");
    let bad = TestBridge::start(|c| {
        let mut cl = cluster(&url, "bad");
        cl.tls_ca = Some(other_path.clone());
        c.cluster = Some(cl);
    })
    .await;
    until_status(good.admin.expect("admin"), "connected over TLS", connected).await;
    let refused = until_refused(bad.admin.expect("admin"), "").await;
    eprintln!(
        "a bridge trusting another CA: {:?}",
        refused.cluster.and_then(|c| c.error)
    );
    good.stop().await;
    bad.stop().await;
}
