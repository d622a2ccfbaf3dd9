//! Shared helpers of the integration tests: finding nvcc and compiling test kernels.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// nvcc (see [`ptx_emu::toolchain::find_nvcc`]).
pub fn nvcc() -> Option<PathBuf> {
    ptx_emu::toolchain::find_nvcc()
}

/// Compiles `tests/kernels/<name>.cu` with `nvcc --ptx -O3 -arch=compute_80` and returns
/// the PTX text, or prints a skip message and returns `None` when nvcc is not available.
pub fn compile(name: &str) -> Option<String> {
    compile_with(name, &[])
}

/// [`compile`] with extra nvcc arguments (e.g. `-DNAME`).
pub fn compile_with(name: &str, extra: &[&str]) -> Option<String> {
    static CACHE: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{name} {}", extra.join(" "));
    if let Some((_, ptx)) = cache.iter().find(|(n, _)| *n == key) {
        return Some(ptx.clone());
    }
    let ptx = compile_uncached(name, extra)?;
    cache.push((key, ptx.clone()));
    Some(ptx)
}

fn compile_uncached(name: &str, extra: &[&str]) -> Option<String> {
    let Some(nvcc) = nvcc() else {
        eprintln!("skipped: nvcc not found, run scripts/cuda-toolchain.sh (eval \"$(bash scripts/cuda-toolchain.sh)\")");
        return None;
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kernels")
        .join(format!("{name}.cu"));
    let tag: String = extra
        .concat()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}{tag}.ptx"));
    match ptx_emu::toolchain::compile_ptx(&nvcc, &src, &out, "compute_80", extra) {
        Ok(ptx) => Some(ptx),
        Err(e) => panic!("{e}"),
    }
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

use ptx_emu::{DevPtr, Device, Error, LaunchReport, Module, Param};

/// Wraps `body` in a kernel `t(.param .u64 t_in, .param .u64 t_out)` with a generous
/// register file: `%rd1` = in, `%rd2` = out, `%r0` = %tid.x, `%rd4` = &in[tid] and
/// `%rd5` = &out[tid] (32-bit elements).
pub fn kernel_src(decls: &str, body: &str) -> String {
    format!(
        ".version 9.0\n.target sm_80\n.address_size 64\n\n\
         .visible .entry t(\n\t.param .u64 t_in,\n\t.param .u64 t_out\n)\n{{\n\
         \t.reg .pred %p<16>;\n\t.reg .b16 %h<16>;\n\t.reg .b32 %r<64>;\n\t.reg .f32 %f<32>;\n\
         \t.reg .b64 %rd<32>;\n\t.reg .f64 %fd<8>;\n{decls}\n\
         \tld.param.u64 %rd1, [t_in];\n\tld.param.u64 %rd2, [t_out];\n\
         \tmov.u32 %r0, %tid.x;\n\tmul.wide.u32 %rd3, %r0, 4;\n\
         \tadd.s64 %rd4, %rd1, %rd3;\n\tadd.s64 %rd5, %rd2, %rd3;\n\
         {body}\n\tret;\n}}\n"
    )
}

/// Runs a [`kernel_src`] kernel on `block` threads (one CTA) with `input` words and
/// `nout` output words.
pub fn run_words(
    decls: &str,
    body: &str,
    block: u32,
    input: &[u32],
    nout: usize,
) -> Result<(Vec<u32>, LaunchReport), Error> {
    let m = Module::parse(&kernel_src(decls, body))?;
    let mut dev = Device::new();
    let pin = dev.alloc_u32(if input.is_empty() { &[0] } else { input });
    let pout = dev.alloc(nout * 4);
    let rep = dev.launch(
        m.kernel("t")?,
        (1, 1, 1),
        (block, 1, 1),
        0,
        &[Param::Ptr(pin), Param::Ptr(pout)],
    )?;
    Ok((dev.read_u32(pout, nout)?, rep))
}

/// Single-thread ALU check: the body reads `in` through `%rd1` and writes `out` through `%rd2`.
pub fn alu(body: &str, input: &[u32], nout: usize) -> Vec<u32> {
    run_words("", body, 1, input, nout)
        .unwrap_or_else(|e| panic!("{e}\n{body}"))
        .0
}

/// f32 bits.
pub fn fb(x: f32) -> u32 {
    x.to_bits()
}

/// A device with one allocation of `n` bytes, for tests that need raw pointers.
pub fn dev_with(n: usize) -> (Device, DevPtr) {
    let mut d = Device::new();
    let p = d.alloc(n);
    (d, p)
}
