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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crate::error::{Error, ExecError, Fault};
use crate::ir::{
    AtomOp, AtomTy, BoolOp, CvtSpec, Instr, Kernel, NumTy, Op, Rnd, ShflMode, Space, Special, Src,
    VoteMode,
};
use crate::memory::{load_atomic, store_atomic, DevPtr, Device, LOCAL_WINDOW, SHARED_WINDOW};
use crate::ops::{self, bf, f32_of, flush, hf};
use crate::report::LaunchReport;

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
    /// Optional cap on thread-instructions per CTA (guards against endless loops).
    pub max_thread_instructions_per_cta: Option<u64>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            sanitize: true,
            host_threads: 0,
            max_thread_instructions_per_cta: None,
        }
    }
}

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

/// Shadow state of shared memory for the sanitizer (one entry per byte).
#[derive(Default)]
struct Shadow {
    /// Barrier epoch of the last write + 1 (0: never written).
    w_epoch: Vec<u32>,
    w_warp: Vec<u8>,
    r_epoch: Vec<u32>,
    r_mask: Vec<u32>,
    /// In-flight `cp.async` copies targeting the byte.
    pending: Vec<u8>,
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
        let sh = c.opts.sanitize.then(|| Shadow {
            w_epoch: vec![0; c.shared_total],
            w_warp: vec![0; c.shared_total],
            r_epoch: vec![0; c.shared_total],
            r_mask: vec![0; c.shared_total],
            pending: vec![0; c.shared_total],
        });
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
            s.w_epoch.fill(0);
            s.r_epoch.fill(0);
            s.r_mask.fill(0);
            s.pending.fill(0);
        }
        self.epoch = 1;
    }

    fn tid(&self, warp: u32, lane: usize) -> [u32; 3] {
        let lin = warp * 32 + lane as u32;
        let [bx, by, _] = self.c.block;
        [lin % bx, (lin / bx) % by, lin / (bx * by)]
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
        for i in off..off + len {
            if s.pending[i] != 0 {
                return Err(self.fault(
                    Fault::AsyncCopyPending,
                    pc,
                    w,
                    lane,
                    Some(i as u64),
                    "read of a shared byte whose cp.async has not been completed by cp.async.wait_group/wait_all".into(),
                ));
            }
            if s.w_epoch[i] == 0 {
                // Reported at the next barrier or at the end of the CTA, unless another
                // warp writes the byte before that: then it is the race that explains it.
                if self.uninit.is_none() {
                    let e = self.fault(
                        Fault::UninitializedSharedRead,
                        pc,
                        w,
                        lane,
                        Some(i as u64),
                        "read of shared memory that was never written".into(),
                    );
                    self.uninit = Some(e);
                    return self.san_read(off, len, pc, w, lane);
                }
            }
            if s.w_epoch[i] == epoch && s.w_warp[i] as u32 != w {
                let other = s.w_warp[i];
                return Err(self.fault(
                    Fault::SharedRace,
                    pc,
                    w,
                    lane,
                    Some(i as u64),
                    format!("read-after-write race: warp {other} wrote this byte with no barrier in between"),
                ));
            }
            if s.r_epoch[i] != epoch {
                s.r_epoch[i] = epoch;
                s.r_mask[i] = 0;
            }
            s.r_mask[i] |= 1 << w;
        }
        Ok(())
    }

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
        for i in off..off + len {
            if !async_done && s.pending[i] != 0 {
                return Err(self.fault(
                    Fault::AsyncCopyPending,
                    pc,
                    w,
                    lane,
                    Some(i as u64),
                    "write to a shared byte whose cp.async has not completed".into(),
                ));
            }
            if s.w_epoch[i] == epoch && s.w_warp[i] as u32 != w {
                let other = s.w_warp[i];
                return Err(self.fault(
                    Fault::SharedRace,
                    pc,
                    w,
                    lane,
                    Some(i as u64),
                    format!("write-after-write race: warp {other} wrote this byte with no barrier in between"),
                ));
            }
            if s.r_epoch[i] == epoch && s.r_mask[i] & !(1u32 << w) != 0 {
                let other = (s.r_mask[i] & !(1u32 << w)).trailing_zeros();
                return Err(self.fault(
                    Fault::SharedRace,
                    pc,
                    w,
                    lane,
                    Some(i as u64),
                    format!("write-after-read race: warp {other} read this byte with no barrier in between"),
                ));
            }
            s.w_epoch[i] = epoch;
            s.w_warp[i] = w as u8;
        }
        Ok(())
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
                let Some((d, off)) = self.c.dev.range(a, size) else {
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
                let Some((d, off)) = self.c.dev.range(a, size) else {
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

    fn global_oob(&self, a: u64, size: usize, pc: usize, w: u32, lane: usize) -> Error {
        self.fault(
            Fault::GlobalOutOfBounds,
            pc,
            w,
            lane,
            Some(a),
            format!(
                "{size}-byte global access outside device memory: {}",
                self.c.dev.describe(a)
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
            let released = !done && self.release_barriers();
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
    fn release_barriers(&mut self) -> bool {
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
        released
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
                    if a % vbytes as u64 != 0 {
                        return Err(self.fault(
                            Fault::Misaligned,
                            pc,
                            w.id,
                            l,
                            Some(a),
                            format!("{vbytes}-byte access not aligned"),
                        ));
                    }
                    let loc = Self::resolve(*space, a);
                    if let Loc::Shared(o) = loc {
                        accs[nacc] = (l, o);
                        nacc += 1;
                    }
                    for (i, d) in ds.iter().enumerate() {
                        let loc = Self::resolve(*space, a + (i * size) as u64);
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
                    if a % vbytes as u64 != 0 {
                        return Err(self.fault(
                            Fault::Misaligned,
                            pc,
                            w.id,
                            l,
                            Some(a),
                            format!("{vbytes}-byte access not aligned"),
                        ));
                    }
                    if let Loc::Shared(o) = Self::resolve(*space, a) {
                        accs[nacc] = (l, o);
                        nacc += 1;
                    }
                    for (i, s) in srcs.iter().enumerate() {
                        let v = self.rd(w, *s, l);
                        let loc = Self::resolve(*space, a + (i * size) as u64);
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
            Op::Bar { id, count } => {
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
            } => {
                for l in lanes(exec) {
                    self.cp_async(w, pc, l, *size as usize, *dst_space, *dst, *src, *src_size)?;
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
            Op::Shfl { .. }
            | Op::Vote { .. }
            | Op::Mma { .. }
            | Op::Ldmatrix { .. }
            | Op::WarpSync { .. }
            | Op::Activemask { .. } => {
                if let Op::Activemask { d } = &ins.op {
                    let active = w.exists
                        & !(0..32).fold(
                            0u32,
                            |m, l| if w.st[l] == St::Exit { m | 1 << l } else { m },
                        );
                    let _ = active;
                    for l in lanes(exec) {
                        w.regs[*d as usize * 32 + l] = mask as u64;
                    }
                } else {
                    unreachable!("collectives are dispatched separately")
                }
            }
        }
        Ok(Flow::Next)
    }

    /// Records the wavefronts of one warp-wide shared access.
    fn banks(&mut self, accs: &[(usize, u64)], bytes: usize) {
        let (wf, ideal) = wavefronts(accs, bytes);
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
        if da % size as u64 != 0 || sa % size as u64 != 0 {
            return Err(self.fault(
                Fault::Misaligned,
                pc,
                w.id,
                l,
                Some(if da % size as u64 != 0 { da } else { sa }),
                format!("cp.async of {size} bytes needs {size}-byte aligned addresses"),
            ));
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
            let Some((d, off)) = self.c.dev.range(saddr, n) else {
                return Err(self.global_oob(saddr, n, pc, w.id, l));
            };
            for (i, x) in data.iter_mut().enumerate().take(n) {
                *x = d[off + i].load(Ordering::Relaxed);
            }
            self.rep.global_bytes_read += n as u64;
        }
        if let Some(s) = &mut self.sh {
            if let Some(i) = (doff..doff + size).find(|i| s.pending[*i] != 0) {
                return Err(self.fault(
                    Fault::AsyncCopyPending,
                    pc,
                    w.id,
                    l,
                    Some(i as u64),
                    "cp.async to a shared byte that another in-flight cp.async also targets".into(),
                ));
            }
            for i in doff..doff + size {
                s.pending[i] = 1;
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
                    for i in off..off + len {
                        s.pending[i] = 0;
                    }
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
        if ad % size as u64 != 0 {
            return Err(self.fault(
                Fault::Misaligned,
                pc,
                w.id,
                l,
                Some(ad),
                "misaligned atomic".into(),
            ));
        }
        let (av, bv) = (self.rd(w, a, l), self.rd(w, b, l));
        let compute = |old: u64| -> u64 { atom_op(op, ty, old, av, bv) };
        let old = match Self::resolve(space, ad) {
            Loc::Global(g) => {
                let Some((dm, off)) = self.c.dev.range(g, size) else {
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
                if let Some(s) = &mut self.sh {
                    let e = self.epoch;
                    for i in off..off + size {
                        if s.pending[i] != 0 || s.w_epoch[i] == 0 {
                            let f = if s.pending[i] != 0 {
                                Fault::AsyncCopyPending
                            } else {
                                Fault::UninitializedSharedRead
                            };
                            return Err(self.fault(
                                f,
                                pc,
                                w.id,
                                l,
                                Some(i as u64),
                                "atomic on shared memory that is in flight or was never written"
                                    .into(),
                            ));
                        }
                        s.w_epoch[i] = e;
                        s.w_warp[i] = w.id as u8;
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
                Op::Shfl { mask, .. } | Op::Vote { mask, .. } | Op::WarpSync { mask } => {
                    cta.rd(w, *mask, l) as u32
                }
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
            Op::Mma { bf16, d, a, b, c } => {
                self.rep.mma += 1;
                mma_m16n8k16(self, w, *bf16, d, a, b, c);
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

    /// `ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16` per the PTX ISA
    /// ("Warp-level matrix load instruction: ldmatrix"): for matrix `i`, threads
    /// `8i..8i+7` supply the addresses of its rows 0..7 (16 contiguous bytes = 8 b16
    /// elements each). Without `.trans`, lane `l` receives in register `d[i]` row `l/4`,
    /// elements `2*(l%4)` (low half) and `2*(l%4)+1` (high half); with `.trans` it
    /// receives elements `[2*(l%4)][l/4]` and `[2*(l%4)+1][l/4]` (row, col), i.e. the
    /// transposed matrix in the same fragment layout.
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
                if off % 16 != 0 {
                    return Err(self.fault(
                        Fault::Misaligned,
                        pc,
                        w.id,
                        l,
                        Some(off),
                        "ldmatrix row addresses must be 16-byte aligned".into(),
                    ));
                }
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
        for l in 0..32 {
            let (g, t) = (l / 4, l % 4);
            for (i, d) in ds.iter().enumerate().take(num) {
                let (lo, hi) = if trans {
                    (m[i][2 * t][g], m[i][2 * t + 1][g])
                } else {
                    (m[i][g][2 * t], m[i][g][2 * t + 1])
                };
                w.regs[*d as usize * 32 + l] = lo as u64 | (hi as u64) << 16;
            }
        }
        Ok(())
    }
}

#[inline(always)]
fn ops_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Warp-wide `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`, with the
/// fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating
/// point type"), groupID = lane/4, threadID_in_group = lane%4:
/// - A (16x16, 4 x .b32 = a0..a7, a_{2r} in the low half of register r):
///   row = groupID for a0,a1,a4,a5 and groupID+8 for a2,a3,a6,a7;
///   col = threadID_in_group*2 + (i&1) for a0..a3, +8 for a4..a7.
/// - B (16x8, 2 x .b32 = b0..b3): row (k) = threadID_in_group*2 + (i&1) for b0,b1, +8 for
///   b2,b3; col (n) = groupID.
/// - C/D (16x8 f32, c0..c3): row = groupID for c0,c1 and groupID+8 for c2,c3;
///   col = threadID_in_group*2 + (i&1).
///
/// Arithmetic: every product of two f16/bf16 values is exact in f32; the products are
/// added to C in f32 with round-to-nearest, sequentially in order of k (the GPU's
/// internal accumulation order and precision are unspecified, so results can differ
/// from hardware in the last bits).
fn mma_m16n8k16(
    cta: &Cta,
    w: &mut Warp,
    bf16: bool,
    d: &[crate::ir::Reg; 4],
    a: &[Src; 4],
    b: &[Src; 2],
    c: &[Src; 4],
) {
    // Operand rows: one value per lane.
    let row = |s: Src| -> [u64; 32] {
        match s {
            Src::Reg(r) => w.regs[r as usize * 32..][..32].try_into().unwrap(),
            s => std::array::from_fn(|l| cta.rd(w, s, l)),
        }
    };
    let (ar, br, cr) = (a.map(row), b.map(row), c.map(row));
    // Both conversions are exact: bf16 is the top half of an f32.
    let cv = |x: u64| -> f32 {
        if bf16 {
            f32::from_bits(((x & 0xFFFF) as u32) << 16)
        } else {
            half::f16::from_bits(x as u16).to_f32()
        }
    };
    let mut am = [[0f32; 16]; 16];
    let mut bm = [[0f32; 8]; 16];
    let mut dm = [[0f32; 8]; 16];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for (r, regs) in ar.iter().enumerate() {
            let v = regs[l];
            // Register r holds a_{2r} (low half) and a_{2r+1} (high half).
            let row = if r % 2 == 0 { g } else { g + 8 };
            let col = t * 2 + if r >= 2 { 8 } else { 0 };
            am[row][col] = cv(v);
            am[row][col + 1] = cv(v >> 16);
        }
        for (r, regs) in br.iter().enumerate() {
            let v = regs[l];
            let row = t * 2 + if r == 1 { 8 } else { 0 };
            bm[row][g] = cv(v);
            bm[row + 1][g] = cv(v >> 16);
        }
        for (i, regs) in cr.iter().enumerate() {
            let row = if i < 2 { g } else { g + 8 };
            dm[row][t * 2 + (i & 1)] = f32_of(regs[l]);
        }
    }
    // D = C + A.B: for each element, products added in order of k, each sum rounded to
    // f32 (mul and add are separate: no fused rounding). The j loop vectorizes.
    for i in 0..16 {
        let acc = &mut dm[i];
        for k in 0..16 {
            let x = am[i][k];
            let brow = &bm[k];
            for j in 0..8 {
                acc[j] += x * brow[j];
            }
        }
    }
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for (i, r) in d.iter().enumerate() {
            let row = if i < 2 { g } else { g + 8 };
            w.regs[*r as usize * 32 + l] = dm[row][t * 2 + (i & 1)].to_bits() as u64;
        }
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
    for ph in 0..32 / per_phase {
        let mut words: [[u64; 8]; 32] = [[0; 8]; 32];
        let mut cnt = [0u8; 32];
        let mut any = false;
        for &(l, off) in accs {
            if l / per_phase != ph {
                continue;
            }
            any = true;
            let first = off / 4;
            let last = (off + bytes.max(1) as u64 - 1) / 4;
            for word in first..=last {
                let bank = (word % 32) as usize;
                let n = cnt[bank] as usize;
                if !words[bank][..n.min(8)].contains(&word) {
                    if n < 8 {
                        words[bank][n] = word;
                    }
                    cnt[bank] = cnt[bank].saturating_add(1);
                }
            }
        }
        if any {
            ideal += 1;
            wf += *cnt.iter().max().unwrap() as u64;
        }
    }
    (wf, ideal)
}

fn atom_op(op: AtomOp, ty: AtomTy, old: u64, a: u64, b: u64) -> u64 {
    match ty {
        AtomTy::F32 => {
            let (o, x) = (f32_of(old), f32_of(a));
            (match op {
                AtomOp::Add => o + x,
                AtomOp::Min => ops::fmin(o, x),
                AtomOp::Max => ops::fmax(o, x),
                AtomOp::Exch => x,
                AtomOp::Cas => {
                    if old as u32 == a as u32 {
                        f32_of(b)
                    } else {
                        o
                    }
                }
                _ => o,
            })
            .to_bits() as u64
        }
        AtomTy::F64 => {
            let (o, x) = (f64::from_bits(old), f64::from_bits(a));
            (match op {
                AtomOp::Add => o + x,
                AtomOp::Exch => x,
                AtomOp::Min => o.min(x),
                AtomOp::Max => o.max(x),
                AtomOp::Cas => {
                    if old == a {
                        f64::from_bits(b)
                    } else {
                        o
                    }
                }
                _ => o,
            })
            .to_bits()
        }
        _ => {
            let w64 = matches!(ty, AtomTy::U64 | AtomTy::S64);
            let m = if w64 { u64::MAX } else { 0xFFFF_FFFF };
            let signed = matches!(ty, AtomTy::S32 | AtomTy::S64);
            let sx = |v: u64| {
                if w64 {
                    v as i64
                } else {
                    v as u32 as i32 as i64
                }
            };
            let (o, x) = (old & m, a & m);
            (match op {
                AtomOp::Add => o.wrapping_add(x),
                AtomOp::Min => {
                    if signed {
                        sx(o).min(sx(x)) as u64
                    } else {
                        o.min(x)
                    }
                }
                AtomOp::Max => {
                    if signed {
                        sx(o).max(sx(x)) as u64
                    } else {
                        o.max(x)
                    }
                }
                AtomOp::Exch => x,
                AtomOp::Cas => {
                    if o == x {
                        b
                    } else {
                        o
                    }
                }
                AtomOp::And => o & x,
                AtomOp::Or => o | x,
                AtomOp::Xor => o ^ x,
                AtomOp::Inc => {
                    if o >= x {
                        0
                    } else {
                        o + 1
                    }
                }
                AtomOp::Dec => {
                    if o == 0 || o > x {
                        x
                    } else {
                        o - 1
                    }
                }
            }) & m
        }
    }
}

fn round(x: f64, r: Rnd) -> f64 {
    match r {
        Rnd::Near => x.round_ties_even(),
        Rnd::Zero => x.trunc(),
        Rnd::Down => x.floor(),
        Rnd::Up => x.ceil(),
    }
}

/// `cvt` of one value.
pub(crate) fn cvt(s: &CvtSpec, a: u64) -> u64 {
    let int_to = |v: i128| -> u64 {
        match s.dst {
            NumTy::U(w) => {
                let max = if w == 64 {
                    u64::MAX as i128
                } else {
                    (1i128 << w) - 1
                };
                if s.sat {
                    v.clamp(0, max) as u64
                } else {
                    (v as u64) & ops_mask(w)
                }
            }
            NumTy::S(w) => {
                let (lo, hi) = (-(1i128 << (w - 1)), (1i128 << (w - 1)) - 1);
                if s.sat {
                    (v.clamp(lo, hi) as u64) & ops_mask(w)
                } else {
                    (v as u64) & ops_mask(w)
                }
            }
            NumTy::F16 => hf::from(v as f64),
            NumTy::Bf16 => bf::from(v as f64),
            NumTy::F32 => (v as f32).to_bits() as u64,
            NumTy::F64 => (v as f64).to_bits(),
        }
    };
    let float_to = |x: f64, from_f32: Option<f32>| -> u64 {
        match s.dst {
            NumTy::U(_) | NumTy::S(_) => {
                // Float to integer: round per mode, NaN -> 0, saturate to the range.
                if x.is_nan() {
                    return 0;
                }
                let r = round(x, s.rnd);
                let (lo, hi) = match s.dst {
                    NumTy::U(w) => (
                        0f64,
                        if w == 64 {
                            u64::MAX as f64
                        } else {
                            ((1u128 << w) - 1) as f64
                        },
                    ),
                    NumTy::S(w) => (-(2f64.powi(w as i32 - 1)), 2f64.powi(w as i32 - 1) - 1.0),
                    _ => unreachable!(),
                };
                let v = if r <= lo {
                    lo as i128
                } else if r >= hi {
                    hi as i128
                } else {
                    r as i128
                };
                let w = match s.dst {
                    NumTy::U(w) | NumTy::S(w) => w,
                    _ => 64,
                };
                (v as u64) & ops_mask(w)
            }
            NumTy::F16 | NumTy::Bf16 => {
                let mut y = if s.int_round { round(x, s.rnd) } else { x };
                if s.sat {
                    y = if y.is_nan() { 0.0 } else { y.clamp(0.0, 1.0) };
                }
                let bf16 = s.dst == NumTy::Bf16;
                match from_f32 {
                    Some(f) if !s.int_round && !s.sat => {
                        if bf16 {
                            ops::f32_to_bf16(f) as u64
                        } else {
                            ops::f32_to_f16(f) as u64
                        }
                    }
                    _ => {
                        if bf16 {
                            bf::from(y)
                        } else {
                            hf::from(y)
                        }
                    }
                }
            }
            NumTy::F32 => {
                let mut y = if s.int_round {
                    round(x, s.rnd) as f32
                } else {
                    x as f32
                };
                if s.ftz {
                    y = flush(y);
                }
                if s.sat {
                    y = ops::sat(y);
                }
                y.to_bits() as u64
            }
            NumTy::F64 => {
                let mut y = if s.int_round { round(x, s.rnd) } else { x };
                if s.sat {
                    y = if y.is_nan() { 0.0 } else { y.clamp(0.0, 1.0) };
                }
                y.to_bits()
            }
        }
    };
    match s.src {
        NumTy::U(w) => int_to((a & ops_mask(w)) as i128),
        NumTy::S(w) => {
            let sh = 64 - w;
            int_to((((a << sh) as i64) >> sh) as i128)
        }
        NumTy::F16 => float_to(hf::to(a & 0xFFFF), None),
        NumTy::Bf16 => float_to(bf::to(a & 0xFFFF), None),
        NumTy::F32 => {
            let mut x = f32_of(a);
            if s.ftz {
                x = flush(x);
            }
            float_to(x as f64, Some(x))
        }
        NumTy::F64 => float_to(f64::from_bits(a), None),
    }
}
