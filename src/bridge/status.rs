//! The `/status` document: every worker and every service of a running
//! bridge, as `wsbridge status` prints it and the dashboard draws it.
//! The types are public so that tools can read it back with serde.

use std::{collections::BTreeMap, sync::atomic::Ordering::Relaxed, time::UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::Shared;

/// A running bridge at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The bridge's version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// The config file it reloads from, if any.
    pub config_file: Option<String>,
    /// Successful reloads since start.
    pub reloads: u64,
    /// Rejected reloads (invalid file or certificate) since start.
    pub reload_failures: u64,
    /// Calls being handled, from routing to the end of the response body.
    pub in_flight: u64,
    /// Calls sent to workers and not finished (the pending maps).
    pub pending: usize,
    /// Calls answered since start.
    pub requests: u64,
    /// Frames from workers that broke the protocol, since start.
    pub protocol_violations: u64,
    /// Worker connections accepted since start (resumes included).
    pub worker_connects: u64,
    /// Worker connections that ended since start.
    pub worker_disconnects: u64,
    /// Per service, by name.
    pub services: Vec<ServiceStatus>,
    /// Per worker connection, oldest first.
    pub workers: Vec<WorkerStatus>,
    /// The cluster, when the bridge is in one (`[cluster]`).
    #[serde(default)]
    pub cluster: Option<ClusterStatus>,
}

/// The cluster as this bridge sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This bridge's node name.
    pub node: String,
    /// The cluster's name.
    pub name: String,
    /// Whether the NATS connection is up. When it is not, the cluster is
    /// degraded: this bridge serves its own workers only.
    pub connected: bool,
    /// The last error NATS or its client reported since the connection
    /// was last up (wrong credentials, a certificate that does not verify).
    #[serde(default)]
    pub error: Option<String>,
    /// The other bridges, by name.
    pub peers: Vec<PeerStatus>,
}

/// Another bridge of the cluster, as its last announcement described it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Its node name.
    pub node: String,
    /// Milliseconds since its last announcement.
    pub seen_ms_ago: u64,
    /// Its services and their workers.
    pub services: Vec<PeerService>,
}

/// A service of another bridge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerService {
    /// The service's name.
    pub name: String,
    /// Its workers on that bridge.
    pub workers: Vec<PeerWorker>,
}

/// A worker connected to another bridge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerWorker {
    /// The id the worker gave in its hello.
    pub id: String,
    /// Calls it accepts at once.
    pub capacity: u32,
    /// Calls it holds now.
    pub in_flight: u32,
    /// It takes no new calls (draining, or waiting to resume).
    pub closed: bool,
}

/// One service: its workers, its load and its last minute.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service's name (`-` for calls that matched no route).
    pub name: String,
    /// Workers connected, draining ones included.
    pub workers: usize,
    /// Workers taking new calls.
    pub accepting: usize,
    /// Calls being handled.
    pub in_flight: u64,
    /// Calls waiting for a free worker.
    pub queued: usize,
    /// Calls answered since start.
    pub requests: u64,
    /// Of those, answered with a 5xx.
    pub errors: u64,
    /// Calls per second over the last minute.
    pub rps: f64,
    /// Median latency over the last minute, in milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency over the last minute, in milliseconds.
    pub p99_ms: Option<f64>,
}

/// One worker connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The id the worker gave in its hello.
    pub id: String,
    /// The session's tag: the first 8 hex digits of the SHA-256 of its id
    /// (kept across a resume). The id itself is shown to its worker only.
    pub session: String,
    /// Where its connection comes from.
    pub address: String,
    /// The services it serves.
    pub services: Vec<String>,
    /// When the session began, in seconds since the Unix epoch.
    pub connected_unix: u64,
    /// `ready`, `draining`, or `detached` (dropped, may resume).
    pub state: String,
    /// Calls it holds now.
    pub in_flight: u32,
    /// Calls it accepts at once.
    pub max_inflight: u32,
    /// Calls it answered.
    pub served: u64,
    /// Of those, answered with a 5xx.
    pub errors: u64,
    /// The last heartbeat round trip, in milliseconds.
    pub rtt_ms: Option<f64>,
}

