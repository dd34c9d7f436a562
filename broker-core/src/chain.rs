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

#[cfg(test)]
mod tests {
    use super::*;

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
