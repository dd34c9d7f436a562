//! The view loop's decisions: who is live, when to campaign, when this
//! node lost its majority. One component that owns what the loop carries
//! from tick to tick (each peer's last report of whom it hears, the term
//! it last campaigned in, whether it heard a majority), plain data in and
//! out, given the time and this node's observation: no lock, clock or I/O
//! of its own. The cluster keeps it behind one mutex (its links add the
//! peers' reports) and sends what a tick returns; the simulator
//! (`mqlb-sim`) drives the same component on simulated time, so the view
//! it tests is decided by this code, not by a copy of it.

use std::collections::BTreeMap;
use std::time::Instant;

use super::consensus::{Consensus, Output};
use super::FAILURE_TIMEOUT;

/// What the view loop carries from one tick to the next.
#[derive(Debug, Default)]
pub struct ViewLoop {
    /// What each peer last said it observes, and when it came.
    reports: BTreeMap<String, (Vec<String>, Instant)>,
    /// Whether this node observed a majority at the last tick.
    had_quorum: bool,
    /// The term in which this node last campaigned because the leader was
    /// lost (see [`Consensus::campaign_now`]).
    campaigned: u64,
}

/// What one tick decided.
#[derive(Debug, Default)]
pub struct Ticked {
    /// Raft's messages to send and the view it committed, if any.
    pub out: Output,
    /// The members a majority hears (what a leader proposes as live).
    pub live: Vec<String>,
    /// This node observes a majority of `quorum`.
    pub quorum: bool,
    /// It did at the last tick and no longer does: it must step down.
    pub lost_quorum: bool,
    /// It started an election at once because the leader was lost.
    pub campaigned: bool,
}

impl ViewLoop {
    /// A loop that has heard nothing yet (and so has no majority to lose).
    pub fn new() -> Self {
        Self::default()
    }

    /// Peer `from` says, as of `now`, that it observes `observed` (its
    /// `Observed` frame).
    pub fn report(&mut self, from: &str, observed: Vec<String>, now: Instant) {
        self.reports.insert(from.to_string(), (observed, now));
    }

