//! Device memory: the global-memory arena shared by all CTAs of a launch, and the
//! generic-address windows of the shared and local state spaces.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use crate::error::Error;

/// Generic addresses `[SHARED_WINDOW, SHARED_WINDOW + 2^32)` name the executing CTA's
/// shared memory (`cvta.shared` adds this base, `cvta.to.shared` subtracts it).
pub const SHARED_WINDOW: u64 = 0x0000_7000_0000_0000;
/// Generic addresses `[LOCAL_WINDOW, LOCAL_WINDOW + 2^32)` name the thread's local memory.
pub const LOCAL_WINDOW: u64 = 0x0000_6000_0000_0000;
/// Addresses `[GLOBALS_WINDOW, GLOBALS_WINDOW + 2^32)` name the module-level `.global` and
/// `.const` variables of the launched kernel (a fresh, initialized copy per launch).
pub const GLOBALS_WINDOW: u64 = 0x0000_5000_0000_0000;
/// First arena address; allocations are 256-byte aligned and separated by unmapped gaps
/// so that running off the end of one allocation faults instead of hitting the next.
pub const ARENA_BASE: u64 = 0x0000_0001_0000_0000;
const GAP: u64 = 4096;

/// A device pointer: an address in the [`Device`] arena (also a valid generic address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevPtr(pub u64);

impl DevPtr {
    /// The pointer `bytes` further on.
    pub fn offset(self, bytes: u64) -> DevPtr {
        DevPtr(self.0 + bytes)
    }
}

struct Alloc {
    base: u64,
    data: Box<[AtomicU8]>,
}

/// The global-memory arena of the emulated device. Kernels read and write it through
/// the pointers [`Device::alloc`] returns; host code uses [`Device::write`] and
/// [`Device::read`] (and the typed helpers). Launches borrow it immutably: memory is a
/// slice of relaxed atomics so CTAs running on several host threads never race in Rust's
/// sense (a kernel's own data races stay the kernel's bug).
#[derive(Default)]
pub struct Device {
    allocs: Vec<Alloc>,
    next: u64,
    pub(crate) atomic_lock: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("allocations", &self.allocs.len())
            .field(
                "bytes",
                &self.allocs.iter().map(|a| a.data.len()).sum::<usize>(),
            )
            .finish()
    }
}

impl Device {
    /// An empty device.
    pub fn new() -> Device {
        Device::default()
    }

