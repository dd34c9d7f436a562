//! Randomness from the seed alone.
//!
//! Two kinds: [`Rng`], a sequence for the fault schedule (drawn in a fixed
//! order by the simulation's main loop), and [`draw`], a value per (stream,
//! number) for everything drawn while events are handled (network delays,
//! the moment a batch is handed on). The second kind does not depend on the
//! order in which the simulation happens to handle things on different
//! streams, so a core that iterates a hash map in another order for the
//! same seed still sees the same delays on each stream.

/// SplitMix64's finaliser: a well-mixed 64-bit value of `z`.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `n`th value of `stream` for `seed`.
pub fn draw(seed: u64, stream: u64, n: u64) -> u64 {
    mix(seed ^ mix(stream ^ mix(n)))
}

/// A value in `lo..=hi` from a draw.
pub fn within(v: u64, lo: u64, hi: u64) -> u64 {
    lo + v % (hi - lo + 1)
}

/// A seeded sequence.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The sequence for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(mix(seed ^ 0x5EED))
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// The next value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        within(self.next_u64(), lo, hi)
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.next_u64().is_multiple_of(n)
    }
}

/// FNV-1a of `b`: what a run sent goes into its digest, so two runs of a
/// seed that send different bytes at the same times differ.
pub fn hash_bytes(b: &[u8]) -> u64 {
    b.iter().fold(0xCBF2_9CE4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}
