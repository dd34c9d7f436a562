//! What session changes and forwarded publishes wait for: each append's
//! outstanding acknowledgements per peer, as one component that owns them,
//! plain data in and out (the waiter holds a channel; acknowledgements,
//! refusals and lost peers come in as calls, and what must be forwarded
//! again comes back out). It takes no lock and does no I/O; the cluster
//! keeps it behind one mutex and sends the frames, registering each wait
//! before its frames leave (a peer may answer within microseconds).

use std::collections::HashMap;
use std::sync::Arc;

use crate::message::Message;
use crate::router::NodeId;

/// A publish to forward again, with the shared groups it serves, and the
/// channel that says when it is committed.
pub(crate) type Resend = (Message, Vec<Arc<str>>, tokio::sync::oneshot::Sender<()>);

/// One append's outstanding acknowledgements.
#[derive(Debug)]
struct Waiting {
    per_node: HashMap<NodeId, usize>,
    tx: Option<tokio::sync::oneshot::Sender<()>>,
    /// A forwarded publish, kept until its peer confirms it: if the peer
    /// dies or refuses it first, it is forwarded again to whoever took
    /// over.
    resend: Option<(Message, Vec<Arc<str>>)>,
}

/// Every outstanding append, by the sequence number its frames carry.
#[derive(Debug, Default)]
pub(crate) struct Commits {
    waits: HashMap<u64, Waiting>,
}

impl Commits {
    /// Waits for `per_node` acknowledgements of `seq` (so many from each
    /// peer); the receiver fires once all came (never, if dropped first).
    /// `resend`: a forwarded publish, given back if its peer is lost or
    /// refuses it.
    pub(crate) fn register(
        &mut self,
        seq: u64,
        per_node: HashMap<NodeId, usize>,
        resend: Option<(Message, Vec<Arc<str>>)>,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waits.insert(
            seq,
            Waiting {
                per_node,
                tx: Some(tx),
                resend,
            },
        );
        rx
    }

    /// `from` acknowledged `seq` once.
    pub(crate) fn acked(&mut self, from: NodeId, seq: u64) {
        let Some(w) = self.waits.get_mut(&seq) else {
            return;
        };
        if let Some(n) = w.per_node.get_mut(&from) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.per_node.remove(&from);
            }
        }
        if w.per_node.is_empty() {
            if let Some(tx) = self.waits.remove(&seq).and_then(|mut w| w.tx.take()) {
                let _ = tx.send(());
            }
        }
    }

    /// `from` did not deliver the forward `seq` (it no longer serves
    /// sessions): once nobody else is waited for, the publish comes back
    /// to be forwarded again (or the wait is done, without one).
    pub(crate) fn refused(&mut self, from: NodeId, seq: u64) -> Option<Resend> {
        let w = self.waits.get_mut(&seq)?;
        w.per_node.remove(&from);
        if !w.per_node.is_empty() {
            return None;
        }
        let mut w = self.waits.remove(&seq)?;
        let tx = w.tx.take()?;
        match w.resend.take() {
            Some((m, groups)) => Some((m, groups, tx)),
            None => {
                let _ = tx.send(());
                None
            }
        }
    }

    /// Peers that left the view wait no longer; the publishes that were
    /// waiting only for them come back, to be forwarded again.
    pub(crate) fn lost(&mut self, gone: &[NodeId]) -> Vec<Resend> {
        let mut done = Vec::new();
        for (seq, w) in &mut self.waits {
            let before = w.per_node.len();
            for g in gone {
                w.per_node.remove(g);
            }
            if w.per_node.is_empty() && before > 0 {
                done.push(*seq);
            }
        }
        let mut again = Vec::new();
        for seq in done {
            let Some(mut w) = self.waits.remove(&seq) else {
                continue;
            };
            let Some(tx) = w.tx.take() else {
                continue;
            };
            match w.resend.take() {
                Some((m, groups)) => again.push((m, groups, tx)),
                None => {
                    let _ = tx.send(());
                }
            }
        }
        again
    }

    /// How many appends are waiting.
    pub(crate) fn len(&self) -> usize {
        self.waits.len()
    }

    /// Up to `most` waits: their numbers, the peers still to answer, and
    /// whether each is a forward (for a log line).
    pub(crate) fn sample(&self, most: usize) -> Vec<(u64, Vec<NodeId>, bool)> {
        self.waits
            .iter()
            .take(most)
            .map(|(seq, w)| {
                (
                    *seq,
                    w.per_node.keys().copied().collect(),
                    w.resend.is_some(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_protocol::{MqttStr, QoS};

    fn message() -> Message {
        Message {
            topic: MqttStr::try_from("t").unwrap_or_default(),
            payload: bytes::Bytes::from_static(b"m"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Arc::default(),
            origin: None,
            received: std::time::Instant::now(),
        }
    }

    /// A session change waits for every acknowledgement it was sent for,
    /// from each member; a lost member waits no longer.
    #[test]
    fn changes_commit_once_every_member_acknowledged() {
        let mut c = Commits::default();
        let mut rx = c.register(1, HashMap::from([(2, 2), (3, 1)]), None);
        c.acked(2, 1);
        c.acked(3, 1);
        assert!(rx.try_recv().is_err(), "2 owes one more");
        c.acked(2, 1);
        assert_eq!(rx.try_recv(), Ok(()));
        let mut rx = c.register(2, HashMap::from([(4, 1)]), None);
        assert!(c.lost(&[4]).is_empty());
        assert_eq!(rx.try_recv(), Ok(()));
        assert_eq!(c.len(), 0);
    }

    /// A forward refused, or whose peer is lost, comes back to be sent
    /// again, its wait still open until then.
    #[test]
    fn forwards_come_back_when_refused_or_lost() {
        let mut c = Commits::default();
        let mut rx = c.register(5, HashMap::from([(2, 1)]), Some((message(), Vec::new())));
        let (m, _, tx) = c.refused(2, 5).expect("comes back");
        assert_eq!(&m.payload[..], b"m");
        assert!(rx.try_recv().is_err(), "not committed until sent again");
        let _ = tx.send(());
        assert_eq!(rx.try_recv(), Ok(()));
        let _rx = c.register(6, HashMap::from([(3, 1)]), Some((message(), Vec::new())));
        assert_eq!(c.sample(8), vec![(6, vec![3], true)]);
        assert_eq!(c.lost(&[3]).len(), 1);
        assert_eq!(c.len(), 0);
    }
}
