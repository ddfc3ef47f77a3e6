//! Fixtures shared by the kernel tests (each test file that needs them says `mod common;`).

/// A small deterministic generator (64-bit LCG, top 31 bits) for random weights and activations.
pub struct Rng(pub u64);

impl Rng {
    /// The next 31-bit value.
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// A uniform value in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
}
