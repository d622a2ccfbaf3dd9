//! `ptxas -v` on the embedded PTX (forward and backward kernels) for sm_80 and
//! sm_90: prints registers and spills per kernel and fails on any spill or a
//! register count above 255.
//! Needs the `ptx` feature (nvcc); `ptxas` is taken from nvcc's directory.
#![cfg(feature = "ptx")]

use std::path::PathBuf;
use std::process::Command;

fn ptxas() -> PathBuf {
    let nvcc = PathBuf::from(ksa::cuda::ptx::NVCC);
    nvcc.with_file_name("ptxas")
}

#[test]
fn no_spills_on_sm80_and_sm90() {
    let dir = std::env::temp_dir().join(format!("ksa-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, ptx, kernels) in [
        ("ksa_fwd", ksa::cuda::ptx::FWD, 4),
        ("ksa_bwd", ksa::cuda::ptx::BWD, 10),
    ] {
        let path = dir.join(format!("{name}.ptx"));
        std::fs::write(&path, ptx).unwrap();
        check(&path, kernels);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `ptxas -v` on one PTX file for both architectures; `kernels` entry points expected.
fn check(ptx: &std::path::Path, kernels: usize) {
    for arch in ["sm_80", "sm_90"] {
        let out = Command::new(ptxas())
            .args(["-v", &format!("-arch={arch}"), "-o", "/dev/null"])
            .arg(ptx)
            .output()
            .expect("run ptxas");
        assert!(out.status.success(), "ptxas failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stderr);
        let mut kernel = String::new();
        let mut seen = 0;
        for line in text.lines() {
            if let Some(i) = line.find("Compiling entry function '") {
                kernel = line[i + 26..].split('\'').next().unwrap_or("").to_string();
            }
            if line.contains("spill stores") {
                let spills: Vec<u64> = line
                    .split(',')
                    .filter(|p| p.contains("spill"))
                    .map(|p| p.split_whitespace().next().unwrap().parse().unwrap())
                    .collect();
                assert!(
                    spills.iter().all(|&s| s == 0),
                    "{kernel} spills on {arch}: {line}"
                );
            }
            if let Some(i) = line.find("Used ") {
                let regs: u32 = line[i + 5..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                println!("{arch} {kernel}: {regs} registers, 0 spills");
                assert!(regs <= 255);
                seen += 1;
            }
        }
        assert_eq!(seen, kernels, "expected {kernels} kernels in:\n{text}");
    }
}
