//! Typed configuration: the TOML file, its defaults and its validation.
//!
//! `Config::from_file` parses (unknown keys are errors), then `validate`s, so
//! the rest of the program only ever sees a value that makes sense.
//! `config/wsbridge.toml` documents every key and is parsed by a test.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{de, Deserialize, Deserializer};

use crate::protocol::{self, CHUNK_SIZE, MAX_HEADER_LEN, MIN_FRAME};

mod cluster;
pub use cluster::ClusterConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Service for paths that match no route; without it they get 404.
    #[serde(default)]
    pub default_service: Option<String>,
    /// How long a stopping bridge waits for calls in flight.
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// The caller-facing HTTP listener.
    pub http: HttpConfig,
    /// The worker-facing WebSocket listener.
    pub workers: WorkersConfig,
    /// Path prefix -> service routes; the longest matching prefix wins.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The operator's listener: metrics, status, dashboard, reload.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Other bridges to share workers with, through NATS; `None` is a
    /// single node.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// Calls to every matching worker (`Wsbridge-Fanout`).
    #[serde(default)]
    pub fanout: FanoutConfig,
    /// Messages from elsewhere pushed to workers.
    #[serde(default)]
    pub ingress: IngressConfig,
    /// Asynchronous calls (`Prefer: respond-async`); off without `dir`.
    #[serde(default)]
    pub jobs: JobsConfig,
}

/// `[jobs]`: calls accepted with `202` now and answered later. Without
/// `dir` there is no job store: `Prefer: respond-async` is then ignored,
/// as RFC 7240 allows, and the call is answered as usual.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// The store's directory (created if missing); one bridge's own.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// How long a finished job and its result are kept.
    #[serde(default = "defaults::jobs_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// How long a job waits for a worker before it expires.
    #[serde(default = "defaults::jobs_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// How long a job may run once a worker has it; then it fails with
    /// `timeout` and the worker is told to cancel.
    #[serde(default = "defaults::jobs_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Most bytes the store holds (request bodies of live jobs, results,
    /// and 1 KiB per job); a submission past it gets 503 `jobs_full`.
    #[serde(default = "defaults::jobs_max_bytes")]
    pub max_bytes: ByteSize,
    /// Largest result kept; a larger reply fails the job (`result_too_large`).
    #[serde(default = "defaults::jobs_max_result")]
    pub max_result: ByteSize,
    /// Jobs of one service sent to its workers at once; the others wait
    /// in the store, so that a backlog never crowds out synchronous calls.
    #[serde(default = "defaults::jobs_concurrency")]
    pub concurrency: usize,
    /// Most jobs queued or running on this bridge (each costs a task and
    /// a few KiB of memory); past it a submission gets 503 `jobs_full`.
    #[serde(default = "defaults::jobs_max_live")]
    pub max_live: usize,
    /// Signs callbacks (HMAC-SHA256); required for `callback_allow`.
    #[serde(default)]
    pub callback_secret: Option<Secret>,
    /// URL prefixes a `Wsbridge-Callback` may name; empty refuses every
    /// callback (the bridge must not POST wherever a caller says).
    #[serde(default)]
    pub callback_allow: Vec<String>,
    /// PEM CA bundle to trust for `https` callbacks instead of the
    /// system's roots.
    #[serde(default)]
    pub callback_ca: Option<PathBuf>,
    /// Keep the jobs in the cluster's JetStream instead of `dir`: any
    /// bridge answers for any job, and a job outlives its bridge.
    #[serde(default)]
    pub jetstream: bool,
    /// Copies JetStream keeps of the jobs (1, 3 or 5; at most the NATS
    /// cluster's servers).
    #[serde(default = "defaults::jobs_replicas")]
    pub replicas: usize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            dir: None,
            retention: defaults::jobs_retention(),
            queue_timeout: defaults::jobs_queue_timeout(),
            timeout: defaults::jobs_timeout(),
            max_bytes: defaults::jobs_max_bytes(),
            max_result: defaults::jobs_max_result(),
            concurrency: defaults::jobs_concurrency(),
            max_live: defaults::jobs_max_live(),
            callback_secret: None,
            callback_allow: Vec::new(),
            callback_ca: None,
            jetstream: false,
            replicas: defaults::jobs_replicas(),
        }
    }
}

