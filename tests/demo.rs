//! The README's first command: `wsbridge demo` starts, prints a curl line,
//! and that line works.

mod common;

use std::process::Stdio;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn the_demo_serves_the_curl_line_it_prints() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbridge"))
        .args(["demo", "--port", "0", "--workers-port", "0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
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
    let r = post(&http_client(), &url, "hi").await;
    assert_eq!(r.body, "hi", "{curl}");
    let _ = child.kill().await;
}
