//! The instruction set the CPU path's tile products and softmax run on,
//! chosen once per process.
//!
//! By default the widest variant the CPU supports runs: AVX-512F with
//! AVX512_BF16, AVX-512F, then AVX2 with FMA, then the portable path (the `gemm` crate's products, baseline
//! code elsewhere). The environment variable `KSA_CPU_ISA` (`avx512`, `avx2`
//! or `portable`) forces one, for A/B measurement; it is read once, and
//! asking for a variant this CPU lacks (or an unknown name) makes every CPU
//! attention call return [`Error::CpuIsa`] instead of
//! running something else.

use crate::{Error, Result};
use std::sync::OnceLock;

/// The environment variable that forces a variant.
pub const ISA_ENV: &str = "KSA_CPU_ISA";

/// A variant of the CPU path's kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuIsa {
    /// [`CpuIsa::Avx512`], plus `vdpbf16ps` for the scores of bf16 inputs
    /// (pairs of bf16 products summed into f32, twice the products per
    /// instruction; Intel Cooper Lake and Sapphire Rapids and later, AMD Zen
    /// 4 and later). Other dtypes run exactly as on [`CpuIsa::Avx512`].
    Avx512Bf16,
    /// 512-bit register-blocked microkernels (x86-64 with AVX-512F: Intel
    /// Skylake-SP and later, AMD Zen 4 and later).
    Avx512,
    /// 256-bit register-blocked microkernels (x86-64 with AVX2 and FMA).
    Avx2,
    /// The `gemm` crate's products and baseline code: every CPU.
    Portable,
}

impl CpuIsa {
    /// Every variant, widest first.
    pub const ALL: [CpuIsa; 4] = [
        CpuIsa::Avx512Bf16,
        CpuIsa::Avx512,
        CpuIsa::Avx2,
        CpuIsa::Portable,
    ];

    /// The name `KSA_CPU_ISA` takes (`avx512bf16`, `avx512`, `avx2`,
    /// `portable`).
    pub fn name(self) -> &'static str {
        match self {
            CpuIsa::Avx512Bf16 => "avx512bf16",
            CpuIsa::Avx512 => "avx512",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Portable => "portable",
        }
    }

    /// The variant called `name` (as [`CpuIsa::name`] spells it, any case).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|isa| isa.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether the variant runs the AVX-512F microkernels (with or without
    /// the bf16 dot products).
    pub fn avx512(self) -> bool {
        matches!(self, CpuIsa::Avx512 | CpuIsa::Avx512Bf16)
    }

    /// Whether this CPU can run the variant.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            // The AVX-512 variant's softmax is also compiled with AVX2 and
            // FMA (every AVX-512F CPU has them; checked all the same).
            CpuIsa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            CpuIsa::Avx512Bf16 => {
                CpuIsa::Avx512.supported() && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            CpuIsa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            CpuIsa::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The variants this CPU supports, widest first (always ends with
    /// [`CpuIsa::Portable`]).
    pub fn available() -> Vec<CpuIsa> {
        Self::ALL
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }

    /// `Ok(self)` if this CPU supports it, else [`Error::CpuIsa`].
    pub fn check(self) -> Result<Self> {
        if self.supported() {
            Ok(self)
        } else {
            Err(Error::CpuIsa {
                requested: self.name().into(),
                available: names(&Self::available()),
            })
        }
    }
}

impl std::fmt::Display for CpuIsa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn names(isas: &[CpuIsa]) -> String {
    isas.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
}

/// The variant for a `KSA_CPU_ISA` value (`None`: unset) on a CPU supporting
/// the variants `available` (widest first): the request if it is supported,
/// else the widest available; an unknown or unsupported request is an error.
pub fn select(request: Option<&str>, available: &[CpuIsa]) -> Result<CpuIsa> {
    let Some(request) = request.filter(|r| !r.trim().is_empty()) else {
        return Ok(available.first().copied().unwrap_or(CpuIsa::Portable));
    };
    match CpuIsa::from_name(request) {
        Some(isa) if available.contains(&isa) => Ok(isa),
        _ => Err(Error::CpuIsa {
            requested: request.into(),
            available: names(available),
        }),
    }
}

/// The variant of this process: chosen on first use from `KSA_CPU_ISA` and
/// the CPU, then fixed. An unusable `KSA_CPU_ISA` is an error on every call.
pub fn process_isa() -> Result<CpuIsa> {
    static CHOICE: OnceLock<std::result::Result<CpuIsa, (String, String)>> = OnceLock::new();
    let choice = CHOICE.get_or_init(|| {
        let request = std::env::var(ISA_ENV).ok();
        select(request.as_deref(), &CpuIsa::available()).map_err(|e| match e {
            Error::CpuIsa {
                requested,
                available,
            } => (requested, available),
            other => unreachable!("select returns only CpuIsa errors, got {other}"),
        })
    });
    choice
        .clone()
        .map_err(|(requested, available)| Error::CpuIsa {
            requested,
            available,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_honours_requests_and_refuses_missing_variants() {
        let all = CpuIsa::ALL;
        let avx2_only = [CpuIsa::Avx2, CpuIsa::Portable];
        assert_eq!(select(None, &all).unwrap(), CpuIsa::Avx512Bf16);
        assert_eq!(select(None, &all[1..]).unwrap(), CpuIsa::Avx512);
        assert_eq!(select(Some("avx512"), &all).unwrap(), CpuIsa::Avx512);
        assert_eq!(select(None, &avx2_only).unwrap(), CpuIsa::Avx2);
        assert_eq!(select(Some(""), &avx2_only).unwrap(), CpuIsa::Avx2);
        assert_eq!(select(Some("AVX2"), &all).unwrap(), CpuIsa::Avx2);
        assert_eq!(select(Some(" portable"), &all).unwrap(), CpuIsa::Portable);
        for bad in ["avx512", "avx512bf16", "sse9"] {
            match select(Some(bad), &avx2_only) {
                Err(Error::CpuIsa {
                    requested,
                    available,
                }) => {
                    assert_eq!(requested, bad);
                    assert_eq!(available, "avx2, portable");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn names_round_trip_and_portable_always_runs() {
        for isa in CpuIsa::ALL {
            assert_eq!(CpuIsa::from_name(isa.name()), Some(isa));
        }
        assert!(CpuIsa::Portable.supported());
        assert_eq!(CpuIsa::available().last(), Some(&CpuIsa::Portable));
        // The process choice is one the CPU supports (KSA_CPU_ISA unset or valid in tests).
        if let Ok(isa) = process_isa() {
            assert!(isa.supported());
        }
    }
}
