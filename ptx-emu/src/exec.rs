//! The execution engine: launches, the per-CTA scheduler, and instruction semantics.
//!
//! Each thread has its own program counter, registers and state. A warp's scheduler
//! repeatedly picks the lowest program counter among its runnable lanes and executes the
//! instruction for every lane at that pc in one tight loop (lockstep when converged, and
//! reconvergence at the lowest pc after divergence); straight-line code runs without
//! rescanning until a branch, barrier, collective or label. Warp collectives wait until
//! every lane of their member mask has arrived at the same instruction; `bar.sync` waits
//! for every live thread of the CTA. CTAs run independently on a pool of host threads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Instant;

use crate::error::{Error, ExecError, Fault};
use crate::ir::{
    AtomOp, AtomTy, BoolOp, Instr, Kernel, Op, ShflMode, Space, Special, Src, VoteMode,
};
use crate::memory::{
    load_atomic, store_atomic, DevPtr, Device, GLOBALS_WINDOW, LOCAL_WINDOW, SHARED_WINDOW,
};
use crate::ops::{self, atom_op, cvt, ops_mask};
use crate::report::LaunchReport;
use crate::sanitizer::{Shadow, Violation};
use crate::tensor;

/// A kernel argument. Its size must match the kernel's `.param` declaration
/// (pointers and 64-bit integers: 8 bytes; 32-bit scalars: 4; [`Param::Bytes`]: any).
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// A device pointer (`.u64` parameter).
    Ptr(DevPtr),
    /// `.u32` / `.b32`.
    U32(u32),
    /// `.s32`.
    I32(i32),
    /// `.u64` / `.b64`.
    U64(u64),
    /// `.s64`.
    I64(i64),
    /// `.f32`.
    F32(f32),
    /// Raw bytes (structs passed by value as `.b8 name[N]`).
    Bytes(Vec<u8>),
}

impl Param {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Param::Ptr(p) => p.0.to_le_bytes().to_vec(),
            Param::U32(v) => v.to_le_bytes().to_vec(),
            Param::I32(v) => v.to_le_bytes().to_vec(),
            Param::U64(v) => v.to_le_bytes().to_vec(),
            Param::I64(v) => v.to_le_bytes().to_vec(),
            Param::F32(v) => v.to_le_bytes().to_vec(),
            Param::Bytes(b) => b.clone(),
        }
    }
}

/// Options of [`Device::launch_with`].
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Sanitizer checks (shared races, uninitialized shared reads, early `cp.async`
    /// destination access). Bounds, alignment and collective checks always apply.
    pub sanitize: bool,
    /// Host threads running CTAs; 0 means the available parallelism.
    pub host_threads: usize,
    /// Cap on thread-instructions per CTA (guards against endless loops; default
    /// [`DEFAULT_INSTRUCTION_LIMIT`], `None` for no limit).
    pub max_thread_instructions_per_cta: Option<u64>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            sanitize: true,
            host_threads: 0,
            max_thread_instructions_per_cta: Some(DEFAULT_INSTRUCTION_LIMIT),
        }
    }
}

/// Default per-CTA thread-instruction budget: 2·10⁹, about 20–40 s of emulation and ~100x
/// what an attention CTA over 16K keys executes.
pub const DEFAULT_INSTRUCTION_LIMIT: u64 = 2_000_000_000;

/// Largest shared memory per CTA (sm_80: 163 KiB of opt-in dynamic shared memory + static;
/// the emulator allows up to 227 KiB, the sm_90 limit).
pub const MAX_SHARED_BYTES: u64 = 227 * 1024;

impl Device {
    /// Launches `kernel` on a `grid` of CTAs of `block` threads with default options
    /// (sanitizer on), waits for it and returns its counters.
    pub fn launch(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        dynamic_shared_bytes: u32,
        params: &[Param],
    ) -> Result<LaunchReport, Error> {
        self.launch_with(
            kernel,
            grid,
            block,
            dynamic_shared_bytes,
            params,
            &LaunchOptions::default(),
        )
    }

    /// [`Device::launch`] with explicit options.
    pub fn launch_with(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        dynamic_shared_bytes: u32,
        params: &[Param],
        opts: &LaunchOptions,
    ) -> Result<LaunchReport, Error> {
        let start = Instant::now();
        let pbuf = build_params(kernel, params)?;
        let nthreads = block.0 as u64 * block.1 as u64 * block.2 as u64;
        if nthreads == 0 || nthreads > 1024 || block.2 > 64 {
            return Err(Error::Launch(format!(
                "block {block:?} must have 1..=1024 threads"
            )));
        }
        let nctas = grid.0 as u64 * grid.1 as u64 * grid.2 as u64;
        if nctas == 0 || grid.1 > 65535 || grid.2 > 65535 {
            return Err(Error::Launch(format!("bad grid {grid:?}")));
        }
        let shared_total = kernel.dyn_shared_offset + dynamic_shared_bytes as u64;
        if shared_total > MAX_SHARED_BYTES {
            return Err(Error::Launch(format!(
                "{shared_total} bytes of shared memory exceed {MAX_SHARED_BYTES}"
            )));
        }
        let workers = if opts.host_threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            opts.host_threads
        }
        .min(nctas as usize)
        .max(1);
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let cfg = Config {
            k: kernel,
            dev: self,
            params: &pbuf,
            opts,
            grid: [grid.0, grid.1, grid.2],
            block: [block.0, block.1, block.2],
            nthreads: nthreads as u32,
            dyn_shared: dynamic_shared_bytes,
            shared_total: shared_total as usize,
            globals: kernel
                .global_init
                .iter()
                .map(|b| AtomicU8::new(*b))
                .collect(),
        };
        let work = || -> (LaunchReport, Option<(u64, Error)>) {
            let mut cta = Cta::new(&cfg);
            loop {
                if abort.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed) as u64;
                if i >= nctas {
                    break;
                }
                let id = [
                    (i % grid.0 as u64) as u32,
                    ((i / grid.0 as u64) % grid.1 as u64) as u32,
                    (i / (grid.0 as u64 * grid.1 as u64)) as u32,
                ];
                cta.reset(id);
                if let Err(e) = cta.run() {
                    abort.store(true, Ordering::Relaxed);
                    return (std::mem::take(&mut cta.rep), Some((i, e)));
                }
                cta.rep.ctas += 1;
            }
            (std::mem::take(&mut cta.rep), None)
        };
        let results: Vec<(LaunchReport, Option<(u64, Error)>)> = if workers == 1 {
            vec![work()]
        } else {
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..workers).map(|_| s.spawn(work)).collect();
                hs.into_iter()
                    .map(|h| h.join().expect("worker panicked"))
                    .collect()
            })
        };
        let mut rep = LaunchReport {
            threads_per_cta: nthreads as u32,
            ..Default::default()
        };
        let mut err: Option<(u64, Error)> = None;
        for (r, e) in results {
            rep.merge(&r);
            if let Some((i, e)) = e {
                if err.as_ref().is_none_or(|(j, _)| i < *j) {
                    err = Some((i, e));
                }
            }
        }
        if let Some((_, e)) = err {
            return Err(e);
        }
        rep.wall = start.elapsed();
        Ok(rep)
    }
}

