//! Publishes held for a takeover: one ordered queue per node, and the rule
//! that says when each one's turn comes.
//!
//! A publish matching sessions of a peer that cannot be reached comes back
//! from the core as `Route::Held`; a forward lost with its link, or
//! refused by a peer that stepped down, is held by the shell; while a
//! publisher has one held, its later publishes come back as
//! `Route::Deferred`. All of them wait here, and are released in the order
//! they came to the node: a publisher's publish never overtakes an earlier
//! one of the same publisher that is still held, so a session promoted
//! meanwhile gets them in order (finding 29 of docs/simulation.md).
//!
//! Plain data in and out, given the time: the broker's cluster keeps one
//! queue behind a mutex and runs a release pass every quarter tick; the
//! simulator runs the same passes on simulated time.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::effects::Deferred;
use crate::message::Message;
use crate::router::NodeId;

/// How a held publish is routed when its turn comes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldAs {
    /// Again (`Core::reforward`), to the peers interested by then, except
    /// `exclude`; `refused`: those refused it (they no longer serve), and
    /// it also waits for a view without them, as their sessions move only
    /// then.
    Again {
        /// Peers not to send it to.
        exclude: Vec<NodeId>,
        /// Whether `exclude` refused it.
        refused: bool,
    },
    /// As new (`Core::route_deferred`): it only waited behind its
    /// publisher's held publishes.
    New(Deferred),
}

/// One held publish; `token` is what the shell resolves once it is
/// routed (the broker's publisher waits on it).
#[derive(Debug)]
pub struct Held<T> {
    /// The publish.
    pub message: Message,
    /// The shared subscription groups it was matched for.
    pub groups: Vec<Arc<str>>,
    /// How it is routed when its turn comes.
    pub how: HeldAs,
    /// When it was held: held [`Release::patience`] long, it goes whatever
    /// the cluster's state.
    pub since: Instant,
    /// The shell's.
    pub token: T,
}

/// A node's held publishes, in the order they were held.
#[derive(Debug)]
pub struct HeldQueue<T> {
    items: Vec<Held<T>>,
}

impl<T> Default for HeldQueue<T> {
    fn default() -> Self {
        Self { items: Vec::new() }
    }
}

/// What a release pass knows of the cluster.
#[derive(Debug, Clone, Copy)]
pub struct Release {
    /// The time of the pass.
    pub now: Instant,
    /// The sessions of every member the view dropped have moved: every
    /// member is reachable and has promoted the copies it owns.
    pub settled: bool,
    /// The longest a publish is held; past it, it is routed again however
    /// the cluster stands (the takeover bound).
    pub patience: Duration,
}

impl<T> HeldQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Holds `h` behind everything held so far.
    pub fn push(&mut self, h: Held<T>) {
        self.items.push(h);
    }

    /// How many are held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether a publish of `origin`'s is held.
    pub fn holds_from(&self, origin: &Option<Arc<str>>) -> bool {
        self.items.iter().any(|h| h.message.origin == *origin)
    }

    /// Everything held, for a release pass ([`release`]); the queue is
    /// empty meanwhile, so that what the pass holds again lands in it.
    pub fn take(&mut self) -> Vec<Held<T>> {
        std::mem::take(&mut self.items)
    }

    /// What a release pass kept, back in front of what was held during it.
    pub fn put_back(&mut self, mut kept: Vec<Held<T>>) {
        kept.append(&mut self.items);
        self.items = kept;
    }

    /// Drops everything (the node's process died).
    pub fn clear(&mut self) {
        self.items.clear();
    }
}

