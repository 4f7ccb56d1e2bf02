//! Seed derivation: independent, reproducible RNG streams from one user seed.
//!
//! Every random choice in the crate (epoch permutations, per-batch noise and flips,
//! per-image crops, procedural images) is drawn from an RNG seeded with
//! `mix_seed(seed, stream)`, so results never depend on thread timing or on how much of a
//! dataset was consumed before.

/// The SplitMix64 finaliser: a bijective 64-bit mixer.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Derives the seed of sub-stream `stream` of `seed` (deterministic, well mixed; distinct
/// streams of one seed give unrelated values).
pub fn mix_seed(seed: u64, stream: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ stream.wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// [`mix_seed`] applied twice: the seed of sub-stream `(a, b)`.
pub fn mix_seed2(seed: u64, a: u64, b: u64) -> u64 {
    mix_seed(mix_seed(seed, a), b)
}
