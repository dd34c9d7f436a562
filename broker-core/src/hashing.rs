//! The hash maps keyed by client ID and topic level. In every build of
//! `mqlb` they are foldhash's, randomly seeded per map (a client cannot
//! aim collisions at a map whose seed it does not know). With the
//! `deterministic` feature (the simulator) they are seeded alike, so their
//! iteration order, and with it the order of a publish's deliveries and of
//! a batch's records, is the same on every run of a seed.

/// A hash map (see the module docs).
#[cfg(not(feature = "deterministic"))]
pub type HashMap<K, V> = foldhash::HashMap<K, V>;
/// A hash set (see the module docs).
#[cfg(not(feature = "deterministic"))]
pub type HashSet<T> = foldhash::HashSet<T>;

/// A hash map (see the module docs).
#[cfg(feature = "deterministic")]
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;
/// A hash set (see the module docs).
#[cfg(feature = "deterministic")]
pub type HashSet<T> = std::collections::HashSet<T, foldhash::fast::FixedState>;
