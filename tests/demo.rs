//! The README's first command: `wsbridge demo` starts, prints a curl line,
//! and that line works.

mod common;

use std::process::Stdio;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Starts `wsbridge demo` on free ports with `extra` arguments and
/// `RUST_LOG`; returns it (stderr piped) and the URL of its curl line.
async fn demo(extra: &[&str], rust_log: &str) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbridge"))
        .args([
            "demo",
            "--port",
            "0",
            "--workers-port",
            "0",
            "--admin-port",
            "0",
        ])
        .args(extra)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn wsbridge demo");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let curl = loop {
        let line = with_timeout(lines.next_line())
            .await
            .expect("read")
            .expect("the demo exited before printing its curl line");
        if line.trim_start().starts_with("curl -s -d hi ") {
            break line;
        }
    };
    let url = curl.split_whitespace().last().expect("url").to_owned();
    (child, url)
}

#[tokio::test]
async fn the_demo_serves_the_curl_line_it_prints() {
    let (mut child, url) = demo(&[], "warn").await;
    let r = post(&http_client(), &url, "hi").await;
    assert_eq!(r.body, "hi", "{url}");
    let _ = child.kill().await;
}

#[tokio::test]
async fn every_call_gets_one_json_access_line() {
    let (mut child, url) = demo(&["--log-format", "json"], "warn,wsbridge::access=info").await;
    let r = post(&http_client(), &url, "hello").await;
    assert_eq!(r.body, "hello");
    let mut logs = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let access = loop {
        let line = with_timeout(logs.next_line())
            .await
            .expect("read")
            .expect("no access line before the demo exited");
        let value: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        if value["target"] == "wsbridge::access" {
            break value;
        }
    };
    let fields = &access["fields"];
    assert_eq!(fields["request_id"], r.header("x-request-id"));
    assert_eq!(fields["method"], "POST");
    assert_eq!(fields["status"], 200);
    assert_eq!(fields["service"], "default");
    assert_eq!(fields["worker"], "demo-echo");
    assert_eq!(fields["attempts"], 1);
    assert_eq!(fields["bytes_in"], 5);
    assert_eq!(fields["bytes_out"], 5);
    assert_eq!(fields["complete"], true);
    assert!(fields["duration_ms"].as_f64().is_some_and(|d| d > 0.0));
    let _ = child.kill().await;
}
