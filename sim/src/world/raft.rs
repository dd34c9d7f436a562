//! The view from the broker's own Raft group (`cluster::consensus`), not
//! an oracle ([`Config::raft`]).
//!
//! Each node runs its `Consensus` (raft-rs with its election timeouts drawn
//! from a generator seeded from the run's seed), ticked every
//! `consensus::TICK`; its messages travel as `Frame::Raft` on a stream of
//! their own beside each link's other frames, lost with the link. The loop
//! follows `Cluster::on_tick`: a node observes itself and the peers it has
//! a link to, hears the reports of the peers it observes (standing in for
//! their `Observed` frames), and runs the broker's own view loop
//! (`cluster::view_loop::ViewLoop`: who is live by majority, who
//! campaigns when the leader is lost, what the leader proposes, whether
//! the node lost its majority and steps down).
//!
//! Each node installs the view its own Raft member commits (`install`), so
//! nodes learn a view one by one, as the broker's do: a node cut off from
//! the leader, hung, or back blank acts on the view it has until the
//! leader catches it up, and promotes copies only once the leader has
//! confirmed that view is the newest (`Consensus::ask_current`, Raft's
//! ReadIndex, on the same simulated links). The cluster's view (where the
//! balancer sends clients, and what the checks and the fault schedule
//! read) is the newest any node has committed. A restarted node's Raft
//! state starts blank (as the broker's does without `--state-dir`), with a
//! view that names only itself, numbered 0, and is caught up by the
//! leader.

use mqlb_broker::cluster::consensus::{Committed, Consensus, StateKeeper, TICK as RAFT_TICK};
use mqlb_broker::cluster::view_loop::ViewLoop;
use mqlb_config::broker::PeerAddr;

use super::*;

fn raft_tick_stream(n: usize) -> u64 {
    (12 << 32) | n as u64
}

/// Raft's frames from `from` to `to`: a FIFO of their own.
fn raft_link_stream(from: usize, to: usize) -> u64 {
    (13 << 32) | (from as u64) << 8 | to as u64
}

/// What a node's Raft side keeps (lost in a crash).
pub(super) struct RaftNode {
    pub(super) consensus: Consensus,
    /// The broker's view loop: each peer's last report of what it
    /// observes, the term it last campaigned in, whether it heard a
    /// majority at its last tick.
    view_loop: ViewLoop,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("leader", &self.consensus.leader())
            .field("term", &self.consensus.term())
            .finish()
    }
}

impl RaftNode {
    /// Node `n` of `names`, its election timeouts drawn from `seed`.
    /// `keeper`: where its state survives a restart (a data directory),
    /// if anywhere.
    pub(super) fn new(
        n: usize,
        names: &[String],
        seed: u64,
        keeper: Option<Box<dyn StateKeeper>>,
    ) -> RaftNode {
        let members: Vec<(String, PeerAddr)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let port = 7000 + u16::try_from(i).unwrap_or(0);
                (
                    name.clone(),
                    PeerAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
                )
            })
            .collect();
        let consensus = Consensus::with_keeper(&names[n], &members, keeper, seed)
            .unwrap_or_else(|e| panic!("raft node {n}: {e}"));
        RaftNode {
            consensus,
            view_loop: ViewLoop::new(),
        }
    }
}

/// How long the Raft group has to elect its first leader and commit its
/// first view before faults begin (a cluster is started before it is
/// loaded; elections take 1-2 s).
pub(super) const RAFT_WARMUP: Time = 2_500 * MS;

impl World {
    /// Faults begin this late: [`RAFT_WARMUP`] with Raft, else at once.
    pub(super) fn warmup(&self) -> Time {
        if self.cfg.raft {
            RAFT_WARMUP
        } else {
            0
        }
    }

    /// Whether node `n` leads the Raft group (for the coverage report).
    pub(super) fn is_raft_leader(&self, n: usize) -> bool {
        self.nodes[n]
            .raft
            .as_ref()
            .is_some_and(|r| r.consensus.is_leader())
    }

    /// The seed of node `n`'s Raft generator in incarnation `inc`.
    pub(super) fn raft_seed(&self, n: usize, inc: u64) -> u64 {
        mix(self.seed ^ mix(0x5241_4654 ^ (n as u64) << 32 ^ inc))
    }

    /// Starts node `n`'s Raft ticks (at start, and after a restart).
    pub(super) fn start_raft_ticks(&mut self, n: usize) {
        let s = raft_tick_stream(n);
        let d = within(
            draw(self.seed, s, self.nodes[n].inc << 20),
            0,
            micros(RAFT_TICK),
        );
        let inc = self.nodes[n].inc;
        self.schedule_unordered(s, d, Ev::RaftTick { node: n, inc });
    }

