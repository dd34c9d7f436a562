//! Test-only switches that put back bugs fixed earlier, so that the
//! simulator (`mqlb-sim`) can prove it finds them. The switches exist only
//! with the `mutations` feature (the simulator's tests enable it); without
//! it, [`on`] is a constant `false` and the code it guards is gone. A
//! switch is per thread: one simulation runs on one thread, and others
//! running beside it in the same test process are not touched.

/// A bug that can be put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// PUBREL leaves at once, before the PUBREC's session change is
    /// committed (fixed in 4fb65f1: a node dying between the two left a
    /// copy that resent the PUBLISH, a QoS 2 duplicate).
    PubrelBeforeCommit,
    /// The change log hands batches on newest first, not in the order the
    /// core made them (the equivalent of the records appended after the
    /// core's lock, fixed in 23b3b02).
    LogOutOfOrder,
    /// A holder streams a session's changes only to its chain in the view,
    /// not to a returning node its link snapshot gave the session to (the
    /// stale copy the simulator found; see `chain::targets`).
    JoinerMissesChanges,
    /// A node keeps a link snapshot's copy of a session it serves (the
    /// copy relayed back that the simulator found; see
    /// `replicas::keeps_snapshot_copy`).
    SnapshotCopyOfLiveSession,
    /// A relayed copy may be promoted at once, as a copy its holder
    /// updated may (the stale relayed copy the simulator found; see
    /// `Replicas::promotable`).
    RelayedCopyPromotedAtOnce,
    /// A chain member whose link broke is counted out, as one that left
    /// the view (changes committed without it, which it could then
    /// promote without; see `commits`).
    UnlinkedMemberCountedOut,
    /// A returning node's copies cut off from their holder may be
    /// promoted at once (see `Replicas::unlinked_from`).
    CutOffCopyPromoted,
    /// A state store change counts a chain member without a link, or whose
    /// link broke before it answered, out, as one that left the view (an
    /// `OK` its owner's death then loses; see the broker's
    /// `cluster::acks::owed_after`).
    StoreMemberCountedOut,
    /// With a data directory, a batch counts as committed once its chain
    /// has it, before it is on this node's own disk (`durable::DiskLog`;
    /// the simulator mirrors that wait): a site-wide power loss then takes
    /// acknowledged messages.
    CommitBeforeFsync,
    /// Copies of one epoch are told apart by their epoch alone, not by how
    /// many of its changes they hold (bug 23 of the simulator's list: a
    /// copy read back from a data directory promoted over a fresher one;
    /// see `session::Progress`).
    CopiesOfOneEpochAlike,
    /// A will waiting out its delay lives on the node that saw its client
    /// go, not with the session (`Core::schedule_will` records no
    /// `SessionChange::WillSet`): it dies with that node.
    WillOnlyOnHolder,
    /// A relayed copy's wait for a fresher one counts from when it came,
    /// not again from when its holder left the view (see
    /// `Replicas::holders_left`).
    RelayedWaitFromArrival,
    /// A QoS 2 resend (DUP) whose id the publisher's session lacks is
    /// routed as a first publish to every session, those taken over lately
    /// that already hold it included (see `Core::route_resent`).
    ResendRoutedAsNew,
    /// A publisher's later publishes are routed at once while one of its
    /// publishes is held for a takeover (see `Core::route`'s
    /// `Route::Deferred`): a session promoted meanwhile gets them first.
    LaterPublishesNotDeferred,
    /// A node that steps down keeps its word that it promoted its copies
    /// (`promotions`, as the broker's `step_down` and `links` and the
    /// simulator use it):
    /// a peer routes held publishes while no node serves those sessions.
    StalePromotedWord,
    /// A QoS 2 resend, or a deferred QoS 2 publish, is routed to the
    /// sessions here and to peers as a first publish, whatever this node
    /// or they had of it (see `first_had`).
    ResendNotDeduplicated,
    /// A QoS 2 resend whose id a taken-over copy held reaches only the
    /// sessions taken over here, never one here all along nor a peer (see
    /// `Core::qos2_resent`).
    ResendOnlyToTakenOver,
}

#[cfg(feature = "mutations")]
thread_local! {
    static ON: std::cell::Cell<Option<Mutation>> = const { std::cell::Cell::new(None) };
}

/// Puts `m` back on this thread (`None`: none).
#[cfg(feature = "mutations")]
pub fn set(m: Option<Mutation>) {
    ON.with(|c| c.set(m));
}

/// Whether `m` is on for this thread.
#[cfg(feature = "mutations")]
pub fn on(m: Mutation) -> bool {
    ON.with(|c| c.get() == Some(m))
}

/// Whether `m` is on: never, without the `mutations` feature.
#[cfg(not(feature = "mutations"))]
#[inline(always)]
pub fn on(_m: Mutation) -> bool {
    false
}
