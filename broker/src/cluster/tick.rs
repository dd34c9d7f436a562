//! The order in which a node's tick acts on what it decided, as plain
//! data: given what the node sees now (its committed view, whether it lost
//! its majority, whether it is leaving or serving) and what it acted on at
//! its last tick, [`Tick::next`] returns the steps to take, in the order
//! they must be taken. The broker's view loop (`Cluster::on_tick`) and the
//! simulator (`mqlb-sim`, at each node's own tick) both carry out the same
//! list, so the orchestration the simulator tests is this one, not a copy.
//!
//! The order matters, and each rule was found the hard way:
//! - a node that lost its majority, or that a new view left out, steps
//!   down before anything else, so it promotes nothing in a view it is
//!   about to leave;
//! - copies whose holder the view dropped are handed over before this
//!   node promotes its own and says so: on each link its `Promoted` word
//!   then comes after those copies (`takeover_done` relies on it);
//! - publishes are held for unpromoted copies right after the promotions,
//!   so none matches nobody between the two;
//! - waits on departed peers end after the promotions, and the sessions go
//!   whole down their new chains last, once they are this node's.

/// What a node sees at a tick, read once before it acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// The committed view's number (0: none committed yet).
    pub view: u64,
    /// The committed view counts this node (always so before a view).
    pub counted: bool,
    /// The view loop found at this tick that this node lost its majority.
    pub lost_quorum: bool,
    /// This node is stopping gracefully (it keeps its links up and hands
    /// its sessions over once the view drops it).
    pub leaving: bool,
    /// This node serves sessions now: counted by the view, not leaving,
    /// and hearing a majority.
    pub serving: bool,
}

/// One thing a tick does; [`Tick::next`] lists them in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Stop serving: sessions become copies, clients are closed.
    StepDown,
    /// Tell linked peers this node serves nothing (an empty snapshot), so
    /// their copies stop naming it as holder. Not on a graceful stop,
    /// whose copies move once the view drops it.
    ServesNothing,
    /// From here on the node serves as [`Facts::serving`] says (until the
    /// next tick): what it accepts and what it sends its peers. After a
    /// step down, before interest is sent again (a change of interest
    /// made from then on goes out too).
    NoteServing,
    /// Back in service: peers forget the interest this node had and get
    /// its current one.
    ResendInterest,
    /// The view changed: copies of holders that left go to their new
    /// owners, and the retained messages those holders wrote last go to
    /// every peer again. The host compares with the view it acted on last.
    HandOver,
    /// Promote the copies this node owns whose holder the view no longer
    /// counts (once this node is synced).
    Promote,
    /// Hold publishes matching copies this node owns and has not promoted.
    HoldForCopies,
    /// Note that this node is synced (every live peer's snapshot heard):
    /// it is ready from now on.
    NoteSynced,
    /// Say `Promoted` for the view once every copy this node owns in it
    /// is a session.
    SayPromoted,
    /// End the waits on peers that are gone (`departures::at_tick`).
    Departures,
    /// The view changed: every session whole down its chain, and the
    /// state store's keys down theirs.
    Rechain,
}

/// What the last tick acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    view: u64,
    left_out: bool,
    serving: bool,
}

impl Tick {
    /// A node starting in view `view` (counted by it or not), as serving:
    /// a process that starts has told no peer anything yet, and each link
    /// it opens sends its whole interest anyway, so its first tick sends
    /// none again.
    pub fn new(view: u64, counted: bool) -> Self {
        Tick {
            view,
            left_out: view > 0 && !counted,
            serving: true,
        }
    }

    /// The view the last tick acted on.
    pub fn view(&self) -> u64 {
        self.view
    }

    /// The steps this tick takes, in order, given what the node sees now;
    /// from here on `now` is what the last tick acted on.
    pub fn next(&mut self, now: Facts) -> Vec<Step> {
        let left_out = now.view > 0 && !now.counted;
        let newly_left_out = left_out && !self.left_out;
        let changed = now.view != self.view;
        let mut steps = Vec::with_capacity(11);
        let stepped_down = now.lost_quorum || newly_left_out;
        if stepped_down {
            steps.push(Step::StepDown);
            if !now.leaving {
                steps.push(Step::ServesNothing);
            }
        }
        steps.push(Step::NoteServing);
        // Stepping down stops the serving this tick compares with.
        let was = self.serving && !stepped_down;
        if now.serving && !was {
            steps.push(Step::ResendInterest);
        }
        if changed {
            steps.push(Step::HandOver);
        }
        steps.extend([
            Step::Promote,
            Step::HoldForCopies,
            Step::NoteSynced,
            Step::SayPromoted,
            Step::Departures,
        ]);
        if changed {
            steps.push(Step::Rechain);
        }
        *self = Tick {
            view: now.view,
            left_out,
            serving: now.serving,
        };
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Step::*;

    fn facts(view: u64, counted: bool) -> Facts {
        Facts {
            view,
            counted,
            lost_quorum: false,
            leaving: false,
            serving: counted,
        }
    }

    /// A quiet tick promotes, holds, notes, speaks and ends waits, in
    /// that order; a new view hands over first and re-chains last.
    #[test]
    fn a_view_change_hands_over_first_and_rechains_last() {
        let mut t = Tick::new(1, true);
        let quiet = [
            NoteServing,
            Promote,
            HoldForCopies,
            NoteSynced,
            SayPromoted,
            Departures,
        ];
        assert_eq!(t.next(facts(1, true)), quiet);
        let mut changed = quiet.to_vec();
        changed.insert(1, HandOver);
        changed.push(Rechain);
        assert_eq!(t.next(facts(2, true)), changed);
        assert_eq!(t.view(), 2);
        // Acted on once.
        assert_eq!(t.next(facts(2, true)), quiet);
    }

    /// Left out by a new view: steps down once, before the hand-over
    /// (and says it serves nothing unless it is leaving); counted again,
    /// it sends its interest again.
    #[test]
    fn a_node_left_out_steps_down_once_and_comes_back() {
        let mut t = Tick::new(1, true);
        let steps = t.next(facts(2, false));
        assert_eq!(steps[..4], [StepDown, ServesNothing, NoteServing, HandOver]);
        assert!(!t.next(facts(2, false)).contains(&StepDown));
        let back = t.next(facts(3, true));
        assert_eq!(back[..3], [NoteServing, ResendInterest, HandOver]);
        assert!(!back.contains(&StepDown));

        let mut leaving = Tick::new(1, true);
        let steps = leaving.next(Facts {
            leaving: true,
            serving: false,
            ..facts(2, false)
        });
        assert_eq!(steps[..3], [StepDown, NoteServing, HandOver]);
    }

    /// A lost majority steps down at every tick the view loop says so;
    /// heard again, the node is back in service and sends its interest,
    /// in the same view.
    #[test]
    fn a_lost_majority_steps_down_and_service_resumes() {
        let mut t = Tick::new(3, true);
        let lost = Facts {
            lost_quorum: true,
            serving: false,
            ..facts(3, true)
        };
        assert_eq!(
            t.next(lost)[..4],
            [StepDown, ServesNothing, NoteServing, Promote]
        );
        assert_eq!(t.next(facts(3, true))[..2], [NoteServing, ResendInterest]);
        // A node that starts before any view is not left out.
        let mut fresh = Tick::new(0, false);
        assert_eq!(fresh.next(facts(0, false))[..2], [NoteServing, Promote]);
    }
}
