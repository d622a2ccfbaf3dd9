//! Launch statistics: the emulator's GPU performance proxies.

use std::time::Duration;

use crate::ir::{Class, NUM_CLASSES};

/// Counters gathered during a launch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LaunchReport {
    /// Thread-instructions executed (one per active, guard-true lane per instruction).
    pub thread_instructions: u64,
    /// Thread-instructions by [`Class`] (index with `Class as usize`, or use [`LaunchReport::class`]).
    pub by_class: [u64; NUM_CLASSES],
    /// Warp-level instruction issues (one per group of lanes executed together).
    pub warp_instructions: u64,
    /// Warp-level `mma` operations (each one m16n8k16 product).
    pub mma: u64,
    /// Warp-level `ldmatrix` operations.
    pub ldmatrix: u64,
    /// Bytes read from global memory (loads, `cp.async` sources, atomics).
    pub global_bytes_read: u64,
    /// Bytes written to global memory.
    pub global_bytes_written: u64,
    /// Bytes read from shared memory.
    pub shared_bytes_read: u64,
    /// Bytes written to shared memory (including completed `cp.async` copies).
    pub shared_bytes_written: u64,
    /// Shared-memory wavefronts of warp-wide `ld`/`st`/`ldmatrix` accesses (32 banks of
    /// 4 bytes; 8-byte accesses in half-warp phases, 16-byte accesses and `ldmatrix`
    /// in 8-address phases).
    pub shared_wavefronts: u64,
    /// Extra wavefronts caused by bank conflicts (wavefronts minus the conflict-free minimum).
    pub bank_conflicts: u64,
    /// CTA-wide barrier releases, summed over CTAs.
    pub barriers: u64,
    /// CTAs executed.
    pub ctas: u64,
    /// Threads per CTA.
    pub threads_per_cta: u32,
    /// Host wall time of the launch.
    pub wall: Duration,
}

impl LaunchReport {
    /// Thread-instructions of one class.
    pub fn class(&self, c: Class) -> u64 {
        self.by_class[c as usize]
    }

    /// Emulation speed: thread-instructions per second of wall time.
    pub fn thread_instructions_per_sec(&self) -> f64 {
        self.thread_instructions as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    pub(crate) fn merge(&mut self, o: &LaunchReport) {
        self.thread_instructions += o.thread_instructions;
        for (a, b) in self.by_class.iter_mut().zip(o.by_class.iter()) {
            *a += b;
        }
        self.warp_instructions += o.warp_instructions;
        self.mma += o.mma;
        self.ldmatrix += o.ldmatrix;
        self.global_bytes_read += o.global_bytes_read;
        self.global_bytes_written += o.global_bytes_written;
        self.shared_bytes_read += o.shared_bytes_read;
        self.shared_bytes_written += o.shared_bytes_written;
        self.shared_wavefronts += o.shared_wavefronts;
        self.bank_conflicts += o.bank_conflicts;
        self.barriers += o.barriers;
        self.ctas += o.ctas;
    }
}

impl std::fmt::Display for LaunchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = [
            "int", "float", "half", "convert", "move", "memory", "control", "warp", "tensor",
        ];
        write!(
            f,
            "{} CTAs x {} threads: {} thread-instr ({:.1} M/s, {:.3} s); ",
            self.ctas,
            self.threads_per_cta,
            self.thread_instructions,
            self.thread_instructions_per_sec() / 1e6,
            self.wall.as_secs_f64()
        )?;
        for (n, c) in names.iter().zip(self.by_class.iter()) {
            if *c > 0 {
                write!(f, "{n} {c}, ")?;
            }
        }
        write!(
            f,
            "mma {}, ldmatrix {}, global r/w {}/{} B, shared r/w {}/{} B, wavefronts {}, bank conflicts {}, barriers {}",
            self.mma,
            self.ldmatrix,
            self.global_bytes_read,
            self.global_bytes_written,
            self.shared_bytes_read,
            self.shared_bytes_written,
            self.shared_wavefronts,
            self.bank_conflicts,
            self.barriers
        )
    }
}

/// Wavefronts of a warp-wide shared access of `bytes` per lane: accesses of up to 4 bytes
/// are served per warp, 8-byte ones per half-warp and 16-byte ones per quarter-warp;
/// within a phase each of the 32 four-byte banks serves one distinct word per wavefront
/// (lanes reading the same word are broadcast). Returns (wavefronts, conflict-free minimum).
pub(crate) fn wavefronts(accs: &[(usize, u64)], bytes: usize) -> (u64, u64) {
    let per_phase = match bytes {
        16 => 8,
        8 => 16,
        _ => 32,
    };
    let (mut wf, mut ideal) = (0u64, 0u64);
    let mut words = [0u64; 160];
    for ph in 0..32 / per_phase {
        // Distinct 4-byte words touched in this phase, then the busiest bank.
        let mut n = 0;
        for &(l, off) in accs {
            if l / per_phase != ph {
                continue;
            }
            let last = (off + bytes.max(1) as u64 - 1) / 4;
            for word in off / 4..=last {
                if n < words.len() {
                    words[n] = word;
                    n += 1;
                }
            }
        }
        if n == 0 {
            continue;
        }
        let ws = &mut words[..n];
        ws.sort_unstable();
        let mut cnt = [0u8; 32];
        let mut prev = None;
        for &w in ws.iter() {
            if prev != Some(w) {
                cnt[(w % 32) as usize] += 1;
                prev = Some(w);
            }
        }
        ideal += 1;
        wf += *cnt.iter().max().unwrap() as u64;
    }
    (wf, ideal)
}
