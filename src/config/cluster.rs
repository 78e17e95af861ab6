//! `[cluster]`: several bridges sharing their workers through NATS. Without
//! the section a bridge is a single node and needs no NATS at all.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{invalid, ConfigError, Secret};

/// `[cluster]`: the NATS servers to dial, who this bridge is, and the
/// credentials NATS wants.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:4222`, `tls://host:4222`); any of the
    /// NATS cluster's servers will do, the client learns the others.
    pub nats: Vec<String>,
    /// This bridge's name, unique in the cluster. Default: the host name
    /// and a short random suffix (so a restarted bridge is a new node).
    #[serde(default = "default_node")]
    pub node: String,
    /// The cluster's name: the first token of every subject, so that two
    /// clusters can share one NATS.
    #[serde(default = "default_name")]
    pub name: String,
    /// NATS token authentication.
    #[serde(default)]
    pub token: Option<Secret>,
    /// NATS user (with `password`).
    #[serde(default)]
    pub user: Option<String>,
    /// NATS password (with `user`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// A NATS `.creds` file (user JWT and NKey seed).
    #[serde(default)]
    pub creds: Option<PathBuf>,
    /// PEM CA bundle to verify the NATS servers with; setting it requires TLS.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// How often this bridge announces its workers (it also does at once on
    /// every change); peers drop a node after three missed announcements.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
}

fn default_name() -> String {
    "wsbridge".to_owned()
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(2)
}

/// The host name (sanitised to a subject token) and 4 random hex digits,
/// chosen once per process, so that a reload reads the same default.
fn default_node() -> String {
    static NODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NODE.get_or_init(host_node).clone()
}

fn host_node() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let mut host: String = host
        .trim()
        .chars()
        .map(|c| if token_char(c) { c } else { '-' })
        .take(48)
        .collect();
    if host.is_empty() {
        host.push_str("bridge");
    }
    // The low bits of a v7 UUID are random.
    let suffix = uuid::Uuid::now_v7().as_u128() as u16;
    format!("{host}-{suffix:04x}")
}

/// Characters a node or cluster name may hold: they become NATS subject
/// tokens, where `.`, `*`, `>` and white space have meanings.
fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// A name that is one safe subject token of 1 to 64 characters.
fn check_token(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > 64 || !value.chars().all(token_char) {
        return Err(invalid(
            key,
            "must be 1 to 64 characters of letters, digits, '-' and '_'",
        ));
    }
    Ok(())
}

impl ClusterConfig {
    /// Checks what the types cannot.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.nats.is_empty() {
            return Err(invalid("cluster.nats", "must list at least one server URL"));
        }
        for url in &self.nats {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| invalid("cluster.nats", format!("has {url:?}: {e}")))?;
        }
        check_token("cluster.node", &self.node)?;
        check_token("cluster.name", &self.name)?;
        let methods = [
            self.token.is_some(),
            self.user.is_some() || self.password.is_some(),
            self.creds.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(invalid(
                "cluster",
                "takes one of `token`, `user`/`password` or `creds`, not several",
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(invalid(
                "cluster.user",
                "and `cluster.password` go together",
            ));
        }
        if self.heartbeat < Duration::from_millis(100) || self.heartbeat > Duration::from_secs(60) {
            return Err(invalid("cluster.heartbeat", "must be 100ms to 60s"));
        }
        Ok(())
    }
}
