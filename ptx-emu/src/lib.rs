//! `ptx-emu`: an instruction-level emulator for the PTX that nvcc emits for ksa's CUDA
//! kernels, so that every GPU kernel runs (and is checked by a sanitizer) on a CPU.
//!
//! ```no_run
//! use ptx_emu::{Device, Module, Param};
//! # fn main() -> Result<(), ptx_emu::Error> {
//! let ptx = std::fs::read_to_string("vector_add.ptx").unwrap();
//! let module = Module::parse(&ptx)?;
//! let kernel = module.kernel("vector_add")?;
//! let mut dev = Device::new();
//! let a = dev.alloc_f32(&[1.0, 2.0]);
//! let b = dev.alloc_f32(&[3.0, 4.0]);
//! let c = dev.alloc(8);
//! let report = dev.launch(
//!     kernel,
//!     (1, 1, 1),
//!     (32, 1, 1),
//!     0,
//!     &[Param::Ptr(a), Param::Ptr(b), Param::Ptr(c), Param::I32(2)],
//! )?;
//! assert_eq!(dev.read_f32(c, 2)?, vec![4.0, 6.0]);
//! println!("{report}");
//! # Ok(()) }
//! ```
//!
//! Modules: `parse` (text to syntax tree), `ir` (decoding into
//! executable instructions), `ops` (scalar semantics), [`memory`] (the device arena),
//! `exec` (scheduler and instruction semantics), `sanitizer` (shadow state of shared
//! memory), [`report`] (counters).

#![warn(missing_docs)]

mod error;
mod exec;
pub(crate) mod ir;
pub mod memory;
mod ops;
pub(crate) mod parse;
pub mod report;
mod sanitizer;
mod tensor;
pub mod toolchain;

pub use error::{Error, ExecError, Fault};
pub use exec::{LaunchOptions, Param, DEFAULT_INSTRUCTION_LIMIT, MAX_SHARED_BYTES};
pub use ir::{Class, Kernel, ParamInfo, NUM_CLASSES};
pub use memory::{DevPtr, Device};
pub use report::LaunchReport;

/// A parsed and decoded PTX module.
#[derive(Debug, Clone)]
pub struct Module {
    kernels: Vec<Kernel>,
    version: Option<String>,
    target: Option<String>,
}

impl Module {
    /// Parses PTX text (as produced by `nvcc --ptx`) and decodes every `.entry`.
    /// Unsupported instructions are reported here, with their line, not at run time.
    pub fn parse(ptx: &str) -> Result<Module, Error> {
        let ast = parse::parse_module(ptx)?;
        let kernels = ir::decode_module(&ast)?;
        Ok(Module {
            kernels,
            version: ast.version,
            target: ast.target,
        })
    }

    /// The kernel (`.entry`) named `name`.
    pub fn kernel(&self, name: &str) -> Result<&Kernel, Error> {
        self.kernels
            .iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| Error::NoSuchKernel(name.to_string()))
    }

    /// All kernels in declaration order.
    pub fn kernels(&self) -> &[Kernel] {
        &self.kernels
    }

    /// The `.version` directive, if present (nvcc 13.0 writes `9.0`).
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The `.target` directive, if present.
    pub fn target(&self) -> Option<&str> {
        self.target.as_deref()
    }
}
