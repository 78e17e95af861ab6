//! What a running bridge counts: calls by service and status, latency,
//! bytes, worker churn; the Prometheus text exposition of it all; and a
//! sliding one-minute window per service for the status page's rates and
//! percentiles.
//!
//! Recording a call costs a few relaxed atomic adds and one uncontended
//! lock (the window); no allocation once a service has been seen.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

/// Upper bounds of the latency histogram's buckets, in seconds.
const LATENCY_BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Status codes are counted in a flat array indexed by `code - 100`.
const CODES: usize = 500;

/// Seconds the status window covers.
const WINDOW_SECS: u64 = 60;

/// Everything the bridge counts, shared by all its connections.
pub(crate) struct Metrics {
    started: Instant,
    services: RwLock<BTreeMap<String, Arc<ServiceStats>>>,
    /// Worker connections that completed the handshake (resumes included).
    pub(crate) worker_connects: AtomicU64,
    /// Worker connections that ended.
    pub(crate) worker_disconnects: AtomicU64,
    /// Fan-out requests (`Wsbridge-Fanout`), and the calls they made.
    pub(crate) fanouts: AtomicU64,
    pub(crate) fanout_calls: AtomicU64,
    /// Jobs submitted, and jobs ended by final state (succeeded, failed,
    /// cancelled, expired).
    pub(crate) jobs_submitted: AtomicU64,
    pub(crate) jobs_ended: [AtomicU64; 4],
    /// Messages an ingress pushed, the workers they reached, and the
    /// calls sent for them.
    pub(crate) ingress_messages: AtomicU64,
    pub(crate) ingress_reached: AtomicU64,
    pub(crate) ingress_sent: AtomicU64,
    /// Messages an ingress dropped (too large, or the workers far behind).
    pub(crate) ingress_dropped: AtomicU64,
}

/// The counters of one service (`-` for calls that matched no route).
pub(crate) struct ServiceStats {
    codes: Box<[AtomicU64]>,
    /// Calls of this service between the routing decision and the end of
    /// the response body.
    active: AtomicI64,
    latency: Histogram,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    recent: Mutex<Window>,
}

