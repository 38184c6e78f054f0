//! Stable hashing and a small deterministic generator: FNV-1a and SplitMix64, the same in
//! every process, platform and Rust release (unlike `std`'s hasher), so replicas agree on
//! the sampled events and the holdout, imported rows get the same derived ids, and a
//! seeded model draws the same initial factors and negatives on every replay.
//!
//! The one copy in the workspace: the models, the quality sampler and `reflex import` all
//! use it, and its outputs are pinned by the tests below (changing one changes persisted
//! ids, the holdout and every seeded model).

/// FNV-1a's offset basis: the start of the standard 64-bit FNV-1a.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a's 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// SplitMix64's increment (2⁶⁴ / φ, odd).
pub const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// FNV-1a of `bytes` started from `basis` ([`FNV_OFFSET`] for the standard hash).
#[inline]
pub fn fnv1a_from(basis: u64, bytes: &[u8]) -> u64 {
    let mut h = basis;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// FNV-1a of a byte string: a stable hash (unlike `std`'s, fixed across releases).
#[inline]
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_from(FNV_OFFSET, bytes)
}

/// SplitMix64's output function: a bijection of `z` that spreads every input bit over
/// the whole output.
#[inline]
pub fn finalise(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64 finaliser: a well-mixed 64-bit hash of `z` (the first output of a
/// [`SplitMix`] seeded with `z`).
#[inline]
pub fn mix(z: u64) -> u64 {
    finalise(z.wrapping_add(GOLDEN_GAMMA))
}

/// FNV-1a of `bytes` from `basis`, then [`finalise`]d: a well-mixed stable hash whose
/// `basis` picks one of many independent functions.
#[inline]
pub fn hash_from(basis: u64, bytes: &[u8]) -> u64 {
    finalise(fnv1a_from(basis, bytes))
}

/// A stable 64-bit hash of `s` (FNV-1a, then a splitmix finaliser), the same in every
/// process and Rust version, so replicas agree on samples and the holdout; `salt` picks
/// an independent function per use.
#[inline]
pub fn stable_hash(s: &str, salt: u64) -> u64 {
    hash_from(FNV_OFFSET ^ salt, s.as_bytes())
}

/// A small sequential generator (SplitMix64). Each output is [`mix`] of the advanced
/// state, which adds the increment once more: the textbook generator's stream one step
/// ahead (`SplitMix::new(s)` gives what it gives seeded with `s + GOLDEN_GAMMA`). Kept so,
/// because seeded models and tests depend on these exact draws.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift.
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values the three copies this module replaced gave (models' `rng`, the quality
    /// sampler's `stable_hash`, `reflex import`'s event-id hash), computed before the move.
    #[test]
    fn outputs_are_pinned() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"user-1"), 0xf84b_a2aa_754a_4bd4);
        assert_eq!(mix(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix(1), 0x910a_2dec_8902_5cc1);
        assert_eq!(mix(42), 0xbdd7_3226_2feb_6e95);
        assert_eq!(mix(u64::MAX), 0xe4d9_7177_1b65_2c20);
        let mut g = SplitMix::new(7);
        assert_eq!(
            [g.next_u64(), g.next_u64(), g.next_u64()],
            [
                0x044c_3cd7_f43c_661c,
                0xe698_4080_bab1_2a02,
                0x953a_eb70_673e_29cb
            ]
        );
        let mut g = SplitMix::new(7);
        assert_eq!([0; 5].map(|_| g.below(10)), [0, 9, 5, 4, 2]);
        assert_eq!(stable_hash("", 0), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(stable_hash("user-1", 0), 0xc499_b5f8_a721_df58);
        assert_eq!(
            stable_hash("user-1", 0x5a4d_504c_4521),
            0xd4e1_5f5f_9302_6cd0
        );
        assert_eq!(stable_hash("ev-9", 0x484f_4c44_4f55), 0xa9f5_1219_f144_0ef8);
        assert_eq!(hash_from(FNV_OFFSET, b"x"), 0x2c78_2ac2_2891_188e);
        assert_eq!(
            hash_from(0x6c62_272e_07bb_0142, b"x"),
            0x22d3_2652_5729_4629
        );
        // `reflex import`'s id of ("u1", "i9", "view", 1_700_000_000_000):
        // imp-8b00d69fd9acb792d0df6aa1fd91f103.
        let key = "u1\u{1f}i9\u{1f}view\u{1f}1700000000000".as_bytes();
        assert_eq!(hash_from(FNV_OFFSET, key), 0x8b00_d69f_d9ac_b792);
        assert_eq!(hash_from(0x6c62_272e_07bb_0142, key), 0xd0df_6aa1_fd91_f103);
        // The user seed of the online model's default seed.
        assert_eq!(mix(0x5eed_0f4e_f1e8 ^ fnv1a(b"u1")), 0x1666_82c9_d469_34cb);
    }
}
