//! The crate's error type.

use std::fmt;

/// What went wrong while a kernel ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A global access outside every arena allocation (or straddling one's end).
    GlobalOutOfBounds,
    /// A shared-memory access outside the CTA's static + dynamic shared memory.
    SharedOutOfBounds,
    /// A local-memory access outside the thread's `.local` frame.
    LocalOutOfBounds,
    /// A parameter-space access outside the kernel's parameter buffer.
    ParamOutOfBounds,
    /// An access not aligned to its size.
    Misaligned,
    /// A generic address that falls in no state space window.
    BadGenericAddress,
    /// Two warps touched the same shared bytes, at least one writing, with no barrier between.
    SharedRace,
    /// A read of shared bytes that nothing wrote since the launch began.
    UninitializedSharedRead,
    /// A `cp.async` destination was read or written before a `cp.async.wait_group`/`wait_all`
    /// completed its group.
    AsyncCopyPending,
    /// A warp-collective `.sync`/`.aligned` instruction was not reached by every thread of its
    /// member mask at the same instruction (or a member had exited).
    DivergentCollective,
    /// Every live thread waits (barrier or collective) and nothing can proceed.
    Deadlock,
    /// An instruction the emulator decodes but cannot execute with these operands.
    Unsupported,
    /// The per-thread instruction budget of the launch options was exhausted.
    InstructionLimit,
}

/// Where and why a kernel faulted: the kernel, PTX line and text of the instruction,
/// the thread, and the address when the fault is about memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecError {
    /// The class of fault.
    pub fault: Fault,
    /// The kernel's name.
    pub kernel: String,
    /// 1-based line of the instruction in the PTX text.
    pub line: u32,
    /// The instruction's opcode as written.
    pub instr: String,
    /// `%ctaid` of the faulting thread.
    pub ctaid: (u32, u32, u32),
    /// `%tid` of the faulting thread.
    pub tid: (u32, u32, u32),
    /// The address involved, if any (global: arena address; shared: byte offset).
    pub addr: Option<u64>,
    /// A human-readable explanation.
    pub detail: String,
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} in kernel `{}` at line {} (`{}`), ctaid {:?} tid {:?}",
            self.fault, self.kernel, self.line, self.instr, self.ctaid, self.tid
        )?;
        if let Some(a) = self.addr {
            write!(f, ", address {a:#x}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Errors of parsing, decoding, memory management and execution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The PTX text could not be parsed.
    #[error("PTX parse error at line {line}: {msg}")]
    Parse {
        /// 1-based line.
        line: u32,
        /// What was expected.
        msg: String,
    },
    /// An instruction or form the emulator does not implement (never silently skipped).
    #[error("unsupported PTX at line {line} (`{instr}`): {msg}")]
    Unsupported {
        /// 1-based line.
        line: u32,
        /// The opcode as written.
        instr: String,
        /// Why.
        msg: String,
    },
    /// `module.kernel(name)` found no `.entry` of that name.
    #[error("no kernel named `{0}` in the module")]
    NoSuchKernel(String),
    /// The parameters given to a launch do not match the kernel's `.param` list.
    #[error("bad parameters for kernel `{kernel}`: {msg}")]
    Params {
        /// Kernel name.
        kernel: String,
        /// What does not match.
        msg: String,
    },
    /// Bad launch configuration (zero or too large dimensions, shared memory too large).
    #[error("bad launch configuration: {0}")]
    Launch(String),
    /// A host-side arena access outside an allocation.
    #[error("host access to device memory out of bounds: address {addr:#x}, {len} bytes")]
    HostOutOfBounds {
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: usize,
    },
    /// A fault while the kernel ran (memory error, sanitizer report, divergence, ...).
    #[error("{0}")]
    Exec(Box<ExecError>),
}

impl Error {
    /// The execution fault, if this is one.
    pub fn fault(&self) -> Option<Fault> {
        match self {
            Error::Exec(e) => Some(e.fault),
            _ => None,
        }
    }
}
