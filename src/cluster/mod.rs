//! The cluster: several bridges sharing their workers through NATS. This
//! module owns the NATS connection (`async-nats`, the official client: it
//! reconnects, and follows the NATS cluster's servers by itself) and the
//! presence of the other bridges ([`presence`]): each bridge announces its
//! workers on `<name>.presence.beat` on every change and every
//! `heartbeat`, asks for everyone's at start (`<name>.presence.sync`), and
//! drops a peer after three missed announcements. docs/CLUSTER.md has the
//! subjects and the failure bounds.

mod batch;
pub(crate) mod directory;
pub(crate) mod presence;
pub(crate) mod relay;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::{
    sync::{mpsc, Notify},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn, Instrument};

use crate::{config::ClusterConfig, flow::Window};
use presence::{Applied, Beat, Peers, ServiceBeat, MAX_BEAT};
use relay::{Ack, CallHead, Delivered, Frame, Routed};

/// Least time between two announcements made for changes: a burst of
/// workers connecting is announced a few times, not once per worker.
const MIN_GAP: Duration = Duration::from_millis(50);

/// What this bridge announces: its services and workers now, and a signal
/// that they changed. The bridge's registry provides both.
pub(crate) struct Announce {
    /// The services and their workers, read at each announcement.
    pub(crate) services: Box<dyn Fn() -> Vec<ServiceBeat> + Send + Sync>,
    /// Notified (one permit) when workers come, go or change state.
    pub(crate) changed: Arc<Notify>,
    /// This bridge's workers as presence lists them, for the peers' queries.
    pub(crate) list: directory::Lister,
}

/// Serves a call another bridge sends this one; it must answer the call's
/// [`Incoming::reply`] with an [`Ack`] at once.
pub(crate) type Serve = Box<dyn Fn(Arc<Cluster>, Incoming) + Send + Sync>;

/// A call another bridge sent this one, registered to receive its frames.
pub(crate) struct Incoming {
    pub(crate) head: CallHead,
    /// The start of the body (all of it when `head.end`).
    pub(crate) body: Bytes,
    /// Where the [`Ack`] goes.
    pub(crate) reply: async_nats::Subject,
    /// The call's later frames: body chunks and a cancel.
    pub(crate) frames: mpsc::Receiver<Routed>,
    /// Spent by the reply body; refilled by the caller's credit.
    pub(crate) window: Arc<Window>,
}

/// A peer that can take a call for a service.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate {
    pub(crate) node: String,
    /// Calls its workers of the service can take now, as last announced.
    pub(crate) free: u64,
}

/// What became of a call offered to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Offered {
    /// The peer answered.
    Ack(Ack),
    /// The peer took the call and answered with the reply's head at once
    /// (an encoded [`Frame::ResHead`]): a quick call needs no separate ack.
    Head(Bytes),
    /// Nobody listens on its subject (gone, or NATS lost it): not started.
    NoResponders,
    /// No answer within the bound: it may have started.
    TimedOut,
    /// The request could not be sent (no NATS connection): not started.
    NotSent,
}

