//! Presence: the announcement ([`Beat`]) each bridge publishes of its
//! workers, and the table ([`Peers`]) a bridge keeps of the others from
//! theirs. The table is synchronous and has no I/O, so its rules (a newer
//! boot replaces a node, a late announcement is ignored, three missed
//! beats drop a node, a leaving node goes at once) are unit-tested here.

use std::{collections::HashMap, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::protocol::Metadata;

/// Largest announcement accepted from a peer (NATS's default
/// `max_payload`): a node with about 10,000 workers without metadata, or
/// a few thousand with some, fits; anything larger is dropped unread.
pub(crate) const MAX_BEAT: usize = 1024 * 1024;

/// Most peers kept; announcements from further nodes are ignored (and
/// logged), so a flood of made-up names cannot grow the table.
pub(crate) const MAX_PEERS: usize = 256;

/// Beats a node may miss before its peers drop it.
pub(crate) const MISSES: u32 = 3;

/// One bridge's announcement of itself and its workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Beat {
    /// The bridge's node name.
    pub(crate) node: String,
    /// When the bridge started (ms since the Unix epoch): a bridge that
    /// restarts under the same name is a new boot of the node.
    pub(crate) epoch: u64,
    /// Counts this boot's announcements; an older one arriving late is ignored.
    pub(crate) seq: u64,
    /// The time to the next announcement at the latest, in ms.
    pub(crate) every_ms: u64,
    /// The bridge is shutting down: drop it now.
    #[serde(default)]
    pub(crate) leaving: bool,
    /// Its services and their workers.
    pub(crate) services: Vec<ServiceBeat>,
}

/// One service of an announcing bridge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ServiceBeat {
    /// The service's name.
    pub(crate) name: String,
    /// The workers connected for it.
    pub(crate) workers: Vec<WorkerBeat>,
}

/// One worker, as its bridge announces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WorkerBeat {
    /// The id the worker gave in its hello.
    pub(crate) id: String,
    /// Calls it accepts at once.
    pub(crate) capacity: u32,
    /// Calls it holds now.
    pub(crate) in_flight: u32,
    /// It takes no new calls (draining, or dropped and waiting to resume).
    #[serde(default)]
    pub(crate) closed: bool,
    /// What its hello said about it, for fan-out selectors.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub(crate) metadata: Metadata,
}

/// Which workers a presence listing or a fan-out is about: those of a
/// service (or of every service), whose metadata holds every pair given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Query {
    /// The node that asks (its own question comes back to it too).
    #[serde(default)]
    pub(crate) from: String,
    /// Only this service's workers; every service's if `None`.
    #[serde(default)]
    pub(crate) service: Option<String>,
    /// Pairs the worker's metadata must all hold.
    #[serde(default)]
    pub(crate) meta: Vec<(String, String)>,
}

impl Query {
    /// Whether a worker of `service` with `metadata` is one this is about.
    pub(crate) fn matches(&self, service: &str, metadata: &Metadata) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
            && self
                .meta
                .iter()
                .all(|(k, v)| metadata.get(k).is_some_and(|m| m == v))
    }
}

/// One worker of one service, as presence lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Listed {
    pub(crate) worker_id: String,
    /// The bridge it is connected to.
    pub(crate) node: String,
    pub(crate) service: String,
    pub(crate) metadata: Metadata,
    /// When its session began, RFC 3339 in UTC.
    pub(crate) connected_at: String,
    pub(crate) in_flight: u32,
    pub(crate) capacity: u32,
}

/// One bridge's answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Listing {
    pub(crate) node: String,
    pub(crate) workers: Vec<Listed>,
    /// The answer did not fit one NATS message: some workers are missing.
    #[serde(default)]
    pub(crate) truncated: bool,
}

/// What applying an announcement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// A node not known before (or a new boot of one).
    Joined,
    /// A known node's newer announcement.
    Updated,
    /// The node said it is leaving and was dropped.
    Left,
    /// Nothing changed: our own, a late one, a leaving node we did not
    /// know, a bad name, or the table is full.
    Ignored,
}

/// A peer as last announced.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// Its last announcement.
    pub(crate) beat: Beat,
    /// When it arrived.
    pub(crate) seen: Instant,
}

impl Peer {
    /// The time after which the peer counts as gone.
    fn deadline(&self) -> Instant {
        let every = Duration::from_millis(self.beat.every_ms.clamp(100, 60_000));
        self.seen + every * MISSES
    }
}

/// The other bridges of the cluster, as their announcements describe them.
#[derive(Debug)]
pub(crate) struct Peers {
    /// This bridge's own name: its own announcements come back and are
    /// not a peer.
    me: String,
    nodes: HashMap<String, Peer>,
}

impl Peers {
    /// An empty table for the bridge named `me`.
    pub(crate) fn new(me: &str) -> Peers {
        Peers {
            me: me.to_owned(),
            nodes: HashMap::new(),
        }
    }

