//! Decoded, executable form of a kernel: registers are indices, symbols are resolved to
//! offsets, and every ALU instruction carries its scalar function ([`crate::ops`]).

use std::collections::HashMap;

use crate::error::Error;
use crate::ops::{self, batch, f32_fn, f64_fn, h_fn, m, s, Cmp, F3};
use crate::parse::{EntryAst, Imm, InstrAst, ModuleAst, OperandAst, Stmt, VarDecl};

/// Register index (a per-thread `u64` slot).
pub(crate) type Reg = u32;

/// Special registers readable with `mov`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Special {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    LaneId,
    WarpId,
    NWarpId,
    Clock,
    SmId,
    DynSmem,
    TotalSmem,
    LanemaskLt,
    LanemaskLe,
    LanemaskEq,
    LanemaskGt,
    LanemaskGe,
}

/// A source operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Src {
    Reg(Reg),
    Imm(u64),
    Sp(Special),
}

/// An address `[base + off]` (symbols are folded into `off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Addr {
    pub base: Option<Reg>,
    pub off: i64,
}

/// A state space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Space {
    Global,
    Shared,
    Local,
    Param,
    Generic,
}

/// `shfl.sync` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

/// `vote.sync` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

/// Boolean combiner of `setp.cmp.bop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BoolOp {
    And,
    Or,
    Xor,
}

/// Atomic operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtomOp {
    Add,
    Min,
    Max,
    Exch,
    Cas,
    And,
    Or,
    Xor,
    Inc,
    Dec,
}

/// Atomic operand types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtomTy {
    U32,
    S32,
    U64,
    S64,
    F32,
    F64,
}

/// `cvt` operand kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NumTy {
    U(u32),
    S(u32),
    F16,
    Bf16,
    F32,
    F64,
}

/// Rounding of `cvt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rnd {
    /// Default / `.rn` / `.rni` (to nearest even).
    Near,
    /// `.rz` / `.rzi`.
    Zero,
    /// `.rm` / `.rmi`.
    Down,
    /// `.rp` / `.rpi`.
    Up,
}

/// A fully decoded `cvt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CvtSpec {
    pub dst: NumTy,
    pub src: NumTy,
    pub rnd: Rnd,
    /// `.rni`-style integer rounding of a float to a float.
    pub int_round: bool,
    pub ftz: bool,
    pub sat: bool,
    /// `.f16x2`/`.bf16x2` destination from two f32 sources (a -> high half, b -> low half).
    pub pair: bool,
}

/// Instruction classes for [`crate::LaunchReport`] counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Integer and logic arithmetic, comparisons on integers, predicates.
    Int = 0,
    /// f32/f64 arithmetic and comparisons.
    Float = 1,
    /// f16/bf16 scalar and packed arithmetic.
    Half = 2,
    /// `cvt` and `cvta`.
    Convert = 3,
    /// `mov`, `selp`, pack/unpack.
    Move = 4,
    /// Loads, stores, `cp.async`, `ldmatrix`, atomics.
    Memory = 5,
    /// Branches, `ret`/`exit`, barriers, fences.
    Control = 6,
    /// Warp collectives other than `mma`/`ldmatrix` (`shfl`, `vote`, `redux`).
    Warp = 7,
    /// `mma`.
    Tensor = 8,
}

/// Number of [`Class`] values.
pub const NUM_CLASSES: usize = 9;

/// One decoded operation.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Alu {
        f: F3,
        d: Reg,
        a: Src,
        b: Src,
        c: Src,
    },
    Setp {
        f: Cmp,
        comb: Option<(BoolOp, Src, bool)>,
        p: Option<Reg>,
        q: Option<Reg>,
        a: Src,
        b: Src,
    },
    Cvt {
        spec: CvtSpec,
        d: Reg,
        a: Src,
        b: Src,
    },
    Pack {
        d: Reg,
        parts: Vec<Src>,
        bits: u32,
    },
    /// `bfi.b{32,64}`: the only four-source integer instruction, so not an `Alu`.
    Bfi {
        bits: u32,
        d: Reg,
        a: Src,
        b: Src,
        pos: Src,
        len: Src,
    },
    Unpack {
        ds: Vec<Option<Reg>>,
        s: Src,
        bits: u32,
    },
    Ld {
        space: Space,
        size: u8,
        sext: bool,
        ds: Vec<Option<Reg>>,
        addr: Addr,
    },
    St {
        space: Space,
        size: u8,
        srcs: Vec<Src>,
        addr: Addr,
    },
    Bra {
        target: u32,
    },
    Exit,
    Bar {
        id: Src,
        count: Option<Src>,
        /// `bar.sync` / `barrier.sync.aligned`: every thread of a warp must wait at the
        /// same barrier instruction.
        aligned: bool,
    },
    WarpSync {
        mask: Src,
    },
    Nop,
    Shfl {
        mode: ShflMode,
        d: Reg,
        p: Option<Reg>,
        a: Src,
        b: Src,
        c: Src,
        mask: Src,
    },
    Vote {
        mode: VoteMode,
        d: Reg,
        a: Src,
        neg: bool,
        mask: Src,
    },
    Activemask {
        d: Reg,
    },
    Redux {
        op: AtomOp,
        signed: bool,
        d: Reg,
        a: Src,
        mask: Src,
    },
    /// `mma.sync.aligned.m16n8k{8,16}.row.col.{f32,f16}.{bf16,f16}.{bf16,f16}.{f32,f16}`:
    /// `k` is 8 or 16; A has k/4 registers, B k/8, C and D 4 (f32) or 2 (f16).
    Mma {
        bf16: bool,
        k: u8,
        f16acc: bool,
        d: Vec<Reg>,
        a: Vec<Src>,
        b: Vec<Src>,
        c: Vec<Src>,
    },
    Ldmatrix {
        num: u8,
        trans: bool,
        space: Space,
        ds: [Reg; 4],
        addr: Addr,
    },
    CpAsync {
        size: u8,
        dst_space: Space,
        dst: Addr,
        src: Addr,
        src_size: Option<Src>,
        /// `ignore-src` predicate: when true, nothing is read and the bytes are zero-filled.
        ignore_src: Option<Reg>,
    },
    CpCommit,
    CpWait {
        n: u32,
    },
    CpWaitAll,
    Atom {
        space: Space,
        op: AtomOp,
        ty: AtomTy,
        d: Option<Reg>,
        addr: Addr,
        a: Src,
        b: Src,
    },
}

/// A decoded instruction with its guard and source position.
#[derive(Debug, Clone)]
pub(crate) struct Instr {
    pub op: Op,
    pub guard: Option<(Reg, bool)>,
    pub line: u32,
    pub text: String,
    pub class: Class,
    /// A label points at this instruction (straight-line execution stops here so
    /// converging lanes can join).
    pub is_target: bool,
}

impl Instr {
    /// Warp-collective instructions wait for their member mask.
    pub(crate) fn is_collective(&self) -> bool {
        matches!(
            self.op,
            Op::Shfl { .. }
                | Op::Vote { .. }
                | Op::Redux { .. }
                | Op::Mma { .. }
                | Op::Ldmatrix { .. }
                | Op::WarpSync { .. }
        )
    }
}

/// A kernel parameter's place in the parameter buffer.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// Name as declared.
    pub name: String,
    /// Byte offset in the parameter buffer.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Declared type (`.u64`, `.u32`, `.f32`, `.b8` for byval arrays, ...).
    pub ty: String,
}

/// A decoded kernel, ready to launch.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub(crate) name: String,
    pub(crate) params: Vec<ParamInfo>,
    pub(crate) param_bytes: u64,
    pub(crate) code: Vec<Instr>,
    pub(crate) nregs: u32,
    pub(crate) shared_static: u64,
    pub(crate) dyn_shared_offset: u64,
    pub(crate) local_bytes: u64,
    /// Initial contents of the module `.global`/`.const` variables the kernel uses.
    pub(crate) global_init: Vec<u8>,
}

impl Kernel {
    /// The kernel's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The kernel's parameters in declaration order.
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }
    /// Bytes of static shared memory (all `.shared` variables the kernel references).
    pub fn static_shared_bytes(&self) -> u64 {
        self.shared_static
    }
    /// Number of decoded instructions.
    pub fn num_instructions(&self) -> usize {
        self.code.len()
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a.max(1)) * a.max(1)
}

