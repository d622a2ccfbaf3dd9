//! Measures emulation speed on the FlashAttention-style test kernel
//! (`tests/kernels/flash_attn.cu`, compiled with nvcc):
//!
//! ```text
//! eval "$(bash scripts/cuda-toolchain.sh)"
//! cargo run -p ptx-emu --release --example bench_attention -- [heads] [n_q] [n_k] [host_threads]
//! ```

use std::path::Path;

use ptx_emu::{Device, LaunchOptions, Module, Param};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let heads = *args.first().unwrap_or(&8);
    let n_q = *args.get(1).unwrap_or(&256);
    let n_k = *args.get(2).unwrap_or(&2048);
    let host_threads = *args.get(3).unwrap_or(&0);
    let d = 64;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernels/flash_attn.cu");
    let out = std::env::temp_dir().join("ptx-emu-bench-flash_attn.ptx");
    let nvcc = ptx_emu::toolchain::find_nvcc()
        .expect("nvcc not found: eval \"$(bash scripts/cuda-toolchain.sh)\"");
    let ptx = ptx_emu::toolchain::compile_ptx(&nvcc, &src, &out, "compute_80", &[]).unwrap();
    let m = Module::parse(&ptx).unwrap();
    let k = m.kernel("flash_attn_fwd").unwrap();
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        half::bf16::from_f32(((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
    };
    let mut dev = Device::new();
    let q: Vec<_> = (0..heads * n_q * d).map(|_| rnd()).collect();
    let kk: Vec<_> = (0..heads * n_k * d).map(|_| rnd()).collect();
    let v: Vec<_> = (0..heads * n_k * d).map(|_| rnd()).collect();
    let (pq, pk, pv) = (dev.alloc_bf16(&q), dev.alloc_bf16(&kk), dev.alloc_bf16(&v));
    let po = dev.alloc(heads * n_q * d * 4);
    let params = [
        Param::Ptr(pq),
        Param::Ptr(pk),
        Param::Ptr(pv),
        Param::Ptr(po),
        Param::I32(n_q as i32),
        Param::I32(n_k as i32),
        Param::F32(0.125 * std::f32::consts::LOG2_E),
    ];
    for sanitize in [true, false] {
        let opts = LaunchOptions {
            sanitize,
            host_threads,
            ..Default::default()
        };
        let grid = (n_q.div_ceil(64) as u32, heads as u32, 1);
        let cpu0 = cpu_seconds();
        let rep = dev
            .launch_with(k, grid, (128, 1, 1), 0, &params, &opts)
            .unwrap();
        let cpu = match (cpu0, cpu_seconds()) {
            (Some(a), Some(b)) => format!(
                "cpu {:.2} s, {:.1} M thread-instr per cpu-second",
                b - a,
                rep.thread_instructions as f64 / (b - a).max(0.01) / 1e6
            ),
            _ => "cpu n/a".into(),
        };
        println!(
            "heads {heads} n_q {n_q} n_k {n_k} (threads {}), sanitize {sanitize}: wall {:.3} s, {:.1} M thread-instr/s; {cpu}\n  {rep}",
            grid.0 * grid.1 * 128,
            rep.wall.as_secs_f64(),
            rep.thread_instructions_per_sec() / 1e6
        );
    }
}

/// User + system CPU time of this process (Linux `/proc/self/stat`, 100 ticks/s).
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
