//! Which nodes keep a session's copies: its chain, the top R of the
//! rendezvous hash of its client ID over the view's members (the balancer's
//! `placement` crate, so the balancer and the cluster agree on owners), and
//! whom a holder streams its changes to. Plain functions over names, shared
//! by the broker's cluster and the simulator.

use mqlb_placement::Node;

struct Member<'a>(&'a str);

impl Node for Member<'_> {
    fn name(&self) -> &str {
        self.0
    }
    fn weight(&self) -> u32 {
        1
    }
}

/// `client`'s chain among `members`: its owner first, at most `r` nodes.
pub fn chain<'a>(client: &str, members: &[&'a str], r: usize) -> Vec<&'a str> {
    let ms: Vec<Member<'a>> = members.iter().map(|m| Member(m)).collect();
    mqlb_placement::rank(client.as_bytes(), &ms)
        .into_iter()
        .take(r)
        .map(|m| m.0)
        .collect()
}

/// Whom a holder sends `client`'s changes to: its chain in the view, and
/// each `joining` peer (linked, not yet counted by the view) that would be
/// in its chain with that peer counted. A returning node's link snapshot
/// holds the sessions whose chain will hold it; were the changes after the
/// snapshot not sent to it until the view counts it, a holder dying in
/// between would leave it a stale copy, which it promotes once it owns
/// the session: messages completed since (a QoS 2 duplicate) or
/// acknowledged since (a loss) are wrong in it. Found by the simulator.
pub fn targets<'a>(client: &str, view: &[&'a str], joining: &[&'a str], r: usize) -> Vec<&'a str> {
    let mut out = chain(client, view, r);
    if crate::mutations::on(crate::mutations::Mutation::JoinerMissesChanges) {
        return out;
    }
    for &j in joining {
        if out.contains(&j) {
            continue;
        }
        let mut with: Vec<&'a str> = view.to_vec();
        with.push(j);
        if chain(client, &with, r).contains(&j) {
            out.push(j);
        }
    }
    out
}

/// What a holder does with one batch's changes for one of their targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Sent on the open link; the batch waits for its acknowledgement.
    Send,
    /// Not sent, but owed: the target's link snapshot had the batch
    /// already (the link opened after the batch was numbered), or the
    /// target is a member of the view without a link and gets it in its
    /// next link's snapshot. The batch waits until that snapshot is
    /// confirmed (`commits`): counted out, the target could be promoted
    /// without the change (found by the simulator).
    Owed,
    /// Neither: a joiner without a link is not waited for.
    Skip,
}

/// Where batch `log_seq` goes for a target whose open link's snapshot
/// holds every batch up to `covers` (`None`: no open link), `in_view`
/// whether the committed view counts it.
pub fn delivery(log_seq: u64, covers: Option<u64>, in_view: bool) -> Delivery {
    match covers {
        Some(c) if log_seq > c => Delivery::Send,
        Some(_) => Delivery::Owed,
        None if in_view => Delivery::Owed,
        None => Delivery::Skip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_sent_owed_or_skipped() {
        assert_eq!(delivery(5, Some(4), true), Delivery::Send);
        assert_eq!(
            delivery(5, Some(4), false),
            Delivery::Send,
            "a joiner linked"
        );
        assert_eq!(
            delivery(5, Some(5), true),
            Delivery::Owed,
            "in the snapshot"
        );
        assert_eq!(delivery(5, None, true), Delivery::Owed, "a member unlinked");
        assert_eq!(
            delivery(5, None, false),
            Delivery::Skip,
            "a joiner unlinked"
        );
    }

    #[test]
    fn a_joining_peer_is_sent_what_its_snapshot_would_hold() {
        let all = ["n1", "n2", "n3"];
        // A client whose full ranking puts n3 in the top two.
        let client = (0..)
            .map(|k| format!("c{k}"))
            .find(|c| chain(c, &all, 2).contains(&"n3") && chain(c, &all, 2)[0] != "n3")
            .unwrap();
        let view = ["n1", "n2"];
        let before = chain(&client, &view, 2);
        assert_eq!(before.len(), 2);
        // n3 is linked but not in the view: it is sent the changes too.
        let t = targets(&client, &view, &["n3"], 2);
        assert_eq!(&t[..2], &before[..]);
        assert_eq!(t[2..], ["n3"]);
        // Not in its chain even with it counted: not sent.
        let other = (0..)
            .map(|k| format!("d{k}"))
            .find(|c| !chain(c, &all, 2).contains(&"n3"))
            .unwrap();
        assert_eq!(targets(&other, &view, &["n3"], 2), chain(&other, &view, 2));
        // Nobody joining: the chain.
        assert_eq!(targets(&client, &view, &[], 2), before);
    }
}
