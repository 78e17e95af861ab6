//! The sidecar: an HTTP listener for callers and a WebSocket listener for
//! workers, joined by the worker registry.
//!
//! * [`http`] turns each HTTP request into a call and its outcome into a
//!   response; [`call`] runs the call's attempts, each on a place the
//!   [`dispatch`] seam finds, and awaits the reply.
//! * [`registry`] picks a worker (least busy, within its declared capacity)
//!   and queues calls when none is free.
//! * [`connection`] runs one worker connection, once [`handshake`] has
//!   authenticated it and settled its terms, for its [`session`] (which a
//!   resume carries over); [`pending`] is the session's table of calls in
//!   flight.
//! * [`routes`] maps paths to services.
//! * [`jobs`] turns a call with `Prefer: respond-async` into a durable job
//!   and serves `/_wsbridge/jobs/`; [`job_run`] runs jobs (in a cluster,
//!   [`job_pull`] pulls them from JetStream) and [`callback`] delivers
//!   their results.
//! * [`admin`] serves `/metrics`, `/status`, the dashboard and `/reload`;
//!   [`reload`] swaps in a re-read config without dropping anything.

pub mod admin;
mod call;
mod callback;
mod caller;
mod conformance;
mod connection;
mod credentials;
mod directory;
mod dispatch;
mod fanout;
mod handshake;
mod http;
mod idempotency;
mod ingress;
mod job_pull;
mod job_run;
mod jobs;
mod keyed;
mod listener;
mod pending;
mod registry;
mod relayed;
mod reload;
mod remote;
mod reply;
mod request_body;
mod reserved;
mod resume;
mod routes;
mod send_timeout;
mod session;
mod sniff;
mod stall;
pub mod status;
mod tls_stream;
mod upload;
mod wire;

pub use reload::{ReloadError, Reloaded};

use std::{io, net::SocketAddr, path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;

use futures_util::future::Either;
use tokio::net::{TcpListener, TcpSocket};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn, Instrument};

use crate::{
    cluster::{presence, Announce, Cluster},
    config::Config,
};
use registry::Registry;
use routes::Router;

/// The listeners a bridge serves; bind them first (port 0 works), then
/// [`run`]. Separating the two lets tests and supervisors own the sockets.
#[derive(Debug)]
pub struct Listeners {
    /// Plain-HTTP listener for callers.
    pub http: TcpListener,
    /// WebSocket listener for workers.
    pub workers: TcpListener,
    /// The admin listener (metrics, status, dashboard, reload), if enabled.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds both addresses of a config.
    pub fn bind(config: &Config) -> io::Result<Listeners> {
        let admin = &config.admin;
        Ok(Listeners {
            http: bind(config.http.listen)?,
            workers: bind(config.workers.listen)?,
            admin: admin.enabled.then(|| bind(admin.listen)).transpose()?,
        })
    }
}

/// Binds a listener with a backlog large enough for bursts of new callers
/// (the std default of 128 drops SYNs under load).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    socket.listen(4096)
}

