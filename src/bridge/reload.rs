//! Hot reload: re-read the config file (SIGHUP, `POST /reload`,
//! `wsbridge reload`) and swap in new settings without dropping anything.
//!
//! Routes, tokens, limits and timeouts, and the worker listener's TLS
//! certificate and key take effect for every call and worker connection
//! that starts after the swap; those already running keep the settings they
//! started with. What is bound to a socket or sized at start (the listen
//! addresses, `workers.tls`, `http.max_connections`, the idempotency store,
//! `jobs.dir` and `jobs.max_bytes`, `[admin]`) keeps its old value, and the reload says so. A file that does
//! not parse or validate, or a certificate that does not load, changes
//! nothing.

use std::sync::{atomic::Ordering, Arc};

use serde::Serialize;
use tracing::{info, warn};

use super::{server_tls, Settings, Shared};
use crate::{
    config::{Config, ConfigError},
    tls::TlsError,
};

/// What a successful reload did.
#[derive(Debug, Clone, Serialize)]
pub struct Reloaded {
    /// The sections or keys whose values changed.
    pub changed: Vec<String>,
    /// Keys that changed in the file but need a restart; their old values
    /// stay in force.
    pub needs_restart: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The bridge was started without a config file.
    #[error("this bridge was not started from a config file; there is nothing to reload")]
    NoFile,
    /// The new file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new certificate or key does not load.
    #[error("the new TLS settings do not load: {0}")]
    Tls(#[from] TlsError),
}

impl ReloadError {
    /// A stable code for the admin API's JSON.
    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::NoFile => "no_config_file",
            ReloadError::Config(_) => "invalid_config",
            ReloadError::Tls(_) => "invalid_tls",
        }
    }
}

/// Re-reads the config file and swaps it in; see the module doc. Blocking
/// (file reads, certificate parsing): call it off the async workers.
pub(crate) fn reload(shared: &Shared) -> Result<Reloaded, ReloadError> {
    let outcome = try_reload(shared);
    match &outcome {
        Ok(r) => info!(changed = ?r.changed, needs_restart = ?r.needs_restart, "config reloaded"),
        Err(e) => {
            shared.reload_failures.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "config reload rejected; the running config stays")
        }
    }
    outcome
}

fn try_reload(shared: &Shared) -> Result<Reloaded, ReloadError> {
    let path = shared.config_file.get().ok_or(ReloadError::NoFile)?;
    // One reload at a time, held from the read to the swap: otherwise an
    // older read could be swapped in after a newer one.
    let _serial = shared.reloading.lock().unwrap_or_else(|p| p.into_inner());
    let mut new = Config::from_file(path)?;
    let old = shared.settings.load_full();
    let old = &old.config;

    let mut needs_restart = Vec::new();
    macro_rules! keep {
        ($($field:ident).+) => {
            if new.$($field).+ != old.$($field).+ {
                needs_restart.push(stringify!($($field).+).replace(' ', ""));
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!(http.listen);
    keep!(http.max_connections);
    keep!(http.idempotency_ttl);
    keep!(http.idempotency_capacity);
    keep!(workers.listen);
    if new.workers.tls != old.workers.tls {
        // Turning TLS on or off needs a restart. Everything TLS-related is
        // kept with it, so a file that drops TLS (and its certificate
        // lines) can never make new worker connections plain ws.
        needs_restart.push("workers.tls".to_owned());
        let w = &mut new.workers;
        w.tls = old.workers.tls;
        w.tls_cert.clone_from(&old.workers.tls_cert);
        w.tls_key.clone_from(&old.workers.tls_key);
        w.client_ca.clone_from(&old.workers.client_ca);
        w.auto_self_signed = old.workers.auto_self_signed;
    }
    keep!(cluster);
    keep!(jobs.dir);
    keep!(jobs.max_bytes);
    keep!(jobs.jetstream);
    keep!(jobs.replicas);
    keep!(jobs.concurrency);
    if format!("{:?}", new.admin) != format!("{:?}", old.admin) {
        needs_restart.push("admin".to_owned());
        new.admin = old.admin.clone();
    }
    // What was put back must still make a valid whole (with TLS on, the
    // certificate and key are required, so `server_tls` cannot return None).
    new.validate()?;
    let tls = server_tls(&new.workers)?;

    let mut changed = Vec::new();
    let mut differs = |key: &str, a: String, b: String| {
        if a != b {
            changed.push(key.to_owned());
        }
    };
    differs(
        "default_service",
        format!("{:?}", new.default_service),
        format!("{:?}", old.default_service),
    );
    differs(
        "shutdown_timeout",
        format!("{:?}", new.shutdown_timeout),
        format!("{:?}", old.shutdown_timeout),
    );
    differs("http", format!("{:?}", new.http), format!("{:?}", old.http));
    differs("jobs", format!("{:?}", new.jobs), format!("{:?}", old.jobs));
    differs(
        "routes",
        format!("{:?}", new.routes),
        format!("{:?}", old.routes),
    );
    // Debug masks tokens, so they are compared on their own.
    let secrets = |c: &Config| {
        c.workers
            .tokens
            .iter()
            .map(|t| {
                (
                    t.secret().expose().to_owned(),
                    t.services().map(<[_]>::to_vec),
                )
            })
            .collect::<Vec<_>>()
    };
    differs(
        "workers",
        format!("{:?}", new.workers),
        format!("{:?}", old.workers),
    );
    if secrets(&new) != secrets(old) {
        changed.push("workers.tokens".to_owned());
    }
    if new.workers.tls {
        // The files are read again whether or not their paths changed.
        changed.push("workers.tls_cert (re-read)".to_owned());
    }

    shared.settings.store(Arc::new(Settings::new(new, tls)));
    shared.reloads.fetch_add(1, Ordering::Relaxed);
    Ok(Reloaded {
        changed,
        needs_restart,
    })
}
