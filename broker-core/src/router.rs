//! Who gets a publish: the subscription trie plus shared groups.
//!
//! Trie entries are keyed by [`Subscriber`], so a session, a shared group
//! and (in a cluster) a peer node are told apart by type, not by string
//! sentinels. A shared group is named by its whole filter,
//! `$share/{group}/{filter}`: two groups with one name on different filters
//! are separate (rumqttd keys by name only).

use crate::hashing::HashMap;
use std::sync::Arc;

use mqlb_protocol::QoS;

use crate::message::Sub;
use crate::trie::Trie;

/// A node in the cluster.
pub type NodeId = u32;

/// Who a trie entry delivers to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subscriber {
    /// A session, by client ID.
    Session(Arc<str>),
    /// A shared group, by its `$share/{group}/{filter}`; one member gets
    /// each message.
    Group(Arc<str>),
    /// A peer node with matching subscriptions (cluster routing).
    Node(NodeId),
}

/// A shared group's members, in subscription order, the peer nodes that
/// have members of it, and whose turn it is.
#[derive(Debug, Default)]
struct Group {
    members: Vec<(Arc<str>, Sub)>,
    nodes: Vec<NodeId>,
    next: usize,
}

/// Who gets a shared group's next message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// A local member.
    Local(Arc<str>, Sub),
    /// A peer node, which gives it to one of its members.
    Node(NodeId),
}

/// One session's delivery of a publish: the highest QoS of its matching
/// subscriptions, with all their identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTarget {
    /// Client ID.
    pub client: Arc<str>,
    /// Delivered QoS.
    pub qos: QoS,
    /// Subscription identifiers of every matching subscription.
    pub sub_ids: Vec<u32>,
    /// Retain As Published on any matching subscription.
    pub retain_as_published: bool,
}

/// Targets of one publish found by a linear scan for duplicates; past
/// this many an index is built.
const DEDUP_SCAN: usize = 16;

/// Everyone a publish goes to.
#[derive(Debug, Default)]
pub struct Targets {
    /// One entry per session.
    pub sessions: Vec<SessionTarget>,
    /// Matching shared groups; one member of each gets the message.
    pub groups: Vec<Arc<str>>,
    /// Peer nodes with matching subscriptions.
    pub nodes: Vec<NodeId>,
}

/// Splits `$share/{group}/{filter}` into the group's inner filter.
pub fn shared_inner(filter: &str) -> Option<&str> {
    filter
        .strip_prefix("$share/")?
        .split_once('/')
        .map(|(_, f)| f)
}

/// The subscription index.
#[derive(Debug, Default)]
pub struct Router {
    trie: Trie<Subscriber, Sub>,
    groups: HashMap<Arc<str>, Group>,
    /// Local sessions per filter (shared ones by their whole
    /// `$share/{group}/{filter}`): the node's interest, as peers see it.
    local: HashMap<String, u32>,
    /// Local subscriptions in all (the sum of `local`): kept as they come
    /// and go, so a metrics scrape reads it without a scan under the
    /// core's lock.
    subscriptions: usize,
    /// Each peer's interest, so a lost peer's entries can be removed.
    remote: HashMap<NodeId, crate::hashing::HashSet<String>>,
}

/// How a local subscription change moved the node's interest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// The first local subscription to this filter: peers must learn it.
    Gained,
    /// The last one left: peers may forget it.
    Lost,
    /// No change peers need to hear about.
    Same,
}

impl Router {
    /// Adds or replaces `client`'s subscription to `filter`. `existed` says
    /// whether the session already held it (a replacement).
    pub fn subscribe(&mut self, client: &Arc<str>, filter: &str, sub: Sub) -> Interest {
        let was = self.has_local(client, filter);
        self.subscribe_inner(client, filter, sub);
        if was {
            return Interest::Same;
        }
        self.subscriptions += 1;
        let n = self.local.entry(filter.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            Interest::Gained
        } else {
            Interest::Same
        }
    }

    fn has_local(&self, client: &Arc<str>, filter: &str) -> bool {
        match shared_inner(filter) {
            Some(_) => self
                .groups
                .get(filter)
                .is_some_and(|g| g.members.iter().any(|(c, _)| c == client)),
            None => self
                .trie
                .contains(filter, &Subscriber::Session(client.clone())),
        }
    }

    /// Local subscriptions in all (shared group memberships included).
    pub fn local_subscriptions(&self) -> usize {
        self.subscriptions
    }

    /// The filters local sessions hold: what peers need to forward here.
    pub fn local_interest(&self) -> impl Iterator<Item = &str> {
        self.local.keys().map(String::as_str)
    }

