//! `wsbridge demo`: the bridge on the example config plus an in-process echo
//! worker connected over real wss on loopback, with a certificate generated
//! in memory. The only thing written to disk is the job store, in a
//! temporary directory removed when the demo stops.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::{
    bridge::{self, Listeners},
    config::Config,
    tls::SelfSigned,
    worker::{self, Worker, WorkerConfig},
};

/// The example configuration, compiled in.
pub const EXAMPLE_CONFIG: &str = include_str!("../config/wsbridge.toml");

/// The ports a demo listens on; `None` keeps the example config's (8080,
/// 8443, 9090), 0 picks a free one (the printed lines show which).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ports {
    /// Callers' HTTP port.
    pub http: Option<u16>,
    /// The worker listener's port (bound to loopback in the demo).
    pub workers: Option<u16>,
    /// The admin listener's port (metrics, status, dashboard).
    pub admin: Option<u16>,
}

/// Runs the demo until `shutdown`.
pub async fn run(ports: Ports, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Ports {
        http: http_port,
        workers: workers_port,
        admin: admin_port,
    } = ports;
    let mut config = Config::parse(EXAMPLE_CONFIG).context("the embedded example config")?;
    if let Some(port) = http_port {
        config.http.listen.set_port(port);
    }
    // The demo's worker is in-process: keep its listener private.
    let port = workers_port.unwrap_or(config.workers.listen.port());
    config.workers.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    if let Some(port) = admin_port {
        config.admin.listen.set_port(port);
    }
    // Jobs (`Prefer: respond-async`) need a store: a temporary one.
    let jobs_dir =
        JobsDir(std::env::temp_dir().join(format!("wsbridge-demo-jobs-{}", std::process::id())));
    config.jobs.dir = Some(jobs_dir.0.clone());
    let cert = SelfSigned::generate(&["localhost".into(), "127.0.0.1".into()])?;
    let listeners = Listeners::bind(&config)
        .context("binding the demo's ports (is another wsbridge running?)")?;
    let http_addr = listeners.http.local_addr()?;
    let workers_addr = listeners.workers.local_addr()?;
    let admin_addr = match &listeners.admin {
        Some(admin) => Some(admin.local_addr()?),
        None => None,
    };

    let mut services: Vec<String> = config.routes.iter().map(|r| r.service.clone()).collect();
    services.extend(config.default_service.clone());
    let token = config
        .workers
        .tokens
        .first()
        .map(|t| t.secret().expose().to_owned())
        .unwrap_or_default();
    let mut wcfg = WorkerConfig::new(
        format!("wss://localhost:{}", workers_addr.port()),
        token,
        services.clone(),
    );
    wcfg.worker_id = "demo-echo".into();
    wcfg.tls = Some(cert.client_config()?);
    let echo = Worker::new(wcfg, worker::echo_as("demo-echo"));
    let mut status = echo.subscribe();

    let bridge = tokio::spawn(bridge::run(
        config,
        listeners,
        Some(cert.server_config()?),
        shutdown.clone(),
    ));
    let worker = tokio::spawn(echo.run(shutdown.clone()));
    tokio::select! {
        _ = shutdown.cancelled() => {}
        ready = status.wait_for(|s| matches!(s, worker::Status::Connected { .. })) => {
            ready.context("the echo worker stopped")?;
            let text = format!(
                "\nwsbridge demo is running\n  \
                 callers: http://{http_addr}\n  \
                 workers: wss://{workers_addr} (self-signed certificate, in memory)\n  \
                 an echo worker is connected for services: {}\n\n\
                 Try:\n  \
                 curl -s -d hi http://{http_addr}/x\n  \
                 curl -si 'http://{http_addr}/orders/42?q=1'\n  \
                 curl -s --http2-prior-knowledge -d hi http://{http_addr}/x\n  \
                 curl -s -H 'Wsbridge-Worker: demo-echo' -d 'just you' http://{http_addr}/x\n  \
                 curl -s -H 'Wsbridge-Fanout: all' -d 'everyone' http://{http_addr}/x\n  \
                 curl -s http://{http_addr}/_wsbridge/workers\n  \
                 curl -si -H 'Prefer: respond-async' -d later http://{http_addr}/x\n  \
                 curl -s 'http://{http_addr}/_wsbridge/jobs/<id>/result?wait=10'   (<id>: from the Location above)\n{}\n\
                 Press Ctrl-C to stop.",
                services.join(", "),
                admin_addr.map_or_else(String::new, |a| format!(
                    "\nWatch it:\n  dashboard: http://{a}/\n  \
                     wsbridge status --admin http://{a}\n  \
                     curl -s http://{a}/metrics\n"
                )),
            );
            // Written whole and errors ignored: `println!` writes line by line
            // and panics when stdout has been closed (a reader that took the
            // curl line and left).
            let mut out = std::io::stdout().lock();
            let _ = std::io::Write::write_all(&mut out, format!("{text}\n").as_bytes());
            let _ = std::io::Write::flush(&mut out);
        }
    }
    bridge.await.context("bridge task")??;
    worker.await.context("worker task")??;
    drop(jobs_dir);
    Ok(())
}

/// The demo's job store, removed when the demo ends.
struct JobsDir(std::path::PathBuf);

impl Drop for JobsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