/// `[ingress]`: where messages pushed to workers come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// `[[ingress.redis]]`: Redis channels whose messages go to workers.
    #[serde(default)]
    pub redis: Vec<RedisIngress>,
}

/// `[[ingress.redis]]`: every message published on `channel` goes to every
/// matching worker of `service`, as a fan-out without replies; code that
/// does `$redis->publish("channel", $msg)` reaches wsbridge workers as is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisIngress {
    /// `redis://[:password@]host[:port][/db]`; a secret (it may hold a
    /// password): never logged.
    pub url: Secret,
    /// The channel to subscribe to.
    pub channel: String,
    /// The service whose workers get the messages.
    pub service: String,
    /// `all` (the default) or `KEY=VALUE,...` pairs of worker metadata.
    #[serde(default)]
    pub selector: Option<String>,
    /// The path of the `POST` the workers get (default `/`).
    #[serde(default)]
    pub path: Option<String>,
}

/// `[fanout]`: the bounds of a call sent to every matching worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanoutConfig {
    /// Most workers one fan-out may reach; a selector matching more gets
    /// 400 (narrow it with metadata).
    #[serde(default = "defaults::fanout_max_workers")]
    pub max_workers: usize,
    /// Largest reply kept per worker; a larger one is `too_large`.
    #[serde(default = "defaults::fanout_max_reply")]
    pub max_reply: ByteSize,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            max_workers: defaults::fanout_max_workers(),
            max_reply: defaults::fanout_max_reply(),
        }
    }
}

/// `[admin]`: Prometheus `/metrics`, `/status` JSON, the dashboard at `/`
/// and `POST /reload`, on a listener of their own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin listener at all.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Its address; keep it on loopback (it can reload the config).
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
    /// Networks allowed to use it; others get 403.
    #[serde(default = "defaults::allow_from")]
    pub allow_from: Vec<ipnet::IpNet>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: defaults::admin_listen(),
            allow_from: defaults::allow_from(),
        }
    }
}

