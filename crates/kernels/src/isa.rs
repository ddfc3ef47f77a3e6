//! Runtime instruction-set selection.
//!
//! The best path the CPU supports is chosen once (AVX-512 > AVX2+FMA > scalar on x86-64; scalar
//! elsewhere). The environment variable `LOWBIT_KERNEL=scalar|avx2|avx512` forces a path (for
//! tests and benchmarks); forcing a path the CPU lacks falls back to the best supported one below
//! it, never to an illegal instruction.

use std::sync::OnceLock;

/// A kernel implementation family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, the reference every SIMD path is tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL (+ VNNI used by the W8A8 kernel when present).
    Avx512,
}

impl Isa {
    /// Lower-case name as accepted by `LOWBIT_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best path this CPU supports.
    pub fn best() -> Isa {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|i| i.supported())
            .unwrap_or(Isa::Scalar)
    }

    /// Every path this CPU supports, scalar first.
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// `want` if supported, else the best supported path below it.
    pub fn clamp(want: Isa) -> Isa {
        [Isa::Avx512, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .find(|i| *i <= want && i.supported())
            .unwrap_or(Isa::Scalar)
    }
}

/// Whether the CPU has AVX-512 VNNI (`vpdpbusd`), used by the W8A8 kernel.
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::Avx512.supported() && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The path used when none is given explicitly: `LOWBIT_KERNEL` if set (clamped to what the CPU
/// supports), else [`Isa::best`]. Read once per process.
pub fn selected() -> Isa {
    static SEL: OnceLock<Isa> = OnceLock::new();
    *SEL.get_or_init(|| match std::env::var("LOWBIT_KERNEL").ok().as_deref() {
        Some("scalar") => Isa::Scalar,
        Some("avx2") => Isa::clamp(Isa::Avx2),
        Some("avx512") => Isa::clamp(Isa::Avx512),
        _ => Isa::best(),
    })
}
