//! Sessions whose connection dropped, kept for `resume_window` so that a
//! resumable worker can come back and deliver the replies it finished
//! meanwhile (PROTOCOL.md 8.5). A session that is not resumed in time is
//! closed: its calls fail (or are retried) as for any lost worker.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;
use tracing::info;

use super::{registry::Registry, session::Session};

/// How long a resume waits for the connection it replaces to let go.
const SUPERSEDE_WAIT: Duration = Duration::from_secs(2);

/// A detached session, its (suspended) registry key, and the timer that
/// ends it.
type Held = (Arc<Session>, u64, AbortOnDropHandle<()>);

/// A session taken for a resume and its registry key; or why not: `None`,
/// no such session; `Some(tag)`, it belongs to another worker.
pub(crate) type Taken = Result<(Arc<Session>, u64), Option<String>>;

/// Detached sessions by session id.
#[derive(Default)]
pub(crate) struct Detached {
    sessions: Mutex<HashMap<String, Held>>,
    /// Woken whenever a session is detached.
    held: Notify,
}

impl Detached {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `session` (suspended in the registry under `key`) for
    /// `window`, then unregisters and closes it with `cause` unless it was
    /// taken back by then.
    pub(crate) fn hold(
        self: &Arc<Self>,
        session: Arc<Session>,
        key: u64,
        registry: Arc<Registry>,
        window: Duration,
        cause: &str,
    ) {
        session.hold_for_resume(cause);
        let id = session.session_id.clone();
        let expire = {
            let (detached, id, cause) = (self.clone(), id.clone(), cause.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                // Removing the entry drops this task's own abort handle;
                // the abort only takes effect at the next await, and there
                // is none after this.
                let taken = detached.lock().remove(&id);
                if let Some((session, key, _timer)) = taken {
                    info!(worker = %session.worker_id, session = %session.tag, ?window, "worker did not resume in time");
                    registry.unregister(key);
                    session.close(&format!("{cause}; not resumed within {window:?}"));
                }
            })
        };
        info!(worker = %session.worker_id, session = %session.tag, %cause, ?window, "worker connection lost; keeping its calls for a resume");
        self.lock()
            .insert(id, (session, key, AbortOnDropHandle::new(expire)));
        self.held.notify_waiters();
    }

    /// The session `id` and its registry key, if it is waiting for its
    /// worker and `owned` says the asker may have it; its timer stops.
    fn take(&self, id: &str, owned: impl Fn(&Session) -> bool) -> Taken {
        let mut sessions = self.lock();
        match sessions.get(id) {
            None => return Err(None),
            Some((session, ..)) if !owned(session) => return Err(Some(session.tag.clone())),
            Some(_) => {}
        }
        sessions
            .remove(id)
            .map(|(session, key, _timer)| (session, key))
            .ok_or(None)
    }

    /// The session `id` for a worker that resumes it, if `owned` says the
    /// worker is the one that opened it (PROTOCOL.md 8.5). If its old
    /// connection still looks alive here (the worker noticed the dead link
    /// first), that connection is ended as dropped and the session taken
    /// once detached. A session that belongs to someone else is left alone,
    /// live or detached: the error then carries its tag, for the log.
    pub(crate) async fn take_for_resume(
        &self,
        id: &str,
        registry: &Registry,
        owned: impl Fn(&Session) -> bool,
    ) -> Taken {
        match self.take(id, &owned) {
            Err(None) => {}
            done => return done,
        }
        let live = registry
            .sessions()
            .into_iter()
            .find(|s| s.session_id == id)
            .ok_or(None)?;
        if !owned(&live) {
            return Err(Some(live.tag.clone()));
        }
        let detached = self.held.notified();
        tokio::pin!(detached);
        detached.as_mut().enable();
        live.supersede();
        let wait = async {
            loop {
                if let Ok(taken) = self.take(id, &owned) {
                    return taken;
                }
                detached.as_mut().await;
                detached.set(self.held.notified());
                detached.as_mut().enable();
            }
        };
        tokio::time::timeout(SUPERSEDE_WAIT, wait)
            .await
            .map_err(|_| None)
    }

    /// Closes every waiting session (the bridge is shutting down).
    pub(crate) fn close_all(&self, cause: &str, registry: &Registry) {
        let all: Vec<_> = self.lock().drain().collect();
        for (_, (session, key, _timer)) in all {
            registry.unregister(key);
            session.close(cause);
        }
    }
}