    /// Peer `node` has local subscribers to `filter`.
    pub fn subscribe_node(&mut self, node: NodeId, filter: &str) {
        if !self
            .remote
            .entry(node)
            .or_default()
            .insert(filter.to_string())
        {
            return;
        }
        match shared_inner(filter) {
            Some(inner) => {
                let key: Arc<str> = match self.groups.get_key_value(filter) {
                    Some((k, _)) => k.clone(),
                    None => Arc::from(filter),
                };
                let g = self.groups.entry(key.clone()).or_default();
                if !g.nodes.contains(&node) {
                    g.nodes.push(node);
                }
                self.trie.insert(inner, Subscriber::Group(key), Sub::node());
            }
            None => {
                self.trie
                    .insert(filter, Subscriber::Node(node), Sub::node());
            }
        }
    }

    /// Peer `node` no longer has subscribers to `filter`.
    pub fn unsubscribe_node(&mut self, node: NodeId, filter: &str) {
        let known = self.remote.get_mut(&node).is_some_and(|f| f.remove(filter));
        if !known {
            return;
        }
        match shared_inner(filter) {
            Some(inner) => {
                let Some(g) = self.groups.get_mut(filter) else {
                    return;
                };
                g.nodes.retain(|n| *n != node);
                self.drop_group_if_empty(filter, inner);
            }
            None => {
                self.trie.remove(filter, &Subscriber::Node(node));
            }
        }
    }

    /// Forgets everything peer `node` was interested in (its link is gone,
    /// or it is about to send its whole interest again).
    pub fn forget_node(&mut self, node: NodeId) {
        let filters: Vec<String> = self
            .remote
            .get(&node)
            .map(|f| f.iter().cloned().collect())
            .unwrap_or_default();
        for f in filters {
            self.unsubscribe_node(node, &f);
        }
        self.remote.remove(&node);
    }

    fn drop_group_if_empty(&mut self, filter: &str, inner: &str) {
        let empty = self
            .groups
            .get(filter)
            .is_some_and(|g| g.members.is_empty() && g.nodes.is_empty());
        if empty {
            if let Some((key, _)) = self.groups.remove_entry(filter) {
                self.trie.remove(inner, &Subscriber::Group(key));
            }
        }
    }

    fn subscribe_inner(&mut self, client: &Arc<str>, filter: &str, sub: Sub) {
        match shared_inner(filter) {
            Some(inner) => {
                let key: Arc<str> = match self.groups.get_key_value(filter) {
                    Some((k, _)) => k.clone(),
                    None => Arc::from(filter),
                };
                let g = self.groups.entry(key.clone()).or_default();
                match g.members.iter_mut().find(|(c, _)| c == client) {
                    Some(m) => m.1 = sub,
                    None => g.members.push((client.clone(), sub)),
                }
                self.trie.insert(inner, Subscriber::Group(key), sub);
            }
            None => {
                self.trie
                    .insert(filter, Subscriber::Session(client.clone()), sub);
            }
        }
    }

    /// Removes `client`'s subscription to `filter`.
    pub fn unsubscribe(&mut self, client: &str, filter: &str) -> Interest {
        let id: Arc<str> = Arc::from(client);
        if !self.has_local(&id, filter) {
            return Interest::Same;
        }
        self.subscriptions = self.subscriptions.saturating_sub(1);
        match shared_inner(filter) {
            Some(inner) => {
                if let Some(g) = self.groups.get_mut(filter) {
                    g.members.retain(|(c, _)| &**c != client);
                }
                self.drop_group_if_empty(filter, inner);
            }
            None => {
                self.trie.remove(filter, &Subscriber::Session(id));
            }
        }
        match self.local.get_mut(filter) {
            Some(n) if *n > 1 => {
                *n -= 1;
                Interest::Same
            }
            Some(_) => {
                self.local.remove(filter);
                Interest::Lost
            }
            None => Interest::Same,
        }
    }