/// What a reload replaces as one: the configuration and everything built
/// from it. Each connection takes the current one when it starts (a call,
/// when it is routed) and keeps it, so a reload never changes the rules
/// halfway through.
pub(crate) struct Settings {
    /// The validated configuration.
    pub(crate) config: Config,
    /// Path -> service.
    pub(crate) router: Router,
    /// Frame limits for worker connections.
    pub(crate) ws_config: WebSocketConfig,
    /// The worker listener's TLS; `None` serves plain ws.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}

impl Settings {
    fn new(config: Config, tls: Option<Arc<rustls::ServerConfig>>) -> Settings {
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(crate::transport::READ_BUFFER)
            .max_message_size(Some(config.workers.max_frame.bytes()))
            .max_frame_size(Some(config.workers.max_frame.bytes()));
        Settings {
            router: Router::new(&config),
            config,
            ws_config,
            tls,
        }
    }
}

/// State shared by every connection of one bridge.
pub(crate) struct Shared {
    /// The current settings; replaced whole by a reload.
    pub(crate) settings: ArcSwap<Settings>,
    /// The file the settings came from, for reloads.
    pub(crate) config_file: std::sync::OnceLock<PathBuf>,
    /// Connected workers and waiting calls.
    pub(crate) registry: Arc<Registry>,
    /// Calls, latencies and worker churn, for `/metrics` and `/status`.
    pub(crate) metrics: crate::metrics::Metrics,
    /// Held while a reload reads and swaps the settings.
    pub(crate) reloading: std::sync::Mutex<()>,
    /// Successful reloads since start.
    pub(crate) reloads: std::sync::atomic::AtomicU64,
    /// Rejected reloads since start.
    pub(crate) reload_failures: std::sync::atomic::AtomicU64,
    /// Protocol violations by workers since start.
    pub(crate) violations: std::sync::atomic::AtomicU64,
    /// Responses stored by idempotency key.
    pub(crate) idempotency: Arc<idempotency::IdempotencyCache>,
    /// Sessions whose connection dropped, waiting for their worker.
    pub(crate) detached: Arc<resume::Detached>,
    /// This bridge's membership of a cluster, once joined (`[cluster]`).
    pub(crate) cluster: std::sync::OnceLock<Arc<Cluster>>,
    /// Calls other bridges sent this one (`relayed.rs`): a stopping bridge
    /// takes no more, and lets these finish with its own callers' calls.
    pub(crate) relayed: TaskTracker,
    /// Set once shutdown begins.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// Asynchronous calls, with `[jobs]`: set at start with a `dir`, once
    /// the cluster is joined with `jetstream`.
    pub(crate) jobs: std::sync::OnceLock<Arc<job_run::Jobs>>,
}

/// Runs a bridge until `shutdown` is cancelled, then stops accepting, lets
/// calls in flight finish for up to `shutdown_timeout`, and returns.
///
/// `tls` is the worker listener's TLS config; `None` serves plain ws and is
/// only accepted when `config.workers.tls` is false.
pub async fn run(
    config: Config,
    listeners: Listeners,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    Bridge::new(config, tls)?.serve(listeners, shutdown).await
}

/// A bridge that is configured but not yet serving. Use [`Bridge::handle`]
/// to look at its state while it runs.
pub struct Bridge {
    shared: Arc<Shared>,
    /// The jobs the store held at start, taken up once serving.
    recovered: Vec<crate::jobs::Record>,
}

/// A read-only view of a running bridge, for status displays and tests.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Workers connected for `service` (draining ones included).
    pub fn workers(&self, service: &str) -> usize {
        self.shared.registry.connected(service)
    }

    /// Protocol violations by workers since the bridge started.
    pub fn protocol_violations(&self) -> u64 {
        self.shared
            .violations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Workers connected for `service` that take new calls (not draining).
    pub fn accepting(&self, service: &str) -> usize {
        self.shared.registry.accepting(service)
    }

    /// Calls sent to workers and not yet finished, streamed replies
    /// included: what the pending maps hold right now.
    pub fn in_flight(&self) -> usize {
        self.shared
            .registry
            .sessions()
            .iter()
            .map(|s| s.pending())
            .sum()
    }

    /// Calls of `service` waiting for a free worker.
    pub fn queued(&self, service: &str) -> usize {
        self.shared.registry.queued(service)
    }

    /// Every worker and service as `/status` shows them.
    pub fn status(&self) -> status::Status {
        status::collect(&self.shared)
    }

    /// Re-reads the config file and swaps in what may change while running
    /// (see [`Reloaded`]); an invalid file changes nothing. Blocking: file
    /// reads and certificate parsing.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        reload::reload(&self.shared)
    }
}