/// `[http]`: where callers connect and how long they may wait.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the plain-HTTP listener; keep it on loopback.
    pub listen: SocketAddr,
    /// Deadline for a whole call, queueing included; then 504.
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a call may wait for a free worker; then 503 `no_worker`.
    #[serde(default = "defaults::queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Calls that may wait per service; beyond it 503 `queue_full`.
    #[serde(default = "defaults::queue_limit")]
    pub queue_limit: usize,
    /// How many more workers a call may be sent to when its worker vanishes
    /// before replying (only calls that cannot take effect twice; see docs).
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// Ask the worker to confirm a POST or PATCH before it runs it
    /// (PROTOCOL 3.7), so that one whose worker dies before confirming goes
    /// to another worker instead of failing with 502. Costs a bridge-worker
    /// round trip per such call; off by default (see docs/PERFORMANCE.md,
    /// "The start gate").
    #[serde(default)]
    pub start_gate: bool,
    /// How long the response to a call with an `Idempotency-Key` is kept,
    /// so that a retry with the same key gets it without a second call.
    #[serde(default = "defaults::idempotency_ttl", with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// Memory for stored responses; the oldest go first when it is full.
    #[serde(default = "defaults::idempotency_capacity")]
    pub idempotency_capacity: ByteSize,
    /// Largest request body; beyond it 413 `body_too_large`.
    #[serde(default = "defaults::max_body")]
    pub max_body: ByteSize,
    /// Largest response body a worker may send; beyond it 502 `bad_response`.
    #[serde(default = "defaults::max_response_body")]
    pub max_response_body: ByteSize,
    /// Time a caller has to send its request headers (slowloris guard).
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Caller addresses (CIDR) the HTTP listener serves; others get 403.
    /// Default: loopback only, since the listener is meant for local apps.
    #[serde(default = "defaults::allow_from")]
    pub allow_from: Vec<ipnet::IpNet>,
    /// Most caller connections open at once; beyond it the listener stops
    /// accepting until one closes (they wait in the kernel's backlog).
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Longest a response write may make no progress (a caller that stopped
    /// reading); then the connection is closed and its call cancelled.
    #[serde(default = "defaults::send_timeout", with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Also serve HTTP/2 with prior knowledge (h2c) on the listener, told
    /// apart from HTTP/1 by a connection's first bytes.
    #[serde(default = "defaults::yes")]
    pub http2: bool,
    /// Calls one HTTP/2 connection may have open at once (its
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`).
    #[serde(default = "defaults::http2_max_streams")]
    pub http2_max_streams: u32,
}

/// `[workers]`: where workers dial in and how they are kept honest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// Address of the WebSocket listener workers connect to.
    pub listen: SocketAddr,
    /// Serve wss (the default). `false` serves plain ws: loopback only, please.
    #[serde(default = "defaults::yes")]
    pub tls: bool,
    /// PEM certificate chain for the worker listener.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the worker listener.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM bundle of CAs; when set, workers must present a certificate
    /// issued by one of them (mutual TLS), in addition to their token.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Create a self-signed `tls_cert`/`tls_key` when the files are missing.
    #[serde(default)]
    pub auto_self_signed: bool,
    /// Bearer tokens workers may present: a plain string may register for
    /// any service, a `{ token, services }` table only for those services.
    pub tokens: Vec<WorkerToken>,
    /// How often the bridge pings each worker.
    #[serde(default = "defaults::ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Missed pongs in a row after which a worker is dropped.
    #[serde(default = "defaults::ping_misses")]
    pub ping_misses: u32,
    /// Time a worker has for the TLS, upgrade and hello exchange.
    #[serde(default = "defaults::handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Largest WebSocket message accepted from a worker.
    #[serde(default = "defaults::max_frame")]
    pub max_frame: ByteSize,
    /// Per-call flow-control window offered to workers that do flow control.
    #[serde(default = "defaults::flow_window")]
    pub flow_window: ByteSize,
    /// How long the calls of a resumable worker whose connection dropped
    /// are kept for it to come back (0: fail them at once).
    #[serde(default = "defaults::resume_window", with = "humantime_serde")]
    pub resume_window: Duration,
    /// Socket send buffer for worker connections (0: the OS's autotuning).
    #[serde(default = "defaults::send_buffer")]
    pub send_buffer: ByteSize,
    /// Let workers that offer it compress large bodies (LZ4). Workers opt
    /// in; this only allows it.
    #[serde(default = "defaults::yes")]
    pub compression: bool,
    /// What a worker's hello with an id that a connected worker of one of
    /// its services already has does: `replace` (the default: the newest
    /// wins, the older connection drains and closes saying why) or
    /// `refuse` (the newcomer is turned away).
    #[serde(default)]
    pub duplicate_ids: DuplicateIds,
    /// Origins (`https://app.example.com`) whose pages may connect as
    /// workers; `"*"` allows any. A connection that sends an `Origin` (every
    /// browser does) from anywhere else is refused with 403, against
    /// cross-site WebSocket hijacking; one without (other clients) is not
    /// checked. Empty (the default): no browser may connect.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

/// See [`WorkersConfig::duplicate_ids`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DuplicateIds {
    /// The newest connection wins.
    #[default]
    Replace,
    /// The newcomer is refused.
    Refuse,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Path prefix, matched on whole segments: `/orders` matches `/orders`
    /// and `/orders/1`, not `/ordersx`.
    pub prefix: String,
    /// The service that answers it.
    pub service: String,
    /// Overrides `http.request_timeout` for this route.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Overrides `http.max_body` for this route.
    #[serde(default)]
    pub max_body: Option<ByteSize>,
}

mod defaults {
    use super::ByteSize;
    use std::time::Duration;