/// The entry of service `name`, empty at first.
fn service<'a>(
    services: &'a mut BTreeMap<String, ServiceStatus>,
    name: &str,
) -> &'a mut ServiceStatus {
    services
        .entry(name.to_owned())
        .or_insert_with(|| ServiceStatus {
            name: name.to_owned(),
            workers: 0,
            accepting: 0,
            in_flight: 0,
            queued: 0,
            requests: 0,
            errors: 0,
            rps: 0.0,
            p50_ms: None,
            p99_ms: None,
        })
}

/// Reads the whole status off a running bridge.
pub(crate) fn collect(shared: &Shared) -> Status {
    let snapshot = shared.registry.snapshot();
    let metrics = &shared.metrics;
    let settings = shared.settings.load();

    // Every service that is configured, has workers, or has seen calls.
    let mut services: BTreeMap<String, ServiceStatus> = BTreeMap::new();
    let configured = settings.config.routes.iter().map(|r| &r.service);
    for name in configured.chain(settings.config.default_service.as_ref()) {
        service(&mut services, name);
    }
    for view in &snapshot.services {
        let s = service(&mut services, &view.name);
        s.workers = view.workers;
        s.accepting = view.accepting;
        s.queued = view.queued;
    }
    let millis = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    for (name, stats) in metrics.services() {
        let s = service(&mut services, &name);
        let recent = metrics.recent(&stats);
        s.in_flight = stats.active();
        s.requests = stats.calls();
        s.errors = stats.errors();
        s.rps = recent.rate;
        s.p50_ms = recent.p50.map(millis);
        s.p99_ms = recent.p99.map(millis);
    }
    let services: Vec<ServiceStatus> = services.into_values().collect();

    let workers = snapshot
        .workers
        .iter()
        .map(|w| {
            let stats = &w.session.stats;
            WorkerStatus {
                id: w.session.worker_id.clone(),
                session: w.session.tag.clone(),
                address: stats.peer().to_string(),
                services: w.services.to_vec(),
                connected_unix: stats
                    .since
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                state: if w.detached {
                    "detached"
                } else if w.draining {
                    "draining"
                } else {
                    "ready"
                }
                .to_owned(),
                in_flight: w.inflight,
                max_inflight: w.max_inflight,
                served: stats.served.load(Relaxed),
                errors: stats.errors.load(Relaxed),
                rtt_ms: stats.rtt().map(millis),
            }
        })
        .collect();

    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: metrics.uptime().as_secs_f64(),
        config_file: shared.config_file.get().map(|p| p.display().to_string()),
        reloads: shared.reloads.load(Relaxed),
        reload_failures: shared.reload_failures.load(Relaxed),
        in_flight: services.iter().map(|s| s.in_flight).sum(),
        pending: snapshot.workers.iter().map(|w| w.session.pending()).sum(),
        requests: services.iter().map(|s| s.requests).sum(),
        protocol_violations: shared.violations.load(Relaxed),
        worker_connects: metrics.worker_connects.load(Relaxed),
        worker_disconnects: metrics.worker_disconnects.load(Relaxed),
        services,
        workers,
        cluster: shared.cluster.get().map(|c| cluster(&c.view())),
    }
}

