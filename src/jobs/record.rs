//! What the bridge keeps of one job: the request to run, where it stands,
//! and how it ended. Stored as JSON (one row per job); every field added
//! later has a default, so that an older store stays readable.

use serde::{Deserialize, Serialize};

/// Where a job stands. `queued` and `running` are live; the rest are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum State {
    /// Waiting for a worker.
    Queued,
    /// Sent to a worker.
    Running,
    /// The worker replied (any status: the reply is the result).
    Succeeded,
    /// The bridge could not get a reply (worker lost, timeout, ...).
    Failed,
    /// Cancelled by `DELETE` before it ended.
    Cancelled,
    /// No worker took it within `jobs.queue_timeout`.
    Expired,
}

impl State {
    /// Whether the job has ended.
    pub(crate) fn finished(self) -> bool {
        !matches!(self, State::Queued | State::Running)
    }

    /// The name the API uses.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::Expired => "expired",
        }
    }
}

/// A header line; a value that is not UTF-8 is kept as Latin-1 (one
/// character per byte), flagged, as on the wire (PROTOCOL 5.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Header {
    pub(crate) name: String,
    pub(crate) value: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) latin1: bool,
}

impl Header {
    /// Keeps `value` exactly.
    pub(crate) fn new(name: &str, value: &[u8]) -> Header {
        match std::str::from_utf8(value) {
            Ok(text) => Header {
                name: name.to_owned(),
                value: text.to_owned(),
                latin1: false,
            },
            Err(_) => Header {
                name: name.to_owned(),
                value: value.iter().map(|&b| char::from(b)).collect(),
                latin1: true,
            },
        }
    }

    /// The value's bytes as they came.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        if self.latin1 {
            self.value.chars().map(|c| c as u32 as u8).collect()
        } else {
            self.value.as_bytes().to_vec()
        }
    }

    /// A header map of `lines` (lines that are not valid headers are
    /// skipped: they were valid when stored).
    pub(crate) fn map(lines: &[Header]) -> http::HeaderMap {
        let mut map = http::HeaderMap::with_capacity(lines.len());
        for h in lines {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(h.name.as_bytes()),
                http::HeaderValue::from_bytes(&h.bytes()),
            ) {
                map.append(name, value);
            }
        }
        map
    }

    /// The lines of a header map.
    pub(crate) fn lines(map: &http::HeaderMap) -> Vec<Header> {
        map.iter()
            .map(|(n, v)| Header::new(n.as_str(), v.as_bytes()))
            .collect()
    }
}

/// The worker's reply to a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Outcome {
    pub(crate) status: u16,
    pub(crate) headers: Vec<Header>,
    /// The body's length in bytes.
    pub(crate) len: u64,
    /// The body is in a file of its own rather than in the database.
    #[serde(default)]
    pub(crate) spooled: bool,
}

/// Why a job has no reply: the error a synchronous call would have got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JobError {
    pub(crate) status: u16,
    pub(crate) code: String,
    pub(crate) message: String,
}

/// One job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) id: String,
    pub(crate) state: State,
    /// The request id of the call that submitted it; every attempt uses it.
    pub(crate) request_id: String,
    /// The submitter's address, passed on in `X-Forwarded-For`.
    #[serde(default)]
    pub(crate) caller: String,
    pub(crate) service: String,
    pub(crate) method: String,
    /// Path and query, as the caller sent them.
    pub(crate) path: String,
    pub(crate) headers: Vec<Header>,
    /// The one worker it is for (`Wsbridge-Worker`), waited for if absent.
    #[serde(default)]
    pub(crate) worker: Option<String>,
    /// Running it again cannot do anything twice (an idempotent method or
    /// an `Idempotency-Key`): a restart may run it again.
    pub(crate) replayable: bool,
    /// Where to POST the result (`Wsbridge-Callback`).
    #[serde(default)]
    pub(crate) callback: Option<String>,
    /// The caller's `Idempotency-Key`, scoped by its credentials.
    #[serde(default)]
    pub(crate) key: Option<String>,
    /// Hex SHA-256 of method, path and body: what the key is bound to.
    #[serde(default)]
    pub(crate) fingerprint: Option<String>,
    pub(crate) body_len: u64,
    /// The request body is in a file of its own.
    #[serde(default)]
    pub(crate) body_spooled: bool,
    pub(crate) created_ms: u64,
    /// A job no worker took by then expires.
    pub(crate) queue_deadline_ms: u64,
    #[serde(default)]
    pub(crate) started_ms: Option<u64>,
    #[serde(default)]
    pub(crate) finished_ms: Option<u64>,
    /// Workers it was sent to.
    #[serde(default)]
    pub(crate) attempts: u32,
    /// The worker that ran it, and its bridge.
    #[serde(default)]
    pub(crate) ran_by: Option<String>,
    #[serde(default)]
    pub(crate) node: Option<String>,
    #[serde(default)]
    pub(crate) outcome: Option<Outcome>,
    #[serde(default)]
    pub(crate) error: Option<JobError>,
    /// In a cluster: the bridge that holds the job now, and until when
    /// (ms) its hold lasts unless renewed.
    #[serde(default)]
    pub(crate) owner: Option<String>,
    #[serde(default)]
    pub(crate) lease_ms: u64,
    /// The callback got a 2xx.
    #[serde(default)]
    pub(crate) callback_delivered: bool,
    #[serde(default)]
    pub(crate) callback_attempts: u32,
}

impl Record {
    /// The bytes this job holds in the store, as counted against
    /// `jobs.max_bytes`: a fixed charge for the row, plus the request body
    /// while the job is live, plus the result once it has one.
    pub(crate) fn charge(&self) -> u64 {
        const ROW: u64 = 1024;
        let result = self.outcome.as_ref().map_or(0, |o| o.len);
        let body = if self.state.finished() {
            0
        } else {
            self.body_len
        };
        ROW + body + result
    }

    /// When the job may be forgotten: `retention` after it finished.
    pub(crate) fn purge_at(&self, retention_ms: u64) -> Option<u64> {
        self.finished_ms.map(|f| f.saturating_add(retention_ms))
    }
}