    pub(super) fn yes() -> bool {
        true
    }
    pub(super) fn shutdown_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn queue_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn queue_limit() -> usize {
        1024
    }
    pub(super) fn max_body() -> ByteSize {
        ByteSize(10 << 20)
    }
    pub(super) fn jobs_retention() -> Duration {
        Duration::from_secs(86_400)
    }
    pub(super) fn jobs_queue_timeout() -> Duration {
        Duration::from_secs(86_400)
    }
    pub(super) fn jobs_timeout() -> Duration {
        Duration::from_secs(3600)
    }
    pub(super) fn jobs_max_bytes() -> ByteSize {
        ByteSize(1 << 30)
    }
    pub(super) fn jobs_max_result() -> ByteSize {
        ByteSize(64 << 20)
    }
    pub(super) fn jobs_max_live() -> usize {
        100_000
    }
    pub(super) fn jobs_replicas() -> usize {
        1
    }
    pub(super) fn jobs_concurrency() -> usize {
        32
    }
    pub(super) fn fanout_max_workers() -> usize {
        10_000
    }
    pub(super) fn fanout_max_reply() -> ByteSize {
        ByteSize(64 << 10)
    }
    pub(super) fn max_response_body() -> ByteSize {
        ByteSize(64 << 20)
    }
    pub(super) fn allow_from() -> Vec<ipnet::IpNet> {
        ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect()
    }
    pub(super) fn admin_listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 9090))
    }
    pub(super) fn max_connections() -> usize {
        10_000
    }
    pub(super) fn idempotency_ttl() -> Duration {
        Duration::from_secs(3600)
    }
    pub(super) fn idempotency_capacity() -> ByteSize {
        ByteSize(64 << 20)
    }
    pub(super) fn max_retries() -> u32 {
        2
    }
    pub(super) fn http2_max_streams() -> u32 {
        256
    }
    pub(super) fn send_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub(super) fn header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn ping_interval() -> Duration {
        Duration::from_secs(15)
    }
    pub(super) fn ping_misses() -> u32 {
        2
    }
    pub(super) fn handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn max_frame() -> ByteSize {
        ByteSize(1 << 20)
    }
    pub(super) fn flow_window() -> ByteSize {
        ByteSize(crate::protocol::WINDOW as u64)
    }
    /// A live worker is back about 4 round trips after a reset (0.4 s at
    /// 100 ms RTT, docs/PERFORMANCE.md): 2 s leaves room for a few attempts
    /// and bounds how long a killed worker's accepted POST waits for its 502.
    pub(super) fn resume_window() -> Duration {
        Duration::from_secs(2)
    }
    pub(super) fn send_buffer() -> ByteSize {
        ByteSize(256 * 1024)
    }
}

