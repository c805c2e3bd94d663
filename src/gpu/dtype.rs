//! Element types of device tensors, the GGUF block formats used for model weights, and tensors in
//! host memory ([`HostTensor`] for f32, [`RawTensor`] for any dtype).
//!
//! Every tensor is row-major and contiguous. Plain types store one little-endian value per element.
//! The quantized types store the last axis in blocks of [`QK`] = 32 elements, exactly as GGUF (and
//! llama.cpp) lay them out, so a weight matrix read from a `.gguf` file uploads as is:
//!
//! | type   | block bytes | layout                                  | element `j` of the block (j < 16 / j >= 16)                 |
//! |--------|-------------|-----------------------------------------|-------------------------------------------------------------|
//! | `q8_0` | 34          | `f16 d; i8 qs[32]`                      | `d * qs[j]`                                                 |
//! | `q4_0` | 18          | `f16 d; u8 qs[16]`                      | `d * ((qs[j] & 15) - 8)` / `d * ((qs[j-16] >> 4) - 8)`      |
//! | `q4_1` | 20          | `f16 d; f16 m; u8 qs[16]`               | `d * (qs[j] & 15) + m` / `d * (qs[j-16] >> 4) + m`          |
//!
//! A quantized tensor's last axis must be a multiple of 32.

use std::fmt;

use super::shape::{check_shape, numel, shape_err};
use super::tensor::{GpuError, Result};

/// Elements per block of the quantized types.
pub const QK: usize = 32;

/// The element type of a tensor. The numeric codes are the `AO_GPU_*` dtype codes of the host ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    I32,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl DType {
    pub const ALL: [DType; 6] = [DType::F32, DType::F16, DType::I32, DType::Q8_0, DType::Q4_0, DType::Q4_1];

    /// The ABI code: f32 0, f16 1, i32 2, q8_0 3, q4_0 4, q4_1 5.
    pub fn code(self) -> i32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::I32 => 2,
            DType::Q8_0 => 3,
            DType::Q4_0 => 4,
            DType::Q4_1 => 5,
        }
    }

    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.code() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == text)
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0 | DType::Q4_1)
    }

    /// Elements per storage block: 32 for quantized types, 1 otherwise.
    pub fn block_len(self) -> usize {
        if self.is_quantized() { QK } else { 1 }
    }

    /// Bytes per storage block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
        }
    }

    /// The storage size of a tensor of `shape`; a quantized type needs a last axis that is a
    /// multiple of 32 ([`GpuError::DType`] otherwise).
    pub fn byte_len(self, op: &'static str, shape: &[usize]) -> Result<usize> {
        let last = shape.last().copied().unwrap_or(1);
        if last % self.block_len() != 0 {
            return Err(dtype_err(op, format!("a {self} tensor needs a last axis that is a multiple of {QK}, got shape {shape:?}")));
        }
        Ok(numel(shape) / self.block_len() * self.block_bytes())
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(crate) fn dtype_err(op: &'static str, details: impl Into<String>) -> GpuError {
    GpuError::DType { op, details: details.into() }
}

/// Refuses anything but `want` for an operand of `op`.
pub(crate) fn expect_dtype(op: &'static str, what: &str, got: DType, want: DType) -> Result<()> {
    if got != want {
        return Err(dtype_err(op, format!("{what} must be {want}, got {got}")));
    }
    Ok(())
}

/// An f32 tensor in host memory: row-major, contiguous.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Checks that the rank is 1..=4 and `data` holds exactly `shape.product()` values.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let t = Self { shape, data };
        t.check()?;
        Ok(t)
    }

    /// The checks of [`HostTensor::new`] on a tensor built by hand (its fields are public), without
    /// copying it: what every backend's `upload` runs first.
    pub fn check(&self) -> Result<()> {
        check_shape("upload", &self.shape)?;
        let n = numel(&self.shape);
        if n != self.data.len() {
            return Err(shape_err("upload", format!("shape {:?} needs {n} values, got {}", self.shape, self.data.len())));
        }
        Ok(())
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
}

/// A tensor in host memory in any dtype: row-major, contiguous, little-endian storage bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawTensor {
    /// Checks the rank, the shape and that `bytes` is exactly the storage size.
    pub fn new(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        check_shape("upload", &shape)?;
        let want = dtype.byte_len("upload", &shape)?;
        if bytes.len() != want {
            return Err(super::shape::shape_err(
                "upload",
                format!("a {dtype} tensor of shape {shape:?} is {want} bytes, got {}", bytes.len()),
            ));
        }
        Ok(Self { dtype, shape, bytes })
    }

    pub fn from_f32(shape: Vec<usize>, data: &[f32]) -> Result<Self> {
        Self::new(DType::F32, shape, data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub fn from_i32(shape: Vec<usize>, data: &[i32]) -> Result<Self> {
        Self::new(DType::I32, shape, data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(DType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DType::from_code(6), None);
    }

    #[test]
    fn storage_sizes() {
        assert_eq!(DType::F32.byte_len("t", &[3, 5]).unwrap(), 60);
        assert_eq!(DType::F16.byte_len("t", &[3, 5]).unwrap(), 30);
        assert_eq!(DType::Q8_0.byte_len("t", &[2, 64]).unwrap(), 4 * 34);
        assert_eq!(DType::Q4_0.byte_len("t", &[64]).unwrap(), 2 * 18);
        assert_eq!(DType::Q4_1.byte_len("t", &[1, 32]).unwrap(), 20);
        assert!(matches!(DType::Q4_0.byte_len("t", &[2, 33]), Err(GpuError::DType { .. })));
        assert!(RawTensor::new(DType::F16, vec![2], vec![0; 3]).is_err());
    }
}