impl Bridge {
    /// Checks that the TLS setting and config agree and prepares the state.
    pub fn new(config: Config, tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<Bridge> {
        if config.workers.tls && tls.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "workers.tls is on but no TLS config was given",
            ));
        }
        let idempotency = Arc::new(idempotency::IdempotencyCache::new(
            config.http.idempotency_ttl,
            config.http.idempotency_capacity.bytes(),
        ));
        let (jobs, recovered) = match &config.jobs.dir {
            Some(dir) => {
                let (store, records) = crate::jobs::Store::open(dir, config.jobs.max_bytes.0)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                (
                    Some(Arc::new(job_run::Jobs::new(crate::jobs::Backend::Local(
                        store,
                    )))),
                    records,
                )
            }
            None => (None, Vec::new()),
        };
        let shared = Arc::new(Shared {
            settings: ArcSwap::from_pointee(Settings::new(config, tls)),
            config_file: std::sync::OnceLock::new(),
            registry: Arc::new(Registry::default()),
            metrics: Default::default(),
            reloading: Default::default(),
            reloads: Default::default(),
            reload_failures: Default::default(),
            violations: Default::default(),
            idempotency,
            detached: Arc::default(),
            cluster: std::sync::OnceLock::new(),
            relayed: TaskTracker::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            jobs: jobs.map(std::sync::OnceLock::from).unwrap_or_default(),
        });
        Ok(Bridge { shared, recovered })
    }

    /// Names the file the config came from, so that SIGHUP, `POST /reload`
    /// and [`Handle::reload`] can read it again. Only the first call counts.
    pub fn with_config_file(self, path: impl Into<PathBuf>) -> Bridge {
        let _ = self.shared.config_file.set(path.into());
        self
    }

    /// A view of the bridge's state that stays valid while it runs.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown`; see [`run`].
    pub async fn serve(self, listeners: Listeners, shutdown: CancellationToken) -> io::Result<()> {
        let workers_addr = listeners.workers.local_addr()?;
        let http_addr = listeners.http.local_addr()?;
        let settings = self.shared.settings.load_full();
        let tls_on = settings.tls.is_some();
        if !tls_on && !workers_addr.ip().is_loopback() {
            warn!(
                addr = %workers_addr,
                "worker listener serves PLAIN ws on a non-loopback address: tokens and calls cross the network unencrypted"
            );
        }
        let tokens = &settings.config.workers.tokens;
        if !workers_addr.ip().is_loopback()
            && tokens.iter().any(|t| t.secret().expose() == "change-me")
        {
            warn!(
                addr = %workers_addr,
                "workers.tokens still holds the example token \"change-me\" on a non-loopback listener: anyone who can reach it can register a worker"
            );
        }
        // The cluster lives until the bridge has drained: its last
        // announcement says it is leaving.
        let cluster_tasks = TaskTracker::new();
        let cluster_stop = CancellationToken::new();
        if let Some(config) = &settings.config.cluster {
            let announce = announce(&self.shared.registry, &config.node);
            let serve = relayed::serve(Arc::downgrade(&self.shared));
            let joined = Cluster::join(
                config,
                announce,
                serve,
                &cluster_tasks,
                cluster_stop.clone(),
            )
            .await;
            let cluster = joined.map_err(|e| io::Error::other(e.to_string()))?;
            let _ = self.shared.cluster.set(cluster);
        }
        // Pushes stop as soon as the bridge begins to stop; those under way
        // end with the calls they made.
        let ingress = TaskTracker::new();
        for i in 0..settings.config.ingress.redis.len() {
            let shared = self.shared.clone();
            ingress.spawn(ingress::redis_channel(shared, i, shutdown.clone()));
        }
        ingress.close();
        if let Some(jobs) = self.shared.jobs.get() {
            if let crate::jobs::Backend::Local(store) = &jobs.store {
                job_run::recover(&self.shared, jobs, store, self.recovered).await;
            }
            jobs.tasks.spawn(job_run::sweep(jobs.clone()));
        } else if settings.config.jobs.jetstream {
            let cluster = self.shared.cluster.get().cloned();
            let jobs = job_pull::join(&self.shared, cluster.as_deref()).await?;
            let _ = self.shared.jobs.set(jobs);
        }
        info!(addr = %http_addr, "http listener ready");
        info!(addr = %workers_addr, tls = tls_on, "worker listener ready");
        let admin = listeners.admin.map(|listener| {
            let (shared, stop) = (self.shared.clone(), shutdown.clone());
            tokio::spawn(
                admin::serve(listener, shared, stop).instrument(tracing::info_span!("admin")),
            )
        });

        // Worker connections outlive the HTTP drain: the calls being drained
        // need their workers to answer them.
        let workers_stop = CancellationToken::new();
        let workers = tokio::spawn(
            accept_workers(listeners.workers, self.shared.clone(), workers_stop.clone())
                .instrument(tracing::info_span!("workers")),
        );
        let shared = self.shared.clone();
        let stopping = {
            let (shared, shutdown) = (shared.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                shared
                    .stopping
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            })
        };
        listener::serve(listeners.http, self.shared, shutdown).await;
        ingress.wait().await;
        let _ = stopping.await;
        // Calls other bridges sent finish too, within the same bound, and
        // so do running jobs (queued ones stay in the store).
        shared.relayed.close();
        let limit = shared.settings.load().config.shutdown_timeout;
        let jobs_done = async {
            if let Some(jobs) = shared.jobs.get() {
                jobs.stop.cancel();
                jobs.tasks.close();
                jobs.tasks.wait().await;
            }
        };
        let _ = tokio::time::timeout(limit, async {
            tokio::join!(shared.relayed.wait(), jobs_done);
        })
        .await;
        shared
            .detached
            .close_all("the bridge is shutting down", &shared.registry);
        workers_stop.cancel();
        let _ = workers.await;
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        cluster_stop.cancel();
        cluster_tasks.close();
        cluster_tasks.wait().await;
        Ok(())
    }
}