/// A cumulative Prometheus histogram over [`LATENCY_BOUNDS`].
struct Histogram {
    /// Per bucket, not cumulative; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

/// One finished call, as [`Metrics::record`] takes it.
pub(crate) struct Finished {
    pub(crate) status: u16,
    /// The response body ended short (cut off mid-stream): a failure in the
    /// window whatever the status said.
    pub(crate) truncated: bool,
    pub(crate) elapsed: Duration,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

/// A service's figures over the last minute.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Recent {
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    /// Calls per second over the window (or since start, if shorter).
    pub(crate) rate: f64,
    pub(crate) p50: Option<Duration>,
    pub(crate) p99: Option<Duration>,
}

/// Marks a call as active for its service until dropped.
pub(crate) struct Active(Arc<ServiceStats>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

impl Active {
    /// The service's counters.
    pub(crate) fn stats(&self) -> &Arc<ServiceStats> {
        &self.0
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            services: RwLock::default(),
            worker_connects: AtomicU64::new(0),
            worker_disconnects: AtomicU64::new(0),
            fanouts: AtomicU64::new(0),
            fanout_calls: AtomicU64::new(0),
            jobs_submitted: AtomicU64::new(0),
            jobs_ended: Default::default(),
            ingress_messages: AtomicU64::new(0),
            ingress_reached: AtomicU64::new(0),
            ingress_sent: AtomicU64::new(0),
            ingress_dropped: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// A fan-out to `workers` workers began.
    pub(crate) fn fanout(&self, workers: usize) {
        self.fanouts.fetch_add(1, Relaxed);
        self.fanout_calls.fetch_add(workers as u64, Relaxed);
    }

    /// A job was stored.
    pub(crate) fn job_submitted(&self) {
        self.jobs_submitted.fetch_add(1, Relaxed);
    }

    /// A job ended in `state`.
    pub(crate) fn job_ended(&self, state: &str) {
        if let Some(i) = JOB_STATES.iter().position(|s| *s == state) {
            self.jobs_ended[i].fetch_add(1, Relaxed);
        }
    }

    /// An ingress pushed a message: `reached` workers matched, `sent` got it.
    pub(crate) fn ingress_message(&self, reached: usize, sent: usize) {
        self.ingress_messages.fetch_add(1, Relaxed);
        self.ingress_reached.fetch_add(reached as u64, Relaxed);
        self.ingress_sent.fetch_add(sent as u64, Relaxed);
    }

    /// An ingress dropped a message; returns how many so far.
    pub(crate) fn ingress_dropped(&self) -> u64 {
        self.ingress_dropped.fetch_add(1, Relaxed) + 1
    }

    /// How long the bridge has been up.
    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The counters of `service`, created on first use.
    pub(crate) fn service(&self, service: &str) -> Arc<ServiceStats> {
        let read = self.services.read().unwrap_or_else(|p| p.into_inner());
        if let Some(stats) = read.get(service) {
            return stats.clone();
        }
        drop(read);
        self.services
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(service.to_owned())
            .or_insert_with(|| Arc::new(ServiceStats::new()))
            .clone()
    }

    /// Counts a call of `service` as active until the guard drops.
    pub(crate) fn begin(&self, service: &str) -> Active {
        let stats = self.service(service);
        stats.active.fetch_add(1, Relaxed);
        Active(stats)
    }

    /// Every service seen so far, by name.
    pub(crate) fn services(&self) -> Vec<(String, Arc<ServiceStats>)> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl ServiceStats {
    fn new() -> Self {
        ServiceStats {
            codes: (0..CODES).map(|_| AtomicU64::new(0)).collect(),
            active: AtomicI64::new(0),
            latency: Histogram {
                buckets: Default::default(),
                sum_micros: AtomicU64::new(0),
            },
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            recent: Mutex::new(Window::default()),
        }
    }

    /// Counts one finished call.
    pub(crate) fn record(&self, call: &Finished, now: Instant, since: Instant) {
        let index = usize::from(call.status.clamp(100, 599) - 100);
        self.codes[index].fetch_add(1, Relaxed);
        let secs = call.elapsed.as_secs_f64();
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.latency.buckets[bucket].fetch_add(1, Relaxed);
        let micros = u64::try_from(call.elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency.sum_micros.fetch_add(micros, Relaxed);
        self.bytes_in.fetch_add(call.bytes_in, Relaxed);
        self.bytes_out.fetch_add(call.bytes_out, Relaxed);
        let second = now.saturating_duration_since(since).as_secs();
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(second, micros, call.status >= 500 || call.truncated);
    }

    /// Calls finished since start.
    pub(crate) fn calls(&self) -> u64 {
        self.codes.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Calls in progress right now.
    pub(crate) fn active(&self) -> u64 {
        u64::try_from(self.active.load(Relaxed)).unwrap_or(0)
    }

    /// Calls that ended with a 5xx since start.
    pub(crate) fn errors(&self) -> u64 {
        self.codes[400..].iter().map(|c| c.load(Relaxed)).sum()
    }

    /// The last minute, as seen at `now`.
    pub(crate) fn recent(&self, now: Instant, since: Instant) -> Recent {
        let up = now.saturating_duration_since(since);
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .summary(up)
    }
}

impl Metrics {
    /// Records a call of `stats`' service that finished at `now`.
    pub(crate) fn record(&self, stats: &ServiceStats, call: &Finished, now: Instant) {
        stats.record(call, now, self.started);
    }

    /// The last minute of `stats`' service.
    pub(crate) fn recent(&self, stats: &ServiceStats) -> Recent {
        stats.recent(Instant::now(), self.started)
    }
}

/// Gauges read from the live bridge when metrics are rendered.
pub(crate) struct Gauges {
    /// Per service: workers connected, calls waiting for a worker.
    pub(crate) services: Vec<ServiceGauges>,
    /// Calls sent to workers and not finished (what the pending maps hold).
    pub(crate) pending: usize,
    /// Tasks alive on the bridge's tokio runtime (connections, sessions,
    /// calls): the figure that shows a leak of spawned work, which neither
    /// RSS nor the call gauges show early. `None` off a runtime.
    pub(crate) tasks: Option<usize>,
    pub(crate) protocol_violations: u64,
    /// Config reloads applied and rejected.
    pub(crate) reloads: (u64, u64),
    /// In a cluster: its link, peers and cross-node calls.
    pub(crate) cluster: Option<ClusterGauges>,
    /// With a job store: jobs live, bytes stored, and this bridge's
    /// store's commits (fsyncs) and the changes they held.
    pub(crate) jobs: Option<(u64, u64, (u64, u64))>,
}

/// The final states of jobs, as `wsbridge_jobs_ended_total` labels them.
const JOB_STATES: [&str; 4] = ["succeeded", "failed", "cancelled", "expired"];

/// The cluster's gauges and counters.
pub(crate) struct ClusterGauges {
    /// Whether NATS is connected.
    pub(crate) connected: bool,
    /// The other bridges known.
    pub(crate) peers: usize,
    /// Calls sent to, and taken by, other bridges (`out`), and calls
    /// taken from them (`in`): totals, then those in flight.
    pub(crate) calls: (u64, u64),
    pub(crate) in_flight: (usize, usize),
    /// Calls run on other bridges that ended, and their total time (µs).
    pub(crate) out_done: (u64, u64),
}

/// A metric with an `out` and an `in` series.
fn directions<T: std::fmt::Display>(
    o: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    (out, inn): (T, T),
) {
    header(o, name, kind, help);
    let _ = writeln!(o, "{name}{{direction=\"out\"}} {out}");
    let _ = writeln!(o, "{name}{{direction=\"in\"}} {inn}");
}

/// One service's live gauges.
pub(crate) struct ServiceGauges {
    pub(crate) name: String,
    pub(crate) workers: usize,
    pub(crate) queued: usize,
}

impl Metrics {
    /// The Prometheus text exposition (format 0.0.4).
    pub(crate) fn render(&self, gauges: &Gauges) -> String {
        let services = self.services();
        let mut out = String::with_capacity(4096 + services.len() * 2048);
        let o = &mut out;
        requests(o, &services);
        latency(o, &services);
        let per_service = [
            (
                "wsbridge_requests_in_flight",
                "gauge",
                "Calls being handled, from routing to the end of the response body, by service.",
                (|s: &ServiceStats| s.active()) as fn(&ServiceStats) -> u64,
            ),
            (
                "wsbridge_request_bytes_total",
                "counter",
                "Request body bytes received from callers, by service.",
                |s| s.bytes_in.load(Relaxed),
            ),
            (
                "wsbridge_response_bytes_total",
                "counter",
                "Response body bytes sent to callers, by service.",
                |s| s.bytes_out.load(Relaxed),
            ),
        ];
        for (name, kind, help, value) in per_service {
            header(o, name, kind, help);
            for (service, s) in &services {
                let _ = writeln!(o, "{name}{{service=\"{}\"}} {}", escape(service), value(s));
            }
        }
        let per_gauge = [
            (
                "wsbridge_queue_depth",
                "Calls waiting for a free worker, by service.",
                (|g: &ServiceGauges| g.queued) as fn(&ServiceGauges) -> usize,
            ),
            (
                "wsbridge_workers_connected",
                "Worker connections serving each service.",
                |g| g.workers,
            ),
        ];
        for (name, help, value) in per_gauge {
            header(o, name, "gauge", help);
            for g in &gauges.services {
                let _ = writeln!(o, "{name}{{service=\"{}\"}} {}", escape(&g.name), value(g));
            }
        }
        self.totals(o, gauges);
        header(
            o,
            "wsbridge_jobs_ended_total",
            "counter",
            "Jobs that ended, by final state.",
        );
        for (state, n) in JOB_STATES.iter().zip(&self.jobs_ended) {
            let _ = writeln!(
                o,
                "wsbridge_jobs_ended_total{{state=\"{state}\"}} {}",
                n.load(Relaxed)
            );
        }
        out
    }

    /// The metrics without labels (and the reloads, by result).
    fn totals(&self, o: &mut String, gauges: &Gauges) {
        let mut single = |name: &str, kind: &str, help: &str, value: &dyn std::fmt::Display| {
            header(o, name, kind, help);
            let _ = writeln!(o, "{name} {value}");
        };
        single(
            "wsbridge_worker_calls_pending",
            "gauge",
            "Calls sent to workers and not yet finished.",
            &gauges.pending,
        );
        if let Some(tasks) = gauges.tasks {
            single(
                "wsbridge_runtime_tasks",
                "gauge",
                "Tasks alive on the bridge's runtime (connections, worker sessions, calls).",
                &tasks,
            );
        }
        single(
            "wsbridge_worker_connects_total",
            "counter",
            "Worker connections accepted (handshake done, resumes included).",
            &self.worker_connects.load(Relaxed),
        );
        single(
            "wsbridge_worker_disconnects_total",
            "counter",
            "Worker connections that ended.",
            &self.worker_disconnects.load(Relaxed),
        );
        single(
            "wsbridge_fanouts_total",
            "counter",
            "Fan-out requests (Wsbridge-Fanout), pushes included.",
            &self.fanouts.load(Relaxed),
        );
        single(
            "wsbridge_fanout_calls_total",
            "counter",
            "Calls made to workers by fan-outs (one per matching worker).",
            &self.fanout_calls.load(Relaxed),
        );
        single(
            "wsbridge_jobs_submitted_total",
            "counter",
            "Jobs stored (calls with Prefer: respond-async).",
            &self.jobs_submitted.load(Relaxed),
        );
        if let Some((live, stored, (commits, changes))) = gauges.jobs {
            single(
                "wsbridge_jobs_commits_total",
                "counter",
                "Transactions the job store committed, each one fsync (group commit: several changes per commit).",
                &commits,
            );
            single(
                "wsbridge_jobs_changes_total",
                "counter",
                "Changes the job store committed (a job's submission, start, end...).",
                &changes,
            );
            single(
                "wsbridge_jobs_live",
                "gauge",
                "Jobs queued or running on this bridge.",
                &live,
            );
            single(
                "wsbridge_jobs_stored_bytes",
                "gauge",
                "Bytes the job store holds, as counted against jobs.max_bytes.",
                &stored,
            );
        }
        single(
            "wsbridge_ingress_messages_total",
            "counter",
            "Messages an ingress ([[ingress.redis]]) pushed to workers.",
            &self.ingress_messages.load(Relaxed),
        );
        single(
            "wsbridge_ingress_deliveries_total",
            "counter",
            "Calls sent to workers for ingress messages.",
            &self.ingress_sent.load(Relaxed),
        );
        single(
            "wsbridge_ingress_undelivered_total",
            "counter",
            "Workers an ingress message matched but could not be sent to (gone, full until the deadline).",
            &(self.ingress_reached.load(Relaxed) - self.ingress_sent.load(Relaxed).min(self.ingress_reached.load(Relaxed))),
        );
        single(
            "wsbridge_ingress_dropped_total",
            "counter",
            "Messages an ingress dropped: larger than http.max_body, or received while 64 MiB of earlier ones waited.",
            &self.ingress_dropped.load(Relaxed),
        );
        single(
            "wsbridge_protocol_violations_total",
            "counter",
            "Frames from workers that broke the protocol.",
            &gauges.protocol_violations,
        );
        if let Some(cluster) = &gauges.cluster {
            single(
                "wsbridge_cluster_connected",
                "gauge",
                "1 while the NATS connection is up; 0: the cluster is degraded to this bridge's workers.",
                &u8::from(cluster.connected),
            );
            single(
                "wsbridge_cluster_peers",
                "gauge",
                "Other bridges of the cluster this bridge hears from.",
                &cluster.peers,
            );
            directions(
                o,
                "wsbridge_cluster_calls_total",
                "counter",
                "Calls run on another bridge (out) and for another bridge (in).",
                cluster.calls,
            );
            directions(
                o,
                "wsbridge_cluster_calls_in_flight",
                "gauge",
                "Cross-node calls in progress, by direction.",
                cluster.in_flight,
            );
            let (done, micros) = cluster.out_done;
            header(
                o,
                "wsbridge_cluster_call_duration_seconds",
                "summary",
                "Calls run on another bridge: time from the request to the end of the response.",
            );
            let _ = writeln!(
                o,
                "wsbridge_cluster_call_duration_seconds_sum {}\nwsbridge_cluster_call_duration_seconds_count {done}",
                micros as f64 / 1e6
            );
        }
        header(
            o,
            "wsbridge_config_reloads_total",
            "counter",
            "Config reloads, by result (success, failure).",
        );
        let (done, rejected) = gauges.reloads;
        let _ = writeln!(
            o,
            "wsbridge_config_reloads_total{{result=\"success\"}} {done}"
        );
        let _ = writeln!(
            o,
            "wsbridge_config_reloads_total{{result=\"failure\"}} {rejected}"
        );
        header(
            o,
            "wsbridge_uptime_seconds",
            "gauge",
            "Seconds since the bridge started.",
        );
        let _ = writeln!(o, "wsbridge_uptime_seconds {}", self.uptime().as_secs_f64());
    }
}

/// `wsbridge_requests_total`, by service and status code.
fn requests(o: &mut String, services: &[(String, Arc<ServiceStats>)]) {
    header(
        o,
        "wsbridge_requests_total",
        "counter",
        "Calls answered, by service and HTTP status code.",
    );
    for (name, s) in services {
        for (i, count) in s.codes.iter().enumerate() {
            let n = count.load(Relaxed);
            if n > 0 {
                let code = i + 100;
                let _ = writeln!(
                    o,
                    "wsbridge_requests_total{{service=\"{}\",code=\"{code}\"}} {n}",
                    escape(name)
                );
            }
        }
    }
}

/// `wsbridge_request_duration_seconds`, a histogram by service.
fn latency(o: &mut String, services: &[(String, Arc<ServiceStats>)]) {
    header(
        o,
        "wsbridge_request_duration_seconds",
        "histogram",
        "Time from the request's arrival to the end of its response body, by service.",
    );
    for (name, s) in services {
        let name = escape(name);
        let mut cumulative = 0;
        for (i, bucket) in s.latency.buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            let le = LATENCY_BOUNDS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(
                o,
                "wsbridge_request_duration_seconds_bucket{{service=\"{name}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = s.latency.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(
            o,
            "wsbridge_request_duration_seconds_sum{{service=\"{name}\"}} {sum}"
        );
        let _ = writeln!(
            o,
            "wsbridge_request_duration_seconds_count{{service=\"{name}\"}} {cumulative}"
        );
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Sub-buckets per power of two in the window's latency buckets: values
/// are kept within 1/16 (about 6%) of their true size.
const SUB: u64 = 8;
/// Buckets cover 0 to 2^36 microseconds (19 hours); longer calls land in
/// the last.
const SLOTS: usize = ((36 - 2) * SUB) as usize;

/// One second of a service's calls.
#[derive(Clone)]
struct Second {
    /// Which second since start this slot holds.
    at: u64,
    calls: u64,
    errors: u64,
    latency: Box<[u32; SLOTS]>,
}

/// The last [`WINDOW_SECS`] seconds, one slot each, reused round-robin.
struct Window {
    seconds: Vec<Second>,
}

impl Default for Window {
    fn default() -> Self {
        let empty = Second {
            at: u64::MAX,
            calls: 0,
            errors: 0,
            latency: Box::new([0; SLOTS]),
        };
        Window {
            seconds: vec![empty; WINDOW_SECS as usize],
        }
    }
}

/// The bucket of a latency in microseconds: exact below 8, then
/// [`SUB`] buckets per power of two.
fn bucket(micros: u64) -> usize {
    if micros < SUB {
        return micros as usize;
    }
    let exp = 63 - u64::from(micros.leading_zeros());
    let sub = (micros >> (exp - 3)) & (SUB - 1);
    usize::try_from((exp - 2) * SUB + sub).map_or(SLOTS - 1, |b| b.min(SLOTS - 1))
}

/// The middle of a bucket, in microseconds.
fn bucket_value(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB {
        return index;
    }
    let exp = index / SUB + 2;
    let sub = index % SUB;
    let low = (SUB + sub) << (exp - 3);
    let width = 1u64 << (exp - 3);
    low + width / 2
}

impl Window {
    fn record(&mut self, second: u64, micros: u64, error: bool) {
        let slot = &mut self.seconds[(second % WINDOW_SECS) as usize];
        if slot.at != second {
            slot.at = second;
            slot.calls = 0;
            slot.errors = 0;
            slot.latency.fill(0);
        }
        slot.calls += 1;
        slot.errors += u64::from(error);
        let b = bucket(micros);
        slot.latency[b] = slot.latency[b].saturating_add(1);
    }

    /// The calls of the last [`WINDOW_SECS`] seconds before `up` (the
    /// current, partial second included).
    fn summary(&self, up: Duration) -> Recent {
        let now = up.as_secs();
        let live = |s: &&Second| s.at != u64::MAX && s.at <= now && now - s.at < WINDOW_SECS;
        let mut merged = [0u64; SLOTS];
        let mut recent = Recent::default();
        for s in self.seconds.iter().filter(live) {
            recent.calls += s.calls;
            recent.errors += s.errors;
            for (m, c) in merged.iter_mut().zip(s.latency.iter()) {
                *m += u64::from(*c);
            }
        }
        let span = up.as_secs_f64().clamp(1.0, WINDOW_SECS as f64);
        recent.rate = recent.calls as f64 / span;
        let quantile = |q: f64| {
            let rank = ((recent.calls as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            merged.iter().enumerate().find_map(|(i, c)| {
                seen += c;
                (seen >= rank).then(|| Duration::from_micros(bucket_value(i)))
            })
        };
        if recent.calls > 0 {
            recent.p50 = quantile(0.50);
            recent.p99 = quantile(0.99);
        }
        recent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_close() {
        let mut last = 0;
        for v in (0..100_000u64).chain([1 << 20, 1 << 30, (1 << 35) + 7]) {
            let b = bucket(v);
            assert!(b >= last || v == 0, "bucket({v}) went backwards");
            last = b;
            let mid = bucket_value(b) as f64;
            if v >= SUB {
                let err = (mid - v as f64).abs() / v as f64;
                assert!(
                    err <= 1.0 / 16.0 + 1e-9,
                    "bucket({v}) mid {mid}: error {err}"
                );
            } else {
                assert_eq!(mid as u64, v);
            }
        }
    }

    #[test]
    fn window_percentiles_and_expiry() {
        let mut w = Window::default();
        for i in 0..100 {
            // 99 fast calls of 1 ms and one of 100 ms.
            let micros = if i == 0 { 100_000 } else { 1_000 };
            w.record(5, micros, i == 0);
        }
        let r = w.summary(Duration::from_secs(5));
        assert_eq!((r.calls, r.errors), (100, 1));
        let p50 = r.p50.map(|d| d.as_micros()).unwrap_or_default();
        assert!((940..=1060).contains(&p50), "p50 {p50}");
        let p99 = r.p99.map(|d| d.as_micros()).unwrap_or_default();
        assert!(
            (940..=1060).contains(&p99),
            "p99 {p99}: 99 of 100 calls took 1 ms"
        );
        assert!((r.rate - 20.0).abs() < 1e-9, "100 calls in the first 5 s");
        // A minute later they have left the window.
        let later = w.summary(Duration::from_secs(65));
        assert_eq!(later.calls, 0);
        assert!(later.p50.is_none());
        // A slot reused for a new second forgets the old one.
        w.record(65, 2_000, false);
        let r = w.summary(Duration::from_secs(65));
        assert_eq!(r.calls, 1);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