    /// Takes in an announcement that arrived at `now`.
    pub(crate) fn apply(&mut self, beat: Beat, now: Instant) -> Applied {
        if beat.node == self.me || !valid_name(&beat.node) {
            return Applied::Ignored;
        }
        let known = self
            .nodes
            .get(&beat.node)
            .map(|p| (p.beat.epoch, p.beat.seq));
        match known {
            // An older boot, or an older announcement of this boot.
            Some((epoch, seq)) if (beat.epoch, beat.seq) <= (epoch, seq) => Applied::Ignored,
            _ if beat.leaving => match known {
                Some((epoch, _)) if beat.epoch >= epoch => {
                    self.nodes.remove(&beat.node);
                    Applied::Left
                }
                _ => Applied::Ignored,
            },
            Some((epoch, _)) => {
                let rebooted = beat.epoch > epoch;
                self.nodes
                    .insert(beat.node.clone(), Peer { beat, seen: now });
                if rebooted {
                    Applied::Joined
                } else {
                    Applied::Updated
                }
            }
            None if self.nodes.len() >= MAX_PEERS => Applied::Ignored,
            None => {
                self.nodes
                    .insert(beat.node.clone(), Peer { beat, seen: now });
                Applied::Joined
            }
        }
    }

    /// Drops the nodes that missed [`MISSES`] announcements by `now`, and
    /// returns their names.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<String> {
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, p)| p.deadline() <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            self.nodes.remove(name);
        }
        gone
    }

    /// The boot epoch of peer `node`, if it is one now.
    pub(crate) fn epoch(&self, node: &str) -> Option<u64> {
        self.nodes.get(node).map(|p| p.beat.epoch)
    }

    /// The peers with workers of `service` that take calls, each with the
    /// calls those can take now (as last announced).
    pub(crate) fn serving(&self, service: &str) -> Vec<(String, u64)> {
        self.nodes
            .iter()
            .filter_map(|(name, peer)| {
                let svc = peer.beat.services.iter().find(|s| s.name == service)?;
                let open = svc.workers.iter().filter(|w| !w.closed);
                let (mut any, mut free) = (false, 0u64);
                for w in open {
                    any = true;
                    free += u64::from(w.capacity.saturating_sub(w.in_flight));
                }
                any.then(|| (name.clone(), free))
            })
            .collect()
    }

    /// The peers announcing a worker named `id` of `service` that takes
    /// calls, each with the room it has (as last announced).
    pub(crate) fn hosting(&self, service: &str, id: &str) -> Vec<(String, u64)> {
        let mut list: Vec<(String, u64)> = self
            .nodes
            .iter()
            .filter_map(|(name, peer)| {
                let svc = peer.beat.services.iter().find(|s| s.name == service)?;
                let w = svc.workers.iter().find(|w| w.id == id && !w.closed)?;
                Some((
                    name.clone(),
                    u64::from(w.capacity.saturating_sub(w.in_flight)),
                ))
            })
            .collect();
        list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        list
    }

    /// The workers of the peers that a fan-out for `query` reaches: open
    /// ones (as last announced), as `(node, worker id)`.
    pub(crate) fn matching(&self, query: &Query) -> Vec<(String, String)> {
        let mut list = Vec::new();
        for (name, peer) in &self.nodes {
            for svc in &peer.beat.services {
                for w in &svc.workers {
                    if !w.closed && query.matches(&svc.name, &w.metadata) {
                        list.push((name.clone(), w.id.clone()));
                    }
                }
            }
        }
        list.sort();
        list
    }

    /// Drops every peer (the NATS connection is gone: none can be reached).
    pub(crate) fn clear(&mut self) {
        self.nodes.clear();
    }

    /// The peers, by name.
    pub(crate) fn list(&self) -> Vec<(String, Peer)> {
        let mut list: Vec<_> = self
            .nodes
            .iter()
            .map(|(name, p)| (name.clone(), p.clone()))
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }

    /// How many peers are known.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }
}

