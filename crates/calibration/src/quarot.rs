//! QuaRot's rotations: randomized Hadamard matrices `diag(±1) · H / sqrt(n)` for the residual
//! stream (R1, size `hidden`) and per head between V and O (R2, size `head_dim`), and the plain
//! Hadamard used online before `down_proj` (R4) and on Q/K (R3).

use crate::error::Result;
use crate::rotation::{random_signs, signed_hadamard};

/// The QuaRot rotation pair.
#[derive(Debug, Clone)]
pub struct QuarotRotations {
    /// R1, `hidden × hidden`.
    pub r1: Vec<f32>,
    /// R2, `head_dim × head_dim`.
    pub r2: Vec<f32>,
}

/// Randomized Hadamard R1 (`hidden`) and R2 (`head_dim`) from `seed`. Errors name a size with
/// no supported Hadamard order.
pub fn quarot_rotations(hidden: usize, head_dim: usize, seed: u64) -> Result<QuarotRotations> {
    Ok(QuarotRotations {
        r1: signed_hadamard(&random_signs(hidden, seed))?,
        r2: signed_hadamard(&random_signs(head_dim, seed ^ 0x5151))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::orthogonality_error;

    #[test]
    fn quarot_pair_is_orthogonal() {
        let q = quarot_rotations(576, 64, 1).unwrap();
        assert!(orthogonality_error(&q.r1, 576).unwrap() < 1e-5);
        assert!(orthogonality_error(&q.r2, 64).unwrap() < 1e-5);
        assert!(quarot_rotations(576, 9, 1)
            .unwrap_err()
            .to_string()
            .contains('9'));
    }
}