/// What can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong form.
    #[error("invalid config{}: {message}", path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    Parse {
        /// The file, if it came from one.
        path: Option<PathBuf>,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("invalid config: `{key}` {problem}")]
    Invalid {
        /// Dotted key, e.g. `workers.ping_misses`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: Some(path.to_owned()),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: None,
            message: without_source(&e.to_string()),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("shutdown_timeout", self.shutdown_timeout),
            ("http.request_timeout", self.http.request_timeout),
            ("http.queue_timeout", self.http.queue_timeout),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.send_timeout", self.http.send_timeout),
            ("workers.ping_interval", self.workers.ping_interval),
            ("workers.handshake_timeout", self.workers.handshake_timeout),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than zero"));
            }
            if value > MAX_DURATION {
                return Err(invalid(key, "must be at most 24h"));
            }
        }
        if self.workers.ping_misses > 1000 {
            return Err(invalid("workers.ping_misses", "must be at most 1000"));
        }
        if self.http.http2_max_streams == 0 {
            return Err(invalid("http.http2_max_streams", "must be at least 1"));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be at least 1"));
        }
        if self.http.allow_from.is_empty() {
            return Err(invalid(
                "http.allow_from",
                "must list at least one network (e.g. \"0.0.0.0/0\" to allow everyone)",
            ));
        }
        if self.admin.enabled && self.admin.allow_from.is_empty() {
            return Err(invalid(
                "admin.allow_from",
                "must list at least one network (or set `admin.enabled = false`)",
            ));
        }
        if self.http.queue_limit == 0 {
            return Err(invalid("http.queue_limit", "must be at least 1"));
        }
        if self.workers.ping_misses == 0 {
            return Err(invalid("workers.ping_misses", "must be at least 1"));
        }
        if (self.workers.max_frame.0 as usize) < MIN_FRAME {
            return Err(invalid(
                "workers.max_frame",
                format!("must be at least {MIN_FRAME} bytes (one body chunk plus a {MAX_HEADER_LEN}-byte header)"),
            ));
        }
        let window = self.workers.flow_window.bytes();
        if !(CHUNK_SIZE..=64 << 20).contains(&window) {
            return Err(invalid(
                "workers.flow_window",
                format!("must be between {CHUNK_SIZE} bytes (one chunk) and 64MiB"),
            ));
        }
        for (i, r) in self.ingress.redis.iter().enumerate() {
            let key = |k: &str| format!("ingress.redis[{i}].{k}");
            let url = r.url.expose();
            if !url.starts_with("redis://") {
                return Err(invalid(key("url"), "must start with redis://"));
            }
            if r.channel.is_empty()
                || r.channel.len() > 256
                || http::HeaderValue::from_str(&r.channel).is_err()
            {
                return Err(invalid(
                    key("channel"),
                    "must be 1 to 256 bytes of visible text (it travels in a header)",
                ));
            }
            check_service(&key("service"), &r.service)?;
            if let Some(selector) = &r.selector {
                protocol::parse_selector(selector).map_err(|e| invalid(key("selector"), e))?;
            }
            if let Some(path) = &r.path {
                if !path.starts_with('/') || http::Uri::try_from(path.as_str()).is_err() {
                    return Err(invalid(key("path"), "must be a path starting with /"));
                }
            }
        }
        self.jobs.validate()?;
        if self.jobs.jetstream && self.cluster.is_none() {
            return Err(invalid(
                "jobs.jetstream",
                "needs a [cluster] (JetStream is the cluster's NATS); a single bridge keeps its jobs in jobs.dir",
            ));
        }
        if !(1..=1_000_000).contains(&self.fanout.max_workers) {
            return Err(invalid("fanout.max_workers", "must be 1 to 1000000"));
        }
        if self.fanout.max_reply.0 == 0 {
            return Err(invalid("fanout.max_reply", "must be at least 1 byte"));
        }
        for t in &self.workers.tokens {
            if let Some(prefix) = t.worker_id_prefix() {
                if prefix.is_empty() || prefix.len() > 128 {
                    return Err(invalid(
                        "workers.tokens",
                        "a worker_id_prefix must be 1 to 128 bytes",
                    ));
                }
                if t.services().is_none() {
                    return Err(invalid(
                        "workers.tokens",
                        "a token with a worker_id_prefix must also list its `services` (a per-user token must not serve everyone's calls)",
                    ));
                }
            }
            if let Some(metadata) = t.metadata() {
                protocol::check_metadata(metadata)
                    .map_err(|e| invalid("workers.tokens", format!("its metadata: {e}")))?;
            }
        }
        if self.workers.tokens.is_empty() {
            return Err(invalid("workers.tokens", "must list at least one token"));
        }
        if self
            .workers
            .tokens
            .iter()
            .any(|t| t.secret().expose().is_empty())
        {
            return Err(invalid("workers.tokens", "must not contain an empty token"));
        }
        if self
            .workers
            .tokens
            .iter()
            .any(|t| t.services().is_some_and(<[String]>::is_empty))
        {
            return Err(invalid(
                "workers.tokens",
                "a token with `services` must list at least one service",
            ));
        }
        if self.workers.tls && (self.workers.tls_cert.is_none() || self.workers.tls_key.is_none()) {
            return Err(invalid(
                "workers.tls_cert",
                "and `workers.tls_key` are required when `workers.tls` is true",
            ));
        }
        if let Some(s) = &self.default_service {
            check_service("default_service", s)?;
        }
        let mut seen = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}].prefix");
            if !route.prefix.starts_with('/') {
                return Err(invalid(
                    key,
                    format!("{:?} must start with '/'", route.prefix),
                ));
            }
            if !seen.insert(route.prefix.trim_end_matches('/')) {
                return Err(invalid(key, format!("{:?} is listed twice", route.prefix)));
            }
            check_service(&format!("routes[{i}].service"), &route.service)?;
            if route
                .request_timeout
                .is_some_and(|t| t.is_zero() || t > MAX_DURATION)
            {
                return Err(invalid(
                    format!("routes[{i}].request_timeout"),
                    "must be longer than zero and at most 24h",
                ));
            }
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        Ok(())
    }
}

/// A TOML error without the quoted source line: that line may hold a token,
/// and these messages reach logs and the admin API. Line and column stay,
/// and the key of the quoted line (what is left of its `=`) is named.
fn without_source(message: &str) -> String {
    let mut out = Vec::new();
    for line in message.lines() {
        let t = line.trim_start();
        if t.starts_with('|') {
            continue;
        }
        if let Some((n, source)) = t.split_once(" |") {
            if n.parse::<u32>().is_ok() {
                if let Some((key, _)) = source.split_once('=') {
                    out.push(format!("(key `{}`)", key.trim()));
                }
                continue;
            }
        }
        out.push(line.to_owned());
    }
    out.join(" ")
}