/// Why the cluster could not be joined at all. (A NATS server that is
/// merely down is not an error: the client keeps trying, and the bridge
/// serves its own workers meanwhile.)
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClusterError {
    /// The `.creds` file could not be read.
    #[error("cannot read cluster.creds {path}: {source}")]
    Creds {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The client refused the options or the subscriptions failed.
    #[error("cannot start the NATS client: {0}")]
    Nats(String),
}

/// This bridge's membership of a cluster.
pub(crate) struct Cluster {
    /// This bridge's node name.
    pub(crate) node: String,
    /// The cluster's name (the subjects' first token).
    pub(crate) name: String,
    /// When this bridge started, ms since the Unix epoch.
    epoch: u64,
    /// Announcements sent.
    seq: AtomicU64,
    /// Between announcements, at the latest.
    heartbeat: Duration,
    client: async_nats::Client,
    /// The calls' messages, to `client` in batches.
    batch: batch::Batcher,
    /// Whether the NATS connection is up now, and the last error NATS or
    /// the client reported (an operator's first clue).
    link: Arc<Link>,
    /// The other bridges.
    peers: Mutex<Peers>,
    /// Asks for an announcement now (a peer asked for one).
    announce: Notify,
    /// Notified when the NATS connection is (re)established: ask the peers
    /// for their presence, and announce ours, at once.
    reconnected: Arc<Notify>,
    /// Calls in progress between this bridge and others.
    pub(crate) calls: Arc<relay::Table>,
    /// Calls this bridge sent to others that were taken there.
    pub(crate) calls_out: AtomicU64,
    /// Calls other bridges sent this one that it took.
    pub(crate) calls_in: AtomicU64,
    /// Calls run on other bridges that have ended, and their time from
    /// the caller's request to the end of its response, in microseconds.
    pub(crate) out_done: AtomicU64,
    pub(crate) out_micros: AtomicU64,
    /// The next id of a call this bridge sends elsewhere; random at boot,
    /// so that a restarted bridge's ids do not meet its last boot's.
    next_call: AtomicU64,
}

/// The state of the NATS connection, kept by the client's event callback.
#[derive(Default)]
struct Link {
    connected: AtomicBool,
    /// Counts the connection's drops. NATS does not keep messages for a
    /// client while it is away, so a cross-node call in flight across a
    /// drop may have lost frames: it ends at once instead of waiting out
    /// its keepalive bound.
    drops: tokio::sync::watch::Sender<u64>,
    /// The last error reported since the last connect.
    error: Mutex<Option<String>>,
}

impl Link {
    fn error(&self) -> MutexGuard<'_, Option<String>> {
        self.error.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The cluster as `/status` shows it.
pub(crate) struct ClusterView {
    pub(crate) node: String,
    pub(crate) name: String,
    pub(crate) connected: bool,
    /// The last NATS error since the connection was last up.
    pub(crate) error: Option<String>,
    pub(crate) peers: Vec<(String, presence::Peer)>,
}

impl Cluster {
    /// Connects to NATS (in the background if no server answers yet),
    /// subscribes, asks the peers for their presence, and starts announcing
    /// `workers` until `shutdown`, when it says it is leaving. Calls other
    /// bridges send this one go to `serve`.
    pub(crate) async fn join(
        config: &ClusterConfig,
        workers: Announce,
        serve: Serve,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let link = Arc::new(Link::default());
        let reconnected = Arc::new(Notify::new());
        let options = options(config, link.clone(), reconnected.clone()).await?;
        let client = options
            .connect(config.nats.as_slice())
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let calls = Arc::new(relay::Table::default());
        let cluster = Arc::new(Cluster {
            node: config.node.clone(),
            name: config.name.clone(),
            epoch,
            seq: AtomicU64::new(0),
            heartbeat: config.heartbeat,
            batch: batch::Batcher::start(client.clone(), busy(&calls)),
            calls,
            client,
            link,
            peers: Mutex::new(Peers::new(&config.node)),
            announce: Notify::new(),
            reconnected,
            calls_out: AtomicU64::new(0),
            calls_in: AtomicU64::new(0),
            out_done: AtomicU64::new(0),
            out_micros: AtomicU64::new(0),
            next_call: AtomicU64::new(uuid::Uuid::now_v7().as_u64_pair().1 >> 2),
        });
        let beats = cluster
            .client
            .subscribe(cluster.subject("presence.beat"))
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let syncs = cluster
            .client
            .subscribe(cluster.subject("presence.sync"))
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let inbox = cluster
            .client
            .subscribe(cluster.node_subject(&cluster.node))
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let queries = cluster
            .client
            .subscribe(cluster.subject("presence.list"))
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let span = tracing::info_span!("cluster", node = %cluster.node);
        tasks.spawn(
            cluster
                .clone()
                .route(inbox, serve, shutdown.clone())
                .instrument(span.clone()),
        );
        tasks.spawn(
            cluster
                .clone()
                .listen(beats, syncs, shutdown.clone())
                .instrument(span.clone()),
        );
        tasks.spawn(
            cluster
                .clone()
                .answer_lists(queries, workers.list.clone(), shutdown.clone())
                .instrument(span.clone()),
        );
        tasks.spawn(
            cluster
                .clone()
                .announce_loop(workers, shutdown)
                .instrument(span),
        );
        cluster.sync().await;
        info!(node = %cluster.node, cluster = %cluster.name, "cluster joined");
        Ok(cluster)
    }

    /// Asks every bridge to announce itself now, so that this one knows
    /// the cluster within a round trip instead of a heartbeat.
    async fn sync(&self) {
        let _ = self
            .client
            .publish(self.subject("presence.sync"), Bytes::new())
            .await;
    }

    fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.name)
    }

    /// The subject a node gets its calls and replies on.
    fn node_subject(&self, node: &str) -> String {
        format!("{}.node.{node}", self.name)
    }

    /// Counts a call another bridge took from this one.
    pub(crate) fn counted_out(&self) {
        self.calls_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the end of a call that ran on another bridge.
    pub(crate) fn finished_out(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.out_micros.fetch_add(micros, Ordering::Relaxed);
        self.out_done.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call this bridge took from another.
    pub(crate) fn counted_in(&self) {
        self.calls_in.fetch_add(1, Ordering::Relaxed);
    }

    /// A new id for a call this bridge sends to another.
    pub(crate) fn call_id(&self) -> u64 {
        self.next_call.fetch_add(1, Ordering::Relaxed)
    }

    /// The NATS connection, for the job store (JetStream).
    pub(crate) fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The largest message the NATS server takes.
    pub(crate) fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    /// Peers whose workers of `service` take calls, the most free capacity
    /// first (as last announced); peers at capacity come last.
    pub(crate) fn candidates(&self, service: &str) -> Vec<Candidate> {
        if !self.is_connected() {
            return Vec::new();
        }
        let mut list = self.peers().serving(service);
        list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        list.into_iter()
            .map(|(node, free)| Candidate { node, free })
            .collect()
    }

    /// Peers that announce a worker named `id` of `service` taking calls.
    pub(crate) fn hosting(&self, service: &str, id: &str) -> Vec<Candidate> {
        if !self.is_connected() {
            return Vec::new();
        }
        self.peers()
            .hosting(service, id)
            .into_iter()
            .map(|(node, free)| Candidate { node, free })
            .collect()
    }

    /// The peers' open workers that a fan-out for `query` reaches, as
    /// `(node, worker id)` (as last announced).
    pub(crate) fn fanout_targets(&self, query: &presence::Query) -> Vec<(String, String)> {
        if !self.is_connected() {
            return Vec::new();
        }
        self.peers().matching(query)
    }

    /// This bridge's boot epoch (ms since the Unix epoch at start).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The boot epoch of peer `node`, if it is a live peer.
    pub(crate) fn peer_epoch(&self, node: &str) -> Option<u64> {
        self.peers().epoch(node)
    }

    /// Offers a call (an encoded [`Frame::Call`]) to `node`, waiting until
    /// `by` for its answer. The bound covers the whole request, including
    /// the wait to hand it to the client (whose queue may be full while
    /// NATS is unreachable).
    pub(crate) async fn offer(&self, node: &str, message: Bytes, by: Instant) -> Offered {
        use async_nats::RequestErrorKind as Kind;
        // One timer for the whole wait: the request has none of its own.
        let subject = self.node_subject(node).into();
        let sent = async {
            let answer = self.batch.request(subject, message).await?;
            Some(answer.await)
        };
        let Ok(answer) = tokio::time::timeout_at(by, sent).await else {
            return Offered::TimedOut;
        };
        match answer {
            None => Offered::NotSent,
            Some(Ok(reply)) if reply.payload.first() == Some(&b'{') => Offered::Head(reply.payload),
            Some(Ok(reply)) => Offered::Ack(Ack::parse(&reply.payload)),
            Some(Err(e)) => match e.kind() {
                Kind::NoResponders => Offered::NoResponders,
                // Only the deadline above times out.
                Kind::TimedOut => Offered::TimedOut,
                _ => Offered::NotSent,
            },
        }
    }

    /// Answers a call offered to this bridge: an [`Ack`], or the reply's
    /// head itself (see [`Offered::Head`]).
    pub(crate) async fn answer(&self, reply: async_nats::Subject, payload: Bytes) -> bool {
        self.batch.publish(reply, payload).await
    }

    /// Sends a frame of a call in progress to `node`.
    pub(crate) async fn send(&self, node: &str, message: Bytes) -> bool {
        self.batch
            .publish(self.node_subject(node).into(), message)
            .await
    }

    /// [`Cluster::send`] from code that cannot wait (a drop, a body's read
    /// hook): queued at once if there is room, else from a task of its own.
    pub(crate) fn send_soon(self: &Arc<Self>, node: &str, message: Bytes) {
        let subject: async_nats::Subject = self.node_subject(node).into();
        if let Err(message) = self.batch.try_publish(subject.clone(), message) {
            let cluster = self.clone();
            tokio::spawn(async move {
                cluster.batch.publish(subject, message).await;
            });
        }
    }

    /// Takes in this bridge's messages: new calls go to `serve`, frames of
    /// calls in progress to their call.
    async fn route(
        self: Arc<Self>,
        mut inbox: async_nats::Subscriber,
        serve: Serve,
        shutdown: CancellationToken,
    ) {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = inbox.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let (frame, body) = match relay::decode(&message.payload) {
                Ok(decoded) => decoded,
                Err(e) => {
                    warn!(error = %e, "cluster message unreadable; dropped");
                    continue;
                }
            };
            match frame {
                Frame::Call(head) if !presence::valid_name(&head.from) => {
                    warn!("cluster call from a bad node name; dropped");
                }
                Frame::Call(head) => {
                    let Some(reply) = message.reply else {
                        warn!(peer = %head.from, "cluster call without a reply subject; dropped");
                        continue;
                    };
                    let (frames, window) = self.calls.add_incoming(&head.from, head.call);
                    let incoming = Incoming {
                        head,
                        body,
                        reply,
                        frames,
                        window,
                    };
                    serve(self.clone(), incoming);
                }
                frame => {
                    if self.calls.deliver(frame, body) == Delivered::Overflow {
                        warn!("a peer sent a call more than its window; the call is ended");
                    }
                }
            }
        }
    }

    fn peers(&self) -> MutexGuard<'_, Peers> {
        // Nothing is left half-done under this lock: a poisoned one is usable.
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cluster as `/status` shows it.
    pub(crate) fn view(&self) -> ClusterView {
        ClusterView {
            node: self.node.clone(),
            name: self.name.clone(),
            connected: self.is_connected(),
            error: self.link.error().clone(),
            peers: self.peers().list(),
        }
    }

    /// Changes each time the NATS connection drops.
    pub(crate) fn drops(&self) -> tokio::sync::watch::Receiver<u64> {
        self.link.drops.subscribe()
    }

    /// Whether the NATS connection is up.
    pub(crate) fn is_connected(&self) -> bool {
        self.link.connected.load(Ordering::Relaxed)
    }

    /// Peers known now.
    pub(crate) fn peer_count(&self) -> usize {
        self.peers().len()
    }

    /// Takes in the peers' announcements and requests, and drops peers
    /// that went quiet.
    async fn listen(
        self: Arc<Self>,
        mut beats: async_nats::Subscriber,
        mut syncs: async_nats::Subscriber,
        shutdown: CancellationToken,
    ) {
        // Expiry is checked a few times per heartbeat: a peer is dropped
        // within a fraction of a heartbeat of its third missed one.
        let mut expiry = tokio::time::interval(self.heartbeat / 4);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = expiry.tick() => {
                    for node in self.peers().expire(Instant::now()) {
                        warn!(peer = %node, "cluster peer missed 3 announcements; dropped");
                    }
                    if !self.is_connected() {
                        // Unreachable while NATS is down: not a place to send calls.
                        self.peers().clear();
                    }
                }
                Some(_) = syncs.next() => self.announce.notify_one(),
                _ = self.reconnected.notified() => {
                    self.sync().await;
                    self.announce.notify_one();
                }
                Some(message) = beats.next() => self.on_beat(&message.payload),
                else => return,
            }
        }
    }

    fn on_beat(&self, payload: &[u8]) {
        if payload.len() > MAX_BEAT {
            warn!(
                bytes = payload.len(),
                "cluster announcement too large; ignored"
            );
            return;
        }
        let beat: Beat = match serde_json::from_slice(payload) {
            Ok(beat) => beat,
            Err(e) => {
                warn!(error = %e, "cluster announcement unreadable; ignored");
                return;
            }
        };
        if beat.node == self.node && beat.epoch != self.epoch {
            // Its beats are taken for ours and ours for its: neither is
            // seen by the other, and the rest see one node flapping.
            warn!(node = %self.node, "another bridge announces itself under this bridge's node name; give each bridge its own cluster.node");
            return;
        }
        let node = beat.node.clone();
        match self.peers().apply(beat, Instant::now()) {
            Applied::Joined => info!(peer = %node, "cluster peer joined"),
            Applied::Left => info!(peer = %node, "cluster peer left"),
            Applied::Updated | Applied::Ignored => {}
        }
    }

    /// Announces this bridge's workers every `heartbeat`, on every change,
    /// and when a peer asks; on shutdown, once more as leaving.
    async fn announce_loop(self: Arc<Self>, workers: Announce, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(self.heartbeat);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = every.tick() => {}
                _ = workers.changed.notified() => {
                    tokio::time::sleep_until(last + MIN_GAP).await;
                }
                _ = self.announce.notified() => {}
            }
            last = Instant::now();
            self.publish(&workers, false).await;
            every.reset();
        }
        self.publish(&workers, true).await;
        // The leaving announcement must be out before the client drops.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
        debug!("cluster left");
    }

    async fn publish(&self, workers: &Announce, leaving: bool) {
        let beat = Beat {
            node: self.node.clone(),
            epoch: self.epoch,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            every_ms: self.heartbeat.as_millis() as u64,
            leaving,
            services: (workers.services)(),
        };
        let Ok(payload) = serde_json::to_vec(&beat) else {
            return;
        };
        if payload.len() > MAX_BEAT {
            warn!(
                bytes = payload.len(),
                "this bridge's announcement is over {MAX_BEAT} bytes; peers will ignore it"
            );
        }
        if let Err(e) = self
            .client
            .publish(self.subject("presence.beat"), payload.into())
            .await
        {
            debug!(error = %e, "cluster announcement not sent");
        }
    }
}

