//! Deterministic hashing and pseudo-random numbers (SplitMix64), so initial factors and
//! negative samples depend only on the seed and on what is being drawn, never on timing.
//! The hash and the generator are [`reflex_core::hash`]'s (one copy in the workspace);
//! this module adds the conversion to floats.

pub use reflex_core::hash::{SplitMix, fnv1a, mix};

/// Uniform in [-1, 1) from the top 24 bits of `h`.
#[inline]
pub fn unit_f32(h: u64) -> f32 {
    ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}
