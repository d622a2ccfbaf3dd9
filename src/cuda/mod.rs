//! The CUDA path: the fused block-sparse prefill kernel (`kernels/ksa_fwd.cu`)
//! with its tile [`schedule`] and [`launch`], its [`backward`] (key-major
//! schedule, three kernels), the split-KV [`decode`] kernels, the candle side
//! (`op`, feature `cuda`) and (feature `ptx`) the embedded PTX.
//!
//! Schedules and launches are plain Rust and always compiled: the candle op
//! and the emulator tests drive the same launch descriptions.

pub mod backward;
pub mod decode;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod op;
pub mod schedule;

#[cfg(feature = "ptx")]
pub mod ptx {
    //! PTX compiled from `kernels/` by build.rs (`nvcc --ptx -O3 -arch=compute_80`).

    /// The forward kernels `ksa_fwd_{bf16,f16}_d{64,128}`.
    pub const FWD: &str = include_str!(concat!(env!("OUT_DIR"), "/ksa_fwd.ptx"));
    /// The backward kernels (`kernels/ksa_bwd.cu`).
    pub const BWD: &str = include_str!(concat!(env!("OUT_DIR"), "/ksa_bwd.ptx"));
    /// The split-KV decode and combine kernels (`kernels/ksa_decode.cu`).
    pub const DECODE: &str = include_str!(concat!(env!("OUT_DIR"), "/ksa_decode.ptx"));
    /// The nvcc that built [`FWD`] (its directory holds `ptxas`).
    pub const NVCC: &str = env!("KSA_NVCC");
}
