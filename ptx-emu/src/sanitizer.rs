//! Shadow state of a CTA's shared memory for the sanitizer: per byte, the barrier epoch
//! and warp of the last write, the warps that read it in the current epoch, and whether a
//! `cp.async` copy to it is in flight. Race rule: a write and an access by another warp to
//! the same byte within one barrier epoch (no `bar.sync` between them) is a race; lanes of
//! one warp never race with each other.

use crate::error::Fault;

/// A sanitizer finding: its kind, the shared byte, and an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub fault: Fault,
    pub byte: usize,
    pub detail: String,
}

fn v(fault: Fault, byte: usize, detail: String) -> Result<(), Violation> {
    Err(Violation {
        fault,
        byte,
        detail,
    })
}

/// Per-byte shadow memory (struct of arrays).
#[derive(Debug, Default)]
pub(crate) struct Shadow {
    /// Barrier epoch of the last write (0: never written; epochs start at 1).
    w_epoch: Vec<u32>,
    w_warp: Vec<u8>,
    r_epoch: Vec<u32>,
    /// Bit w: warp w read the byte in epoch `r_epoch` (≤ 32 warps per CTA).
    r_mask: Vec<u32>,
    /// In-flight `cp.async` copies targeting the byte.
    pending: Vec<u8>,
}

impl Shadow {
    /// Shadow state for `bytes` bytes of shared memory.
    pub fn new(bytes: usize) -> Shadow {
        Shadow {
            w_epoch: vec![0; bytes],
            w_warp: vec![0; bytes],
            r_epoch: vec![0; bytes],
            r_mask: vec![0; bytes],
            pending: vec![0; bytes],
        }
    }

    /// Forgets everything (a new CTA starts).
    pub fn reset(&mut self) {
        self.w_epoch.fill(0);
        self.r_epoch.fill(0);
        self.r_mask.fill(0);
        self.pending.fill(0);
    }

    /// A read of `[off, off+len)` by `warp` in `epoch`. Returns the first never-written
    /// byte, if any (the caller decides when to report it).
    pub fn read(
        &mut self,
        off: usize,
        len: usize,
        warp: u32,
        epoch: u32,
    ) -> Result<Option<usize>, Violation> {
        let mut uninit = None;
        for i in off..off + len {
            if self.pending[i] != 0 {
                v(
                    Fault::AsyncCopyPending,
                    i,
                    "read of a shared byte whose cp.async has not been completed by cp.async.wait_group/wait_all".into(),
                )?;
            }
            if self.w_epoch[i] == 0 && uninit.is_none() {
                uninit = Some(i);
            }
            if self.w_epoch[i] == epoch && self.w_warp[i] as u32 != warp {
                v(
                    Fault::SharedRace,
                    i,
                    format!(
                        "read-after-write race: warp {} wrote this byte with no barrier in between",
                        self.w_warp[i]
                    ),
                )?;
            }
            if self.r_epoch[i] != epoch {
                self.r_epoch[i] = epoch;
                self.r_mask[i] = 0;
            }
            self.r_mask[i] |= 1 << warp;
        }
        Ok(uninit)
    }

    /// A write of `[off, off+len)` by `warp` in `epoch`; `async_done` for the completion of
    /// the warp's own `cp.async`.
    pub fn write(
        &mut self,
        off: usize,
        len: usize,
        warp: u32,
        epoch: u32,
        async_done: bool,
    ) -> Result<(), Violation> {
        for i in off..off + len {
            if !async_done && self.pending[i] != 0 {
                v(
                    Fault::AsyncCopyPending,
                    i,
                    "write to a shared byte whose cp.async has not completed".into(),
                )?;
            }
            if self.w_epoch[i] == epoch && self.w_warp[i] as u32 != warp {
                v(
                    Fault::SharedRace,
                    i,
                    format!(
                        "write-after-write race: warp {} wrote this byte with no barrier in between",
                        self.w_warp[i]
                    ),
                )?;
            }
            let others = self.r_mask[i] & !(1u32 << warp);
            if self.r_epoch[i] == epoch && others != 0 {
                v(
                    Fault::SharedRace,
                    i,
                    format!(
                        "write-after-read race: warp {} read this byte with no barrier in between",
                        others.trailing_zeros()
                    ),
                )?;
            }
            self.w_epoch[i] = epoch;
            self.w_warp[i] = warp as u8;
        }
        Ok(())
    }

    /// An atomic read-modify-write: must not touch in-flight or never-written bytes; it
    /// counts as a write for later plain accesses (atomics do not race with each other).
    pub fn atomic(
        &mut self,
        off: usize,
        len: usize,
        warp: u32,
        epoch: u32,
    ) -> Result<(), Violation> {
        for i in off..off + len {
            if self.pending[i] != 0 {
                v(
                    Fault::AsyncCopyPending,
                    i,
                    "atomic on a shared byte whose cp.async has not completed".into(),
                )?;
            }
            if self.w_epoch[i] == 0 {
                v(
                    Fault::UninitializedSharedRead,
                    i,
                    "atomic on shared memory that was never written".into(),
                )?;
            }
            self.w_epoch[i] = epoch;
            self.w_warp[i] = warp as u8;
        }
        Ok(())
    }

    /// A `cp.async` to `[off, off+len)` is issued.
    pub fn start_async(&mut self, off: usize, len: usize) -> Result<(), Violation> {
        if let Some(i) = (off..off + len).find(|i| self.pending[*i] != 0) {
            v(
                Fault::AsyncCopyPending,
                i,
                "cp.async to a shared byte that another in-flight cp.async also targets".into(),
            )?;
        }
        for p in &mut self.pending[off..off + len] {
            *p = 1;
        }
        Ok(())
    }

    /// A `cp.async` to `[off, off+len)` completes (followed by [`Shadow::write`]).
    pub fn finish_async(&mut self, off: usize, len: usize) {
        for p in &mut self.pending[off..off + len] {
            *p = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn race_rules() {
        let mut s = Shadow::new(8);
        s.write(0, 4, 0, 1, false).unwrap();
        assert_eq!(s.read(0, 4, 0, 1), Ok(None), "same warp");
        assert_eq!(s.read(0, 4, 1, 1).unwrap_err().fault, Fault::SharedRace);
        assert_eq!(s.read(0, 4, 1, 2), Ok(None), "after a barrier");
        assert_eq!(
            s.write(0, 4, 0, 2, false).unwrap_err().fault,
            Fault::SharedRace,
            "WAR"
        );
        assert_eq!(s.read(4, 4, 0, 2), Ok(Some(4)), "never written");
        s.start_async(4, 4).unwrap();
        assert_eq!(
            s.start_async(6, 2).unwrap_err().fault,
            Fault::AsyncCopyPending
        );
        assert_eq!(
            s.read(4, 1, 0, 2).unwrap_err().fault,
            Fault::AsyncCopyPending
        );
        s.finish_async(4, 4);
        s.write(4, 4, 0, 3, true).unwrap();
        assert_eq!(s.read(4, 4, 0, 3), Ok(None));
    }
}