/// Whether more than one call is in progress between this bridge and
/// others: then the batcher waits for the others' messages (see [`batch`]).
fn busy(calls: &Arc<relay::Table>) -> batch::Busy {
    let calls = calls.clone();
    Box::new(move || calls.outgoing_len() + calls.incoming_len() > 1)
}

/// The client's options from the config: credentials, TLS, and an event
/// callback that keeps `connected` current.
async fn options(
    config: &ClusterConfig,
    link: Arc<Link>,
    reconnected: Arc<Notify>,
) -> Result<async_nats::ConnectOptions, ClusterError> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some(path) = &config.creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|source| ClusterError::Creds {
                path: path.display().to_string(),
                source,
            })?;
    }
    if let Some(token) = &config.token {
        options = options.token(token.expose().to_owned());
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let node = config.node.clone();
    Ok(options
        .name(format!("wsbridge {node}"))
        // A server that stops answering is noticed within two pings.
        .ping_interval(config.heartbeat)
        .connection_timeout(config.heartbeat.max(Duration::from_secs(2)))
        // Start degraded rather than not at all when no server answers yet.
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let link = link.clone();
            let reconnected = reconnected.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        link.connected.store(true, Ordering::Relaxed);
                        *link.error() = None;
                        reconnected.notify_one();
                        info!("NATS connected");
                    }
                    async_nats::Event::Disconnected => {
                        link.connected.store(false, Ordering::Relaxed);
                        link.drops.send_modify(|n| *n += 1);
                        warn!(
                            "NATS disconnected; the cluster is degraded to this bridge's workers"
                        );
                    }
                    async_nats::Event::ServerError(e) => note_error(&link, e.to_string()),
                    async_nats::Event::ClientError(e) => note_error(&link, e.to_string()),
                    other => debug!(event = %other, "NATS event"),
                }
            }
        }))
}

/// Keeps (and logs) an error NATS or its client reported: wrong
/// credentials, a certificate that does not verify, a server refusing us.
fn note_error(link: &Link, error: String) {
    // Bounded: it is shown on /status.
    let error: String = error.chars().take(200).collect();
    let mut last = link.error();
    if last.as_deref() != Some(error.as_str()) {
        warn!(%error, "NATS error");
    }
    *last = Some(error);
}
