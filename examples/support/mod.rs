//! Helpers shared by the benchmark examples (`delay_worker`, `many_workers`,
//! `hold_load`); not an example itself. Each example includes it with
//! `#[path = "support/mod.rs"] mod support;` and uses what it needs.

#![allow(dead_code)]

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wsbridge::worker::{Status, Worker};

/// Errors the examples report and exit on.
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs worker connection `i` until `shutdown`, keeping `up` equal to the
/// number of connections currently welcomed (a reconnect counts again once
/// it is welcomed), so a caller can wait for all of them as an event.
pub(crate) fn spawn_counted(
    worker: Worker,
    i: u32,
    up: Arc<watch::Sender<u32>>,
    shutdown: CancellationToken,
) {
    let mut status = worker.subscribe();
    tokio::spawn(async move {
        let mut was_up = false;
        loop {
            let now = matches!(*status.borrow_and_update(), Status::Connected { .. });
            if now != was_up {
                was_up = now;
                up.send_modify(|n| *n = if now { *n + 1 } else { n.saturating_sub(1) });
            }
            if status.changed().await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        if let Err(e) = worker.run(shutdown).await {
            eprintln!("worker {i}: {e}");
        }
    });
}

/// `VmRSS` of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<usize, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status").into())
}
