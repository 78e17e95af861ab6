//! Asynchronous calls ("jobs"): a call sent with `Prefer: respond-async` is
//! stored durably before the caller gets `202 Accepted`, run like any call,
//! and its result kept for `jobs.retention`. This module owns what a job is
//! ([`record`]), where it is kept on one bridge ([`store`], an embedded
//! redb database with group commit) and how a callback is signed
//! ([`sign`]). The HTTP side and the runner live in `bridge/jobs.rs` and
//! `bridge/job_run.rs`.

pub(crate) mod record;
pub(crate) mod sign;
pub(crate) mod store;

pub(crate) use record::{JobError, Outcome, Record, State};
pub(crate) use store::{ResultBody, Store, StoreError};

/// Milliseconds since the Unix epoch, the clock of job records (they
/// outlive the process, so `Instant`s cannot be stored).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A new job id: 128 random bits from the OS's generator, as 32 hex digits.
pub(crate) fn new_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Io(format!("no randomness: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