    /// The members of `members` a majority of `quorum` hears from: for each
    /// member, the other nodes that hear it (this node's `observed` plus
    /// each peer's report younger than [`FAILURE_TIMEOUT`]; a node's word
    /// about itself does not count), which with the member itself must
    /// make a majority. One failed link (the leader's to a node others
    /// still reach) evicts nobody, while a dead or cut-off node, which no
    /// majority hears, leaves as soon as its peers say so.
    pub fn live_by_majority(
        &self,
        me: &str,
        members: &[String],
        observed: &[String],
        quorum: usize,
        now: Instant,
    ) -> Vec<String> {
        let fresh: Vec<(&String, &Vec<String>)> = self
            .reports
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) <= FAILURE_TIMEOUT)
            .map(|(by, (r, _))| (by, r))
            .collect();
        members
            .iter()
            .filter(|m| {
                let mine = usize::from(m.as_str() != me && observed.contains(m));
                let theirs = fresh
                    .iter()
                    .filter(|(by, r)| *by != *m && r.contains(m))
                    .count();
                1 + mine + theirs >= quorum
            })
            .cloned()
            .collect()
    }

    /// One tick of node `me`, which observes `observed` (itself and the
    /// peers it hears, sorted) among `members` (the committed membership,
    /// or every configured member before one is known), a majority being
    /// `quorum`: ticks Raft; if a majority no longer hears the leader, the
    /// first survivor by name that the committed view counts live
    /// campaigns at once, once per term (one, so that two candidates do
    /// not split the vote; a node just back from a restart may have lost
    /// its log and cannot win, and the others would wait out an election
    /// timeout: found by the simulator with the view from Raft); the
    /// leader proposes the live set.
    pub fn tick(
        &mut self,
        consensus: &mut Consensus,
        me: &str,
        members: &[String],
        observed: &[String],
        quorum: usize,
        now: Instant,
    ) -> Ticked {
        let live = self.live_by_majority(me, members, observed, quorum, now);
        let mut out = consensus.tick();
        let leader = consensus.leader();
        let lost = leader
            .as_ref()
            .is_some_and(|l| l != me && !live.contains(l));
        let counted = consensus.view().live;
        let first = observed
            .iter()
            .find(|n| Some(*n) != leader.as_ref() && counted.contains(n));
        let mut campaigned = false;
        if lost && first.map(String::as_str) == Some(me) {
            let term = consensus.term();
            if self.campaigned != term {
                self.campaigned = term;
                campaigned = true;
                let campaign = consensus.campaign_now();
                out.messages.extend(campaign.messages);
                out.view = campaign.view.or(out.view);
            }
        }
        let proposed = consensus.propose_live(&live, now);
        out.messages.extend(proposed.messages);
        out.view = proposed.view.or(out.view);
        let quorum = observed.len() >= quorum;
        let lost_quorum = std::mem::replace(&mut self.had_quorum, quorum) && !quorum;
        Ticked {
            out,
            live,
            quorum,
            lost_quorum,
            campaigned,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_node_a_majority_does_not_hear_is_not_live() {
        let t0 = Instant::now();
        let mut v = ViewLoop::new();
        let all = names(&["a", "b", "c"]);
        // a hears b only; b says it hears a only: c is heard by nobody.
        v.report("b", names(&["a", "b"]), t0);
        let live = v.live_by_majority("a", &all, &names(&["a", "b"]), 2, t0);
        assert_eq!(live, names(&["a", "b"]));
        // b also hears c: c is live (b and c are a majority).
        v.report("b", names(&["a", "b", "c"]), t0);
        let live = v.live_by_majority("a", &all, &names(&["a", "b"]), 2, t0);
        assert_eq!(live, all);
    }

    #[test]
    fn a_report_older_than_the_failure_timeout_counts_for_nothing() {
        let t0 = Instant::now();
        let mut v = ViewLoop::new();
        let all = names(&["a", "b", "c"]);
        v.report("b", names(&["b", "c"]), t0);
        let later = t0 + FAILURE_TIMEOUT;
        assert!(v
            .live_by_majority("a", &all, &names(&["a"]), 2, later)
            .contains(&"c".to_string()));
        let too_late = later + Duration::from_millis(1);
        assert!(!v
            .live_by_majority("a", &all, &names(&["a"]), 2, too_late)
            .contains(&"c".to_string()));
    }

    #[test]
    fn a_nodes_word_about_itself_does_not_make_it_live() {
        let t0 = Instant::now();
        let mut v = ViewLoop::new();
        let all = names(&["a", "b", "c"]);
        v.report("c", names(&["c"]), t0);
        let live = v.live_by_majority("a", &all, &names(&["a"]), 2, t0);
        assert_eq!(live, Vec::<String>::new());
    }

    fn group() -> Vec<(String, mqlb_config::broker::PeerAddr)> {
        ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let port = 7000 + u16::try_from(i).unwrap_or(0);
                (
                    n.to_string(),
                    mqlb_config::broker::PeerAddr::from(std::net::SocketAddr::from((
                        [127, 0, 0, 1],
                        port,
                    ))),
                )
            })
            .collect()
    }

    #[test]
    fn losing_the_majority_is_reported_once() {
        let t0 = Instant::now();
        let mut c = Consensus::with_keeper("a", &group(), None, 7).expect("raft node");
        let mut v = ViewLoop::new();
        let all = names(&["a", "b", "c"]);
        let alone = names(&["a"]);
        // Never had a majority: nothing to lose.
        assert!(!v.tick(&mut c, "a", &all, &alone, 2, t0).lost_quorum);
        let t = v.tick(&mut c, "a", &all, &names(&["a", "b"]), 2, t0);
        assert!(t.quorum && !t.lost_quorum);
        let t = v.tick(&mut c, "a", &all, &alone, 2, t0);
        assert!(!t.quorum && t.lost_quorum);
        assert!(!v.tick(&mut c, "a", &all, &alone, 2, t0).lost_quorum);
    }

    /// Three members on one thread and a supplied clock: they elect a
    /// leader; when a majority no longer hears it, the first survivor by
    /// name campaigns at once (once in its term) and the survivors commit
    /// a view without it, well inside one election timeout.
    #[test]
    fn when_the_leader_is_lost_the_first_survivor_campaigns_at_once() {
        let all = names(&["a", "b", "c"]);
        let mut nodes: Vec<(Consensus, ViewLoop)> = all
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let seed = u64::try_from(i).unwrap_or(0) + 11;
                let c = Consensus::with_keeper(n, &group(), None, seed).expect("raft node");
                (c, ViewLoop::new())
            })
            .collect();
        let mut now = Instant::now();
        // One round: every node ticks with what it observes; messages are
        // delivered among the nodes `up` says are running.
        let round = |nodes: &mut Vec<(Consensus, ViewLoop)>, up: &[bool], now: Instant| {
            let observed: Vec<String> = all
                .iter()
                .zip(up)
                .filter(|(_, u)| **u)
                .map(|(n, _)| n.clone())
                .collect();
            let mut mail: Vec<(String, String, bytes::Bytes)> = Vec::new();
            let mut campaigned = Vec::new();
            for (i, (c, v)) in nodes.iter_mut().enumerate() {
                if !up[i] {
                    continue;
                }
                // Reports of the running peers (their `Observed` frames).
                for p in &observed {
                    if *p != all[i] {
                        v.report(p, observed.clone(), now);
                    }
                }
                let t = v.tick(c, &all[i], &all, &observed, 2, now);
                if t.campaigned {
                    campaigned.push(all[i].clone());
                }
                mail.extend(
                    t.out
                        .messages
                        .into_iter()
                        .map(|(to, m)| (all[i].clone(), to, m)),
                );
            }
            // Deliver until quiet (replies produce more messages).
            while let Some((from, to, m)) = mail.pop() {
                let Some(j) = all.iter().position(|n| *n == to) else {
                    continue;
                };
                if !up[j] {
                    continue;
                }
                let out = nodes[j].0.step(&from, &m);
                mail.extend(out.messages.into_iter().map(|(t, m)| (to.clone(), t, m)));
            }
            campaigned
        };
        let up = [true, true, true];
        let mut leader = None;
        for _ in 0..100 {
            now += super::super::consensus::TICK;
            round(&mut nodes, &up, now);
            leader = nodes[0].0.leader();
            if leader.is_some() && nodes.iter().all(|(c, _)| c.view().live == all) {
                break;
            }
        }
        let leader = leader.expect("a leader within 100 ticks");
        assert!(
            nodes.iter().all(|(c, _)| c.view().live == all),
            "first view"
        );
        let dead = all.iter().position(|n| *n == leader).expect("a member");
        let mut up = [true, true, true];
        up[dead] = false;
        let first = all
            .iter()
            .find(|n| **n != leader)
            .expect("a survivor")
            .clone();
        let survivors: Vec<String> = all.iter().filter(|n| **n != leader).cloned().collect();
        let mut campaigns = Vec::new();
        let mut ticks = 0;
        // Reports of the dead leader age out after the failure timeout.
        now += FAILURE_TIMEOUT;
        while ticks < super::super::consensus::ELECTION_TICKS {
            ticks += 1;
            now += super::super::consensus::TICK;
            campaigns.extend(round(&mut nodes, &up, now));
            let j = (dead + 1) % 3;
            if nodes[j].0.view().live == survivors {
                break;
            }
        }
        assert_eq!(
            campaigns,
            vec![first],
            "one campaign, by the first survivor"
        );
        let j = (dead + 1) % 3;
        assert_eq!(
            nodes[j].0.view().live,
            survivors,
            "a view without the dead leader"
        );
        assert!(
            ticks < super::super::consensus::ELECTION_TICKS,
            "took {ticks} ticks: no faster than an election timeout"
        );
    }
}
