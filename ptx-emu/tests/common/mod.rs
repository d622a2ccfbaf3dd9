//! Shared helpers of the integration tests: finding nvcc and compiling test kernels.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// nvcc from PATH, else `$CUDA_HOME/bin`, else the cache of `scripts/cuda-toolchain.sh`.
pub fn nvcc() -> Option<PathBuf> {
    let works = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let mut cands = vec![PathBuf::from("nvcc")];
    if let Ok(h) = std::env::var("CUDA_HOME") {
        cands.push(Path::new(&h).join("bin/nvcc"));
    }
    if let Ok(d) = std::env::var("KSA_CUDA_DIR") {
        cands.push(Path::new(&d).join("nvidia/cu13/bin/nvcc"));
    }
    if let Ok(h) = std::env::var("HOME") {
        cands.push(Path::new(&h).join(".cache/ksa-cuda/nvidia/cu13/bin/nvcc"));
    }
    cands.into_iter().find(|p| works(p))
}

/// Compiles `tests/kernels/<name>.cu` with `nvcc --ptx -O3 -arch=compute_80` and returns
/// the PTX text, or prints a skip message and returns `None` when nvcc is not available.
pub fn compile(name: &str) -> Option<String> {
    let Some(nvcc) = nvcc() else {
        eprintln!("skipped: nvcc not found, run scripts/cuda-toolchain.sh (eval \"$(bash scripts/cuda-toolchain.sh)\")");
        return None;
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kernels")
        .join(format!("{name}.cu"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.ptx"));
    let o = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-arch=compute_80", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .expect("running nvcc");
    assert!(
        o.status.success(),
        "nvcc failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    Some(std::fs::read_to_string(&out).unwrap())
}

/// A deterministic pseudo-random generator (xorshift) for test data.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u32() as f64 / (1u64 << 32) as f64 * 2.0 - 1.0) as f32
    }
}
