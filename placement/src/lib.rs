//! Placement: which node owns a client ID.
//!
//! "Where is client X's session" must have one answer everywhere: in every
//! balancer replica, in every release, and in the bundled broker cluster. So
//! placement is one small function with a fixed, documented hash, and this
//! crate has no dependencies.
//!
//! # Algorithm
//! Weighted rendezvous (highest random weight) hashing:
//! * For each node, `h = fmix64(fnv1a64(node_name ++ 0xFF ++ key))`, where
//!   `fnv1a64` is 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime
//!   0x100000001b3) and `fmix64` is MurmurHash3's 64-bit finaliser, which
//!   gives FNV's output full avalanche. The 0xFF separator cannot occur in
//!   UTF-8, so `("ab","c")` and `("a","bc")` never collide.
//! * `u = ((h >> 11) + 0.5) / 2^53` lies in (0, 1); the score is
//!   `weight / -ln(u)` (Schindelhauer & Schomaker's logarithmic method), which
//!   gives each node a share proportional to its weight.
//! * Nodes are ranked by score, highest first. Equal weights compare `h`
//!   directly.
//! * Unequal weights are compared in integers, so every platform and
//!   release agrees bit for bit (`f64::ln` is not guaranteed to round the
//!   same in every math library). With `x = 2·(h >> 11) + 1`,
//!   `-ln(u) = ln 2 · (54 − log2 x)`; the common `ln 2` cancels, and
//!   `m = 54 − log2 x` is computed in fixed point with 40 fraction bits
//!   (`log2` by repeated squaring of the mantissa, truncating each step).
//!   Node `a` beats `b` when `weight_a · m_b > weight_b · m_a` (exact in
//!   `u128`); a tie falls back to comparing `h`.
//!
//! Nodes are identified by **name**, not address: moving a broker to a new
//! address keeps its clients; renaming it moves them. Removing a node moves
//! only the keys it owned; adding a node of weight `w` takes about
//! `w / total` of the keys and moves nothing else.
//!
//! Rust's `DefaultHasher` is deliberately not used: std does not promise its
//! algorithm across releases.

#![forbid(unsafe_code)]

use std::cmp::Ordering;

/// 64-bit FNV-1a over several byte slices, as if concatenated.
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// MurmurHash3's 64-bit finaliser.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The per-(node, key) hash. Stable forever: changing it moves every client.
pub fn node_hash(node_name: &str, key: &[u8]) -> u64 {
    fmix64(fnv1a64(&[node_name.as_bytes(), &[0xFF], key]))
}

/// Anything that can be placed on: a name (its identity) and a weight.
pub trait Node {
    /// The stable identity that is hashed.
    fn name(&self) -> &str;
    /// Relative share of keys; 0 means the node never receives keys.
    fn weight(&self) -> u32;
}

impl<T: Node + ?Sized> Node for &T {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn weight(&self) -> u32 {
        (**self).weight()
    }
}

impl<T: Node + ?Sized> Node for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn weight(&self) -> u32 {
        (**self).weight()
    }
}

/// Fraction bits of the fixed-point logarithm.
const FRAC: u32 = 40;

/// `floor(log2(x) · 2^FRAC)` for `x ≥ 1`, in integers only: the integer part
/// from the leading zeros, then one fraction bit per squaring of the
/// mantissa (kept in Q1.63, truncated at each step).
fn log2_fixed(x: u64) -> u128 {
    let int = u128::from(63 - x.max(1).leading_zeros());
    // Mantissa in [1, 2) as Q1.63.
    let mut m: u128 = u128::from(x.max(1)) << (63 - int as u32);
    let mut frac: u128 = 0;
    for _ in 0..FRAC {
        m = (m * m) >> 63;
        frac <<= 1;
        if m >= 2u128 << 63 {
            m >>= 1;
            frac |= 1;
        }
    }
    (int << FRAC) | frac
}

/// `(54 − log2(2·(h >> 11) + 1)) · 2^FRAC`: proportional to `-ln(u)`.
fn neg_log_u(hash: u64) -> u128 {
    let x = 2 * (hash >> 11) + 1;
    (54u128 << FRAC).saturating_sub(log2_fixed(x))
}

/// A node's score for one key.
#[derive(Debug, Clone, Copy)]
struct Score {
    hash: u64,
    weight: u32,
}