/// What this bridge announces to its cluster: its registry's services and
/// workers, and the registry's change signal.
fn announce(registry: &Arc<Registry>, node: &str) -> Announce {
    let view = registry.clone();
    Announce {
        services: Box::new(move || {
            let snapshot = view.snapshot();
            let mut services: std::collections::BTreeMap<&str, presence::ServiceBeat> =
                Default::default();
            for w in &snapshot.workers {
                for name in w.services.iter() {
                    let service = services
                        .entry(name)
                        .or_insert_with(|| presence::ServiceBeat {
                            name: name.clone(),
                            workers: Vec::new(),
                        });
                    service.workers.push(presence::WorkerBeat {
                        id: w.session.worker_id.clone(),
                        capacity: w.max_inflight,
                        in_flight: w.inflight,
                        closed: w.draining || w.detached,
                        metadata: w.session.metadata.clone(),
                    });
                }
            }
            services.into_values().collect()
        }),
        changed: registry.changed.clone(),
        list: {
            let registry = registry.clone();
            let node = node.to_owned();
            Arc::new(move |query| directory::local(&registry, &node, query))
        },
    }
}

/// The next connection on `listener` (`what` names it in logs), or `None`
/// once `shutdown` is cancelled. Accept errors (EMFILE and friends) are
/// transient: logged, then retried after 50 ms, keeping the listener.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    warn!(error = %e, "accepting a {what} connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Accepts worker connections until shutdown; each runs in its own task.
async fn accept_workers(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        let Some((tcp, peer)) = accept(&listener, &shutdown, "worker").await else {
            break;
        };
        // A connection keeps the settings it started with, reloads or not.
        let settings = shared.settings.load_full();
        crate::transport::tune(&tcp, settings.config.workers.send_buffer.bytes());
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        // The handshake runs inside `serve`'s boxed opening phase, so that
        // neither the raw socket nor the TLS stream's state is kept in the
        // connection's task after the worker is welcomed: a local moved out
        // of an async block still takes room in it, and the TLS stream
        // (rustls' state inline) made the task's future 3,544 B; it is
        // 1,000 B now.
        let job = match settings.tls.clone() {
            None => {
                let plain = std::future::ready(Some((tcp, None)));
                Either::Left(connection::serve(plain, peer, shared, settings, shutdown))
            }
            Some(config) => {
                let timeout = settings.config.workers.handshake_timeout;
                let tls = tls_handshake(config, tcp, peer, timeout, shutdown.clone());
                Either::Right(connection::serve(tls, peer, shared, settings, shutdown))
            }
        };
        tasks.spawn(job.instrument(tracing::info_span!("worker", %peer)));
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// A worker connection's TLS handshake, bounded by `timeout`: the stream
/// and, with mutual TLS, the SHA-256 of the client certificate (a session
/// is bound to it too, PROTOCOL.md 8.5). `None` if it failed (logged).
async fn tls_handshake(
    config: Arc<rustls::ServerConfig>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    timeout: std::time::Duration,
    shutdown: CancellationToken,
) -> Option<(tls_stream::TlsStream, Option<[u8; 32]>)> {
    let accept = tokio::time::timeout(timeout, tls_stream::accept(config, tcp));
    let accepted = tokio::select! {
        _ = shutdown.cancelled() => return None,
        accepted = accept => accepted,
    };
    match accepted {
        Ok(Ok(stream)) => {
            let cert = stream
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|der| credentials::sha256(der));
            Some((stream, cert))
        }
        Ok(Err(e)) => {
            info!(%peer, error = %e, "worker TLS handshake failed");
            None
        }
        Err(_) => {
            info!(%peer, "worker TLS handshake timed out");
            None
        }
    }
}

/// The worker listener's TLS config from `[workers]`: `None` when TLS is
/// off; with `auto_self_signed`, missing cert files are generated first.
pub fn server_tls(
    workers: &crate::config::WorkersConfig,
) -> Result<Option<Arc<rustls::ServerConfig>>, crate::tls::TlsError> {
    if !workers.tls {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&workers.tls_cert, &workers.tls_key) else {
        // validate() guarantees both are set when TLS is on.
        return Ok(None);
    };
    if workers.auto_self_signed && !cert.exists() && !key.exists() {
        let mut hosts = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let ip = workers.listen.ip();
        if !ip.is_unspecified() && !ip.is_loopback() {
            hosts.push(ip.to_string());
        }
        warn!(
            cert = %cert.display(), key = %key.display(), ?hosts,
            "TLS files missing: generating a self-signed certificate (workers need --ca {}); use real certificates in production",
            cert.display()
        );
        crate::tls::SelfSigned::generate(&hosts)?.write(cert, key)?;
    }
    crate::tls::server_config(cert, key, workers.client_ca.as_deref()).map(Some)
}