    /// Allocates `bytes` zeroed bytes, 256-byte aligned.
    pub fn alloc(&mut self, bytes: usize) -> DevPtr {
        if self.next == 0 {
            self.next = ARENA_BASE;
        }
        let base = self.next;
        let zeroed = vec![0u8; bytes].into_boxed_slice();
        // SAFETY: AtomicU8 has the same size, alignment and bit validity as u8.
        let data = unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicU8]) };
        self.allocs.push(Alloc { base, data });
        self.next = (base + bytes as u64 + GAP).div_ceil(256) * 256;
        DevPtr(base)
    }

    /// Allocates and fills with `bytes`.
    pub fn alloc_bytes(&mut self, bytes: &[u8]) -> DevPtr {
        let p = self.alloc(bytes.len());
        self.write(p, bytes).expect("fresh allocation");
        p
    }

    /// Size of the allocation starting at `p`, if `p` is the start of one.
    pub fn allocation_size(&self, p: DevPtr) -> Option<usize> {
        self.find(p.0)
            .filter(|a| a.base == p.0)
            .map(|a| a.data.len())
    }

    fn find(&self, addr: u64) -> Option<&Alloc> {
        let i = self.allocs.partition_point(|a| a.base <= addr);
        let a = self.allocs.get(i.checked_sub(1)?)?;
        (addr < a.base + a.data.len() as u64).then_some(a)
    }

    /// The allocation bytes `[addr, addr+len)` lie in, with the offset of `addr`; `None`
    /// if the range is not inside one allocation.
    pub(crate) fn range(&self, addr: u64, len: usize) -> Option<(&[AtomicU8], usize)> {
        let a = self.find(addr)?;
        let off = (addr - a.base) as usize;
        (off + len <= a.data.len()).then_some((&a.data[..], off))
    }

    /// Bounds of the allocation containing `addr`, for error messages.
    pub(crate) fn describe(&self, addr: u64) -> String {
        match self.find(addr) {
            Some(a) => format!(
                "allocation [{:#x}, {:#x}) ({} bytes)",
                a.base,
                a.base + a.data.len() as u64,
                a.data.len()
            ),
            None => {
                let i = self.allocs.partition_point(|a| a.base <= addr);
                match i.checked_sub(1).and_then(|j| self.allocs.get(j)) {
                    Some(a) => format!(
                        "no allocation; nearest below is [{:#x}, {:#x}) ({} bytes, {} bytes past its end)",
                        a.base,
                        a.base + a.data.len() as u64,
                        a.data.len(),
                        addr - (a.base + a.data.len() as u64)
                    ),
                    None => "no allocation at or below this address".to_string(),
                }
            }
        }
    }

    /// Copies `bytes` to device address `p`.
    pub fn write(&self, p: DevPtr, bytes: &[u8]) -> Result<(), Error> {
        let (d, off) = self.range(p.0, bytes.len()).ok_or(Error::HostOutOfBounds {
            addr: p.0,
            len: bytes.len(),
        })?;
        for (x, b) in d[off..off + bytes.len()].iter().zip(bytes) {
            x.store(*b, Relaxed);
        }
        Ok(())
    }

    /// Reads `len` bytes at device address `p`.
    pub fn read(&self, p: DevPtr, len: usize) -> Result<Vec<u8>, Error> {
        let (d, off) = self
            .range(p.0, len)
            .ok_or(Error::HostOutOfBounds { addr: p.0, len })?;
        Ok(d[off..off + len].iter().map(|x| x.load(Relaxed)).collect())
    }

    /// Allocates and uploads f32 values.
    pub fn alloc_f32(&mut self, v: &[f32]) -> DevPtr {
        self.alloc_bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
    }
    /// Allocates and uploads u32 values.
    pub fn alloc_u32(&mut self, v: &[u32]) -> DevPtr {
        self.alloc_bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
    }
    /// Allocates and uploads f16 values.
    pub fn alloc_f16(&mut self, v: &[half::f16]) -> DevPtr {
        self.alloc_bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
    }
    /// Allocates and uploads bf16 values.
    pub fn alloc_bf16(&mut self, v: &[half::bf16]) -> DevPtr {
        self.alloc_bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
    }
    /// Reads `n` f32 values.
    pub fn read_f32(&self, p: DevPtr, n: usize) -> Result<Vec<f32>, Error> {
        Ok(self
            .read(p, n * 4)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
    /// Reads `n` u32 values.
    pub fn read_u32(&self, p: DevPtr, n: usize) -> Result<Vec<u32>, Error> {
        Ok(self
            .read(p, n * 4)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
    /// Reads `n` f16 values.
    pub fn read_f16(&self, p: DevPtr, n: usize) -> Result<Vec<half::f16>, Error> {
        Ok(self
            .read(p, n * 2)?
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
    /// Reads `n` bf16 values.
    pub fn read_bf16(&self, p: DevPtr, n: usize) -> Result<Vec<half::bf16>, Error> {
        Ok(self
            .read(p, n * 2)?
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
}

/// Loads `len` (≤ 8) bytes little-endian.
#[inline]
pub(crate) fn load_atomic(d: &[AtomicU8], off: usize, len: usize) -> u64 {
    let mut v = 0u64;
    for (i, x) in d[off..off + len].iter().enumerate() {
        v |= (x.load(Relaxed) as u64) << (8 * i);
    }
    v
}

/// Stores the low `len` (≤ 8) bytes of `v` little-endian.
#[inline]
pub(crate) fn store_atomic(d: &[AtomicU8], off: usize, len: usize, v: u64) {
    for (i, x) in d[off..off + len].iter().enumerate() {
        x.store((v >> (8 * i)) as u8, Relaxed);
    }
}