fn build_params(k: &Kernel, params: &[Param]) -> Result<Vec<u8>, Error> {
    let bad = |msg: String| Error::Params {
        kernel: k.name.clone(),
        msg,
    };
    if params.len() != k.params.len() {
        return Err(bad(format!(
            "expected {} parameters, got {}",
            k.params.len(),
            params.len()
        )));
    }
    let mut buf = vec![0u8; k.param_bytes as usize];
    for (i, (p, decl)) in params.iter().zip(&k.params).enumerate() {
        let b = p.bytes();
        if b.len() as u64 != decl.size {
            return Err(bad(format!(
                "parameter {i} ({} {}) is {} bytes, {p:?} is {}",
                decl.ty,
                decl.name,
                decl.size,
                b.len()
            )));
        }
        if matches!(p, Param::F32(_)) && decl.ty != ".f32" && decl.ty != ".b32" {
            return Err(bad(format!("parameter {i} is {}, not .f32", decl.ty)));
        }
        buf[decl.offset as usize..decl.offset as usize + b.len()].copy_from_slice(&b);
    }
    Ok(buf)
}

struct Config<'a> {
    k: &'a Kernel,
    dev: &'a Device,
    params: &'a [u8],
    opts: &'a LaunchOptions,
    grid: [u32; 3],
    block: [u32; 3],
    nthreads: u32,
    dyn_shared: u32,
    shared_total: usize,
    /// This launch's copy of the module `.global`/`.const` variables.
    globals: Vec<AtomicU8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum St {
    #[default]
    Run,
    Bar,
    Coll,
    Exit,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    dst: u32,
    len: u8,
    data: [u8; 16],
}

#[derive(Debug, Default, Clone)]
struct LaneAsync {
    uncommitted: Vec<Pending>,
    groups: VecDeque<Vec<Pending>>,
}

#[derive(Debug, Default)]
struct Warp {
    id: u32,
    exists: u32,
    regs: Vec<u64>,
    pc: [u32; 32],
    st: [St; 32],
    bar: [(u32, u32); 32],
    local: Vec<u8>,
    asyncq: Vec<LaneAsync>,
}

struct Cta<'a> {
    c: &'a Config<'a>,
    k: &'a Kernel,
    ctaid: [u32; 3],
    warps: Vec<Warp>,
    shared: Vec<u8>,
    sh: Option<Shadow>,
    /// Barrier epoch (starts at 1).
    epoch: u32,
    rep: LaunchReport,
    executed: u64,
    /// First read of never-written shared memory, reported at the next barrier.
    uninit: Option<Error>,
    /// Operand buffer of batched ALU instructions.
    lanes: Option<Box<ops::Lanes>>,
}

#[inline(always)]
fn lanes(mut m: u32) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if m == 0 {
            None
        } else {
            let l = m.trailing_zeros() as usize;
            m &= m - 1;
            Some(l)
        }
    })
}

/// Flow after executing an instruction for a set of lanes.
enum Flow {
    Next,
    /// The instruction set each lane's pc / state itself.
    Done,
}

enum Loc {
    Global(u64),
    Shared(u64),
    Local(u64),
    Param(u64),
}

