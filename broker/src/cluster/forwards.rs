//! What a node does with a publish a peer forwarded to it
//! (`Frame::Forward`), decided from plain facts: the broker's link reader
//! and the simulator run the same rule.

use mqlb_protocol::QoS;

/// What to do with a forwarded publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// This node does not serve (left out of the view, without a
    /// majority, or leaving): it has handed its sessions to their replicas
    /// and must not acknowledge what it cannot deliver. Refused
    /// (`Frame::Refused`), the sender holds the message and forwards it
    /// again to whoever took the sessions over.
    Refuse,
    /// Routed to this node's sessions; `again`: as a message sent again,
    /// given only to sessions that cannot have it yet (`first_had`).
    Route {
        /// Routed as sent again.
        again: bool,
    },
}

/// Decides what a forwarded publish does here. `serving`: this node
/// serves; `qos`: the message's; `again`: the sender marked it sent again;
/// `sender_counted`: whether the committed view counts the sender (read
/// only for QoS 2).
///
/// From a node the committed view no longer counts (a dead node's last
/// frames, late), its publisher had no answer and may have sent the
/// message again through another node already, so it counts as sent again
/// (found by the simulator with sessions on different chains). QoS 2 only:
/// a QoS 1 copy too many is allowed, and skipping by fingerprint could
/// lose one.
pub fn forwarded(
    serving: bool,
    qos: QoS,
    again: bool,
    sender_counted: impl FnOnce() -> bool,
) -> Forwarded {
    if !serving {
        return Forwarded::Refuse;
    }
    let again = again || qos == QoS::ExactlyOnce && !sender_counted();
    Forwarded::Route { again }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_is_refused_routed_or_routed_as_sent_again() {
        let route = |again| Forwarded::Route { again };
        let unread = || -> bool { panic!("read for a message that is not QoS 2") };
        assert_eq!(
            forwarded(false, QoS::AtLeastOnce, false, unread),
            Forwarded::Refuse
        );
        assert_eq!(
            forwarded(true, QoS::AtLeastOnce, false, unread),
            route(false)
        );
        assert_eq!(forwarded(true, QoS::AtLeastOnce, true, unread), route(true));
        assert_eq!(
            forwarded(true, QoS::ExactlyOnce, false, || true),
            route(false)
        );
        assert_eq!(
            forwarded(true, QoS::ExactlyOnce, false, || false),
            route(true)
        );
        assert_eq!(
            forwarded(true, QoS::ExactlyOnce, true, || true),
            route(true)
        );
    }
}