/// Longest timeout or interval accepted; longer ones are almost certainly a
/// unit mistake, and bounding them keeps deadline arithmetic trivially safe.
const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// The longest a job's durations may be.
const MAX_JOB_DURATION: Duration = Duration::from_secs(30 * 86_400);

impl JobsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("jobs.retention", self.retention),
            ("jobs.queue_timeout", self.queue_timeout),
            ("jobs.timeout", self.timeout),
        ] {
            if value.is_zero() || value > MAX_JOB_DURATION {
                return Err(invalid(key, "must be longer than zero and at most 30 days"));
            }
        }
        if self.concurrency == 0 {
            return Err(invalid("jobs.concurrency", "must be at least 1"));
        }
        if self.max_live == 0 {
            return Err(invalid("jobs.max_live", "must be at least 1"));
        }
        if self.max_result.0 == 0 || self.max_result > self.max_bytes {
            return Err(invalid(
                "jobs.max_result",
                "must be at least 1 byte and at most jobs.max_bytes",
            ));
        }
        if self.jetstream && self.dir.is_some() {
            return Err(invalid(
                "jobs.dir",
                "and jobs.jetstream are exclusive: jobs live in one place",
            ));
        }
        if ![1, 3, 5].contains(&self.replicas) {
            return Err(invalid("jobs.replicas", "must be 1, 3 or 5"));
        }
        if self.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err(invalid("jobs.dir", "must not be empty"));
        }
        for prefix in &self.callback_allow {
            let ok = (prefix.starts_with("http://") || prefix.starts_with("https://"))
                && prefix
                    .parse::<http::Uri>()
                    .is_ok_and(|u| u.host().is_some());
            if !ok {
                return Err(invalid(
                    "jobs.callback_allow",
                    format!("{prefix:?} must be an http:// or https:// URL with a host"),
                ));
            }
        }
        let secret = self.callback_secret.as_ref().map(Secret::expose);
        if !self.callback_allow.is_empty() && secret.is_none_or(|s| s.len() < 16) {
            return Err(invalid(
                "jobs.callback_secret",
                "must be set (at least 16 bytes) when jobs.callback_allow lists URLs: callbacks are signed with it",
            ));
        }
        Ok(())
    }
}

fn check_service(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 128 {
        return Err(invalid(key, "must be 1 to 128 bytes"));
    }
    Ok(())
}

/// A token a worker may present, and what it may register for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum WorkerToken {
    /// `"secret"`: any service, any id.
    Any(Secret),
    /// `{ token = "secret", services = ["orders"], worker_id_prefix =
    /// "user-42/", metadata = { user = "42" } }`: what it may claim.
    Scoped(ScopedToken),
}

/// A token limited in what its workers may claim. A key it does not know
/// is an error, never a token that silently grants everything.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedToken {
    /// The bearer token.
    pub token: Secret,
    /// The services a worker with this token may serve; any if absent.
    #[serde(default)]
    pub services: Option<Vec<String>>,
    /// Workers with this token must claim a `worker_id` that starts with
    /// this, so one user's worker cannot pose as another's (needs
    /// `services`: a per-user token must not serve everyone's calls).
    #[serde(default)]
    pub worker_id_prefix: Option<String>,
    /// Metadata the bridge sets on every worker with this token, over what
    /// its hello says: selectors on these keys (`user=42`) then reach only
    /// workers that hold this token.
    #[serde(default)]
    pub metadata: crate::protocol::Metadata,
}

impl ScopedToken {
    /// A token for `services` only.
    pub fn for_services(token: &str, services: &[&str]) -> WorkerToken {
        WorkerToken::Scoped(ScopedToken {
            token: Secret::new(token),
            services: Some(services.iter().map(|s| s.to_string()).collect()),
            worker_id_prefix: None,
            metadata: Default::default(),
        })
    }
}

impl WorkerToken {
    /// The bearer token itself.
    pub fn secret(&self) -> &Secret {
        match self {
            WorkerToken::Any(token) => token,
            WorkerToken::Scoped(s) => &s.token,
        }
    }

    /// The services this token is limited to; `None` for any service.
    pub fn services(&self) -> Option<&[String]> {
        match self {
            WorkerToken::Any(_) => None,
            WorkerToken::Scoped(s) => s.services.as_deref(),
        }
    }

    /// The prefix every `worker_id` claimed with this token must have.
    pub fn worker_id_prefix(&self) -> Option<&str> {
        match self {
            WorkerToken::Any(_) => None,
            WorkerToken::Scoped(s) => s.worker_id_prefix.as_deref(),
        }
    }