/// A node name a peer may use: what `cluster.node` allows.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(node: &str, epoch: u64, seq: u64) -> Beat {
        Beat {
            node: node.to_owned(),
            epoch,
            seq,
            every_ms: 1000,
            leaving: false,
            services: vec![ServiceBeat {
                name: "orders".to_owned(),
                workers: vec![WorkerBeat {
                    id: format!("w{seq}"),
                    capacity: 8,
                    in_flight: 1,
                    closed: false,
                    metadata: [("region".to_owned(), format!("r{}", seq % 2))].into(),
                }],
            }],
        }
    }

    #[test]
    fn a_new_node_joins_and_its_next_beat_updates_it() {
        let now = Instant::now();
        let mut peers = Peers::new("a");
        assert_eq!(peers.apply(beat("b", 1, 1), now), Applied::Joined);
        assert_eq!(peers.apply(beat("b", 1, 2), now), Applied::Updated);
        let list = peers.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].1.beat.services[0].workers[0].id, "w2");
    }

    #[test]
    fn our_own_beat_is_not_a_peer() {
        let mut peers = Peers::new("a");
        assert_eq!(
            peers.apply(beat("a", 1, 1), Instant::now()),
            Applied::Ignored
        );
        assert_eq!(peers.len(), 0);
    }

    #[test]
    fn a_late_or_repeated_beat_changes_nothing() {
        let now = Instant::now();
        let mut peers = Peers::new("a");
        peers.apply(beat("b", 1, 5), now);
        assert_eq!(peers.apply(beat("b", 1, 4), now), Applied::Ignored);
        assert_eq!(peers.apply(beat("b", 1, 5), now), Applied::Ignored);
        assert_eq!(peers.list()[0].1.beat.seq, 5);
    }

    #[test]
    fn a_new_boot_replaces_the_old_one_whatever_its_count() {
        let now = Instant::now();
        let mut peers = Peers::new("a");
        peers.apply(beat("b", 1, 900), now);
        assert_eq!(peers.apply(beat("b", 2, 1), now), Applied::Joined);
        // The old boot's beats, still in flight, are ignored from now on.
        assert_eq!(peers.apply(beat("b", 1, 901), now), Applied::Ignored);
        assert_eq!(peers.list()[0].1.beat.epoch, 2);
    }

    #[test]
    fn a_node_is_dropped_after_three_missed_beats_and_not_before() {
        let t0 = Instant::now();
        let mut peers = Peers::new("a");
        peers.apply(beat("b", 1, 1), t0);
        peers.apply(beat("c", 1, 1), t0);
        peers.apply(beat("c", 1, 2), t0 + Duration::from_millis(2500));
        let almost = t0 + Duration::from_millis(2999);
        assert!(peers.expire(almost).is_empty());
        let gone = peers.expire(t0 + Duration::from_millis(3000));
        assert_eq!(gone, vec!["b".to_owned()]);
        assert_eq!(peers.list()[0].0, "c");
    }

    #[test]
    fn a_leaving_node_goes_at_once_but_only_its_own_boot_can_say_so() {
        let now = Instant::now();
        let mut peers = Peers::new("a");
        peers.apply(beat("b", 2, 1), now);
        let mut old = beat("b", 1, 7);
        old.leaving = true;
        assert_eq!(peers.apply(old, now), Applied::Ignored, "an older boot");
        let mut leaving = beat("b", 2, 2);
        leaving.leaving = true;
        assert_eq!(peers.apply(leaving.clone(), now), Applied::Left);
        assert_eq!(peers.len(), 0);
        leaving.node = "z".to_owned();
        assert_eq!(peers.apply(leaving, now), Applied::Ignored, "never known");
    }

    #[test]
    fn bad_names_and_a_full_table_are_ignored() {
        let now = Instant::now();
        let mut peers = Peers::new("a");
        for bad in ["", "a.b", "x*", "has space", &"n".repeat(65)] {
            assert_eq!(
                peers.apply(beat(bad, 1, 1), now),
                Applied::Ignored,
                "{bad:?}"
            );
        }
        for i in 0..MAX_PEERS {
            assert_eq!(
                peers.apply(beat(&format!("n{i}"), 1, 1), now),
                Applied::Joined
            );
        }
        assert_eq!(peers.apply(beat("one-more", 1, 1), now), Applied::Ignored);
        // A known node still updates when the table is full.
        assert_eq!(peers.apply(beat("n0", 1, 2), now), Applied::Updated);
    }

    #[test]
    fn a_beat_round_trips_through_json() {
        let b = beat("b", 3, 4);
        let text = serde_json::to_vec(&b).expect("encode");
        let back: Beat = serde_json::from_slice(&text).expect("decode");
        assert_eq!(back, b);
    }

    #[test]
    fn a_query_matches_service_and_every_metadata_pair() {
        let now = Instant::now();
        let mut peers = Peers::new("a");
        peers.apply(beat("b", 1, 1), now); // worker w1, region r1
        peers.apply(beat("c", 1, 2), now); // worker w2, region r0
        let q = |service: Option<&str>, meta: &[(&str, &str)]| Query {
            from: "a".into(),
            service: service.map(str::to_owned),
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let all = peers.matching(&q(Some("orders"), &[]));
        assert_eq!(all, [("b".into(), "w1".into()), ("c".into(), "w2".into())]);
        let eu = peers.matching(&q(None, &[("region", "r0")]));
        assert_eq!(eu, [("c".to_owned(), "w2".to_owned())]);
        assert!(peers.matching(&q(Some("billing"), &[])).is_empty());
        assert!(peers
            .matching(&q(Some("orders"), &[("region", "r0"), ("user", "1")]))
            .is_empty());
    }
}
