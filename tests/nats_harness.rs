//! The NATS harness (tests/common/nats.rs) over real sockets: real
//! nats-server processes, checked with a NATS client written here on plain
//! TCP (the text protocol: INFO, CONNECT, SUB, PUB, MSG, PING/PONG). A
//! message crosses a 3-server cluster; after a kill the other two still
//! route, and the killed one comes back on its ports; a frozen server
//! answers nothing until it is thawed, then routes again; dropping the cluster, even in a
//! panicking test, leaves no process behind.

mod common;

use std::{
    collections::{HashSet, VecDeque},
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use common::*;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    time::Instant,
};

/// How long a frozen server is watched for an answer it must not give.
const SILENCE: Duration = Duration::from_millis(500);

/// One delivered message: subject, subscription id, payload.
type Msg = (String, String, Vec<u8>);

/// A NATS client played line by line.
struct RawNats {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    /// Messages read while waiting for a PONG.
    msgs: VecDeque<Msg>,
}

impl RawNats {
    /// Connects, reads the server's INFO, sends CONNECT and waits for the
    /// PONG that shows the server took it.
    async fn connect(addr: SocketAddr) -> RawNats {
        let stream = with_timeout(TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let (read, write) = stream.into_split();
        let mut client = RawNats {
            read: BufReader::new(read),
            write,
            msgs: VecDeque::new(),
        };
        let info = with_timeout(client.line()).await;
        assert!(info.starts_with("INFO {"), "greeting from {addr}: {info:?}");
        client
            .send("CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
            .await;
        client.ping().await;
        client
    }

    async fn send(&mut self, text: &str) {
        with_timeout(self.write.write_all(text.as_bytes()))
            .await
            .expect("write to nats-server");
    }

    /// The next protocol line, without its CRLF.
    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .read
            .read_line(&mut line)
            .await
            .expect("read from nats-server");
        assert!(n > 0, "nats-server closed the connection");
        line.trim_end_matches("\r\n").to_owned()
    }

    /// Reads until a PONG, keeping the messages that come before it.
    async fn until_pong(&mut self) {
        loop {
            let line = self.line().await;
            match line.split(' ').next().unwrap_or_default() {
                "PONG" => return,
                "PING" => self.send("PONG\r\n").await,
                "MSG" => {
                    let msg = self.payload(&line).await;
                    self.msgs.push_back(msg);
                }
                _ => panic!("unexpected from nats-server: {line:?}"),
            }
        }
    }

    /// The payload of the message whose `MSG subject sid len` line is `head`.
    async fn payload(&mut self, head: &str) -> Msg {
        let parts: Vec<&str> = head.split(' ').collect();
        let (subject, sid, len) = match parts.as_slice() {
            ["MSG", subject, sid, len] => (*subject, *sid, *len),
            _ => panic!("a MSG line without a reply subject expected, got {head:?}"),
        };
        let len: usize = len.parse().expect("MSG length");
        let mut payload = vec![0; len + 2];
        self.read
            .read_exact(&mut payload)
            .await
            .expect("read the payload");
        assert_eq!(
            &payload[len..],
            b"\r\n",
            "payload of {head:?} not followed by CRLF"
        );
        payload.truncate(len);
        (subject.to_owned(), sid.to_owned(), payload)
    }

    /// A PING/PONG round trip: everything sent before it was processed.
    async fn ping(&mut self) {
        self.send("PING\r\n").await;
        with_timeout(self.until_pong()).await;
    }

    async fn sub(&mut self, subject: &str, sid: u32) {
        self.send(&format!("SUB {subject} {sid}\r\n")).await;
        self.ping().await;
    }

    async fn publish(&mut self, subject: &str, payload: &[u8]) {
        let mut frame = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        with_timeout(self.write.write_all(&frame))
            .await
            .expect("write to nats-server");
        self.ping().await;
    }

    /// The next message delivered to this client.
    async fn next_msg(&mut self) -> Msg {
        if let Some(msg) = self.msgs.pop_front() {
            return msg;
        }
        loop {
            let line = self.line().await;
            match line.split(' ').next().unwrap_or_default() {
                "MSG" => return self.payload(&line).await,
                "PING" => self.send("PONG\r\n").await,
                _ => panic!("a MSG expected from nats-server, got {line:?}"),
            }
        }
    }
}

fn msg(subject: &str, sid: &str, payload: &[u8]) -> Msg {
    (subject.to_owned(), sid.to_owned(), payload.to_vec())
}

/// Publishes `payload` on `foo` at server `from` and checks that a
/// subscriber at server `to` gets it (and nothing else first).
async fn crosses(cluster: &NatsCluster, from: usize, to: usize, payload: &[u8]) {
    let mut sub = RawNats::connect(cluster.client_addr(to)).await;
    sub.sub("foo", 1).await;
    cluster.wait_interest(from, "foo").await;
    let mut publisher = RawNats::connect(cluster.client_addr(from)).await;
    // No subscriber anywhere: delivered to no one.
    publisher.publish("bar", b"nobody").await;
    publisher.publish("foo", payload).await;
    let got = within(
        Duration::from_secs(10),
        &format!("the message from nats-{from} at nats-{to}"),
        sub.next_msg(),
    )
    .await;
    assert_eq!(got, msg("foo", "1", payload), "nats-{from} -> nats-{to}");
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn a_message_published_on_one_server_reaches_a_subscriber_on_another() {
    let t0 = Instant::now();
    let cluster = NatsCluster::start(3).await;
    eprintln!(
        "nats-server {}: a 3-server cluster formed in {:?}",
        nats_server_version(),
        t0.elapsed()
    );
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    assert_eq!(urls[2], cluster.url(2));
    assert!(
        urls.iter().all(|u| u.starts_with("nats://127.0.0.1:")),
        "{urls:?}"
    );
    assert_eq!(
        urls.iter().collect::<HashSet<_>>().len(),
        3,
        "one client port per server: {urls:?}"
    );
    // Each server reports the other two as routes, under one cluster name.
    let mut ids = Vec::new();
    for i in 0..3 {
        let varz = cluster.monitor(i, "/varz").await;
        assert_eq!(varz["cluster"]["name"], cluster.name.as_str(), "nats-{i}");
        assert_eq!(varz["server_name"], format!("nats-{i}"));
        ids.push(varz["server_id"].as_str().expect("server_id").to_owned());
    }
    for i in 0..3 {
        let routez = cluster.monitor(i, "/routez").await;
        let peers: HashSet<&str> = routez["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .filter_map(|r| r["remote_id"].as_str())
            .collect();
        let others: HashSet<&str> = (0..3)
            .filter(|&j| j != i)
            .map(|j| ids[j].as_str())
            .collect();
        assert_eq!(peers, others, "nats-{i}'s routes (server ids {ids:?})");
    }
    crosses(&cluster, 0, 2, b"hello").await;
}

#[tokio::test]
async fn after_a_kill_the_others_still_route_and_the_killed_one_comes_back() {
    let mut cluster = NatsCluster::start(3).await;
    let pid = cluster.pid(1).expect("nats-1 runs");
    cluster.kill(1);
    assert!(
        !process_exists(pid),
        "nats-1 (pid {pid}) still exists after kill"
    );
    assert!(!cluster.is_running(1));
    assert!(
        TcpStream::connect(cluster.client_addr(1)).await.is_err(),
        "a killed server's client port still accepts connections"
    );
    crosses(&cluster, 0, 2, b"after the kill").await;

    let t0 = Instant::now();
    cluster.restart(1).await;
    eprintln!("nats-1 restarted and routed again in {:?}", t0.elapsed());
    assert_ne!(cluster.pid(1), Some(pid));
    crosses(&cluster, 1, 2, b"from the restarted server").await;
    crosses(&cluster, 2, 1, b"to the restarted server").await;
}

#[tokio::test]
async fn a_frozen_server_answers_nothing_until_thawed() {
    let mut cluster = NatsCluster::start(3).await;
    let mut client = RawNats::connect(cluster.client_addr(1)).await;
    cluster.freeze(1);

    client.send("PING\r\n").await;
    let early = tokio::time::timeout(SILENCE, client.line()).await;
    assert!(early.is_err(), "a frozen server answered a PING: {early:?}");
    // Its kernel still accepts connections, but no INFO comes.
    let mut late = BufReader::new(
        with_timeout(TcpStream::connect(cluster.client_addr(1)))
            .await
            .expect("a frozen server's port still accepts"),
    );
    let mut greeting = String::new();
    let silent = tokio::time::timeout(SILENCE, late.read_line(&mut greeting)).await;
    assert!(
        silent.is_err(),
        "a frozen server greeted a client: {greeting:?}"
    );
    // Meanwhile the two others route between themselves.
    crosses(&cluster, 0, 2, b"around the frozen one").await;

    cluster.thaw(1);
    within(
        Duration::from_secs(10),
        "the PONG sent while frozen, after the thaw",
        client.until_pong(),
    )
    .await;
    let info = within(
        Duration::from_secs(10),
        "INFO after the thaw",
        late.read_line(&mut greeting),
    )
    .await
    .expect("read INFO");
    assert!(info > 0 && greeting.starts_with("INFO {"), "{greeting:?}");
    client.ping().await;
    // And it routes again.
    cluster.wait_formed().await;
    crosses(&cluster, 1, 0, b"from the thawed server").await;
}

#[tokio::test]
async fn dropping_the_cluster_in_a_failing_test_kills_every_server() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let failing = tokio::spawn(async move {
        let mut cluster = NatsCluster::start(3).await;
        cluster.freeze(2);
        let pids: Vec<u32> = (0..3).filter_map(|i| cluster.pid(i)).collect();
        tx.send(pids).expect("send pids");
        panic!("this test fails here (expected: its cluster's logs follow)");
    });
    let outcome = with_timeout(failing).await;
    assert!(
        outcome.as_ref().is_err_and(|e| e.is_panic()),
        "the task should have panicked: {outcome:?}"
    );
    let pids = rx.recv().await.expect("the pids");
    assert_eq!(pids.len(), 3);
    let left: Vec<u32> = pids
        .into_iter()
        .filter(|&pid| process_exists(pid))
        .collect();
    assert!(
        left.is_empty(),
        "nats-server processes left behind: {left:?}"
    );
}

#[tokio::test]
async fn one_server_alone() {
    let mut cluster = NatsCluster::start_with(1, "max_payload: 65536").await;
    assert_eq!(cluster.urls(), vec![cluster.url(0)]);
    let mut client = RawNats::connect(cluster.client_addr(0)).await;
    client.sub("foo", 7).await;
    client.publish("foo", b"to myself").await;
    assert_eq!(
        within(Duration::from_secs(10), "own message", client.next_msg()).await,
        msg("foo", "7", b"to myself")
    );
    // The extra config took effect.
    let varz = cluster.monitor(0, "/varz").await;
    assert_eq!(varz["max_payload"], 65536);
    cluster.restart(0).await;
    RawNats::connect(cluster.client_addr(0)).await.ping().await;
}