fn cluster(view: &crate::cluster::ClusterView) -> ClusterStatus {
    let now = tokio::time::Instant::now();
    let peers = view
        .peers
        .iter()
        .map(|(node, peer)| PeerStatus {
            node: node.clone(),
            seen_ms_ago: now.saturating_duration_since(peer.seen).as_millis() as u64,
            services: peer
                .beat
                .services
                .iter()
                .map(|s| PeerService {
                    name: s.name.clone(),
                    workers: s
                        .workers
                        .iter()
                        .map(|w| PeerWorker {
                            id: w.id.clone(),
                            capacity: w.capacity,
                            in_flight: w.in_flight,
                            closed: w.closed,
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    ClusterStatus {
        node: view.node.clone(),
        name: view.name.clone(),
        connected: view.connected,
        error: view.error.clone(),
        peers,
    }
}

impl Status {
    /// The status as `wsbridge status` prints it: a summary line, then a
    /// table of services and a table of workers. `now_unix` is the current
    /// time, for the workers' connection ages.
    pub fn table(&self, now_unix: u64) -> String {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}ms"));
        let mut out = format!(
            "wsbridge {}, up {}: {} calls in flight, {} answered, {} worker connects, {} protocol violations, {} reloads\n\n",
            self.version,
            age(self.uptime_s as u64),
            self.in_flight,
            self.requests,
            self.worker_connects,
            self.protocol_violations,
            self.reloads,
        );
        let mut services = vec![[
            "SERVICE",
            "WORKERS",
            "IN-FLIGHT",
            "QUEUE",
            "REQ/S",
            "P50",
            "P99",
            "CALLS",
            "5XX",
        ]
        .map(str::to_owned)
        .to_vec()];
        for s in &self.services {
            services.push(vec![
                printable(&s.name),
                format!("{}/{}", s.accepting, s.workers),
                s.in_flight.to_string(),
                s.queued.to_string(),
                format!("{:.1}", s.rps),
                ms(s.p50_ms),
                ms(s.p99_ms),
                s.requests.to_string(),
                s.errors.to_string(),
            ]);
        }
        out += &columns(&services);
        out.push('\n');
        if let Some(cluster) = &self.cluster {
            out += &cluster.table();
            out.push('\n');
        }
        if self.workers.is_empty() {
            out += "no workers connected\n";
            return out;
        }
        let mut workers = vec![[
            "WORKER",
            "ADDRESS",
            "SERVICES",
            "CONNECTED",
            "STATE",
            "IN-FLIGHT",
            "SERVED",
            "5XX",
            "RTT",
        ]
        .map(str::to_owned)
        .to_vec()];
        for w in &self.workers {
            workers.push(vec![
                printable(&w.id),
                w.address.clone(),
                printable(&w.services.join(",")),
                format!("{} ago", age(now_unix.saturating_sub(w.connected_unix))),
                w.state.clone(),
                format!("{}/{}", w.in_flight, w.max_inflight),
                w.served.to_string(),
                w.errors.to_string(),
                ms(w.rtt_ms),
            ]);
        }
        out += &columns(&workers);
        out
    }
}

/// Names chosen by workers, safe for a terminal: control characters (which
/// could carry escape sequences) become `?`.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `3d4h`, `2h5m`, `4m12s`, `9s`.
fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// Rows padded into left-aligned columns two spaces apart.
fn columns(rows: &[Vec<String>]) -> String {
    let mut widths = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) if *max < w => *max = w,
                Some(_) => {}
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            line += &format!("{cell:<width$}  ");
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

impl ClusterStatus {
    /// A line on the cluster, then a table of the other bridges' workers
    /// per service.
    fn table(&self) -> String {
        let state = match (self.connected, &self.error) {
            (true, _) => "connected".to_owned(),
            (false, None) => {
                "DEGRADED: NATS unreachable, serving this bridge's workers only".to_owned()
            }
            (false, Some(e)) => format!(
                "DEGRADED: NATS unreachable ({}), serving this bridge's workers only",
                printable(e)
            ),
        };
        let mut out = format!(
            "cluster {} as node {}: {state}, {} other bridge(s)\n",
            printable(&self.name),
            printable(&self.node),
            self.peers.len()
        );
        if self.peers.is_empty() {
            return out;
        }
        out.push('\n');
        let mut rows = vec![["NODE", "SERVICE", "WORKERS", "IN-FLIGHT", "SEEN"]
            .map(str::to_owned)
            .to_vec()];
        for peer in &self.peers {
            for s in &peer.services {
                let open = s.workers.iter().filter(|w| !w.closed).count();
                let in_flight: u64 = s.workers.iter().map(|w| u64::from(w.in_flight)).sum();
                let capacity: u64 = s.workers.iter().map(|w| u64::from(w.capacity)).sum();
                rows.push(vec![
                    printable(&peer.node),
                    printable(&s.name),
                    format!("{open}/{}", s.workers.len()),
                    format!("{in_flight}/{capacity}"),
                    format!("{:.1}s ago", peer.seen_ms_ago as f64 / 1e3),
                ]);
            }
        }
        out += &columns(&rows);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_cannot_send_escape_sequences() {
        assert_eq!(printable("w\u{1b}[2Jx"), "w?[2Jx");
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(9), "9s");
        assert_eq!(age(252), "4m12s");
        assert_eq!(age(7500), "2h05m");
        assert_eq!(age(3 * 86_400 + 4 * 3600), "3d4h");
    }

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["A".to_owned(), "B".to_owned()],
            vec!["long".to_owned(), "x".to_owned()],
        ];
        assert_eq!(columns(&rows), "A     B\nlong  x\n");
    }
}
