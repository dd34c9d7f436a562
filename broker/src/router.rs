//! Who gets a publish: the subscription trie plus shared groups.
//!
//! Trie entries are keyed by [`Subscriber`], so a session, a shared group
//! and (in a cluster) a peer node are told apart by type, not by string
//! sentinels. A shared group is named by its whole filter,
//! `$share/{group}/{filter}`: two groups with one name on different filters
//! are separate (rumqttd keys by name only).

use std::collections::HashMap;
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

/// A shared group's members, in subscription order, and whose turn it is.
#[derive(Debug, Default)]
struct Group {
    members: Vec<(Arc<str>, Sub)>,
    next: usize,
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
}

impl Router {
    /// Adds or replaces `client`'s subscription to `filter`.
    pub fn subscribe(&mut self, client: &Arc<str>, filter: &str, sub: Sub) {
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
    pub fn unsubscribe(&mut self, client: &str, filter: &str) {
        match shared_inner(filter) {
            Some(inner) => {
                let Some(g) = self.groups.get_mut(filter) else {
                    return;
                };
                g.members.retain(|(c, _)| &**c != client);
                if g.members.is_empty() {
                    if let Some((key, _)) = self.groups.remove_entry(filter) {
                        self.trie.remove(inner, &Subscriber::Group(key));
                    }
                }
            }
            None => {
                self.trie
                    .remove(filter, &Subscriber::Session(Arc::from(client)));
            }
        }
    }

    /// Everyone a publish on `topic` at `qos` from `origin` goes to. No
    /// Local subscriptions of the publisher itself are skipped.
    pub fn matches(&self, topic: &str, qos: QoS, origin: Option<&str>) -> Targets {
        let mut sessions: HashMap<&Arc<str>, (QoS, Vec<u32>, bool)> = HashMap::new();
        let mut t = Targets::default();
        self.trie.matches(topic, |who, sub| match who {
            Subscriber::Session(client) => {
                if sub.options.no_local && origin == Some(&**client) {
                    return;
                }
                let e = sessions
                    .entry(client)
                    .or_insert((QoS::AtMostOnce, Vec::new(), false));
                e.0 = e.0.max(qos.min(sub.options.qos));
                e.1.extend(sub.id);
                e.2 |= sub.options.retain_as_published;
            }
            Subscriber::Group(g) => t.groups.push(g.clone()),
            Subscriber::Node(n) => t.nodes.push(*n),
        });
        t.sessions = sessions
            .into_iter()
            .map(|(client, (qos, sub_ids, rap))| SessionTarget {
                client: client.clone(),
                qos,
                sub_ids,
                retain_as_published: rap,
            })
            .collect();
        t
    }

    /// Picks the member of `group` that gets the next message: round robin,
    /// preferring members for which `ready` holds (connected with room in
    /// their window), skipping `except`.
    pub fn pick(
        &mut self,
        group: &str,
        except: Option<&str>,
        ready: impl Fn(&str) -> Option<bool>,
    ) -> Option<(Arc<str>, Sub)> {
        let g = self.groups.get_mut(group)?;
        let n = g.members.len();
        let mut fallback = None;
        for i in 0..n {
            let idx = (g.next + i) % n;
            let (client, sub) = &g.members[idx];
            if Some(&**client) == except {
                continue;
            }
            match ready(client) {
                Some(true) => {
                    g.next = idx + 1;
                    return Some((client.clone(), *sub));
                }
                Some(false) if fallback.is_none() => fallback = Some(idx),
                _ => {}
            }
        }
        let idx = fallback?;
        g.next = idx + 1;
        let (client, sub) = &g.members[idx];
        Some((client.clone(), *sub))
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