impl<'a> Cta<'a> {
    fn new(c: &'a Config<'a>) -> Cta<'a> {
        let nwarps = c.nthreads.div_ceil(32);
        let k = c.k;
        let warps = (0..nwarps)
            .map(|w| {
                let n = (c.nthreads - w * 32).min(32);
                Warp {
                    id: w,
                    exists: if n == 32 { u32::MAX } else { (1u32 << n) - 1 },
                    regs: vec![0; k.nregs as usize * 32],
                    local: vec![0; k.local_bytes as usize * 32],
                    asyncq: vec![LaneAsync::default(); 32],
                    ..Default::default()
                }
            })
            .collect();
        let sh = c.opts.sanitize.then(|| Shadow::new(c.shared_total));
        Cta {
            c,
            k,
            ctaid: [0; 3],
            warps,
            shared: vec![0; c.shared_total],
            sh,
            epoch: 1,
            rep: LaunchReport::default(),
            executed: 0,
            uninit: None,
            lanes: Some(Box::new(ops::Lanes {
                a: [0; 32],
                b: [0; 32],
                c: [0; 32],
                d: [0; 32],
            })),
        }
    }

    fn reset(&mut self, ctaid: [u32; 3]) {
        self.ctaid = ctaid;
        self.executed = 0;
        self.uninit = None;
        for w in &mut self.warps {
            w.regs.fill(0);
            w.pc = [0; 32];
            w.st = [St::Run; 32];
            for l in 0..32 {
                if w.exists & (1 << l) == 0 {
                    w.st[l] = St::Exit;
                }
            }
            w.local.fill(0);
            for q in &mut w.asyncq {
                q.uncommitted.clear();
                q.groups.clear();
            }
        }
        self.shared.fill(0);
        if let Some(s) = &mut self.sh {
            s.reset();
        }
        self.epoch = 1;
    }

    fn tid(&self, warp: u32, lane: usize) -> [u32; 3] {
        let lin = warp * 32 + lane as u32;
        let [bx, by, _] = self.c.block;
        [lin % bx, (lin / bx) % by, lin / (bx * by)]
    }

    /// A `Misaligned` fault unless `addr` is a multiple of `align`; `detail`
    /// is only built when the check fails.
    fn check_aligned(
        &self,
        addr: u64,
        align: u64,
        pc: usize,
        warp: u32,
        lane: usize,
        detail: impl FnOnce() -> String,
    ) -> Result<(), Error> {
        if addr % align == 0 {
            Ok(())
        } else {
            Err(self.fault(Fault::Misaligned, pc, warp, lane, Some(addr), detail()))
        }
    }

    fn fault(
        &self,
        f: Fault,
        pc: usize,
        warp: u32,
        lane: usize,
        addr: Option<u64>,
        detail: String,
    ) -> Error {
        let ins = &self.k.code[pc.min(self.k.code.len() - 1)];
        let t = self.tid(warp, lane);
        Error::Exec(Box::new(ExecError {
            fault: f,
            kernel: self.k.name.clone(),
            line: ins.line,
            instr: ins.text.clone(),
            ctaid: (self.ctaid[0], self.ctaid[1], self.ctaid[2]),
            tid: (t[0], t[1], t[2]),
            addr,
            detail,
        }))
    }

    #[inline(always)]
    fn rd(&self, w: &Warp, s: Src, lane: usize) -> u64 {
        match s {
            Src::Reg(r) => w.regs[r as usize * 32 + lane],
            Src::Imm(v) => v,
            Src::Sp(sp) => self.special(w, lane, sp),
        }
    }

    fn special(&self, w: &Warp, lane: usize, sp: Special) -> u64 {
        let t = self.tid(w.id, lane);
        let c = self.c;
        match sp {
            Special::Tid(d) => t[d as usize] as u64,
            Special::Ntid(d) => c.block[d as usize] as u64,
            Special::Ctaid(d) => self.ctaid[d as usize] as u64,
            Special::Nctaid(d) => c.grid[d as usize] as u64,
            Special::LaneId => lane as u64,
            Special::WarpId => w.id as u64,
            Special::NWarpId => self.warps.len().max(w.id as usize + 1) as u64,
            Special::Clock => self.executed,
            Special::SmId => 0,
            Special::DynSmem => c.dyn_shared as u64,
            Special::TotalSmem => c.shared_total as u64,
            Special::LanemaskEq => 1u64 << lane,
            Special::LanemaskLt => (1u64 << lane) - 1,
            Special::LanemaskLe => (1u64 << (lane + 1)) - 1,
            Special::LanemaskGt => (!((1u64 << (lane + 1)) - 1)) & 0xFFFF_FFFF,
            Special::LanemaskGe => (!((1u64 << lane) - 1)) & 0xFFFF_FFFF,
        }
    }

    #[inline(always)]
    fn addr(&self, w: &Warp, a: crate::ir::Addr, lane: usize) -> u64 {
        let b = match a.base {
            Some(r) => w.regs[r as usize * 32 + lane],
            None => 0,
        };
        b.wrapping_add(a.off as u64)
    }

    fn resolve(space: Space, a: u64) -> Loc {
        match space {
            Space::Global => Loc::Global(a),
            Space::Shared => Loc::Shared(a),
            Space::Local => Loc::Local(a),
            Space::Param => Loc::Param(a),
            Space::Generic => {
                if (SHARED_WINDOW..SHARED_WINDOW + (1 << 32)).contains(&a) {
                    Loc::Shared(a - SHARED_WINDOW)
                } else if (LOCAL_WINDOW..LOCAL_WINDOW + (1 << 32)).contains(&a) {
                    Loc::Local(a - LOCAL_WINDOW)
                } else {
                    Loc::Global(a)
                }
            }
        }
    }

    // ---- shared-memory sanitizer -------------------------------------------------

    fn shared_check(
        &self,
        off: u64,
        len: usize,
        pc: usize,
        w: u32,
        lane: usize,
    ) -> Result<usize, Error> {
        if off
            .checked_add(len as u64)
            .is_none_or(|e| e > self.shared.len() as u64)
        {
            return Err(self.fault(
                Fault::SharedOutOfBounds,
                pc,
                w,
                lane,
                Some(off),
                format!(
                    "{len}-byte shared access at offset {off:#x}; the CTA has {} bytes of shared memory ({} static + {} dynamic)",
                    self.shared.len(),
                    self.k.dyn_shared_offset,
                    self.c.dyn_shared
                ),
            ));
        }
        Ok(off as usize)
    }

    fn violation(&self, v: Violation, pc: usize, w: u32, lane: usize) -> Error {
        self.fault(v.fault, pc, w, lane, Some(v.byte as u64), v.detail)
    }

    fn san_read(
        &mut self,
        off: usize,
        len: usize,
        pc: usize,
        w: u32,
        lane: usize,
    ) -> Result<(), Error> {
        let epoch = self.epoch;
        let Some(s) = &mut self.sh else { return Ok(()) };
        match s.read(off, len, w, epoch) {
            Err(v) => Err(self.violation(v, pc, w, lane)),
            // Reported at the next barrier or at the end of the CTA, unless another warp
            // writes the byte before that: then it is the race that explains it.
            Ok(Some(byte)) if self.uninit.is_none() => {
                let e = self.fault(
                    Fault::UninitializedSharedRead,
                    pc,
                    w,
                    lane,
                    Some(byte as u64),
                    "read of shared memory that was never written".into(),
                );
                self.uninit = Some(e);
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn san_write(
        &mut self,
        off: usize,
        len: usize,
        pc: usize,
        w: u32,
        lane: usize,
        async_done: bool,
    ) -> Result<(), Error> {
        let epoch = self.epoch;
        let Some(s) = &mut self.sh else { return Ok(()) };
        s.write(off, len, w, epoch, async_done)
            .map_err(|v| self.violation(v, pc, w, lane))
    }

    // ---- memory ---------------------------------------------------------------------

    fn load(
        &mut self,
        w: &Warp,
        loc: Loc,
        size: usize,
        pc: usize,
        lane: usize,
    ) -> Result<u64, Error> {
        match loc {
            Loc::Global(a) => {
                let Some((d, off)) = self.gmem(a, size) else {
                    return Err(self.global_oob(a, size, pc, w.id, lane));
                };
                self.rep.global_bytes_read += size as u64;
                Ok(load_atomic(d, off, size))
            }
            Loc::Shared(a) => {
                let off = self.shared_check(a, size, pc, w.id, lane)?;
                self.san_read(off, size, pc, w.id, lane)?;
                self.rep.shared_bytes_read += size as u64;
                let mut v = 0u64;
                for i in 0..size {
                    v |= (self.shared[off + i] as u64) << (8 * i);
                }
                Ok(v)
            }
            Loc::Local(a) => {
                let lb = self.k.local_bytes;
                if a.checked_add(size as u64).is_none_or(|e| e > lb) {
                    return Err(self.fault(
                        Fault::LocalOutOfBounds,
                        pc,
                        w.id,
                        lane,
                        Some(a),
                        format!("local frame is {lb} bytes"),
                    ));
                }
                let base = lane * lb as usize + a as usize;
                let mut v = 0u64;
                for i in 0..size {
                    v |= (w.local[base + i] as u64) << (8 * i);
                }
                Ok(v)
            }
            Loc::Param(a) => {
                let p = self.c.params;
                if a.checked_add(size as u64)
                    .is_none_or(|e| e > p.len() as u64)
                {
                    return Err(self.fault(
                        Fault::ParamOutOfBounds,
                        pc,
                        w.id,
                        lane,
                        Some(a),
                        format!("parameter buffer is {} bytes", p.len()),
                    ));
                }
                let mut v = 0u64;
                for i in 0..size {
                    v |= (p[a as usize + i] as u64) << (8 * i);
                }
                Ok(v)
            }
        }
    }

    fn store(
        &mut self,
        w: &mut Warp,
        loc: Loc,
        size: usize,
        v: u64,
        pc: usize,
        lane: usize,
    ) -> Result<(), Error> {
        match loc {
            Loc::Global(a) => {
                let Some((d, off)) = self.gmem(a, size) else {
                    return Err(self.global_oob(a, size, pc, w.id, lane));
                };
                self.rep.global_bytes_written += size as u64;
                store_atomic(d, off, size, v);
                Ok(())
            }
            Loc::Shared(a) => {
                let off = self.shared_check(a, size, pc, w.id, lane)?;
                self.san_write(off, size, pc, w.id, lane, false)?;
                self.rep.shared_bytes_written += size as u64;
                for i in 0..size {
                    self.shared[off + i] = (v >> (8 * i)) as u8;
                }
                Ok(())
            }
            Loc::Local(a) => {
                let lb = self.k.local_bytes;
                if a.checked_add(size as u64).is_none_or(|e| e > lb) {
                    return Err(self.fault(
                        Fault::LocalOutOfBounds,
                        pc,
                        w.id,
                        lane,
                        Some(a),
                        format!("local frame is {lb} bytes"),
                    ));
                }
                let base = lane * lb as usize + a as usize;
                for i in 0..size {
                    w.local[base + i] = (v >> (8 * i)) as u8;
                }
                Ok(())
            }
            Loc::Param(a) => Err(self.fault(
                Fault::Unsupported,
                pc,
                w.id,
                lane,
                Some(a),
                "stores to kernel parameters are not supported".into(),
            )),
        }
    }

    /// Global memory: the arena, or the launch's block of module variables.
    #[inline]
    fn gmem(&self, a: u64, len: usize) -> Option<(&'a [AtomicU8], usize)> {
        let c: &'a Config<'a> = self.c;
        if (GLOBALS_WINDOW..GLOBALS_WINDOW + (1 << 32)).contains(&a) {
            let off = (a - GLOBALS_WINDOW) as usize;
            (off + len <= c.globals.len()).then_some((&c.globals[..], off))
        } else {
            c.dev.range(a, len)
        }
    }

    fn global_oob(&self, a: u64, size: usize, pc: usize, w: u32, lane: usize) -> Error {
        self.fault(
            Fault::GlobalOutOfBounds,
            pc,
            w,
            lane,
            Some(a),
            format!(
                "{size}-byte global access outside device memory: {}",
                if (GLOBALS_WINDOW..GLOBALS_WINDOW + (1 << 32)).contains(&a) {
                    format!(
                        "module variables are [{GLOBALS_WINDOW:#x}, {:#x})",
                        GLOBALS_WINDOW + self.c.globals.len() as u64
                    )
                } else {
                    self.c.dev.describe(a)
                }
            ),
        )
    }

    // ---- scheduling -------------------------------------------------------------------

    fn run(&mut self) -> Result<(), Error> {
        loop {
            let mut progressed = false;
            for wi in 0..self.warps.len() {
                let w = &self.warps[wi];
                if (0..32).any(|l| w.st[l] == St::Run) {
                    let mut w = std::mem::take(&mut self.warps[wi]);
                    let r = self.run_warp(&mut w);
                    self.warps[wi] = w;
                    r?;
                    progressed = true;
                }
            }
            let done = self
                .warps
                .iter()
                .all(|w| w.st.iter().all(|s| *s == St::Exit));
            let released = !done && self.release_barriers()?;
            if let Some(e) = self.uninit.take() {
                if done || released {
                    return Err(e);
                }
                self.uninit = Some(e);
            }
            if done {
                return Ok(());
            }
            if released {
                continue;
            }
            if !progressed {
                return Err(self.stuck());
            }
        }
    }

    /// Releases every barrier whose expected thread count has arrived.
    fn release_barriers(&mut self) -> Result<bool, Error> {
        let live: u32 = self
            .warps
            .iter()
            .map(|w| w.st.iter().filter(|s| **s != St::Exit).count() as u32)
            .sum();
        let mut waiting: Vec<(u32, u32, u32)> = Vec::new(); // (id, expected, arrived)
        for w in &self.warps {
            for l in 0..32 {
                if w.st[l] == St::Bar {
                    let (id, exp) = w.bar[l];
                    match waiting.iter_mut().find(|x| x.0 == id) {
                        Some(x) => x.2 += 1,
                        None => waiting.push((id, exp, 1)),
                    }
                }
            }
        }
        let mut released = false;
        for (id, exp, arrived) in waiting {
            let need = if exp == 0 { live } else { exp };
            if arrived >= need {
                self.check_aligned_barrier(id)?;
                for w in &mut self.warps {
                    for l in 0..32 {
                        if w.st[l] == St::Bar && w.bar[l].0 == id {
                            w.st[l] = St::Run;
                            w.pc[l] += 1;
                        }
                    }
                }
                self.epoch += 1;
                self.rep.barriers += 1;
                released = true;
            }
        }
        Ok(released)
    }

    /// `bar.sync` is `.aligned`: the lanes of a warp waiting on barrier `id` must all
    /// wait at the same instruction, and no live lane of that warp may be elsewhere.
    fn check_aligned_barrier(&self, id: u32) -> Result<(), Error> {
        for w in &self.warps {
            let waiting: Vec<usize> = (0..32)
                .filter(|l| w.st[*l] == St::Bar && w.bar[*l].0 == id)
                .collect();
            let Some(&l0) = waiting.first() else { continue };
            let pc = w.pc[l0] as usize;
            if !matches!(self.k.code[pc].op, Op::Bar { aligned: true, .. }) {
                continue;
            }
            let live = (0..32).filter(|l| w.st[*l] != St::Exit).count();
            if let Some(&l) = waiting.iter().find(|l| w.pc[**l] as usize != pc) {
                return Err(self.fault(
                    Fault::DivergentCollective,
                    pc,
                    w.id,
                    l0,
                    None,
                    format!(
                        "lanes of warp {} wait at different bar.sync instructions (lines {} and {}); bar.sync is .aligned",
                        w.id,
                        self.k.code[pc].line,
                        self.k.code[w.pc[l] as usize].line
                    ),
                ));
            }
            if waiting.len() != live {
                return Err(self.fault(
                    Fault::DivergentCollective,
                    pc,
                    w.id,
                    l0,
                    None,
                    format!(
                        "only {} of the {live} live lanes of warp {} reached bar.sync (.aligned)",
                        waiting.len(),
                        w.id
                    ),
                ));
            }
        }
        Ok(())
    }

    fn stuck(&self) -> Error {
        let mut desc = Vec::new();
        let mut first = None;
        let mut coll = false;
        for w in &self.warps {
            let mut groups: Vec<(St, u32, u32)> = Vec::new();
            for l in 0..32 {
                if w.exists & (1 << l) == 0 || w.st[l] == St::Exit {
                    continue;
                }
                let key = (w.st[l], w.pc[l]);
                match groups.iter_mut().find(|g| (g.0, g.1) == key) {
                    Some(g) => g.2 |= 1 << l,
                    None => groups.push((key.0, key.1, 1 << l)),
                }
                if first.is_none() || (w.st[l] == St::Coll && !coll) {
                    first = Some((w.pc[l] as usize, w.id, l));
                }
                coll |= w.st[l] == St::Coll;
            }
            for (st, pc, m) in groups {
                desc.push(format!(
                    "warp {} lanes {m:#010x} {} at line {}",
                    w.id,
                    if st == St::Bar {
                        "wait at barrier"
                    } else {
                        "wait at collective"
                    },
                    self.k.code[pc as usize].line
                ));
            }
        }
        let (pc, w, l) = first.unwrap_or((0, 0, 0));
        let (fault, what) = if coll {
            (Fault::DivergentCollective, "warp collective never completed (not all member lanes reached the same instruction, or a member exited)")
        } else {
            (Fault::Deadlock, "no thread can make progress")
        };
        self.fault(
            fault,
            pc,
            w,
            l,
            None,
            format!("{what}: {}", desc.join("; ")),
        )
    }

    fn run_warp(&mut self, w: &mut Warp) -> Result<(), Error> {
        let k = self.k;
        // Time slice: a warp that spins on a flag another warp sets must let it run.
        let mut budget = 1u32 << 16;
        loop {
            budget = budget.saturating_sub(1);
            if budget == 0 {
                return Ok(());
            }
            let mut run = 0u32;
            let mut minpc = u32::MAX;
            for l in lanes(w.exists) {
                if w.st[l] == St::Run {
                    run |= 1 << l;
                    minpc = minpc.min(w.pc[l]);
                }
            }
            if run == 0 {
                return Ok(());
            }
            let mut mask = 0u32;
            for l in lanes(run) {
                if w.pc[l] == minpc {
                    mask |= 1 << l;
                }
            }
            let mut pc = minpc as usize;
            loop {
                let ins = &k.code[pc];
                if ins.is_collective() {
                    self.collective(w, pc, mask)?;
                    break;
                }
                let exec = self.guard(w, ins, mask);
                self.count(ins, exec, pc, w, mask)?;
                match self.exec(w, ins, pc, exec, mask)? {
                    Flow::Done => break,
                    Flow::Next => {}
                }
                pc += 1;
                if k.code[pc].is_target {
                    for l in lanes(mask) {
                        w.pc[l] = pc as u32;
                    }
                    break;
                }
            }
        }
    }

    #[inline(always)]
    fn guard(&self, w: &Warp, ins: &Instr, mask: u32) -> u32 {
        match ins.guard {
            None => mask,
            Some((p, neg)) => {
                let mut e = 0;
                for l in lanes(mask) {
                    if ((w.regs[p as usize * 32 + l] & 1) != 0) != neg {
                        e |= 1 << l;
                    }
                }
                e
            }
        }
    }

    #[inline(always)]
    fn count(
        &mut self,
        ins: &Instr,
        exec: u32,
        pc: usize,
        w: &Warp,
        mask: u32,
    ) -> Result<(), Error> {
        let n = exec.count_ones() as u64;
        self.rep.thread_instructions += n;
        self.rep.by_class[ins.class as usize] += n;
        self.rep.warp_instructions += 1;
        self.executed += n;
        if let Some(max) = self.c.opts.max_thread_instructions_per_cta {
            if self.executed > max {
                return Err(self.fault(
                    Fault::InstructionLimit,
                    pc,
                    w.id,
                    mask.trailing_zeros() as usize,
                    None,
                    format!("more than {max} thread-instructions in one CTA"),
                ));
            }
        }
        Ok(())
    }

    /// Executes a non-collective instruction for the lanes of `exec` (guard true) out of
    /// `mask` (all lanes at this pc).
    fn exec(
        &mut self,
        w: &mut Warp,
        ins: &Instr,
        pc: usize,
        exec: u32,
        mask: u32,
    ) -> Result<Flow, Error> {
        match &ins.op {
            Op::Alu { f, d, a, b, c } => {
                let mut x = self.lanes.take().expect("lane buffer");
                {
                    let xr = &mut *x;
                    for (dst, s) in [(&mut xr.a, a), (&mut xr.b, b), (&mut xr.c, c)] {
                        match *s {
                            Src::Reg(r) => dst.copy_from_slice(&w.regs[r as usize * 32..][..32]),
                            Src::Imm(v) => *dst = [v; 32],
                            Src::Sp(_) => {
                                for l in lanes(exec) {
                                    dst[l] = self.rd(w, *s, l);
                                }
                            }
                        }
                    }
                }
                f(&mut x);
                let d = *d as usize * 32;
                if exec == u32::MAX {
                    w.regs[d..d + 32].copy_from_slice(&x.d);
                } else {
                    for l in lanes(exec) {
                        w.regs[d + l] = x.d[l];
                    }
                }
                self.lanes = Some(x);
            }
            Op::Setp {
                f,
                comb,
                p,
                q,
                a,
                b,
            } => {
                for l in lanes(exec) {
                    let t = f(self.rd(w, *a, l), self.rd(w, *b, l));
                    let (mut pv, mut qv) = (t, !t);
                    if let Some((op, c, neg)) = comb {
                        let cv = (self.rd(w, *c, l) & 1 != 0) != *neg;
                        let apply = |x: bool| match op {
                            BoolOp::And => x && cv,
                            BoolOp::Or => x || cv,
                            BoolOp::Xor => x != cv,
                        };
                        pv = apply(pv);
                        qv = apply(qv);
                    }
                    if let Some(p) = p {
                        w.regs[*p as usize * 32 + l] = pv as u64;
                    }
                    if let Some(q) = q {
                        w.regs[*q as usize * 32 + l] = qv as u64;
                    }
                }
            }
            Op::Cvt { spec, d, a, b } => {
                for l in lanes(exec) {
                    let av = self.rd(w, *a, l);
                    let r = if spec.pair {
                        let bv = self.rd(w, *b, l);
                        (cvt(spec, av) << 16) | cvt(spec, bv)
                    } else {
                        cvt(spec, av)
                    };
                    w.regs[*d as usize * 32 + l] = r;
                }
            }
            Op::Bfi {
                bits,
                d,
                a,
                b,
                pos,
                len,
            } => {
                for l in lanes(exec) {
                    let (av, bv) = (self.rd(w, *a, l), self.rd(w, *b, l));
                    let (p, n) = (self.rd(w, *pos, l), self.rd(w, *len, l));
                    w.regs[*d as usize * 32 + l] = crate::ops::bfi(*bits, av, bv, p, n);
                }
            }
            Op::Pack { d, parts, bits } => {
                for l in lanes(exec) {
                    let mut v = 0u64;
                    for (i, p) in parts.iter().enumerate() {
                        v |= (self.rd(w, *p, l) & ops_mask(*bits)) << (i as u32 * bits);
                    }
                    w.regs[*d as usize * 32 + l] = v;
                }
            }
            Op::Unpack { ds, s, bits } => {
                for l in lanes(exec) {
                    let v = self.rd(w, *s, l);
                    for (i, d) in ds.iter().enumerate() {
                        if let Some(d) = d {
                            w.regs[*d as usize * 32 + l] =
                                (v >> (i as u32 * bits)) & ops_mask(*bits);
                        }
                    }
                }
            }
            Op::Ld {
                space,
                size,
                sext,
                ds,
                addr,
            } => {
                let size = *size as usize;
                let vbytes = size * ds.len();
                let mut accs = [(0usize, 0u64); 32];
                let mut nacc = 0;
                for l in lanes(exec) {
                    let a = self.addr(w, *addr, l);
                    self.check_aligned(a, vbytes as u64, pc, w.id, l, || {
                        format!("{vbytes}-byte access not aligned")
                    })?;
                    let loc = Self::resolve(*space, a);
                    if let Loc::Shared(o) = loc {
                        accs[nacc] = (l, o);
                        nacc += 1;
                    }
                    for (i, d) in ds.iter().enumerate() {
                        let loc = Self::resolve(*space, a.wrapping_add((i * size) as u64));
                        let mut v = self.load(w, loc, size, pc, l)?;
                        if *sext && size < 8 {
                            let sh = 64 - 8 * size as u32;
                            v = (((v << sh) as i64) >> sh) as u64;
                        }
                        if let Some(d) = d {
                            w.regs[*d as usize * 32 + l] = v;
                        }
                    }
                }
                if nacc > 0 {
                    self.banks(&accs[..nacc], vbytes);
                }
            }
            Op::St {
                space,
                size,
                srcs,
                addr,
            } => {
                let size = *size as usize;
                let vbytes = size * srcs.len();
                let mut accs = [(0usize, 0u64); 32];
                let mut nacc = 0;
                for l in lanes(exec) {
                    let a = self.addr(w, *addr, l);
                    self.check_aligned(a, vbytes as u64, pc, w.id, l, || {
                        format!("{vbytes}-byte access not aligned")
                    })?;
                    if let Loc::Shared(o) = Self::resolve(*space, a) {
                        accs[nacc] = (l, o);
                        nacc += 1;
                    }
                    for (i, s) in srcs.iter().enumerate() {
                        let v = self.rd(w, *s, l);
                        let loc = Self::resolve(*space, a.wrapping_add((i * size) as u64));
                        self.store(w, loc, size, v, pc, l)?;
                    }
                }
                if nacc > 0 {
                    self.banks(&accs[..nacc], vbytes);
                }
            }
            Op::Bra { target } => {
                for l in lanes(mask) {
                    w.pc[l] = if exec & (1 << l) != 0 {
                        *target
                    } else {
                        pc as u32 + 1
                    };
                }
                return Ok(Flow::Done);
            }
            Op::Exit => {
                for l in lanes(mask) {
                    if exec & (1 << l) != 0 {
                        w.st[l] = St::Exit;
                        w.pc[l] = pc as u32;
                    } else {
                        w.pc[l] = pc as u32 + 1;
                    }
                }
                return Ok(Flow::Done);
            }
            Op::Bar { id, count, .. } => {
                for l in lanes(mask) {
                    if exec & (1 << l) != 0 {
                        let idv = self.rd(w, *id, l) as u32;
                        let cnt = count.map(|c| self.rd(w, c, l) as u32).unwrap_or(0);
                        w.st[l] = St::Bar;
                        w.bar[l] = (idv, cnt);
                        w.pc[l] = pc as u32;
                    } else {
                        w.pc[l] = pc as u32 + 1;
                    }
                }
                return Ok(Flow::Done);
            }
            Op::Nop => {}
            Op::CpAsync {
                size,
                dst_space,
                dst,
                src,
                src_size,
                ignore_src,
            } => {
                for l in lanes(exec) {
                    let ignore = ignore_src.is_some_and(|p| w.regs[p as usize * 32 + l] & 1 != 0);
                    let src_size = if ignore { Some(Src::Imm(0)) } else { *src_size };
                    self.cp_async(w, pc, l, *size as usize, *dst_space, *dst, *src, src_size)?;
                }
            }
            Op::CpCommit => {
                for l in lanes(exec) {
                    let q = &mut w.asyncq[l];
                    let g = std::mem::take(&mut q.uncommitted);
                    q.groups.push_back(g);
                }
            }
            Op::CpWait { n } => {
                for l in lanes(exec) {
                    self.cp_wait(w, pc, l, *n as usize)?;
                }
            }
            Op::CpWaitAll => {
                for l in lanes(exec) {
                    let q = &mut w.asyncq[l];
                    let g = std::mem::take(&mut q.uncommitted);
                    q.groups.push_back(g);
                    self.cp_wait(w, pc, l, 0)?;
                }
            }
            Op::Atom {
                space,
                op,
                ty,
                d,
                addr,
                a,
                b,
            } => {
                for l in lanes(exec) {
                    self.atom(w, pc, l, *space, *op, *ty, *d, *addr, *a, *b)?;
                }
            }
            Op::Activemask { d } => {
                // The lanes executing this instruction together.
                for l in lanes(exec) {
                    w.regs[*d as usize * 32 + l] = mask as u64;
                }
            }
            Op::Shfl { .. }
            | Op::Vote { .. }
            | Op::Redux { .. }
            | Op::Mma { .. }
            | Op::Ldmatrix { .. }
            | Op::WarpSync { .. } => unreachable!("collectives are dispatched separately"),
        }
        Ok(Flow::Next)
    }

    /// Records the wavefronts of one warp-wide shared access.
    fn banks(&mut self, accs: &[(usize, u64)], bytes: usize) {
        let (wf, ideal) = crate::report::wavefronts(accs, bytes);
        self.rep.shared_wavefronts += wf;
        self.rep.bank_conflicts += wf - ideal;
    }

    #[allow(clippy::too_many_arguments)]
    fn cp_async(
        &mut self,
        w: &mut Warp,
        pc: usize,
        l: usize,
        size: usize,
        dst_space: Space,
        dst: crate::ir::Addr,
        src: crate::ir::Addr,
        src_size: Option<Src>,
    ) -> Result<(), Error> {
        let da = self.addr(w, dst, l);
        let sa = self.addr(w, src, l);
        let n = match src_size {
            Some(s) => (self.rd(w, s, l) as u32 as usize).min(size),
            None => size,
        };
        for a in [da, sa] {
            self.check_aligned(a, size as u64, pc, w.id, l, || {
                format!("cp.async of {size} bytes needs {size}-byte aligned addresses")
            })?;
        }
        let doff = match Self::resolve(dst_space, da) {
            Loc::Shared(o) => self.shared_check(o, size, pc, w.id, l)?,
            _ => {
                return Err(self.fault(
                    Fault::BadGenericAddress,
                    pc,
                    w.id,
                    l,
                    Some(da),
                    "cp.async destination is not shared memory".into(),
                ))
            }
        };
        let saddr = match Self::resolve(Space::Generic, sa) {
            Loc::Global(g) => g,
            _ => {
                return Err(self.fault(
                    Fault::BadGenericAddress,
                    pc,
                    w.id,
                    l,
                    Some(sa),
                    "cp.async source is not global memory".into(),
                ))
            }
        };
        let mut data = [0u8; 16];
        if n > 0 {
            let Some((d, off)) = self.gmem(saddr, n) else {
                return Err(self.global_oob(saddr, n, pc, w.id, l));
            };
            for (i, x) in data.iter_mut().enumerate().take(n) {
                *x = d[off + i].load(Ordering::Relaxed);
            }
            self.rep.global_bytes_read += n as u64;
        }
        if let Some(s) = &mut self.sh {
            if let Err(v) = s.start_async(doff, size) {
                return Err(self.violation(v, pc, w.id, l));
            }
        }
        w.asyncq[l].uncommitted.push(Pending {
            dst: doff as u32,
            len: size as u8,
            data,
        });
        Ok(())
    }

    fn cp_wait(&mut self, w: &mut Warp, pc: usize, l: usize, n: usize) -> Result<(), Error> {
        while w.asyncq[l].groups.len() > n {
            let g = w.asyncq[l].groups.pop_front().unwrap();
            for p in g {
                let (off, len) = (p.dst as usize, p.len as usize);
                if let Some(s) = &mut self.sh {
                    s.finish_async(off, len);
                }
                self.san_write(off, len, pc, w.id, l, true)?;
                self.shared[off..off + len].copy_from_slice(&p.data[..len]);
                self.rep.shared_bytes_written += len as u64;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn atom(
        &mut self,
        w: &mut Warp,
        pc: usize,
        l: usize,
        space: Space,
        op: AtomOp,
        ty: AtomTy,
        d: Option<crate::ir::Reg>,
        addr: crate::ir::Addr,
        a: Src,
        b: Src,
    ) -> Result<(), Error> {
        let ad = self.addr(w, addr, l);
        let size = match ty {
            AtomTy::U32 | AtomTy::S32 | AtomTy::F32 => 4,
            _ => 8,
        };
        self.check_aligned(ad, size as u64, pc, w.id, l, || "misaligned atomic".into())?;
        let (av, bv) = (self.rd(w, a, l), self.rd(w, b, l));
        let compute = |old: u64| -> u64 { atom_op(op, ty, old, av, bv) };
        let old = match Self::resolve(space, ad) {
            Loc::Global(g) => {
                let Some((dm, off)) = self.gmem(g, size) else {
                    return Err(self.global_oob(g, size, pc, w.id, l));
                };
                let _guard = self
                    .c
                    .dev
                    .atomic_lock
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let old = load_atomic(dm, off, size);
                store_atomic(dm, off, size, compute(old));
                self.rep.global_bytes_read += size as u64;
                self.rep.global_bytes_written += size as u64;
                old
            }
            Loc::Shared(o) => {
                let off = self.shared_check(o, size, pc, w.id, l)?;
                let e = self.epoch;
                if let Some(s) = &mut self.sh {
                    if let Err(v) = s.atomic(off, size, w.id, e) {
                        return Err(self.violation(v, pc, w.id, l));
                    }
                }
                let mut old = 0u64;
                for i in 0..size {
                    old |= (self.shared[off + i] as u64) << (8 * i);
                }
                let new = compute(old);
                for i in 0..size {
                    self.shared[off + i] = (new >> (8 * i)) as u8;
                }
                old
            }
            _ => {
                return Err(self.fault(
                    Fault::Unsupported,
                    pc,
                    w.id,
                    l,
                    Some(ad),
                    "atomics on this state space are not supported".into(),
                ))
            }
        };
        if let Some(d) = d {
            w.regs[d as usize * 32 + l] = old;
        }
        Ok(())
    }

    // ---- collectives -------------------------------------------------------------------

    fn collective(&mut self, w: &mut Warp, pc: usize, mask: u32) -> Result<(), Error> {
        let ins = &self.k.code[pc];
        let exec = self.guard(w, ins, mask);
        for l in lanes(mask & !exec) {
            w.pc[l] = pc as u32 + 1;
        }
        for l in lanes(exec) {
            w.st[l] = St::Coll;
            w.pc[l] = pc as u32;
        }
        let mut waiting = 0u32;
        for l in lanes(w.exists) {
            if w.st[l] == St::Coll && w.pc[l] == pc as u32 {
                waiting |= 1 << l;
            }
        }
        let full = matches!(ins.op, Op::Mma { .. } | Op::Ldmatrix { .. });
        let member_of = |cta: &Self, w: &Warp, l: usize| -> u32 {
            match &ins.op {
                Op::Shfl { mask, .. }
                | Op::Vote { mask, .. }
                | Op::Redux { mask, .. }
                | Op::WarpSync { mask } => cta.rd(w, *mask, l) as u32,
                _ => u32::MAX,
            }
        };
        // Group waiting lanes by member mask; run each group whose members all arrived.
        let mut pending = waiting;
        while pending != 0 {
            let l0 = pending.trailing_zeros() as usize;
            let mm = member_of(self, w, l0);
            let mut group = 0u32;
            for l in lanes(pending) {
                if member_of(self, w, l) == mm {
                    group |= 1 << l;
                }
            }
            pending &= !group;
            if mm & (1 << l0) == 0 {
                return Err(self.fault(
                    Fault::DivergentCollective,
                    pc,
                    w.id,
                    l0,
                    None,
                    format!("executing lane {l0} is not in the member mask {mm:#010x}"),
                ));
            }
            let required = if full { w.exists } else { mm & w.exists };
            if full && w.exists != u32::MAX {
                return Err(self.fault(
                    Fault::DivergentCollective,
                    pc,
                    w.id,
                    l0,
                    None,
                    "warp-wide .aligned instruction in a partial warp".into(),
                ));
            }
            let exited = (0..32)
                .filter(|l| required & (1 << l) != 0 && w.st[*l] == St::Exit)
                .fold(0u32, |m, l| m | 1 << l);
            if exited != 0 {
                return Err(self.fault(
                    Fault::DivergentCollective,
                    pc,
                    w.id,
                    l0,
                    None,
                    format!("member lanes {exited:#010x} of mask {required:#010x} have exited"),
                ));
            }
            if group & required != required {
                continue; // wait for the others
            }
            let n = group.count_ones() as u64;
            self.rep.thread_instructions += n;
            self.rep.by_class[ins.class as usize] += n;
            self.rep.warp_instructions += 1;
            self.executed += n;
            self.exec_collective(w, pc, ins, group)?;
            for l in lanes(group) {
                w.st[l] = St::Run;
                w.pc[l] = pc as u32 + 1;
            }
        }
        Ok(())
    }

    fn exec_collective(
        &mut self,
        w: &mut Warp,
        pc: usize,
        ins: &Instr,
        group: u32,
    ) -> Result<(), Error> {
        match &ins.op {
            Op::WarpSync { .. } => {}
            Op::Shfl {
                mode,
                d,
                p,
                a,
                b,
                c,
                ..
            } => {
                let mut vals = [0u64; 32];
                let mut preds = [false; 32];
                for l in lanes(group) {
                    let bv = self.rd(w, *b, l) as u32 & 0x1f;
                    let cv = self.rd(w, *c, l) as u32;
                    let cl = cv & 0x1f;
                    let seg = (cv >> 8) & 0x1f;
                    let lane = l as i32;
                    let max_lane = ((lane as u32 & seg) | (cl & !seg)) as i32;
                    let min_lane = (lane as u32 & seg) as i32;
                    let (j, pv) = match mode {
                        ShflMode::Up => {
                            let j = lane - bv as i32;
                            (j, j >= max_lane)
                        }
                        ShflMode::Down => {
                            let j = lane + bv as i32;
                            (j, j <= max_lane)
                        }
                        ShflMode::Bfly => {
                            let j = lane ^ bv as i32;
                            (j, j <= max_lane)
                        }
                        ShflMode::Idx => {
                            let j = min_lane | (bv as i32 & !(seg as i32));
                            (j, j <= max_lane)
                        }
                    };
                    let j = if pv { j as usize } else { l };
                    // A source lane outside the member mask gives an undefined value on the
                    // GPU; the emulator reads that lane's register anyway.
                    vals[l] = self.rd(w, *a, j);
                    preds[l] = pv;
                }
                for l in lanes(group) {
                    w.regs[*d as usize * 32 + l] = vals[l] & 0xFFFF_FFFF;
                    if let Some(p) = p {
                        w.regs[*p as usize * 32 + l] = preds[l] as u64;
                    }
                }
            }
            Op::Vote {
                mode, d, a, neg, ..
            } => {
                let mut ballot = 0u32;
                for l in lanes(group) {
                    if ((self.rd(w, *a, l) & 1) != 0) != *neg {
                        ballot |= 1 << l;
                    }
                }
                let r = match mode {
                    VoteMode::Ballot => ballot as u64,
                    VoteMode::All => (ballot == group) as u64,
                    VoteMode::Any => (ballot != 0) as u64,
                    VoteMode::Uni => (ballot == group || ballot == 0) as u64,
                };
                for l in lanes(group) {
                    w.regs[*d as usize * 32 + l] = r;
                }
            }
            Op::Redux {
                op, signed, d, a, ..
            } => {
                let vals: Vec<u32> = lanes(group).map(|l| self.rd(w, *a, l) as u32).collect();
                let r = vals.iter().skip(1).fold(vals[0], |x, &y| match op {
                    AtomOp::Add => x.wrapping_add(y),
                    AtomOp::Min if *signed => (x as i32).min(y as i32) as u32,
                    AtomOp::Max if *signed => (x as i32).max(y as i32) as u32,
                    AtomOp::Min => x.min(y),
                    AtomOp::Max => x.max(y),
                    AtomOp::And => x & y,
                    AtomOp::Or => x | y,
                    _ => x ^ y,
                });
                for l in lanes(group) {
                    w.regs[*d as usize * 32 + l] = r as u64;
                }
            }
            Op::Mma {
                bf16,
                k,
                f16acc,
                d,
                a,
                b,
                c,
            } => {
                self.rep.mma += 1;
                let row = |s: &Src| -> [u64; 32] {
                    match *s {
                        Src::Reg(r) => w.regs[r as usize * 32..][..32].try_into().unwrap(),
                        s => std::array::from_fn(|l| self.rd(w, s, l)),
                    }
                };
                let (ar, br, cr): (Vec<_>, Vec<_>, Vec<_>) = (
                    a.iter().map(row).collect(),
                    b.iter().map(row).collect(),
                    c.iter().map(row).collect(),
                );
                let out = tensor::mma_m16n8(*bf16, *k as usize, *f16acc, &ar, &br, &cr);
                for (r, vals) in d.iter().zip(out.iter()) {
                    w.regs[*r as usize * 32..][..32].copy_from_slice(vals);
                }
            }
            Op::Ldmatrix {
                num,
                trans,
                space,
                ds,
                addr,
            } => {
                self.rep.ldmatrix += 1;
                self.ldmatrix(w, pc, *num as usize, *trans, *space, ds, *addr)?;
            }
            _ => unreachable!(),
        }
        Ok(())
    }

    /// `ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16`: for matrix `i`, threads
    /// `8i..8i+7` supply the addresses of its rows 0..7 (16 contiguous, 16-byte aligned
    /// bytes = 8 b16 elements each); see [`tensor::ldmatrix_fragments`] for the result.
    #[allow(clippy::too_many_arguments)]
    fn ldmatrix(
        &mut self,
        w: &mut Warp,
        pc: usize,
        num: usize,
        trans: bool,
        space: Space,
        ds: &[crate::ir::Reg; 4],
        addr: crate::ir::Addr,
    ) -> Result<(), Error> {
        let mut m = [[[0u16; 8]; 8]; 4];
        for (i, mat) in m.iter_mut().enumerate().take(num) {
            let mut accs = [(0usize, 0u64); 8];
            for (r, row) in mat.iter_mut().enumerate() {
                let l = 8 * i + r;
                let a = self.addr(w, addr, l);
                let off = match Self::resolve(space, a) {
                    Loc::Shared(o) => o,
                    _ => {
                        return Err(self.fault(
                            Fault::BadGenericAddress,
                            pc,
                            w.id,
                            l,
                            Some(a),
                            "ldmatrix address is not in shared memory".into(),
                        ))
                    }
                };
                self.check_aligned(off, 16, pc, w.id, l, || {
                    "ldmatrix row addresses must be 16-byte aligned".into()
                })?;
                let o = self.shared_check(off, 16, pc, w.id, l)?;
                self.san_read(o, 16, pc, w.id, l)?;
                for (c, x) in row.iter_mut().enumerate() {
                    *x = u16::from_le_bytes([self.shared[o + 2 * c], self.shared[o + 2 * c + 1]]);
                }
                accs[r] = (l, off);
            }
            self.rep.shared_bytes_read += 128;
            self.banks(&accs, 16);
        }
        let frags = tensor::ldmatrix_fragments(&m, num, trans);
        for (d, vals) in ds.iter().zip(frags.iter()).take(num) {
            w.regs[*d as usize * 32..][..32].copy_from_slice(vals);
        }
        Ok(())
    }
}