/// Decodes every entry of a parsed module.
pub(crate) fn decode_module(m: &ModuleAst) -> Result<Vec<Kernel>, Error> {
    m.entries
        .iter()
        .map(|e| decode_entry(e, &m.globals))
        .collect()
}

struct Dec<'a> {
    scopes: Vec<HashMap<String, Reg>>,
    nregs: u32,
    shared: HashMap<String, u64>,
    local: HashMap<String, u64>,
    params: HashMap<String, u64>,
    labels: HashMap<String, u32>,
    globals: HashMap<String, u64>,
    preds: std::collections::HashSet<Reg>,
    ins: &'a InstrAst,
}

fn unsup<T>(ins: &InstrAst, msg: impl Into<String>) -> Result<T, Error> {
    Err(Error::Unsupported {
        line: ins.line,
        instr: ins.opcode.clone(),
        msg: msg.into(),
    })
}

fn decode_entry(e: &EntryAst, globals: &[VarDecl]) -> Result<Kernel, Error> {
    // Parameter layout.
    let mut params = Vec::new();
    let mut off = 0u64;
    for p in &e.params {
        off = align_up(off, p.align);
        params.push(ParamInfo {
            name: p.name.clone(),
            offset: off,
            size: p.size,
            ty: p.ty.clone(),
        });
        off += p.size;
    }
    let param_bytes = off;

    // Shared / local layout: module-level shared variables the body references, then the
    // body's own, then dynamic shared memory (extern, size 0) at the end.
    let mut referenced = std::collections::HashSet::new();
    for st in &e.body {
        if let Stmt::Instr(i) = st {
            for o in &i.operands {
                collect_names(o, &mut referenced);
            }
        }
    }
    let mut vars: Vec<&VarDecl> = globals
        .iter()
        .filter(|g| referenced.contains(&g.name))
        .collect();
    vars.extend(e.body.iter().filter_map(|s| match s {
        Stmt::Var(v) => Some(v),
        _ => None,
    }));
    let (mut sh, mut lo) = (0u64, 0u64);
    let mut shared = HashMap::new();
    let mut local = HashMap::new();
    let mut dyn_syms = Vec::new();
    let (mut gl, mut globals, mut global_init) = (0u64, HashMap::new(), Vec::<u8>::new());
    let mut dyn_align = 16u64;
    for v in &vars {
        match v.space.as_str() {
            ".shared" if v.extern_ || v.size == 0 => {
                dyn_syms.push(v.name.clone());
                dyn_align = dyn_align.max(v.align);
            }
            ".shared" => {
                sh = align_up(sh, v.align);
                shared.insert(v.name.clone(), sh);
                sh += v.size;
            }
            ".local" => {
                lo = align_up(lo, v.align);
                local.insert(v.name.clone(), lo);
                lo += v.size;
            }
            sp => {
                // Module `.global`/`.const` variables live in a per-launch block of device
                // memory at `GLOBALS_WINDOW`, initialized from their initializers.
                if !referenced.contains(&v.name) {
                    continue;
                }
                let Some(init) = &v.init else {
                    return Err(Error::Unsupported {
                        line: v.line,
                        instr: format!("{sp} {}", v.name),
                        msg: "initializers other than numeric literals are not supported".into(),
                    });
                };
                gl = align_up(gl, v.align);
                globals.insert(v.name.clone(), crate::memory::GLOBALS_WINDOW + gl);
                global_init.resize((gl + v.size) as usize, 0);
                let n = init.len().min(v.size as usize);
                global_init[gl as usize..gl as usize + n].copy_from_slice(&init[..n]);
                gl += v.size;
            }
        }
    }
    let dyn_shared_offset = align_up(sh, dyn_align);
    for d in dyn_syms {
        shared.insert(d, dyn_shared_offset);
    }

    // Registers and labels.
    let dummy = InstrAst {
        guard: None,
        opcode: String::new(),
        operands: vec![],
        line: 0,
    };
    let mut dec = Dec {
        scopes: vec![HashMap::new()],
        nregs: 0,
        shared,
        local,
        params: params.iter().map(|p| (p.name.clone(), p.offset)).collect(),
        labels: HashMap::new(),
        globals,
        preds: Default::default(),
        ins: &dummy,
    };
    let mut n = 0u32;
    let mut targets = std::collections::HashSet::new();
    for st in &e.body {
        match st {
            Stmt::Label(l) => {
                dec.labels.insert(l.clone(), n);
                targets.insert(n);
            }
            Stmt::Instr(_) => n += 1,
            _ => {}
        }
    }
    let mut code = Vec::new();
    for st in &e.body {
        match st {
            Stmt::ScopeOpen => dec.scopes.push(HashMap::new()),
            Stmt::ScopeClose => {
                dec.scopes.pop();
            }
            Stmt::Reg { pred, names } => {
                for nm in names {
                    let r = dec.nregs;
                    dec.nregs += 1;
                    if *pred {
                        dec.preds.insert(r);
                    }
                    dec.scopes.last_mut().unwrap().insert(nm.clone(), r);
                }
            }
            Stmt::Instr(i) => {
                dec.ins = i;
                let (op, class) = dec.decode()?;
                let guard = match &i.guard {
                    Some((p, neg)) => Some((dec.reg(p)?, *neg)),
                    None => None,
                };
                let idx = code.len() as u32;
                code.push(Instr {
                    op,
                    guard,
                    line: i.line,
                    text: i.opcode.clone(),
                    class,
                    is_target: targets.contains(&idx),
                });
            }
            Stmt::Label(_) | Stmt::Var(_) => {}
        }
    }
    // A final implicit exit so falling off the end terminates the thread.
    code.push(Instr {
        op: Op::Exit,
        guard: None,
        line: 0,
        text: "<end of kernel>".into(),
        class: Class::Control,
        is_target: targets.contains(&(code.len() as u32)),
    });
    Ok(Kernel {
        name: e.name.clone(),
        params,
        param_bytes,
        code,
        nregs: dec.nregs.max(1),
        shared_static: sh,
        dyn_shared_offset,
        local_bytes: lo,
        global_init,
    })
}

fn collect_names(o: &OperandAst, out: &mut std::collections::HashSet<String>) {
    match o {
        OperandAst::Name(n) => {
            out.insert(n.clone());
        }
        OperandAst::Address(Some(n), _) => {
            out.insert(n.clone());
        }
        OperandAst::Vector(v) => v.iter().for_each(|x| collect_names(x, out)),
        _ => {}
    }
}

