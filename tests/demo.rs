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
    // The same over HTTP/2, as the demo's third line shows.
    let r = post(&h2_client(), &url, "hi").await;
    assert_eq!(
        (r.head.version, &r.body[..]),
        (http::Version::HTTP_2, &b"hi"[..])
    );
    // The lines for one worker, every worker, and who is connected.
    let client = http_client();
    let one = http::Request::post(&url)
        .header("wsbridge-worker", "demo-echo")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"just you",
        )))
        .expect("request");
    let r = send(&client, one).await;
    assert_eq!(
        (r.header("x-echo-worker"), &r.body[..]),
        ("demo-echo", &b"just you"[..])
    );
    let all = http::Request::post(&url)
        .header("wsbridge-fanout", "all")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"everyone",
        )))
        .expect("request");
    let doc = send(&client, all).await.json();
    assert_eq!(
        (doc["expected"].as_u64(), doc["results"][0]["body"].as_str()),
        (Some(1), Some("everyone"))
    );
    let workers = url.replace("/x", "/_wsbridge/workers");
    let doc = get(&client, &workers).await.json();
    assert!(
        doc["workers"]
            .as_array()
            .is_some_and(|w| w.iter().all(|w| w["worker_id"] == "demo-echo") && !w.is_empty()),
        "{doc}"
    );
    // The job lines: 202 with a Location, then the result there.
    let job = http::Request::post(&url)
        .header("prefer", "respond-async")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"later",
        )))
        .expect("request");
    let accepted = send(&client, job).await;
    assert_eq!(accepted.head.status, 202, "{:?}", accepted.body);
    let result = url.replace(
        "/x",
        &format!("{}/result?wait=10", accepted.header("location")),
    );
    assert_eq!(get(&client, &result).await.body, "later");
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

#[tokio::test]
async fn the_text_access_line_quotes_what_the_caller_chose() {
    let (mut child, url) = demo(&[], "warn,wsbridge::access=info").await;
    // Visible ASCII, so adopted as the request id; but a quote and an `=`.
    let forged = r#"a"b=c"#;
    let req = http::Request::post(&url)
        .header("x-request-id", forged)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"hi")))
        .expect("request");
    let r = send(&http_client(), req).await;
    assert_eq!(r.header("x-request-id"), forged);
    let mut logs = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let line = loop {
        let line = with_timeout(logs.next_line())
            .await
            .expect("read")
            .expect("no access line before the demo exited");
        if line.contains("wsbridge::access") {
            break line;
        }
    };
    // The text format may colour field names: compare without escapes.
    let plain = strip_ansi(&line);
    assert!(plain.contains(r#" request_id="a\"b=c" "#), "{plain}");
    assert!(!plain.contains(" b=c"), "{plain}");
    let duration = plain
        .split(" duration_ms=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a duration");
    assert!(
        duration.parse::<f64>().is_ok() && duration.split('.').nth(1).is_none_or(|d| d.len() <= 3),
        "duration_ms={duration} in {plain}"
    );
    let _ = child.kill().await;
}

/// `text` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// CPU ticks (user + system) of each thread of process `pid`, by thread
/// id (Linux: `/proc/PID/task/TID/stat`).
fn thread_ticks(pid: u32) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc") {
        let path = task.expect("task").path();
        let tid = path.file_name().and_then(|n| n.to_str()?.parse().ok());
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // After the name in parentheses: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .collect();
        let ticks =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        out.push((tid.expect("tid"), ticks));
    }
    out
}

#[tokio::test]
async fn threads_1_serves_every_call_on_the_main_thread() {
    for threads in ["1", "2"] {
        let (mut child, url) = demo(&["--threads", threads], "warn").await;
        let pid = child.id().expect("pid");
        let before = thread_ticks(pid);
        let client = http_client();
        // Calls until the process has spent enough CPU (ticks of 10 ms) to
        // tell where it went.
        let mut round = 0;
        let (main, total) = loop {
            let replies = join_all(100, |i| {
                let (client, url) = (client.clone(), url.clone());
                async move { post(&client, &url, format!("call {i}")).await }
            })
            .await;
            for (i, r) in replies.iter().enumerate() {
                assert_eq!(
                    r.body,
                    format!("call {i}"),
                    "--threads {threads}, round {round}"
                );
            }
            let after = thread_ticks(pid);
            let spent = |tid: u32| {
                let was = before
                    .iter()
                    .find(|(t, _)| *t == tid)
                    .map_or(0, |(_, n)| *n);
                after
                    .iter()
                    .find(|(t, _)| *t == tid)
                    .map_or(0, |(_, n)| *n)
                    .saturating_sub(was)
            };
            let total: u64 = after.iter().map(|(tid, _)| spent(*tid)).sum();
            round += 1;
            if total >= 10 || round == 100 {
                // The main thread's id is the process id.
                break (spent(pid), total);
            }
        };
        assert!(
            total >= 10,
            "--threads {threads}: too little CPU to judge ({total} ticks)"
        );
        if threads == "1" {
            assert!(
                main * 10 >= total * 9,
                "--threads 1: main thread {main} of {total} ticks"
            );
        } else {
            // A multi-thread runtime runs connections on its workers; the
            // main thread only waits for the end.
            assert!(
                main * 10 <= total,
                "--threads 2: main thread {main} of {total} ticks"
            );
        }
        let _ = child.kill().await;
    }
}

#[tokio::test]
async fn threads_zero_is_refused_with_a_clear_error() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbridge"))
        .args(["--threads", "0", "demo"])
        .output()
        .await
        .expect("run wsbridge");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--threads"), "{stderr}");
}
