//! Compiles every `kernels/*.cu` to PTX with nvcc when the `ptx` feature
//! (implied by `cuda`) is on; `ksa::cuda::ptx` embeds them (`FWD`, `BWD`, `DECODE`).
//!
//! nvcc is looked up on PATH, then `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, then the
//! toolchain `scripts/cuda-toolchain.sh` installs (`$HOME/.cache/ksa-cuda/nvidia/cu13/bin`).
//! Target: `-arch=compute_80` PTX, which the driver JITs for sm_80 and newer.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=NVCC");
    if env::var_os("CARGO_FEATURE_PTX").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=kernels");
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "ksa: the `ptx`/`cuda` feature needs nvcc (CUDA 12.x or 13.0) to compile kernels/*.cu, \
             and none was found on PATH, in $CUDA_HOME/bin, $CUDA_PATH/bin or \
             $HOME/.cache/ksa-cuda/nvidia/cu13/bin. Install one with \
             `eval \"$(bash scripts/cuda-toolchain.sh)\"` (pinned nvcc 13.0 from PyPI) or point \
             CUDA_HOME at a CUDA toolkit."
        )
    });
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("ksa: kernels/ folder")
        .map(|e| e.expect("ksa: kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().expect("kernel file name");
        let ptx = out.join(stem).with_extension("ptx");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-arch=compute_80", "-std=c++17", "-o"])
            .arg(&ptx)
            .arg(src)
            .status()
            .unwrap_or_else(|e| panic!("ksa: cannot run {}: {e}", nvcc.display()));
        assert!(
            status.success(),
            "ksa: nvcc failed on {} ({status})",
            src.display()
        );
    }
    // The tests run ptxas (next to nvcc) for register/spill figures.
    println!("cargo:rustc-env=KSA_NVCC={}", nvcc.display());
}

fn runs(path: &Path) -> bool {
    Command::new(path)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn find_nvcc() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = env::var_os(var) {
            candidates.push(PathBuf::from(d).join("bin").join("nvcc"));
        }
    }
    if let Some(home) = env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/ksa-cuda/nvidia/cu13/bin/nvcc"));
    }
    candidates.into_iter().find(|p| p.is_file() && runs(p))
}