/// One release pass over `pending` (a queue's [`HeldQueue::take`]): in the
/// order the publishes came to the node (a forward lost with its link is
/// held after later publishes may have been), each whose turn came is
/// handed to `route`, which routes it and says whether its publisher has
/// a publish held again (held once more by that routing, or held
/// meanwhile): the publisher's later ones then wait behind it. A deferred
/// publish goes at its turn; one to route again goes once the cluster is
/// settled and, if refused, the view has dropped the refusers
/// (`in_view`), or once it waited [`Release::patience`]. Returns what
/// stays held, in order.
pub fn release<T>(
    mut pending: Vec<Held<T>>,
    r: Release,
    in_view: impl Fn(NodeId) -> bool,
    mut route: impl FnMut(Held<T>) -> bool,
) -> Vec<Held<T>> {
    pending.sort_by_key(|h| h.message.received);
    let mut blocked: HashSet<Option<Arc<str>>> = HashSet::new();
    let mut kept = Vec::new();
    for h in pending {
        let origin = h.message.origin.clone();
        if blocked.contains(&origin) {
            kept.push(h);
            continue;
        }
        let ready = match &h.how {
            HeldAs::New(_) => true,
            HeldAs::Again { exclude, refused } => {
                let refusers_left = !*refused || exclude.iter().all(|&n| !in_view(n));
                (r.settled && refusers_left) || r.now >= h.since + r.patience
            }
        };
        if !ready {
            blocked.insert(origin);
            kept.push(h);
            continue;
        }
        if route(h) {
            blocked.insert(origin);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mqlb_protocol::QoS;

    fn publish(from: &str, n: u32, at: Instant) -> Message {
        Message {
            topic: mqlb_protocol::MqttStr::try_from(format!("t/{from}")).expect("a topic"),
            payload: Bytes::from(n.to_string()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Arc::default(),
            origin: Some(Arc::from(from)),
            received: at,
        }
    }

    fn held(m: Message, how: HeldAs, since: Instant, token: u32) -> Held<u32> {
        Held {
            message: m,
            groups: Vec::new(),
            how,
            since,
            token,
        }
    }

    const AGAIN: HeldAs = HeldAs::Again {
        exclude: Vec::new(),
        refused: false,
    };

    #[test]
    fn a_publishers_later_publishes_wait_behind_its_held_one() {
        let t0 = Instant::now();
        let mut q = HeldQueue::new();
        // Held in a different order than they came: released as they came.
        let at = |ms| t0 + Duration::from_millis(ms);
        q.push(held(
            publish("a", 2, at(2)),
            HeldAs::New(Deferred::New { resent: false }),
            at(2),
            2,
        ));
        q.push(held(publish("a", 1, at(1)), AGAIN, at(1), 1));
        q.push(held(
            publish("b", 1, at(3)),
            HeldAs::New(Deferred::New { resent: false }),
            at(3),
            3,
        ));
        let unsettled = Release {
            now: at(10),
            settled: false,
            patience: Duration::from_secs(6),
        };
        let mut routed = Vec::new();
        let kept = release(
            q.take(),
            unsettled,
            |_| false,
            |h| {
                routed.push(h.token);
                false
            },
        );
        // a's first waits for the takeover, its second behind it; b's goes.
        assert_eq!(routed, vec![3]);
        q.put_back(kept);
        assert_eq!(q.len(), 2);
        let settled = Release {
            settled: true,
            ..unsettled
        };
        let kept = release(
            q.take(),
            settled,
            |_| false,
            |h| {
                routed.push(h.token);
                false
            },
        );
        assert!(kept.is_empty());
        assert_eq!(routed, vec![3, 1, 2]);
    }

    #[test]
    fn one_held_again_keeps_its_publishers_later_ones_back() {
        let t0 = Instant::now();
        let mut q = HeldQueue::new();
        q.push(held(publish("a", 1, t0), AGAIN, t0, 1));
        q.push(held(
            publish("a", 2, t0 + Duration::from_millis(1)),
            HeldAs::New(Deferred::Resent),
            t0,
            2,
        ));
        let r = Release {
            now: t0,
            settled: true,
            patience: Duration::from_secs(6),
        };
        let mut routed = Vec::new();
        let kept = release(
            q.take(),
            r,
            |_| false,
            |h| {
                routed.push(h.token);
                // Routing it held it again (a peer unreachable once more).
                true
            },
        );
        assert_eq!(routed, vec![1]);
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn a_refused_publish_waits_for_a_view_without_the_refuser_or_its_patience() {
        let t0 = Instant::now();
        let refused = HeldAs::Again {
            exclude: vec![2],
            refused: true,
        };
        let r = Release {
            now: t0 + Duration::from_secs(1),
            settled: true,
            patience: Duration::from_secs(6),
        };
        let pass = |r: Release, in_view: bool| {
            let mut routed = 0;
            let kept = release(
                vec![held(publish("a", 1, t0), refused.clone(), t0, 1)],
                r,
                |n| in_view && n == 2,
                |_| {
                    routed += 1;
                    false
                },
            );
            (routed, kept.len())
        };
        assert_eq!(pass(r, true), (0, 1));
        assert_eq!(pass(r, false), (1, 0));
        let late = Release {
            now: t0 + Duration::from_secs(6),
            ..r
        };
        assert_eq!(pass(late, true), (1, 0));
    }

    #[test]
    fn what_is_held_during_a_pass_stays_behind_what_the_pass_kept() {
        let t0 = Instant::now();
        let mut q = HeldQueue::new();
        q.push(held(publish("a", 1, t0), AGAIN, t0, 1));
        let pending = q.take();
        q.push(held(publish("b", 1, t0), AGAIN, t0, 2));
        q.put_back(pending);
        let tokens: Vec<u32> = q.take().iter().map(|h| h.token).collect();
        assert_eq!(tokens, vec![1, 2]);
    }
}
