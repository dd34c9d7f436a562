//! The ordered change log's numbering: each batch of log entries the core
//! makes is numbered under the core's lock and handed on, outside it, in
//! that order, whoever hands it on. A node's shell (`State::sequence` and
//! `State::commit` in the broker) keeps one behind a mutex; the simulator
//! drives the same code.

use std::collections::VecDeque;

/// Batches numbered and not yet handed on.
#[derive(Debug)]
pub struct Sequencer<T> {
    last: u64,
    pending: VecDeque<(u64, T)>,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Self {
            last: 0,
            pending: VecDeque::new(),
        }
    }
}

impl<T> Sequencer<T> {
    /// Numbers `batch` (one more than the last) and keeps it until
    /// [`Sequencer::take_next`] hands it on.
    pub fn number(&mut self, batch: T) -> u64 {
        self.last += 1;
        self.pending.push_back((self.last, batch));
        self.last
    }

    /// Numbers go on after `last` (a data directory's batches were
    /// numbered up to it before this start), if that is further.
    pub fn start_after(&mut self, last: u64) {
        self.last = self.last.max(last);
    }

    /// The number of the last batch numbered: every change made before it
    /// is in a batch numbered at most this.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The oldest batch not yet handed on, with its number.
    pub fn take_next(&mut self) -> Option<(u64, T)> {
        if crate::mutations::on(crate::mutations::Mutation::LogOutOfOrder) {
            return self.pending.pop_back();
        }
        self.pending.pop_front()
    }

    /// How many batches wait to be handed on.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_leave_in_the_order_they_were_numbered() {
        let mut s = Sequencer::default();
        assert_eq!((s.number("a"), s.number("b")), (1, 2));
        assert_eq!(s.take_next(), Some((1, "a")));
        assert_eq!(s.number("c"), 3);
        assert_eq!(
            (s.take_next(), s.take_next(), s.take_next()),
            (Some((2, "b")), Some((3, "c")), None)
        );
        assert_eq!(s.last(), 3);
    }
}