fn special(name: &str) -> Option<Special> {
    let dim = |s: &str| match s {
        "x" => Some(0u8),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    if let Some((base, d)) = name.split_once('.') {
        let d = dim(d)?;
        return Some(match base {
            "%tid" => Special::Tid(d),
            "%ntid" => Special::Ntid(d),
            "%ctaid" => Special::Ctaid(d),
            "%nctaid" => Special::Nctaid(d),
            _ => return None,
        });
    }
    Some(match name {
        "%laneid" => Special::LaneId,
        "%warpid" => Special::WarpId,
        "%nwarpid" => Special::NWarpId,
        "%clock" | "%clock64" | "%globaltimer" => Special::Clock,
        "%smid" => Special::SmId,
        "%dynamic_smem_size" => Special::DynSmem,
        "%total_smem_size" => Special::TotalSmem,
        "%lanemask_lt" => Special::LanemaskLt,
        "%lanemask_le" => Special::LanemaskLe,
        "%lanemask_eq" => Special::LanemaskEq,
        "%lanemask_gt" => Special::LanemaskGt,
        "%lanemask_ge" => Special::LanemaskGe,
        _ => return None,
    })
}

/// Type of an opcode suffix.
fn num_ty(t: &str) -> Option<NumTy> {
    Some(match t {
        "u8" => NumTy::U(8),
        "u16" => NumTy::U(16),
        "u32" => NumTy::U(32),
        "u64" => NumTy::U(64),
        "b8" => NumTy::U(8),
        "b16" => NumTy::U(16),
        "b32" => NumTy::U(32),
        "b64" => NumTy::U(64),
        "s8" => NumTy::S(8),
        "s16" => NumTy::S(16),
        "s32" => NumTy::S(32),
        "s64" => NumTy::S(64),
        "f16" => NumTy::F16,
        "bf16" => NumTy::Bf16,
        "f32" => NumTy::F32,
        "f64" => NumTy::F64,
        _ => return None,
    })
}

fn ty_bits(t: &str) -> Option<u32> {
    Some(match t {
        "pred" => 1,
        "b8" | "u8" | "s8" => 8,
        "b16" | "u16" | "s16" | "f16" | "bf16" => 16,
        "b32" | "u32" | "s32" | "f32" | "f16x2" | "bf16x2" => 32,
        "b64" | "u64" | "s64" | "f64" => 64,
        "b128" => 128,
        _ => return None,
    })
}

macro_rules! by_width {
    ($w:expr, $f:ident $(, $extra:tt)*) => {
        match $w {
            1 => batch!($f::<1 $(, $extra)*>),
            8 => batch!($f::<8 $(, $extra)*>),
            16 => batch!($f::<16 $(, $extra)*>),
            32 => batch!($f::<32 $(, $extra)*>),
            _ => batch!($f::<64 $(, $extra)*>),
        }
    };
}

// Integer ALU functions, generic over width `W`.
fn i_mov<const W: u32>(a: u64, _: u64, _: u64) -> u64 {
    m::<W>(a)
}
fn i_add<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(a.wrapping_add(b))
}
fn i_sub<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(a.wrapping_sub(b))
}
fn i_mul_lo<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(a.wrapping_mul(b))
}
fn i_mad_lo<const W: u32>(a: u64, b: u64, c: u64) -> u64 {
    m::<W>(a.wrapping_mul(b).wrapping_add(c))
}
fn i_mul_hi_u<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(((m::<W>(a) as u128 * m::<W>(b) as u128) >> W) as u64)
}
fn i_mul_hi_s<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(((s::<W>(a) as i128 * s::<W>(b) as i128) >> W) as u64)
}
fn i_mad_hi_u<const W: u32>(a: u64, b: u64, c: u64) -> u64 {
    m::<W>(i_mul_hi_u::<W>(a, b, 0).wrapping_add(c))
}
fn i_mad_hi_s<const W: u32>(a: u64, b: u64, c: u64) -> u64 {
    m::<W>(i_mul_hi_s::<W>(a, b, 0).wrapping_add(c))
}
fn i_mul_wide_u<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(a).wrapping_mul(m::<W>(b))
}
fn i_mul_wide_s<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    (s::<W>(a).wrapping_mul(s::<W>(b))) as u64
}
fn i_mad_wide_u<const W: u32>(a: u64, b: u64, c: u64) -> u64 {
    i_mul_wide_u::<W>(a, b, 0).wrapping_add(c)
}
fn i_mad_wide_s<const W: u32>(a: u64, b: u64, c: u64) -> u64 {
    i_mul_wide_s::<W>(a, b, 0).wrapping_add(c)
}
fn i_div_u<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    let (a, b) = (m::<W>(a), m::<W>(b));
    m::<W>(a.checked_div(b).unwrap_or(u64::MAX))
}
fn i_div_s<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    let (a, b) = (s::<W>(a), s::<W>(b));
    m::<W>(if b == 0 { -1i64 } else { a.wrapping_div(b) } as u64)
}
fn i_rem_u<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    let (a, b) = (m::<W>(a), m::<W>(b));
    m::<W>(if b == 0 { a } else { a % b })
}
fn i_rem_s<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    let (a, b) = (s::<W>(a), s::<W>(b));
    m::<W>(if b == 0 { a } else { a.wrapping_rem(b) } as u64)
}
fn i_min_u<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(a).min(m::<W>(b))
}
fn i_max_u<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(a).max(m::<W>(b))
}
fn i_min_s<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(s::<W>(a).min(s::<W>(b)) as u64)
}
fn i_max_s<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(s::<W>(a).max(s::<W>(b)) as u64)
}
fn i_abs<const W: u32>(a: u64, _: u64, _: u64) -> u64 {
    m::<W>(s::<W>(a).wrapping_abs() as u64)
}
fn i_neg<const W: u32>(a: u64, _: u64, _: u64) -> u64 {
    m::<W>((s::<W>(a)).wrapping_neg() as u64)
}
fn i_and<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(a & b)
}
fn i_or<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(a | b)
}
fn i_xor<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    m::<W>(a ^ b)
}
fn i_not<const W: u32>(a: u64, _: u64, _: u64) -> u64 {
    m::<W>(!a)
}
fn i_cnot<const W: u32>(a: u64, _: u64, _: u64) -> u64 {
    (m::<W>(a) == 0) as u64
}
// Shifts clamp the amount (an unsigned 32-bit value) to the operand width.
fn i_shl<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    let n = b as u32;
    if n >= W {
        0
    } else {
        m::<W>(a << n)
    }
}
fn i_shr_u<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    let n = b as u32;
    if n >= W {
        0
    } else {
        m::<W>(a) >> n
    }
}
fn i_shr_s<const W: u32>(a: u64, b: u64, _: u64) -> u64 {
    let n = (b as u32).min(W - 1);
    m::<W>((s::<W>(a) >> n) as u64)
}
fn i_popc<const W: u32>(a: u64, _: u64, _: u64) -> u64 {
    m::<W>(a).count_ones() as u64
}
fn i_clz<const W: u32>(a: u64, _: u64, _: u64) -> u64 {
    (m::<W>(a).leading_zeros() - (64 - W)) as u64
}
fn i_brev<const W: u32>(a: u64, _: u64, _: u64) -> u64 {
    m::<W>(a).reverse_bits() >> (64 - W)
}
fn i_selp<const W: u32>(a: u64, b: u64, c: u64) -> u64 {
    if c & 1 != 0 {
        m::<W>(a)
    } else {
        m::<W>(b)
    }
}
fn i_sad_u<const W: u32>(a: u64, b: u64, c: u64) -> u64 {
    let (a, b) = (m::<W>(a), m::<W>(b));
    m::<W>(a.abs_diff(b).wrapping_add(c))
}
fn i_sad_s<const W: u32>(a: u64, b: u64, c: u64) -> u64 {
    m::<W>(s::<W>(a).abs_diff(s::<W>(b)).wrapping_add(c))
}

