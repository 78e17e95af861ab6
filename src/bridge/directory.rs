//! Presence for callers: `GET /_wsbridge/workers?service=S&meta.K=V` on
//! the caller and the admin listener lists the workers connected to this
//! bridge and, in a cluster, to every other (asked live over NATS, see
//! `cluster/directory.rs`): `{"complete", "nodes_missing", "workers"}`.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use super::{registry::Registry, Shared};
use crate::{
    cluster::presence::{Listed, Query},
    error::CallError,
    protocol::{self, MAX_METADATA_KEYS},
};

/// The path.
pub(crate) const PATH: &str = "/_wsbridge/workers";

/// How long the peers have to answer; a later one is named in
/// `nodes_missing`, and the answer is partial rather than slow.
const PEERS_WITHIN: Duration = Duration::from_millis(500);

/// The node name a bridge without a cluster shows.
pub(crate) const LOCAL_NODE: &str = "local";

/// The answer.
#[derive(Serialize)]
struct Document {
    /// Every node answered, each in full.
    complete: bool,
    /// Peers that did not answer in time.
    nodes_missing: Vec<String>,
    workers: Vec<Listed>,
}

/// Reads `service=S` and `meta.K=V` pairs from a query string.
pub(crate) fn parse(query: Option<&str>) -> Result<Query, CallError> {
    let bad = |reason: String| CallError::BadRequest { reason };
    let mut q = Query::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if value.len() > protocol::MAX_METADATA_VALUE {
            return Err(bad(format!(
                "{key:?}: values are at most {} bytes",
                protocol::MAX_METADATA_VALUE
            )));
        }
        if key == "service" {
            q.service = Some(value.into_owned());
        } else if let Some(k) = key.strip_prefix("meta.") {
            if !protocol::metadata_key(k) {
                return Err(bad(format!("{key:?} is not a metadata key")));
            }
            if q.meta.len() == MAX_METADATA_KEYS {
                return Err(bad(format!("at most {MAX_METADATA_KEYS} meta.* filters")));
            }
            q.meta.push((k.to_owned(), value.into_owned()));
        } else {
            return Err(bad(format!(
                "unknown parameter {key:?}: use service=NAME and meta.KEY=VALUE"
            )));
        }
    }
    Ok(q)
}

/// The node name this bridge lists its workers under.
pub(crate) fn node(shared: &Shared) -> &str {
    shared.cluster.get().map_or(LOCAL_NODE, |c| c.node.as_str())
}

/// This bridge's workers that `query` is about and that take calls, one
/// entry per service.
pub(crate) fn local(registry: &Registry, node: &str, query: &Query) -> Vec<Listed> {
    let mut list = Vec::new();
    for w in registry.open_workers(query.service.as_deref()) {
        for service in w.services.iter() {
            if query.matches(service, &w.session.metadata) {
                list.push(Listed {
                    worker_id: w.session.worker_id.clone(),
                    node: node.to_owned(),
                    service: service.clone(),
                    metadata: w.session.metadata.clone(),
                    connected_at: humantime_serde::re::humantime::format_rfc3339_millis(
                        w.session.stats.since,
                    )
                    .to_string(),
                    in_flight: w.inflight,
                    capacity: w.max_inflight,
                });
            }
        }
    }
    list
}

/// The JSON answer for `query`: this bridge's workers and its peers'.
pub(crate) async fn document(shared: &Shared, query: &Query) -> Bytes {
    let mut workers = local(&shared.registry, node(shared), query);
    let mut doc = Document {
        complete: true,
        nodes_missing: Vec::new(),
        workers: Vec::new(),
    };
    if let Some(cluster) = shared.cluster.get() {
        let gathered = cluster.list(query, PEERS_WITHIN).await;
        for listing in gathered.listings {
            doc.complete &= !listing.truncated;
            workers.extend(
                listing
                    .workers
                    .into_iter()
                    .filter(|w| w.node == listing.node),
            );
        }
        doc.complete &= gathered.missing.is_empty();
        doc.nodes_missing = gathered.missing;
    }
    workers.sort_by(|a, b| {
        (&a.service, &a.worker_id, &a.node).cmp(&(&b.service, &b.worker_id, &b.node))
    });
    doc.workers = workers;
    Bytes::from(serde_json::to_vec(&doc).unwrap_or_default())
}