    /// Metadata the bridge pins on this token's workers.
    pub fn metadata(&self) -> Option<&crate::protocol::Metadata> {
        match self {
            WorkerToken::Scoped(s) if !s.metadata.is_empty() => Some(&s.metadata),
            _ => None,
        }
    }
}

/// A secret string whose `Debug` output never shows it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; call only where it is compared or sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"MASKED\"")
    }
}

/// A size in bytes, written in the config as `512`, `"64KiB"`, `"10MiB"`,
/// `"1GiB"` (binary units) or `"10MB"` (decimal units).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size as a `usize` (saturating on 32-bit targets).
    pub fn bytes(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a size like \"10MiB\""))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 1048576 or \"10MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parse_errors_do_not_quote_the_line_that_may_hold_a_secret() {
        let text = "[http]\nlisten = \"127.0.0.1:1\"\n[workers]\nlisten = \"127.0.0.1:2\"\ntokens = [\"s3cret\n";
        let err = super::Config::parse(text)
            .expect_err("unclosed array")
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    use super::*;

    const MINIMAL: &str = r#"
        [http]
        listen = "127.0.0.1:0"
        [workers]
        listen = "127.0.0.1:0"
        tls = false
        tokens = ["t"]
    "#;

    #[test]
    fn the_example_config_parses_with_its_documented_values() {
        let c = Config::parse(include_str!("../config/wsbridge.toml")).expect("example is valid");
        assert_eq!(c.default_service.as_deref(), Some("default"));
        assert_eq!(c.http.listen, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(c.http.queue_timeout, Duration::from_secs(5));
        assert_eq!(c.workers.listen.port(), 8443);
        assert!(c.workers.tls && c.workers.auto_self_signed);
        assert_eq!(
            c.workers.tokens,
            vec![WorkerToken::Any(Secret::new("change-me"))]
        );
        assert_eq!(c.routes.len(), 1);
        assert_eq!(
            (c.routes[0].prefix.as_str(), c.routes[0].service.as_str()),
            ("/orders", "orders")
        );
    }

    #[test]
    fn sizes_parse_in_all_units() {
        assert_eq!("10MiB".parse(), Ok(ByteSize(10 << 20)));
        assert_eq!("64 KiB".parse(), Ok(ByteSize(64 << 10)));
        assert_eq!("2MB".parse(), Ok(ByteSize(2_000_000)));
        assert_eq!("17".parse(), Ok(ByteSize(17)));
        assert!("ten".parse::<ByteSize>().is_err());
        assert!("5 parsecs".parse::<ByteSize>().is_err());
        assert!("99999999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.http.request_timeout, Duration::from_secs(30));
        assert_eq!(c.http.max_body, ByteSize(10 << 20));
        assert_eq!(c.workers.ping_misses, 2);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("tls = false", "tls = false\nping_intervall = \"1s\"");
        let err = Config::parse(&text).expect_err("unknown key").to_string();
        assert!(err.contains("ping_intervall"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let text = MINIMAL.replace("tls = false", "tls = false\nping_interval = \"soon\"");
        let err = Config::parse(&text).expect_err("bad value").to_string();
        assert!(err.contains("ping_interval"), "{err}");
    }

    #[test]
    fn invalid_relations_are_named() {
        let text = MINIMAL.replace("tls = false", "tls = false\nping_misses = 0");
        let err = Config::parse(&text).expect_err("zero misses").to_string();
        assert!(err.contains("workers.ping_misses"), "{err}");
        let text = MINIMAL.replace("tls = false", "");
        let err = Config::parse(&text)
            .expect_err("tls without cert")
            .to_string();
        assert!(err.contains("workers.tls_cert"), "{err}");
        let text = format!("{MINIMAL}\n[[routes]]\nprefix = \"orders\"\nservice = \"o\"\n");
        let err = Config::parse(&text)
            .expect_err("relative prefix")
            .to_string();
        assert!(err.contains("routes[0].prefix"), "{err}");
    }

    #[test]
    fn secrets_are_masked_in_debug() {
        let c = Config::parse(&MINIMAL.replace("[\"t\"]", "[\"hunter2\"]")).expect("valid");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("MASKED"),
            "{shown}"
        );
    }
}
