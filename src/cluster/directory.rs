//! Presence asked live: a bridge puts a [`Query`] to every bridge at once
//! on `<name>.presence.list` with a reply inbox, and gathers their
//! [`Listing`]s until every known peer has answered or the bound passes.
//! A peer that is late is named as missing, so the answer is partial but
//! never slow. Announcements ([`super::presence`]) say where calls may go;
//! this says, as of now, who is connected.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    presence::{Listed, Listing, Query},
    Cluster,
};

/// Largest query accepted from a peer: a service name and a few pairs.
const MAX_QUERY: usize = 16 * 1024;

/// Lists this bridge's own workers for a query (the bridge's registry).
pub(crate) type Lister = Arc<dyn Fn(&Query) -> Vec<Listed> + Send + Sync>;

/// What the peers answered.
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    /// One per peer that answered in time.
    pub(crate) listings: Vec<Listing>,
    /// Known peers that did not answer in time.
    pub(crate) missing: Vec<String>,
}

impl Cluster {
    /// Asks every peer which of its workers `query` is about, waiting at
    /// most `within` for the slowest.
    pub(crate) async fn list(&self, query: &Query, within: Duration) -> Gathered {
        let mut expected: Vec<String> = self.peers().list().into_iter().map(|(n, _)| n).collect();
        if expected.is_empty() || !self.is_connected() {
            return Gathered {
                listings: Vec::new(),
                missing: expected,
            };
        }
        let inbox = self.client.new_inbox();
        let Ok(mut answers) = self.client.subscribe(inbox.clone()).await else {
            return Gathered {
                listings: Vec::new(),
                missing: expected,
            };
        };
        let mut query = query.clone();
        query.from = self.node.clone();
        let payload = Bytes::from(serde_json::to_vec(&query).unwrap_or_default());
        let asked = self
            .client
            .publish_with_reply(self.subject("presence.list"), inbox, payload)
            .await;
        let mut gathered = Gathered::default();
        if asked.is_ok() {
            let by = Instant::now() + within;
            while !expected.is_empty() {
                let Ok(Some(message)) = tokio::time::timeout_at(by, answers.next()).await else {
                    break;
                };
                let Ok(listing) = serde_json::from_slice::<Listing>(&message.payload) else {
                    warn!("a peer's presence listing is unreadable; ignored");
                    continue;
                };
                // Only the peers asked, each once: what peers can make this
                // bridge hold is one message from each known peer (at most
                // MAX_PEERS). A node that joined meanwhile is listed next time.
                let before = expected.len();
                expected.retain(|n| *n != listing.node);
                if expected.len() < before {
                    gathered.listings.push(listing);
                }
            }
        }
        let _ = answers.unsubscribe().await;
        gathered.missing = expected;
        gathered
    }

    /// Answers the peers' presence queries with this bridge's workers.
    pub(super) async fn answer_lists(
        self: Arc<Self>,
        mut queries: async_nats::Subscriber,
        lister: Lister,
        shutdown: CancellationToken,
    ) {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = queries.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let Some(reply) = message.reply else { continue };
            if message.payload.len() > MAX_QUERY {
                warn!(
                    bytes = message.payload.len(),
                    "presence query too large; ignored"
                );
                continue;
            }
            let Ok(query) = serde_json::from_slice::<Query>(&message.payload) else {
                warn!("presence query unreadable; ignored");
                continue;
            };
            if query.from == self.node {
                continue;
            }
            let payload = self.fitted(Listing {
                node: self.node.clone(),
                workers: lister(&query),
                truncated: false,
            });
            if let Err(e) = self.client.publish(reply, payload).await {
                debug!(error = %e, "presence answer not sent");
            }
        }
    }

    /// `listing` encoded within the largest message NATS takes, with
    /// workers left out (and `truncated` said) if it must be cut.
    fn fitted(&self, mut listing: Listing) -> Bytes {
        let room = self.max_payload().saturating_sub(1024);
        loop {
            let encoded = serde_json::to_vec(&listing).unwrap_or_default();
            if encoded.len() <= room || listing.workers.is_empty() {
                return Bytes::from(encoded);
            }
            // Cut in proportion, and a little more, so this ends quickly.
            let keep = listing.workers.len() * room / encoded.len() * 9 / 10;
            listing.workers.truncate(keep);
            listing.truncated = true;
        }
    }
}
