//! Resume state: what outlives one connection of a
//! [`Worker`](super::Worker) (the queue to the bridge, the calls still
//! running, the replies recently written), so that a resumed connection
//! delivers their replies and a resume's hello can say what ran
//! (PROTOCOL 8.5).

use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    body::BodyError,
    protocol::Resume,
    transport::{self, Inbox, OutFrame, Outbox},
};

use super::{
    call::{abandon, lock, Calls, Partials, Starts},
    replied::Replied,
};

/// What outlives one connection of a [`Worker`](super::Worker): the queue to the bridge
/// and the calls still running, so that a resumed connection delivers
/// their replies.
pub(super) struct Carry {
    pub(super) outbox: Outbox,
    pub(super) inbox: Arc<tokio::sync::Mutex<Inbox>>,
    pub(super) calls: Calls,
    pub(super) partial: Partials,
    pub(super) starts: Starts,
    pub(super) replied: Arc<Mutex<Replied>>,
    /// The session to resume after a drop, if the bridge keeps sessions.
    pub(super) session: Option<String>,
    /// How long the bridge keeps the session after a drop (the welcome's).
    pub(super) resume_window: Duration,
    /// When the current connection's welcome arrived.
    pub(super) connected_at: Option<Instant>,
    /// The bridge ended the current connection with a close frame (it is
    /// not a drop: no immediate redial).
    pub(super) closed_by_bridge: bool,
}

impl Carry {
    pub(super) fn new() -> Carry {
        let (outbox, inbox) = transport::outbox();
        Carry {
            outbox,
            inbox: Arc::new(tokio::sync::Mutex::new(inbox)),
            calls: Arc::default(),
            partial: Arc::default(),
            starts: Arc::default(),
            replied: Arc::default(),
            session: None,
            resume_window: Duration::ZERO,
            connected_at: None,
            closed_by_bridge: false,
        }
    }

    /// The hello's `resume`, after a dropped connection of a resumable session.
    pub(super) fn resume(&self) -> Option<Resume> {
        let session_id = self.session.clone()?;
        Some(Resume {
            session_id,
            running: lock(&self.calls).keys().copied().collect(),
            replied: lock(&self.replied).iter().map(|(id, _)| *id).collect(),
        })
    }

    /// After a resume: the replies the bridge never got go out again; the
    /// rest are known to have arrived.
    pub(super) fn resend(&self, ids: &[u64]) {
        let mut replied = lock(&self.replied);
        for (id, frame) in replied.iter() {
            if ids.contains(id) {
                self.outbox.control(OutFrame::Binary(frame.clone()));
            }
        }
        replied.clear();
    }

    /// The connection dropped: calls with a body on the move cannot be
    /// resumed (the bridge fails them), so they stop here too.
    pub(super) fn drop_streams(&self) {
        let uploading: Vec<u64> = lock(&self.partial).keys().copied().collect();
        let streaming: Vec<u64> = lock(&self.calls)
            .iter()
            .filter(|(_, c)| c.streaming.load(Ordering::Relaxed))
            .map(|(id, _)| *id)
            .collect();
        for id in uploading.into_iter().chain(streaming) {
            abandon(&self.calls, &self.partial, id, "connection lost mid-body");
        }
    }

    /// Every call stops and everything queued for the bridge is dropped.
    pub(super) fn abandon_all(&mut self) {
        for (_, body) in lock(&self.partial).drain() {
            body.abort(BodyError::new("connection to the bridge lost"));
        }
        for (_, entry) in lock(&self.calls).drain() {
            entry.abort.abort();
        }
        lock(&self.starts).clear();
        if let Ok(mut inbox) = self.inbox.try_lock() {
            inbox.clear();
        }
        lock(&self.replied).clear();
        self.session = None;
    }
}

impl Drop for Carry {
    fn drop(&mut self) {
        self.abandon_all();
    }
}
