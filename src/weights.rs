//! Memory-mapped safetensors for [`crate::Qwen3Ksa::from_folder`] that keep
//! peak resident memory near one copy of the weights.
//!
//! candle's own mapped loader copies each tensor out of the map and leaves
//! the map's pages resident until the whole model is loaded, so a load
//! peaks at the file plus the model (2x the weights for bf16 kept as bf16).
//! Here each tensor's pages are released (`MADV_DONTNEED`) right after the
//! copy: they are clean file pages, re-read from disk should anything touch
//! them again, so the peak is the model plus one tensor.

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::PathBuf;

/// Read-only maps of a model's safetensors files and which file holds each tensor.
pub(crate) struct MappedWeights {
    maps: Vec<Mmap>,
    /// Tensor name to (file index, shape).
    index: HashMap<String, (usize, Vec<usize>)>,
}

impl MappedWeights {
    /// Maps `files` and reads their headers.
    ///
    /// # Safety
    /// The files must not be modified while the maps live (as for any
    /// memory-mapped loader, candle's included).
    pub(crate) unsafe fn open(files: &[PathBuf]) -> crate::Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let io = |source| crate::Error::Io {
                path: path.clone(),
                source,
            };
            let file = std::fs::File::open(path).map_err(io)?;
            // SAFETY: forwarded to the caller (the file does not change).
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            let tensors = safetensors::SafeTensors::deserialize(&map)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
            for (name, view) in tensors.tensors() {
                index.insert(name, (i, view.shape().to_vec()));
            }
            maps.push(map);
        }
        Ok(Self { maps, index })
    }

    /// Every tensor's name and shape.
    pub(crate) fn shapes(&self) -> HashMap<String, Vec<usize>> {
        self.index
            .iter()
            .map(|(n, (_, s))| (n.clone(), s.clone()))
            .collect()
    }

    fn load(&self, name: &str) -> candle_core::Result<Tensor> {
        let (file, _) = self
            .index
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })?;
        let map = &self.maps[*file];
        let tensors = safetensors::SafeTensors::deserialize(map)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let view = tensors
            .tensor(name)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let tensor = view.load(&Device::Cpu)?;
        let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
        #[cfg(unix)]
        // SAFETY: the range lies inside the read-only file map; DONTNEED on
        // a shared file mapping only drops clean pages from this process,
        // and a later read faults them in again from the file, unchanged.
        // Failure only means the pages stay resident.
        unsafe {
            let _ = map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                offset,
                view.data().len(),
            );
        }
        Ok(tensor)
    }
}

impl candle_nn::var_builder::SimpleBackend for MappedWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}
