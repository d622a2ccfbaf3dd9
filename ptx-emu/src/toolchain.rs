//! Finding nvcc and compiling `.cu` files to PTX, for tests of crates that ship CUDA
//! kernels (nvcc is installed by `scripts/cuda-toolchain.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// nvcc from `PATH`, else `$CUDA_HOME/bin`, else `$KSA_CUDA_DIR/nvidia/cu13/bin`, else
/// `~/.cache/ksa-cuda/nvidia/cu13/bin` (the cache of `scripts/cuda-toolchain.sh`); the
/// first one that runs `--version` successfully.
pub fn find_nvcc() -> Option<PathBuf> {
    let works = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let mut cands = vec![PathBuf::from("nvcc")];
    if let Some(h) = std::env::var_os("CUDA_HOME") {
        cands.push(Path::new(&h).join("bin/nvcc"));
    }
    if let Some(d) = std::env::var_os("KSA_CUDA_DIR") {
        cands.push(Path::new(&d).join("nvidia/cu13/bin/nvcc"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        cands.push(Path::new(&h).join(".cache/ksa-cuda/nvidia/cu13/bin/nvcc"));
    }
    cands.into_iter().find(|p| works(p))
}

/// Compiles `src` with `nvcc --ptx -O3 -arch=<arch>` (e.g. `compute_80`) plus `extra`
/// arguments into `out` and returns the PTX text; `Err` carries nvcc's stderr.
pub fn compile_ptx(
    nvcc: &Path,
    src: &Path,
    out: &Path,
    arch: &str,
    extra: &[&str],
) -> Result<String, String> {
    let o = Command::new(nvcc)
        .args(["--ptx", "-O3"])
        .arg(format!("-arch={arch}"))
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(src)
        .output()
        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    if !o.status.success() {
        return Err(format!(
            "nvcc failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    std::fs::read_to_string(out).map_err(|e| format!("reading {}: {e}", out.display()))
}