impl Score {
    /// Higher is better.
    fn cmp(&self, other: &Score) -> Ordering {
        if self.weight == other.weight {
            return self.hash.cmp(&other.hash);
        }
        // weight_a / m_a versus weight_b / m_b, cross-multiplied; m = 0
        // (u indistinguishable from 1) is the best possible score.
        let (ma, mb) = (neg_log_u(self.hash), neg_log_u(other.hash));
        let a = u128::from(self.weight) * mb;
        let b = u128::from(other.weight) * ma;
        a.cmp(&b).then(self.hash.cmp(&other.hash))
    }
}

/// All nodes with non-zero weight, best first, for `key`. Callers walk the
/// list and take the first usable node, so readiness stays out of the
/// algorithm (pingora's `select_with` split).
pub fn rank<'a, N: Node>(key: &[u8], nodes: &'a [N]) -> Vec<&'a N> {
    let mut scored: Vec<(Score, &N)> = nodes
        .iter()
        .filter(|n| n.weight() > 0)
        .map(|n| {
            (
                Score {
                    hash: node_hash(n.name(), key),
                    weight: n.weight(),
                },
                n,
            )
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name().cmp(b.1.name())));
    scored.into_iter().map(|(_, n)| n).collect()
}

/// The best node for `key` among those `usable` accepts, without allocating.
pub fn pick<'a, N: Node>(key: &[u8], nodes: &'a [N], usable: impl Fn(&N) -> bool) -> Option<&'a N> {
    let mut best: Option<(Score, &N)> = None;
    for n in nodes.iter().filter(|n| n.weight() > 0 && usable(n)) {
        let s = Score {
            hash: node_hash(n.name(), key),
            weight: n.weight(),
        };
        let better = match &best {
            None => true,
            Some((b, bn)) => match s.cmp(b) {
                Ordering::Greater => true,
                Ordering::Equal => n.name() < bn.name(),
                Ordering::Less => false,
            },
        };
        if better {
            best = Some((s, n));
        }
    }
    best.map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct N(&'static str, u32);
    impl Node for N {
        fn name(&self) -> &str {
            self.0
        }
        fn weight(&self) -> u32 {
            self.1
        }
    }

    fn three() -> Vec<N> {
        vec![N("b1", 1), N("b2", 1), N("b3", 1)]
    }

    #[test]
    fn golden_hashes_never_change() {
        // Pinned values: a change here moves clients in every deployment.
        assert_eq!(fnv1a64(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(node_hash("b1", b"sensor-1"), GOLDEN[0].2);
        for (node, key, h) in GOLDEN {
            assert_eq!(node_hash(node, key.as_bytes()), *h, "{node} {key}");
        }
        let nodes = three();
        let owners: Vec<&str> = ["sensor-1", "sensor-2", "", "日本"]
            .iter()
            .map(|k| pick(k.as_bytes(), &nodes, |_| true).unwrap().0)
            .collect();
        assert_eq!(owners, GOLDEN_OWNERS);
    }

    /// Computed by an independent Python implementation of the documented
    /// algorithm, so this also checks the docs match the code.
    const GOLDEN: &[(&str, &str, u64)] = &[
        ("b1", "sensor-1", 0x7a2b_9d63_29a2_6d71),
        ("b2", "sensor-1", 0x46ae_f688_72ec_5c49),
        ("b3", "", 0xd6ce_c5ea_55f8_be7e),
    ];
    const GOLDEN_OWNERS: [&str; 4] = ["b3", "b1", "b3", "b3"];

    /// Owners among b1 (weight 1), b2 (3), b3 (2), b4 (7), from exact
    /// arithmetic; keys within 1e-6 of a tie were left out.
    const GOLDEN_WEIGHTED: &[(&str, &str)] = &[
        ("dev-0", "b4"),
        ("dev-1", "b3"),
        ("dev-2", "b4"),
        ("dev-3", "b3"),
        ("dev-4", "b4"),
        ("dev-5", "b4"),
        ("dev-6", "b2"),
        ("dev-7", "b4"),
        ("dev-8", "b4"),
        ("dev-9", "b4"),
        ("dev-10", "b4"),
        ("dev-11", "b2"),
        ("dev-12", "b4"),
        ("dev-13", "b3"),
        ("dev-14", "b4"),
        ("dev-15", "b2"),
        ("dev-16", "b2"),
        ("dev-17", "b1"),
        ("dev-18", "b2"),
        ("dev-19", "b4"),
        ("dev-20", "b4"),
        ("dev-21", "b4"),
        ("dev-22", "b3"),
        ("dev-23", "b3"),
    ];

    #[test]
    fn separator_prevents_concatenation_collisions() {
        assert_ne!(node_hash("ab", b"c"), node_hash("a", b"bc"));
    }

    #[test]
    fn pick_agrees_with_rank() {
        let nodes = vec![N("a", 1), N("b", 3), N("c", 2), N("d", 1)];
        for i in 0..2000 {
            let key = format!("client-{i}");
            assert_eq!(
                rank(key.as_bytes(), &nodes)[0],
                pick(key.as_bytes(), &nodes, |_| true).unwrap()
            );
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let nodes = three();
        let mut moved = 0;
        let mut owned_by_b2 = 0;
        for i in 0..10_000 {
            let key = format!("device-{i}");
            let before = pick(key.as_bytes(), &nodes, |_| true).unwrap();
            let after = pick(key.as_bytes(), &nodes, |n| n.0 != "b2").unwrap();
            if before.0 == "b2" {
                owned_by_b2 += 1;
                // It goes to its second choice.
                assert_eq!(after, rank(key.as_bytes(), &nodes)[1]);
            } else {
                assert_eq!(before, after, "{key} moved although its node stayed");
            }
            if before != after {
                moved += 1;
            }
        }
        assert_eq!(moved, owned_by_b2);
        assert!(
            (2_900..=3_800).contains(&owned_by_b2),
            "b2 owned {owned_by_b2}"
        );
    }

    #[test]
    fn adding_a_node_moves_about_one_nth() {
        let old = three();
        let mut four = three();
        four.push(N("b4", 1));
        let mut moved = 0;
        for i in 0..10_000 {
            let key = format!("device-{i}");
            let a = pick(key.as_bytes(), &old, |_| true).unwrap().0;
            let b = pick(key.as_bytes(), &four, |_| true).unwrap().0;
            if a != b {
                assert_eq!(b, "b4", "a key moved between old nodes");
                moved += 1;
            }
        }
        assert!((2_200..=2_800).contains(&moved), "moved {moved}");
    }

    #[test]
    fn weights_set_shares() {
        let nodes = vec![N("a", 1), N("b", 2), N("c", 1), N("z", 0)];
        let mut counts = [0usize; 4];
        for i in 0..20_000 {
            let key = format!("k{i}");
            let n = pick(key.as_bytes(), &nodes, |_| true).unwrap();
            counts[nodes.iter().position(|x| x == n).unwrap()] += 1;
        }
        assert_eq!(counts[3], 0, "weight 0 receives nothing");
        // Expect 5000 / 10000 / 5000.
        assert!((4_500..=5_500).contains(&counts[0]), "{counts:?}");
        assert!((9_300..=10_700).contains(&counts[1]), "{counts:?}");
        assert!((4_500..=5_500).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn fixed_point_log_is_exact_where_it_can_be() {
        for k in 0..64u32 {
            assert_eq!(log2_fixed(1u64 << k), u128::from(k) << FRAC);
        }
        // floor(log2(3) · 2^40), from Python decimal at 50 digits.
        assert_eq!(log2_fixed(3), 1_742_684_699_131);
        // And it agrees with f64 to its precision on arbitrary values.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = x >> 10 | 1;
            let fixed = log2_fixed(v) as f64 / (1u64 << FRAC) as f64;
            assert!((fixed - (v as f64).log2()).abs() < 1e-9, "{v}");
        }
    }

    /// Unequal weights, pinned. The expected owners come from exact
    /// arithmetic (Python `decimal` at 60 digits, of `weight / -ln(u)`),
    /// not from this code, and every key was checked to be far from a tie.
    #[test]
    fn golden_owners_with_unequal_weights() {
        let nodes = vec![N("b1", 1), N("b2", 3), N("b3", 2), N("b4", 7)];
        let owners: Vec<&str> = GOLDEN_WEIGHTED
            .iter()
            .map(|(k, _)| pick(k.as_bytes(), &nodes, |_| true).unwrap().0)
            .collect();
        let want: Vec<&str> = GOLDEN_WEIGHTED.iter().map(|(_, o)| *o).collect();
        assert_eq!(owners, want);
    }

    #[test]
    fn nothing_usable_is_none() {
        assert!(pick(b"x", &three(), |_| false).is_none());
        assert!(pick::<N>(b"x", &[], |_| true).is_none());
    }
}