    /// `Cluster::on_tick`'s view part on node `n`.
    pub(super) fn raft_tick(&mut self, n: usize, inc: u64) {
        if !self.nodes[n].up || self.nodes[n].inc != inc {
            return;
        }
        // Ticks stop once the run is over: the faults are done, every
        // publisher finished, every node is up and in the view.
        let over = self.now > self.cfg.fault_window + RAFT_WARMUP
            && self.settled_all()
            && self.view.len() == self.nodes.len()
            && self.clients.iter().all(|c| match &c.role {
                Role::Publisher(p) => p.done(),
                Role::Subscriber(_) => true,
            });
        if !over {
            let s = raft_tick_stream(n);
            self.schedule(s, micros(RAFT_TICK), Ev::RaftTick { node: n, inc });
        }
        let observed = self.observed(n);
        let name = |m: usize| self.nodes[m].name.clone();
        // The peers it has a link to report what they observe (reports
        // travel on the peer's link: only from peers observed).
        let reports: Vec<(String, Vec<String>)> = observed
            .iter()
            .filter(|&&p| p != n)
            .map(|&p| (name(p), self.observed(p).into_iter().map(name).collect()))
            .collect();
        let members: Vec<String> = (0..self.nodes.len()).map(name).collect();
        let me = name(n);
        let observed_names: Vec<String> = observed.iter().map(|&m| name(m)).collect();
        let quorum = self.nodes.len() / 2 + 1;
        let now = self.instant();
        let raft = self.nodes[n].raft.as_mut().expect("raft mode");
        for (p, r) in reports {
            raft.view_loop.report(&p, r, now);
        }
        let ticked = raft.view_loop.tick(
            &mut raft.consensus,
            &me,
            &members,
            &observed_names,
            quorum,
            now,
        );
        if ticked.campaigned {
            self.cov.raft_campaigns += 1;
        }
        let raft = self.nodes[n].raft.as_ref().expect("raft mode");
        if self.trace && raft.consensus.is_leader() && raft.consensus.view().live != ticked.live {
            println!(
                "{:>10.3}ms raft: leader n{} (term {}) observes {:?}, live {:?}",
                self.now as f64 / 1000.0,
                n + 1,
                raft.consensus.term(),
                observed,
                ticked.live
            );
        }
        self.raft_deliver(n, ticked.out);
        if !self.nodes[n].up || self.nodes[n].inc != inc {
            return;
        }
        // The rest of `on_tick`, in its order.
        self.cluster_tick(n, ticked.lost_quorum);
    }

    /// Node `n` and the peers it has open links with both ways (`observe`:
    /// its own link to the peer registered, after its snapshot, and the
    /// peer heard on the peer's).
    pub(super) fn observed(&self, n: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&p| {
                // A peer that said it is leaving is not heard
                // (`Peers::hears`).
                p == n || (self.link_up(n, p) && self.link_up(p, n) && !self.nodes[p].announced)
            })
            .collect()
    }

    /// Whether `from`'s link to `to` is open: both up, not broken, and its
    /// snapshot sent (`LinkOpen` handled).
    fn link_up(&self, from: usize, to: usize) -> bool {
        self.linked(from, to) && self.nodes[from].covers.contains_key(&to)
    }

    /// Sends `out`'s messages from `n` and applies the view it committed.
    pub(super) fn raft_deliver(&mut self, n: usize, out: mqlb_broker::cluster::consensus::Output) {
        for (to, m) in out.messages {
            let Some(t) = self.index_of(&to) else {
                continue;
            };
            self.send_raft(n, t, Frame::Raft(m));
        }
        if let Some(v) = out.view {
            if self.trace {
                println!(
                    "{:>10.3}ms raft: n{} committed view #{} live {:?}",
                    self.now as f64 / 1000.0,
                    n + 1,
                    v.number,
                    v.live
                );
            }
            let live: BTreeSet<usize> = v
                .live
                .iter()
                .filter_map(|name| self.index_of(name))
                .collect();
            let number = v.number;
            self.raft_view(v);
            // Installed on this node alone: each learns it from its own
            // Raft member.
            self.install(n, live, number);
        }
    }

    /// `send_frame` on Raft's own stream of the link (once it is open).
    fn send_raft(&mut self, from: usize, to: usize, frame: Frame) {
        let open = self.link_up(from, to);
        self.send_on(raft_link_stream(from, to), from, to, &frame, open);
    }

    /// A Raft message from `from` at `to`.
    pub(super) fn raft_frame(&mut self, from: usize, to: usize, m: &Bytes) {
        let name = self.nodes[from].name.clone();
        let Some(raft) = self.nodes[to].raft.as_mut() else {
            return;
        };
        let out = raft.consensus.step(&name, m);
        self.raft_deliver(to, out);
    }

    /// A view committed by the Raft group, the first time any node commits
    /// it: the cluster's view from then on (the balancer's, the checks'
    /// and the fault schedule's). Each node installs it when its own Raft
    /// member commits it (`raft_deliver`), and acts on it at its next tick
    /// (`cluster_tick`: a node left out steps down there).
    fn raft_view(&mut self, v: Committed) {
        if v.number <= self.raft_view_number {
            return;
        }
        self.raft_view_number = v.number;
        self.cov.raft_views += 1;
        self.cov.view_changes += 1;
        if self.trace {
            println!(
                "{:>10.3}ms raft view #{} live {:?}",
                self.now as f64 / 1000.0,
                v.number,
                v.live
            );
        }
        // A member that joins while it is down is left out until a later
        // view (the balancer would not send it clients either).
        let live: BTreeSet<usize> = v
            .live
            .iter()
            .filter_map(|name| self.index_of(name))
            .filter(|&j| self.view.contains(&j) || self.nodes[j].up)
            .collect();
        if live.iter().any(|j| !self.view.contains(j)) {
            self.last_join = self.now;
            if self.partitioned.is_some_and(|p| live.contains(&p)) {
                // (One failure at a time: the next may come.)
                self.partitioned = None;
            }
        }
        self.view = live;
        self.view_number = v.number;
    }
}

/// A duration in the simulation's microseconds.
pub(super) fn micros(d: Duration) -> Time {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