impl Dec<'_> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, Error> {
        unsup(self.ins, msg)
    }

    fn reg(&self, name: &str) -> Result<Reg, Error> {
        for sc in self.scopes.iter().rev() {
            if let Some(r) = sc.get(name) {
                return Ok(*r);
            }
        }
        self.err(format!("undeclared register {name}"))
    }

    fn dst(&self, o: &OperandAst) -> Result<Reg, Error> {
        match o {
            OperandAst::Name(n) => self.reg(n),
            _ => self.err(format!("expected a destination register, found {o:?}")),
        }
    }

    /// A source operand; `fty` says how to read a decimal float literal.
    fn src(&self, o: &OperandAst, f32_lit: bool) -> Result<Src, Error> {
        Ok(match o {
            OperandAst::Name(n) => {
                if let Some(sp) = special(n) {
                    Src::Sp(sp)
                } else if let Some(off) = self.shared.get(n) {
                    Src::Imm(*off)
                } else if let Some(off) = self.local.get(n) {
                    Src::Imm(*off)
                } else if let Some(a) = self.globals.get(n) {
                    Src::Imm(*a)
                } else if self.params.contains_key(n) {
                    return self.err(format!(
                        "taking the address of parameter {n} is not supported"
                    ));
                } else {
                    Src::Reg(self.reg(n)?)
                }
            }
            OperandAst::Imm(Imm::Int(v)) => Src::Imm(*v as u64),
            OperandAst::Imm(Imm::F32(b)) => Src::Imm(*b as u64),
            OperandAst::Imm(Imm::F64(b)) => {
                if f32_lit {
                    Src::Imm((f64::from_bits(*b) as f32).to_bits() as u64)
                } else {
                    Src::Imm(*b)
                }
            }
            _ => return self.err(format!("unexpected operand {o:?}")),
        })
    }

    fn addr(&self, o: &OperandAst) -> Result<Addr, Error> {
        match o {
            OperandAst::Address(base, off) => {
                let Some(b) = base else {
                    return Ok(Addr {
                        base: None,
                        off: *off,
                    });
                };
                if let Some(x) = self
                    .shared
                    .get(b)
                    .or_else(|| self.local.get(b))
                    .or_else(|| self.params.get(b))
                    .or_else(|| self.globals.get(b))
                {
                    return Ok(Addr {
                        base: None,
                        off: *x as i64 + off,
                    });
                }
                Ok(Addr {
                    base: Some(self.reg(b)?),
                    off: *off,
                })
            }
            _ => self.err(format!("expected an address, found {o:?}")),
        }
    }

    fn vec_dsts(&self, o: &OperandAst) -> Result<Vec<Option<Reg>>, Error> {
        match o {
            OperandAst::Vector(v) => v
                .iter()
                .map(|x| match x {
                    OperandAst::Name(n) if n == "_" => Ok(None),
                    x => self.dst(x).map(Some),
                })
                .collect(),
            x => Ok(vec![Some(self.dst(x)?)]),
        }
    }

    fn vec_srcs(&self, o: &OperandAst, f32_lit: bool) -> Result<Vec<Src>, Error> {
        match o {
            OperandAst::Vector(v) => v.iter().map(|x| self.src(x, f32_lit)).collect(),
            x => Ok(vec![self.src(x, f32_lit)?]),
        }
    }

    fn nops(&self, n: usize) -> Result<(), Error> {
        if self.ins.operands.len() != n {
            return self.err(format!(
                "expected {n} operands, found {}",
                self.ins.operands.len()
            ));
        }
        Ok(())
    }

    fn space(&self, mods: &[&str]) -> Space {
        for m in mods {
            match *m {
                // `.const` variables live in the module-variable block of global memory.
                "global" | "const" => return Space::Global,
                "shared" | "shared::cta" => return Space::Shared,
                "local" => return Space::Local,
                "param" => return Space::Param,
                _ => {}
            }
        }
        Space::Generic
    }

    /// Decodes the current instruction.
    fn decode(&self) -> Result<(Op, Class), Error> {
        let ins = self.ins;
        let parts: Vec<&str> = ins.opcode.split('.').collect();
        let base = parts[0];
        let mods = &parts[1..];
        let has = |m: &str| mods.contains(&m);
        let ty = mods.iter().rev().find(|m| ty_bits(m).is_some()).copied();
        let ops = &ins.operands;
        let ftz = has("ftz");
        let satm = has("sat");
        match base {
            "mov" => {
                self.nops(2)?;
                let t = ty.ok_or(()).or_else(|_| self.err("mov without type"))?;
                let w = ty_bits(t).unwrap();
                match (&ops[0], &ops[1]) {
                    (OperandAst::Vector(_), s) => {
                        let ds = self.vec_dsts(&ops[0])?;
                        let bits = w / ds.len() as u32;
                        Ok((
                            Op::Unpack {
                                ds,
                                s: self.src(s, false)?,
                                bits,
                            },
                            Class::Move,
                        ))
                    }
                    (d, OperandAst::Vector(_)) => {
                        let parts = self.vec_srcs(&ops[1], false)?;
                        let bits = w / parts.len() as u32;
                        Ok((
                            Op::Pack {
                                d: self.dst(d)?,
                                parts,
                                bits,
                            },
                            Class::Move,
                        ))
                    }
                    (d, s) => Ok((
                        Op::Alu {
                            f: by_width!(w, i_mov),
                            d: self.dst(d)?,
                            a: self.src(s, t == "f32")?,
                            b: Src::Imm(0),
                            c: Src::Imm(0),
                        },
                        Class::Move,
                    )),
                }
            }
            "ld" | "ldu" => {
                self.nops(2)?;
                let t = ty.ok_or(()).or_else(|_| self.err("ld without type"))?;
                let bits = ty_bits(t).unwrap();
                let ds = self.vec_dsts(&ops[0])?;
                let n = if has("v4") {
                    4
                } else if has("v2") {
                    2
                } else {
                    1
                };
                if ds.len() != n || bits > 64 {
                    return self.err("vector width / type mismatch");
                }
                Ok((
                    Op::Ld {
                        space: self.space(mods),
                        size: (bits / 8).max(1) as u8,
                        sext: t.starts_with('s'),
                        ds,
                        addr: self.addr(&ops[1])?,
                    },
                    Class::Memory,
                ))
            }
            "st" => {
                self.nops(2)?;
                let t = ty.ok_or(()).or_else(|_| self.err("st without type"))?;
                let bits = ty_bits(t).unwrap();
                let srcs = self.vec_srcs(&ops[1], t == "f32")?;
                let n = if has("v4") {
                    4
                } else if has("v2") {
                    2
                } else {
                    1
                };
                if srcs.len() != n || bits > 64 {
                    return self.err("vector width / type mismatch");
                }
                Ok((
                    Op::St {
                        space: self.space(mods),
                        size: (bits / 8).max(1) as u8,
                        srcs,
                        addr: self.addr(&ops[0])?,
                    },
                    Class::Memory,
                ))
            }
            "cvta" => {
                self.nops(2)?;
                let to = has("to");
                let sp = self.space(mods);
                let f: F3 = match (to, sp) {
                    (_, Space::Global) => batch!(i_mov::<64>),
                    (false, Space::Shared) => batch!(|a: u64, _: u64, _: u64| {
                        crate::memory::SHARED_WINDOW + (a & 0xFFFF_FFFF)
                    }),
                    (true, Space::Shared) => {
                        batch!(|a: u64, _: u64, _: u64| a.wrapping_sub(crate::memory::SHARED_WINDOW))
                    }
                    (false, Space::Local) => batch!(|a: u64, _: u64, _: u64| {
                        crate::memory::LOCAL_WINDOW + (a & 0xFFFF_FFFF)
                    }),
                    (true, Space::Local) => {
                        batch!(|a: u64, _: u64, _: u64| a.wrapping_sub(crate::memory::LOCAL_WINDOW))
                    }
                    _ => return self.err("unsupported cvta state space"),
                };
                let f = if ty == Some("u32") {
                    match (to, sp) {
                        (true, Space::Shared) => {
                            batch!(|a: u64, _: u64, _: u64| (a
                                .wrapping_sub(crate::memory::SHARED_WINDOW))
                                & 0xFFFF_FFFF)
                        }
                        (true, Space::Local) => {
                            batch!(|a: u64, _: u64, _: u64| (a
                                .wrapping_sub(crate::memory::LOCAL_WINDOW))
                                & 0xFFFF_FFFF)
                        }
                        _ => return self.err("32-bit generic addresses are not supported"),
                    }
                } else {
                    f
                };
                Ok((
                    Op::Alu {
                        f,
                        d: self.dst(&ops[0])?,
                        a: self.src(&ops[1], false)?,
                        b: Src::Imm(0),
                        c: Src::Imm(0),
                    },
                    Class::Convert,
                ))
            }
            "setp" => self.decode_setp(mods, ty),
            "selp" => {
                self.nops(4)?;
                let t = ty.unwrap_or("b32");
                let w = ty_bits(t).unwrap();
                Ok((
                    Op::Alu {
                        f: by_width!(w, i_selp),
                        d: self.dst(&ops[0])?,
                        a: self.src(&ops[1], t == "f32")?,
                        b: self.src(&ops[2], t == "f32")?,
                        c: self.src(&ops[3], false)?,
                    },
                    Class::Move,
                ))
            }
            "cvt" => self.decode_cvt(mods),
            "bra" => {
                self.nops(1)?;
                match &ops[0] {
                    OperandAst::Name(l) => match self.labels.get(l) {
                        Some(t) => Ok((Op::Bra { target: *t }, Class::Control)),
                        None => self.err(format!("unknown label {l}")),
                    },
                    _ => self.err("bra needs a label"),
                }
            }
            "ret" | "exit" => Ok((Op::Exit, Class::Control)),
            "bar" | "barrier" => {
                if has("warp") {
                    self.nops(1)?;
                    return Ok((
                        Op::WarpSync {
                            mask: self.src(&ops[0], false)?,
                        },
                        Class::Control,
                    ));
                }
                if has("arrive") || has("red") {
                    return self.err("only bar.sync / barrier.sync are supported");
                }
                let id = if ops.is_empty() {
                    Src::Imm(0)
                } else {
                    self.src(&ops[0], false)?
                };
                let count = if ops.len() > 1 {
                    Some(self.src(&ops[1], false)?)
                } else {
                    None
                };
                let aligned = base == "bar" || has("aligned");
                Ok((Op::Bar { id, count, aligned }, Class::Control))
            }
            "membar" | "fence" => Ok((Op::Nop, Class::Control)),
            "shfl" => {
                if !has("sync") {
                    return self.err("only shfl.sync is supported");
                }
                self.nops(5)?;
                let mode = if has("up") {
                    ShflMode::Up
                } else if has("down") {
                    ShflMode::Down
                } else if has("bfly") {
                    ShflMode::Bfly
                } else if has("idx") {
                    ShflMode::Idx
                } else {
                    return self.err("unknown shfl mode");
                };
                let (d, p) = match &ops[0] {
                    OperandAst::Pair(d, p) => (self.reg(d)?, Some(self.reg(p)?)),
                    o => (self.dst(o)?, None),
                };
                Ok((
                    Op::Shfl {
                        mode,
                        d,
                        p,
                        a: self.src(&ops[1], true)?,
                        b: self.src(&ops[2], false)?,
                        c: self.src(&ops[3], false)?,
                        mask: self.src(&ops[4], false)?,
                    },
                    Class::Warp,
                ))
            }
            "vote" => {
                if !has("sync") {
                    return self.err("only vote.sync is supported");
                }
                self.nops(3)?;
                let mode = if has("all") {
                    VoteMode::All
                } else if has("any") {
                    VoteMode::Any
                } else if has("uni") {
                    VoteMode::Uni
                } else if has("ballot") {
                    VoteMode::Ballot
                } else {
                    return self.err("unknown vote mode");
                };
                let (a, neg) = match &ops[1] {
                    OperandAst::Not(n) => (Src::Reg(self.reg(n)?), true),
                    o => (self.src(o, false)?, false),
                };
                Ok((
                    Op::Vote {
                        mode,
                        d: self.dst(&ops[0])?,
                        a,
                        neg,
                        mask: self.src(&ops[2], false)?,
                    },
                    Class::Warp,
                ))
            }
            "redux" => {
                if !has("sync") {
                    return self.err("only redux.sync is supported");
                }
                self.nops(3)?;
                let op = [
                    ("add", AtomOp::Add),
                    ("min", AtomOp::Min),
                    ("max", AtomOp::Max),
                    ("and", AtomOp::And),
                    ("or", AtomOp::Or),
                    ("xor", AtomOp::Xor),
                ]
                .iter()
                .find(|(n, _)| has(n))
                .map(|x| x.1)
                .ok_or(())
                .or_else(|_| self.err("unknown redux operation"))?;
                if !matches!(ty, Some("u32") | Some("s32") | Some("b32")) {
                    return self.err("redux.sync supports .u32/.s32/.b32 only");
                }
                Ok((
                    Op::Redux {
                        op,
                        signed: ty == Some("s32"),
                        d: self.dst(&ops[0])?,
                        a: self.src(&ops[1], false)?,
                        mask: self.src(&ops[2], false)?,
                    },
                    Class::Warp,
                ))
            }
            "activemask" => {
                self.nops(1)?;
                Ok((
                    Op::Activemask {
                        d: self.dst(&ops[0])?,
                    },
                    Class::Warp,
                ))
            }
            "mma" => self.decode_mma(&ins.opcode),
            "ldmatrix" => {
                if !(has("sync") && has("aligned") && has("m8n8") && has("b16")) {
                    return self.err(
                        "only ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.b16 is supported",
                    );
                }
                self.nops(2)?;
                let num = if has("x4") {
                    4
                } else if has("x2") {
                    2
                } else if has("x1") {
                    1
                } else {
                    return self.err("ldmatrix needs .x1/.x2/.x4");
                };
                let v = self.vec_dsts(&ops[0])?;
                if v.len() != num as usize || v.iter().any(|x| x.is_none()) {
                    return self.err("ldmatrix destination count does not match .num");
                }
                let mut ds = [0; 4];
                for (i, r) in v.iter().enumerate() {
                    ds[i] = r.unwrap();
                }
                Ok((
                    Op::Ldmatrix {
                        num,
                        trans: has("trans"),
                        space: self.space(mods),
                        ds,
                        addr: self.addr(&ops[1])?,
                    },
                    Class::Memory,
                ))
            }
            "cp" => {
                if mods.first() != Some(&"async") {
                    return self.err("only cp.async is supported");
                }
                if has("commit_group") {
                    return Ok((Op::CpCommit, Class::Memory));
                }
                if has("wait_all") {
                    return Ok((Op::CpWaitAll, Class::Memory));
                }
                if has("wait_group") {
                    self.nops(1)?;
                    let n = match &ops[0] {
                        OperandAst::Imm(Imm::Int(n)) => *n as u32,
                        _ => return self.err("wait_group needs an immediate"),
                    };
                    return Ok((Op::CpWait { n }, Class::Memory));
                }
                if has("bulk") || has("mbarrier") {
                    return self.err("cp.async.bulk / mbarrier forms are not supported");
                }
                // `.L2::cache_hint` adds a trailing cache-policy operand (a hint: ignored).
                let nops = ops.len() - usize::from(has("L2::cache_hint"));
                if !(3..=4).contains(&nops) {
                    return self.err("cp.async needs dst, src, cp-size[, src-size]");
                }
                let size = match &ops[2] {
                    OperandAst::Imm(Imm::Int(n)) if matches!(n, 4 | 8 | 16) => *n as u8,
                    _ => return self.err("cp.async cp-size must be 4, 8 or 16"),
                };
                if has("cg") && size != 16 {
                    return self.err("cp.async.cg requires cp-size 16");
                }
                // The optional fourth operand is src-size (an integer) or ignore-src (a
                // predicate register).
                let (mut src_size, mut ignore_src) = (None, None);
                if nops == 4 {
                    match self.src(&ops[3], false)? {
                        Src::Reg(r) if self.preds.contains(&r) => ignore_src = Some(r),
                        s => src_size = Some(s),
                    }
                }
                let dst_space = if has("shared") || has("shared::cta") {
                    Space::Shared
                } else {
                    Space::Generic
                };
                Ok((
                    Op::CpAsync {
                        size,
                        dst_space,
                        dst: self.addr(&ops[0])?,
                        src: self.addr(&ops[1])?,
                        src_size,
                        ignore_src,
                    },
                    Class::Memory,
                ))
            }
            "atom" | "red" => self.decode_atom(base == "red", mods),
            "bfi" => {
                self.nops(5)?;
                let bits = match ty {
                    Some("b32") => 32,
                    Some("b64") => 64,
                    _ => return self.err("bfi needs .b32 or .b64"),
                };
                Ok((
                    Op::Bfi {
                        bits,
                        d: self.dst(&ops[0])?,
                        a: self.src(&ops[1], false)?,
                        b: self.src(&ops[2], false)?,
                        pos: self.src(&ops[3], false)?,
                        len: self.src(&ops[4], false)?,
                    },
                    Class::Int,
                ))
            }
            "call" | "prefetch" | "prefetchu" | "trap" | "brkpt" | "pmevent" => {
                if base == "prefetch" || base == "prefetchu" {
                    return Ok((Op::Nop, Class::Memory));
                }
                self.err(format!("`{base}` is not supported by the emulator"))
            }
            _ => self.decode_arith(base, mods, ty, ftz, satm),
        }
    }

    fn decode_setp(&self, mods: &[&str], ty: Option<&str>) -> Result<(Op, Class), Error> {
        let ops = &self.ins.operands;
        if ops.len() != 3 && ops.len() != 4 {
            return self.err("setp needs 3 or 4 operands");
        }
        let t = ty.ok_or(()).or_else(|_| self.err("setp without type"))?;
        let cmp = mods[0];
        let code = match cmp {
            "eq" => ops::EQ,
            "ne" => ops::NE,
            "lt" | "lo" => ops::LT,
            "le" | "ls" => ops::LE,
            "gt" | "hi" => ops::GT,
            "ge" | "hs" => ops::GE,
            "equ" => ops::EQ + ops::UNORD,
            "neu" => ops::NE + ops::UNORD,
            "ltu" => ops::LT + ops::UNORD,
            "leu" => ops::LE + ops::UNORD,
            "gtu" => ops::GT + ops::UNORD,
            "geu" => ops::GE + ops::UNORD,
            "num" => ops::NUM,
            "nan" => ops::NAN,
            _ => return self.err(format!("unknown comparison {cmp}")),
        };
        let ftz = mods.contains(&"ftz");
        macro_rules! pick {
            ($f:ident $(, $e:tt)*) => {
                match code {
                    ops::EQ => ops::$f::<{ ops::EQ } $(, $e)*> as Cmp,
                    ops::NE => ops::$f::<{ ops::NE } $(, $e)*> as Cmp,
                    ops::LT => ops::$f::<{ ops::LT } $(, $e)*> as Cmp,
                    ops::LE => ops::$f::<{ ops::LE } $(, $e)*> as Cmp,
                    ops::GT => ops::$f::<{ ops::GT } $(, $e)*> as Cmp,
                    ops::GE => ops::$f::<{ ops::GE } $(, $e)*> as Cmp,
                    8 => ops::$f::<8 $(, $e)*> as Cmp,
                    9 => ops::$f::<9 $(, $e)*> as Cmp,
                    10 => ops::$f::<10 $(, $e)*> as Cmp,
                    11 => ops::$f::<11 $(, $e)*> as Cmp,
                    12 => ops::$f::<12 $(, $e)*> as Cmp,
                    13 => ops::$f::<13 $(, $e)*> as Cmp,
                    ops::NUM => ops::$f::<{ ops::NUM } $(, $e)*> as Cmp,
                    _ => ops::$f::<{ ops::NAN } $(, $e)*> as Cmp,
                }
            };
        }
        let is_float = matches!(t, "f32" | "f64" | "f16" | "bf16");
        if !is_float && code >= ops::UNORD {
            return self.err("unordered comparison on an integer type");
        }
        let (f, class) = match t {
            "f32" => (
                if ftz {
                    pick!(fcmp32, true)
                } else {
                    pick!(fcmp32, false)
                },
                Class::Float,
            ),
            "f64" => (pick!(fcmp64), Class::Float),
            "f16" => (pick!(fcmp16, false), Class::Half),
            "bf16" => (pick!(fcmp16, true), Class::Half),
            "s8" => (pick!(icmp_s, 8), Class::Int),
            "s16" => (pick!(icmp_s, 16), Class::Int),
            "s32" => (pick!(icmp_s, 32), Class::Int),
            "s64" => (pick!(icmp_s, 64), Class::Int),
            "u8" | "b8" => (pick!(icmp_u, 8), Class::Int),
            "u16" | "b16" => (pick!(icmp_u, 16), Class::Int),
            "u32" | "b32" => (pick!(icmp_u, 32), Class::Int),
            "u64" | "b64" => (pick!(icmp_u, 64), Class::Int),
            _ => return self.err(format!("setp on .{t} is not supported")),
        };
        let comb = if ops.len() == 4 {
            let bop = if mods.contains(&"and") {
                BoolOp::And
            } else if mods.contains(&"or") {
                BoolOp::Or
            } else if mods.contains(&"xor") {
                BoolOp::Xor
            } else {
                return self.err("setp with a predicate source needs .and/.or/.xor");
            };
            let (c, neg) = match &ops[3] {
                OperandAst::Not(n) => (Src::Reg(self.reg(n)?), true),
                o => (self.src(o, false)?, false),
            };
            Some((bop, c, neg))
        } else {
            None
        };
        let (p, q) = match &ops[0] {
            OperandAst::Pair(p, q) => (
                if p == "_" { None } else { Some(self.reg(p)?) },
                if q == "_" { None } else { Some(self.reg(q)?) },
            ),
            o => (Some(self.dst(o)?), None),
        };
        Ok((
            Op::Setp {
                f,
                comb,
                p,
                q,
                a: self.src(&ops[1], t == "f32")?,
                b: self.src(&ops[2], t == "f32")?,
            },
            class,
        ))
    }

    fn decode_cvt(&self, mods: &[&str]) -> Result<(Op, Class), Error> {
        let ops = &self.ins.operands;
        let tys: Vec<&str> = mods
            .iter()
            .filter(|m| ty_bits(m).is_some())
            .copied()
            .collect();
        if tys.len() != 2 {
            return self.err("cvt needs a destination and a source type");
        }
        let has = |m: &str| mods.contains(&m);
        let (rnd, int_round) = if has("rn") {
            (Rnd::Near, false)
        } else if has("rz") {
            (Rnd::Zero, false)
        } else if has("rm") {
            (Rnd::Down, false)
        } else if has("rp") {
            (Rnd::Up, false)
        } else if has("rni") {
            (Rnd::Near, true)
        } else if has("rzi") {
            (Rnd::Zero, true)
        } else if has("rmi") {
            (Rnd::Down, true)
        } else if has("rpi") {
            (Rnd::Up, true)
        } else {
            (Rnd::Near, false)
        };
        if has("relu")
            || has("satfinite")
            || mods
                .iter()
                .any(|m| m.starts_with("e4m3") || m.starts_with("e5m2") || m.starts_with("tf32"))
        {
            return self.err("cvt with .relu/.satfinite/fp8/tf32 is not supported");
        }
        let pair = matches!(tys[0], "f16x2" | "bf16x2");
        let dst = if pair {
            if tys[1] != "f32" {
                return self.err("packed cvt needs .f32 sources");
            }
            if tys[0] == "f16x2" {
                NumTy::F16
            } else {
                NumTy::Bf16
            }
        } else {
            num_ty(tys[0])
                .ok_or(())
                .or_else(|_| self.err("bad cvt type"))?
        };
        let src = num_ty(tys[1])
            .ok_or(())
            .or_else(|_| self.err("bad cvt type"))?;
        let float = |t: NumTy| matches!(t, NumTy::F16 | NumTy::Bf16 | NumTy::F32 | NumTy::F64);
        let rank = |t: NumTy| match t {
            NumTy::F16 | NumTy::Bf16 => 16,
            NumTy::F32 => 32,
            NumTy::F64 => 64,
            _ => 0,
        };
        // Rounding modes other than nearest are implemented for float->int and
        // float->float integer rounding only; narrowing/int->float need .rn.
        let narrowing = float(dst)
            && ((float(src) && rank(dst) < rank(src))
                || !float(src)
                || (dst == NumTy::Bf16 && src == NumTy::F16)
                || (dst == NumTy::F16 && src == NumTy::Bf16));
        if narrowing && rnd != Rnd::Near && !int_round {
            return self.err("only round-to-nearest is supported for narrowing conversions");
        }
        if float(src)
            && !float(dst)
            && !int_round
            && mods.iter().any(|m| matches!(*m, "rn" | "rz" | "rm" | "rp"))
        {
            return self.err("float to integer cvt uses .rni/.rzi/.rmi/.rpi");
        }
        let spec = CvtSpec {
            dst,
            src,
            rnd,
            int_round: int_round || (float(src) && !float(dst)),
            ftz: has("ftz"),
            sat: has("sat"),
            pair,
        };
        let (a, b) = if pair {
            self.nops(3)?;
            (self.src(&ops[1], true)?, self.src(&ops[2], true)?)
        } else {
            self.nops(2)?;
            (self.src(&ops[1], src == NumTy::F32)?, Src::Imm(0))
        };
        Ok((
            Op::Cvt {
                spec,
                d: self.dst(&ops[0])?,
                a,
                b,
            },
            Class::Convert,
        ))
    }

    fn decode_mma(&self, opcode: &str) -> Result<(Op, Class), Error> {
        let parts: Vec<&str> = opcode.split('.').collect();
        let bad = || {
            self.err(
                "only mma.sync.aligned.m16n8k{8,16}.row.col with f16/bf16 inputs and f32 (or, for f16, f16) accumulators is supported",
            )
        };
        if parts.len() != 10 || parts[1..3] != ["sync", "aligned"] || parts[4..6] != ["row", "col"]
        {
            return bad();
        }
        let k = match parts[3] {
            "m16n8k16" => 16u8,
            "m16n8k8" => 8,
            _ => return bad(),
        };
        let (dt, at, bt, ct) = (parts[6], parts[7], parts[8], parts[9]);
        let bf16 = match (at, bt) {
            ("bf16", "bf16") => true,
            ("f16", "f16") => false,
            _ => return bad(),
        };
        let f16acc = match (dt, ct) {
            ("f32", "f32") => false,
            ("f16", "f16") if !bf16 => true,
            _ => return bad(),
        };
        self.nops(4)?;
        let ops = &self.ins.operands;
        let d = self.vec_dsts(&ops[0])?;
        let a = self.vec_srcs(&ops[1], false)?;
        let b = self.vec_srcs(&ops[2], false)?;
        let c = self.vec_srcs(&ops[3], !f16acc)?;
        let nacc = if f16acc { 2 } else { 4 };
        if d.len() != nacc
            || a.len() != k as usize / 4
            || b.len() != k as usize / 8
            || c.len() != nacc
            || d.iter().any(|x| x.is_none())
        {
            return self.err(format!(
                "{} needs {nacc} d, {} a, {} b and {nacc} c registers",
                parts[3],
                k / 4,
                k / 8
            ));
        }
        Ok((
            Op::Mma {
                bf16,
                k,
                f16acc,
                d: d.into_iter().map(|x| x.unwrap()).collect(),
                a,
                b,
                c,
            },
            Class::Tensor,
        ))
    }

    fn decode_atom(&self, red: bool, mods: &[&str]) -> Result<(Op, Class), Error> {
        let ops = &self.ins.operands;
        let has = |m: &str| mods.contains(&m);
        let op = [
            ("add", AtomOp::Add),
            ("min", AtomOp::Min),
            ("max", AtomOp::Max),
            ("exch", AtomOp::Exch),
            ("cas", AtomOp::Cas),
            ("and", AtomOp::And),
            ("or", AtomOp::Or),
            ("xor", AtomOp::Xor),
            ("inc", AtomOp::Inc),
            ("dec", AtomOp::Dec),
        ]
        .iter()
        .find(|(n, _)| has(n))
        .map(|x| x.1)
        .ok_or(())
        .or_else(|_| self.err("unknown atomic operation"))?;
        let ty = match mods.iter().rev().find(|m| ty_bits(m).is_some()).copied() {
            Some("u32") | Some("b32") => AtomTy::U32,
            Some("s32") => AtomTy::S32,
            Some("u64") | Some("b64") => AtomTy::U64,
            Some("s64") => AtomTy::S64,
            Some("f32") => AtomTy::F32,
            Some("f64") => AtomTy::F64,
            t => return self.err(format!("atomic type {t:?} is not supported")),
        };
        if has("v2") || has("v4") || has("v8") {
            return self.err("vector atomics are not supported");
        }
        let space = self.space(mods);
        let f32l = ty == AtomTy::F32;
        if red {
            self.nops(2)?;
            Ok((
                Op::Atom {
                    space,
                    op,
                    ty,
                    d: None,
                    addr: self.addr(&ops[0])?,
                    a: self.src(&ops[1], f32l)?,
                    b: Src::Imm(0),
                },
                Class::Memory,
            ))
        } else {
            let cas = op == AtomOp::Cas;
            self.nops(if cas { 4 } else { 3 })?;
            Ok((
                Op::Atom {
                    space,
                    op,
                    ty,
                    d: Some(self.dst(&ops[0])?),
                    addr: self.addr(&ops[1])?,
                    a: self.src(&ops[2], f32l)?,
                    b: if cas {
                        self.src(&ops[3], f32l)?
                    } else {
                        Src::Imm(0)
                    },
                },
                Class::Memory,
            ))
        }
    }

    fn decode_arith(
        &self,
        base: &str,
        mods: &[&str],
        ty: Option<&str>,
        ftz: bool,
        satm: bool,
    ) -> Result<(Op, Class), Error> {
        let ops = &self.ins.operands;
        let t = ty
            .ok_or(())
            .or_else(|_| self.err(format!("unsupported instruction `{}`", self.ins.opcode)))?;
        let has = |m: &str| mods.contains(&m);
        let dir = if has("rz") {
            ops::RZ
        } else if has("rm") {
            ops::RM
        } else if has("rp") {
            ops::RP
        } else {
            0
        };
        if dir != 0 {
            if t != "f32" || satm || !matches!(base, "add" | "sub" | "mul" | "fma" | "mad") {
                return self.err("directed rounding is supported for f32 add/sub/mul/fma only");
            }
            macro_rules! pick {
                ($f:ident) => {
                    match (dir, ftz) {
                        (ops::RZ, false) => batch!(ops::$f::<{ ops::RZ }, false>),
                        (ops::RZ, true) => batch!(ops::$f::<{ ops::RZ }, true>),
                        (ops::RM, false) => batch!(ops::$f::<{ ops::RM }, false>),
                        (ops::RM, true) => batch!(ops::$f::<{ ops::RM }, true>),
                        (_, false) => batch!(ops::$f::<{ ops::RP }, false>),
                        _ => batch!(ops::$f::<{ ops::RP }, true>),
                    }
                };
            }
            let (f, n) = match base {
                "add" => (pick!(fadd_dir), 2),
                "sub" => (pick!(fsub_dir), 2),
                "mul" => (pick!(fmul_dir), 2),
                _ => (pick!(ffma_dir), 3),
            };
            self.nops(n + 1)?;
            let src = |i: usize| -> Result<Src, Error> {
                if i <= n {
                    self.src(&ops[i], true)
                } else {
                    Ok(Src::Imm(0))
                }
            };
            return Ok((
                Op::Alu {
                    f,
                    d: self.dst(&ops[0])?,
                    a: src(1)?,
                    b: src(2)?,
                    c: src(3)?,
                },
                Class::Float,
            ));
        }
        let f32l = t == "f32";
        let (f, class, n): (F3, Class, usize) = match t {
            "f32" => {
                if satm
                    && !matches!(
                        base,
                        "add" | "sub" | "mul" | "fma" | "mad" | "ex2" | "sqrt" | "div" | "rcp"
                    )
                {
                    return self.err(".sat is not supported here");
                }
                let approx = has("approx");
                let r = match base {
                    "add" => (f32_fn!(ftz, satm, |x, y, z| x + y), 2),
                    "sub" => (f32_fn!(ftz, satm, |x, y, z| x - y), 2),
                    "mul" => (f32_fn!(ftz, satm, |x, y, z| x * y), 2),
                    "fma" | "mad" => {
                        if base == "mad" && !has("rn") {
                            return self.err("mad.f32 without .rn is not supported");
                        }
                        (f32_fn!(ftz, satm, |x, y, z| x.mul_add(y, z)), 3)
                    }
                    // div.approx is documented as within 2 ulp; the exact quotient is used.
                    "div" => (f32_fn!(ftz, satm, |x, y, z| x / y), 2),
                    "rcp" => (f32_fn!(ftz, satm, |x, y, z| 1.0 / x), 1),
                    "sqrt" => (f32_fn!(ftz, satm, |x, y, z| x.sqrt()), 1),
                    "rsqrt" if approx => (f32_fn!(ftz, false, |x, y, z| 1.0 / x.sqrt()), 1),
                    "neg" => (f32_fn!(ftz, false, |x, y, z| -x), 1),
                    "abs" => (f32_fn!(ftz, false, |x, y, z| x.abs()), 1),
                    "min" if has("NaN") => (f32_fn!(ftz, false, |x, y, z| ops::fmin_nan(x, y)), 2),
                    "max" if has("NaN") => (f32_fn!(ftz, false, |x, y, z| ops::fmax_nan(x, y)), 2),
                    "min" => (f32_fn!(ftz, false, |x, y, z| ops::fmin(x, y)), 2),
                    "max" => (f32_fn!(ftz, false, |x, y, z| ops::fmax(x, y)), 2),
                    // The .approx transcendental functions are computed exactly (correctly
                    // rounded by the host libm): kernels that pass here may differ from the
                    // GPU by the hardware's documented approximation error (ex2: 2 ulp).
                    "ex2" if approx => (f32_fn!(ftz, satm, |x, y, z| x.exp2()), 1),
                    "lg2" if approx => (f32_fn!(ftz, false, |x, y, z| x.log2()), 1),
                    "sin" if approx => (f32_fn!(ftz, false, |x, y, z| x.sin()), 1),
                    "cos" if approx => (f32_fn!(ftz, false, |x, y, z| x.cos()), 1),
                    "tanh" if approx => (f32_fn!(ftz, false, |x, y, z| x.tanh()), 1),
                    "copysign" => (f32_fn!(false, false, |x, y, z| y.copysign(x)), 2),
                    _ => {
                        return self
                            .err(format!("unsupported f32 instruction `{}`", self.ins.opcode))
                    }
                };
                (r.0, Class::Float, r.1)
            }
            "f64" => {
                let r = match base {
                    "add" => (f64_fn!(|x, y, z| x + y), 2),
                    "sub" => (f64_fn!(|x, y, z| x - y), 2),
                    "mul" => (f64_fn!(|x, y, z| x * y), 2),
                    "fma" | "mad" => (f64_fn!(|x, y, z| x.mul_add(y, z)), 3),
                    "div" => (f64_fn!(|x, y, z| x / y), 2),
                    "rcp" => (f64_fn!(|x, y, z| 1.0 / x), 1),
                    "sqrt" => (f64_fn!(|x, y, z| x.sqrt()), 1),
                    "neg" => (f64_fn!(|x, y, z| -x), 1),
                    "abs" => (f64_fn!(|x, y, z| x.abs()), 1),
                    "min" => (
                        f64_fn!(|x, y, z| if x.is_nan() {
                            y
                        } else if y.is_nan() {
                            x
                        } else {
                            x.min(y)
                        }),
                        2,
                    ),
                    "max" => (
                        f64_fn!(|x, y, z| if x.is_nan() {
                            y
                        } else if y.is_nan() {
                            x
                        } else {
                            x.max(y)
                        }),
                        2,
                    ),
                    _ => {
                        return self
                            .err(format!("unsupported f64 instruction `{}`", self.ins.opcode))
                    }
                };
                (r.0, Class::Float, r.1)
            }
            "f16" | "f16x2" | "bf16" | "bf16x2" => {
                if ftz && t.starts_with("bf") {
                    return self.err(".ftz on bf16");
                }
                if satm {
                    return self.err(".sat on half types is not supported");
                }
                let packed = t.ends_with("x2");
                macro_rules! hsel {
                    (|$x:ident, $y:ident, $z:ident| $e:expr) => {
                        if t.starts_with("bf") {
                            h_fn!(bf, packed, |$x, $y, $z| $e)
                        } else {
                            h_fn!(hf, packed, |$x, $y, $z| $e)
                        }
                    };
                }
                let r = match base {
                    "add" => (hsel!(|x, y, z| x + y), 2),
                    "sub" => (hsel!(|x, y, z| x - y), 2),
                    "mul" => (hsel!(|x, y, z| x * y), 2),
                    "fma" => (hsel!(|x, y, z| x.mul_add(y, z)), 3),
                    "neg" => (hsel!(|x, y, z| -x), 1),
                    "abs" => (hsel!(|x, y, z| x.abs()), 1),
                    "min" => (hsel!(|x, y, z| ops::fmin(x as f32, y as f32) as f64), 2),
                    "max" => (hsel!(|x, y, z| ops::fmax(x as f32, y as f32) as f64), 2),
                    "ex2" if has("approx") => (hsel!(|x, y, z| x.exp2()), 1),
                    _ => {
                        return self.err(format!(
                            "unsupported half instruction `{}`",
                            self.ins.opcode
                        ))
                    }
                };
                // f16 .ftz only matters for f16 subnormals, which f16 arithmetic keeps on sm_80
                // except under .ftz: not modelled.
                if ftz {
                    return self.err(".ftz on f16 arithmetic is not supported");
                }
                (r.0, Class::Half, r.1)
            }
            _ => {
                let w = ty_bits(t).unwrap();
                let signed = t.starts_with('s');
                if satm && !(t == "s32" && matches!(base, "add" | "sub")) {
                    return self.err(".sat on this integer instruction is not supported");
                }
                if has("cc") || base == "addc" || base == "subc" || base == "madc" {
                    return self.err("carry-chain arithmetic (.cc/addc) is not supported");
                }
                let wide = has("wide");
                let r: (F3, usize) = match base {
                    "add" if satm => (
                        batch!(|a: u64, b: u64, _: u64| {
                            m::<32>(
                                (s::<32>(a) + s::<32>(b)).clamp(i32::MIN as i64, i32::MAX as i64)
                                    as u64,
                            )
                        }),
                        2,
                    ),
                    "sub" if satm => (
                        batch!(|a: u64, b: u64, _: u64| {
                            m::<32>(
                                (s::<32>(a) - s::<32>(b)).clamp(i32::MIN as i64, i32::MAX as i64)
                                    as u64,
                            )
                        }),
                        2,
                    ),
                    "add" => (by_width!(w, i_add), 2),
                    "sub" => (by_width!(w, i_sub), 2),
                    "mul" if wide => (
                        if signed {
                            by_width!(w, i_mul_wide_s)
                        } else {
                            by_width!(w, i_mul_wide_u)
                        },
                        2,
                    ),
                    "mul" if has("hi") => (
                        if signed {
                            by_width!(w, i_mul_hi_s)
                        } else {
                            by_width!(w, i_mul_hi_u)
                        },
                        2,
                    ),
                    "mul" if !has("hi") => (by_width!(w, i_mul_lo), 2),
                    "mad" if wide => (
                        if signed {
                            by_width!(w, i_mad_wide_s)
                        } else {
                            by_width!(w, i_mad_wide_u)
                        },
                        3,
                    ),
                    "mad" if has("hi") => (
                        if signed {
                            by_width!(w, i_mad_hi_s)
                        } else {
                            by_width!(w, i_mad_hi_u)
                        },
                        3,
                    ),
                    "mad" if !has("hi") => (by_width!(w, i_mad_lo), 3),
                    "div" => (
                        if signed {
                            by_width!(w, i_div_s)
                        } else {
                            by_width!(w, i_div_u)
                        },
                        2,
                    ),
                    "rem" => (
                        if signed {
                            by_width!(w, i_rem_s)
                        } else {
                            by_width!(w, i_rem_u)
                        },
                        2,
                    ),
                    "min" => (
                        if signed {
                            by_width!(w, i_min_s)
                        } else {
                            by_width!(w, i_min_u)
                        },
                        2,
                    ),
                    "max" => (
                        if signed {
                            by_width!(w, i_max_s)
                        } else {
                            by_width!(w, i_max_u)
                        },
                        2,
                    ),
                    "abs" => (by_width!(w, i_abs), 1),
                    "neg" => (by_width!(w, i_neg), 1),
                    "and" => (by_width!(w, i_and), 2),
                    "or" => (by_width!(w, i_or), 2),
                    "xor" => (by_width!(w, i_xor), 2),
                    "not" => (by_width!(w, i_not), 1),
                    "cnot" => (by_width!(w, i_cnot), 1),
                    "shl" => (by_width!(w, i_shl), 2),
                    "shr" => (
                        if signed {
                            by_width!(w, i_shr_s)
                        } else {
                            by_width!(w, i_shr_u)
                        },
                        2,
                    ),
                    "popc" => (by_width!(w, i_popc), 1),
                    "clz" => (by_width!(w, i_clz), 1),
                    "brev" => (by_width!(w, i_brev), 1),
                    "sad" => (
                        if signed {
                            by_width!(w, i_sad_s)
                        } else {
                            by_width!(w, i_sad_u)
                        },
                        3,
                    ),
                    "prmt" if mods.len() == 1 => (batch!(ops::prmt), 3),
                    "bfe" => (
                        match (w, signed) {
                            (32, false) => batch!(ops::bfe::<32, false>),
                            (32, true) => batch!(ops::bfe::<32, true>),
                            (64, false) => batch!(ops::bfe::<64, false>),
                            _ => batch!(ops::bfe::<64, true>),
                        },
                        3,
                    ),
                    _ => return self.err(format!("unsupported instruction `{}`", self.ins.opcode)),
                };
                (r.0, Class::Int, r.1)
            }
        };
        self.nops(n + 1)?;
        let src = |i: usize| -> Result<Src, Error> {
            if i <= n {
                self.src(&ops[i], f32l)
            } else {
                Ok(Src::Imm(0))
            }
        };
        Ok((
            Op::Alu {
                f,
                d: self.dst(&ops[0])?,
                a: src(1)?,
                b: src(2)?,
                c: src(3)?,
            },
            class,
        ))
    }
}