    /// Everyone a publish on `topic` at `qos` from `origin` goes to. No
    /// Local subscriptions of the publisher itself are skipped.
    ///
    /// A session with several matching subscriptions is one target (the
    /// highest QoS, every identifier). Targets come in the trie's order;
    /// duplicates are found by a scan while there are few, and through an
    /// index past `DEDUP_SCAN` (a map per publish cost an allocation and
    /// a hash per target, on the hottest path).
    pub fn matches(&self, topic: &str, qos: QoS, origin: Option<&str>) -> Targets {
        let mut t = Targets::default();
        let mut index: Option<HashMap<Arc<str>, usize>> = None;
        self.trie.matches(topic, |who, sub| match who {
            Subscriber::Session(client) => {
                if sub.options.no_local && origin == Some(&**client) {
                    return;
                }
                let found = match &mut index {
                    Some(ix) => ix.get(client).copied(),
                    None => t.sessions.iter().position(|s| s.client == *client),
                };
                let i = match found {
                    Some(i) => i,
                    None => {
                        t.sessions.push(SessionTarget {
                            client: client.clone(),
                            qos: QoS::AtMostOnce,
                            sub_ids: Vec::new(),
                            retain_as_published: false,
                        });
                        let n = t.sessions.len();
                        match &mut index {
                            Some(ix) => {
                                ix.insert(client.clone(), n - 1);
                            }
                            None if n > DEDUP_SCAN => {
                                index = Some(
                                    t.sessions
                                        .iter()
                                        .enumerate()
                                        .map(|(i, s)| (s.client.clone(), i))
                                        .collect(),
                                );
                            }
                            None => {}
                        }
                        n - 1
                    }
                };
                let Some(e) = t.sessions.get_mut(i) else {
                    return;
                };
                e.qos = e.qos.max(qos.min(sub.options.qos));
                e.sub_ids.extend(sub.id);
                e.retain_as_published |= sub.options.retain_as_published;
            }
            Subscriber::Group(g) => t.groups.push(g.clone()),
            Subscriber::Node(n) => {
                if !t.nodes.contains(n) {
                    t.nodes.push(*n);
                }
            }
        });
        t
    }

    /// Picks who gets `group`'s next message: round robin over the local
    /// members and the peer nodes with members, preferring local members
    /// for which `ready` holds (connected with room in their window),
    /// skipping `except`. With `local_only`, peers are not candidates (a
    /// message a peer handed over, or one being moved between members).
    /// Peers for which `reachable` is false are skipped (a dead node's
    /// members take no new messages; whoever takes over their sessions
    /// announces them again).
    pub fn pick(
        &mut self,
        group: &str,
        except: Option<&str>,
        local_only: bool,
        ready: impl Fn(&str) -> Option<bool>,
        reachable: impl Fn(NodeId) -> bool,
    ) -> Option<Pick> {
        let g = self.groups.get_mut(group)?;
        let locals = g.members.len();
        let n = locals + if local_only { 0 } else { g.nodes.len() };
        let mut fallback = None;
        for i in 0..n {
            let idx = (g.next + i) % n;
            let Some((client, sub)) = g.members.get(idx) else {
                let Some(&node) = idx.checked_sub(locals).and_then(|k| g.nodes.get(k)) else {
                    continue;
                };
                if reachable(node) {
                    g.next = idx + 1;
                    return Some(Pick::Node(node));
                }
                continue;
            };
            if Some(&**client) == except {
                continue;
            }
            match ready(client) {
                Some(true) => {
                    g.next = idx + 1;
                    return Some(Pick::Local(client.clone(), *sub));
                }
                Some(false) if fallback.is_none() => fallback = Some(idx),
                _ => {}
            }
        }
        let idx = fallback?;
        g.next = idx + 1;
        let (client, sub) = g.members.get(idx)?;
        Some(Pick::Local(client.clone(), *sub))
    }

    /// Whether `group` has a member other than `client`.
    pub fn has_other_member(&self, group: &str, client: &str) -> bool {
        self.groups
            .get(group)
            .is_some_and(|g| g.members.iter().any(|(c, _)| &**c != client))
    }

    /// The group's shared key as stored, so pending messages share one
    /// allocation.
    pub fn group_key(&self, filter: &str) -> Option<Arc<str>> {
        self.groups.get_key_value(filter).map(|(k, _)| k.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_protocol::SubscriptionOptions;

    fn sub(qos: QoS) -> Sub {
        Sub {
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
            id: None,
        }
    }

    #[test]
    fn groups_are_keyed_by_group_and_filter_and_leave_no_trace() {
        let mut r = Router::default();
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        r.subscribe(&a, "$share/g/t/+", sub(QoS::AtLeastOnce));
        r.subscribe(&b, "$share/g/t/#", sub(QoS::AtLeastOnce));
        r.subscribe(&a, "t/x", sub(QoS::AtMostOnce));
        let t = r.matches("t/x", QoS::AtLeastOnce, None);
        assert_eq!(t.groups.len(), 2);
        assert_eq!(t.sessions.len(), 1);
        assert_eq!(t.sessions[0].qos, QoS::AtMostOnce);
        r.unsubscribe("a", "$share/g/t/+");
        r.unsubscribe("b", "$share/g/t/#");
        r.unsubscribe("a", "t/x");
        let t = r.matches("t/x", QoS::AtLeastOnce, None);
        assert!(t.groups.is_empty() && t.sessions.is_empty());
        assert!(r.groups.is_empty());
        assert!(r.trie.is_empty());
    }
}
