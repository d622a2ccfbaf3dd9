//! Generators of the fuzz suite: a seeded RNG, tensors laid out as any
//! strided view (transposed, narrowed with an offset, stride-0 broadcast,
//! empty), values with occasional non-finite entries, and hostile numbers.

use candle_core::{DType, Device, Tensor};

/// SplitMix64: seedable, so a failing case reproduces from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64 * 1.0 < p
    }

    /// Uniform in `[-1, 1)`.
    pub fn unit(&mut self) -> f32 {
        ((self.u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }

    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    /// A size that is usually small but sometimes hostile: 0, a power of two
    /// up to 2^63, or the type's maximum.
    pub fn hostile_usize(&mut self) -> usize {
        match self.below(6) {
            0 => 0,
            1 => usize::MAX,
            2 => 1usize << self.range(20, 63),
            3 => (1usize << self.range(8, 40)) + self.below(3),
            _ => self.range(1, 64),
        }
    }
}

/// A non-finite f32 value.
pub fn non_finite(rng: &mut Rng) -> f32 {
    rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY])
}

/// How a tensor of a given logical shape is laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum View {
    /// Row-major, no offset.
    Contiguous,
    /// Built in another dimension order and transposed back.
    Transposed,
    /// A `narrow` of a larger tensor: a storage offset and non-unit strides.
    Narrowed,
    /// A stride-0 broadcast along the first dimension.
    Broadcast,
}

pub const VIEWS: [View; 4] = [
    View::Contiguous,
    View::Transposed,
    View::Narrowed,
    View::Broadcast,
];

/// The values of a logical `dims` tensor, row-major (what the tensor must
/// read as, whatever its view).
pub fn values(rng: &mut Rng, dims: &[usize], scale: f32) -> Vec<f32> {
    let n: usize = dims.iter().product();
    (0..n).map(|_| scale * rng.unit()).collect()
}

/// A tensor reading as `data` (row-major over `dims`), in `dtype`, laid out
/// as `view` (the dtype conversion comes first, so the view survives it).
/// Returns the tensor and what it reads as in f32: a broadcast view repeats
/// the first entry of dimension 0, and a narrow dtype rounds.
pub fn tensor(dims: &[usize], data: Vec<f32>, dtype: DType, view: View) -> (Tensor, Vec<f32>) {
    let dev = &Device::Cpu;
    let rank = dims.len();
    let base = |data: Vec<f32>, dims: &[usize]| {
        Tensor::from_vec(data, dims, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let t = match view {
        View::Transposed if rank >= 2 => {
            // Store with the last two dimensions swapped, then transpose.
            let (a, b) = (dims[rank - 2], dims[rank - 1]);
            let outer: usize = dims[..rank - 2].iter().product();
            let mut swapped = vec![0f32; data.len()];
            for o in 0..outer {
                for i in 0..a {
                    for j in 0..b {
                        swapped[o * a * b + j * a + i] = data[o * a * b + i * b + j];
                    }
                }
            }
            let mut sdims = dims.to_vec();
            sdims.swap(rank - 2, rank - 1);
            base(swapped, &sdims).transpose(rank - 2, rank - 1).unwrap()
        }
        View::Narrowed if rank >= 1 => {
            // Padded by one element on both sides of the last dimension, so
            // the view has an offset and a row stride wider than its rows.
            let last = dims[rank - 1];
            let rows: usize = dims[..rank - 1].iter().product();
            let mut padded = Vec::with_capacity(rows * (last + 2));
            for r in 0..rows {
                padded.push(f32::NAN); // never read: outside the view
                padded.extend_from_slice(&data[r * last..(r + 1) * last]);
                padded.push(f32::NAN);
            }
            let mut pdims = dims.to_vec();
            pdims[rank - 1] = last + 2;
            base(padded, &pdims).narrow(rank - 1, 1, last).unwrap()
        }
        View::Broadcast if rank >= 1 => {
            let inner: usize = dims[1..].iter().product();
            let first = if dims[0] > 0 {
                data[..inner].to_vec()
            } else {
                vec![0.0; inner]
            };
            let mut one = dims.to_vec();
            one[0] = 1;
            base(first, &one).broadcast_as(dims).unwrap()
        }
        _ => base(data.clone(), dims),
    };
    // (candle's strided copy of an empty view with an offset panics: the
    // crate's inputs get that case on purpose, the reads here do not.)
    let reads = if t.elem_count() == 0 {
        vec![]
    } else if is_float(dtype) {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    } else {
        data
    };
    (t, reads)
}

pub fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

/// An empty tensor with a storage offset: a `narrow` of a larger empty one.
pub fn empty_with_offset(dims: &[usize], dtype: DType) -> Tensor {
    let mut big = dims.to_vec();
    let rank = big.len();
    // dims has a zero; make another dimension longer and narrow it back.
    let axis = (0..rank).find(|&i| dims[i] != 0).unwrap_or(0);
    big[axis] += 3;
    Tensor::zeros(big, dtype, &Device::Cpu)
        .unwrap()
        .narrow(axis, 2, dims[axis])
        .unwrap()
}
