//! GGUF model files (versions 2 and 3, little-endian): the header, every metadata key/value, the
//! tensor infos and where each tensor's bytes lie.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! "GGUF" u32 version u64 tensor_count u64 kv_count
//! kv_count    x { string key; u32 value_type; value }
//! tensor_count x { string name; u32 n_dims; u64 dims[n_dims]; u32 ggml_type; u64 offset }
//! padding to `general.alignment` (default 32), then the tensor data; each `offset` is relative
//! to the start of the data and a multiple of the alignment.
//! string = u64 len, len bytes of UTF-8; array value = u32 element_type, u64 count, elements.
//! ```
//!
//! `dims[0]` is the contiguous axis (ggml order), so the row-major shape is `dims` reversed: a
//! ggml `(576, 49152)` matrix is 49152 rows of 576. Version 1 (32-bit counts) and big-endian files
//! are refused by name.
//!
//! Nothing here panics on a malformed file: truncation, absurd counts or sizes, misaligned or
//! out-of-file tensors, duplicate names and unknown value types are [`GgufError`]s, and no
//! allocation is sized from a count before the bytes backing it are known to exist.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::gpu::DType;

/// The first four bytes of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most axes a ggml tensor has.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (real files use 1).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Longest key or tensor name accepted (ggml's own limit for names is 64; keys are short).
pub const MAX_NAME_LEN: u64 = 65_535;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
    #[error("not a GGUF file (the first bytes are {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (versions 2 and 3 are; version 1 is obsolete)")]
    UnsupportedVersion(u32),
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error("truncated GGUF file: {what} at byte {at} needs {need} bytes, only {left} are left")]
    Truncated { what: String, at: u64, need: u64, left: u64 },
    #[error("invalid GGUF file: {0}")]
    Invalid(String),
    #[error("tensor {name}: ggml type {type_name} (id {id}) is not supported (f32, f16, q8_0, q4_0 and q4_1 are)")]
    UnsupportedType { name: String, id: u32, type_name: String },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

fn invalid(msg: impl Into<String>) -> GgufError {
    GgufError::Invalid(msg.into())
}

/// A metadata value. Arrays keep their element type (even when empty).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any float type (f32 widened exactly).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }

    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }
}

/// The GGUF metadata value types, with their codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_code(code: u32) -> Option<Self> {
        use ValueType::*;
        Some(match code {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type occupies (a string or array: its length field).
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A ggml tensor type id, as stored in a tensor info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);

    /// ggml's name for the type ("q6_K"), or "unknown".
    pub fn name(self) -> &'static str {
        const NAMES: [&str; 40] = [
            "f32",
            "f16",
            "q4_0",
            "q4_1",
            "q4_2",
            "q4_3",
            "q5_0",
            "q5_1",
            "q8_0",
            "q8_1",
            "q2_K",
            "q3_K",
            "q4_K",
            "q5_K",
            "q6_K",
            "q8_K",
            "iq2_xxs",
            "iq2_xs",
            "iq3_xxs",
            "iq1_s",
            "iq4_nl",
            "iq3_s",
            "iq2_s",
            "iq4_xs",
            "i8",
            "i16",
            "i32",
            "i64",
            "f64",
            "iq1_m",
            "bf16",
            "q4_0_4_4",
            "q4_0_4_8",
            "q4_0_8_8",
            "tq1_0",
            "tq2_0",
            "iq4_nl_4_4",
            "iq4_nl_4_8",
            "iq4_nl_8_8",
            "mxfp4",
        ];
        NAMES.get(self.0 as usize).copied().unwrap_or("unknown")
    }

    /// The tensor dtype this type maps to; `None` for the types the worker does not take.
    pub fn dtype(self) -> Option<DType> {
        Some(match self {
            GgmlType::F32 => DType::F32,
            GgmlType::F16 => DType::F16,
            GgmlType::Q4_0 => DType::Q4_0,
            GgmlType::Q4_1 => DType::Q4_1,
            GgmlType::Q8_0 => DType::Q8_0,
            _ => return None,
        })
    }

    /// The ggml type of a dtype (`None` for i32, which GGUF models do not use for weights).
    pub fn of(dtype: DType) -> Option<Self> {
        Some(match dtype {
            DType::F32 => GgmlType::F32,
            DType::F16 => GgmlType::F16,
            DType::Q4_0 => GgmlType::Q4_0,
            DType::Q4_1 => GgmlType::Q4_1,
            DType::Q8_0 => GgmlType::Q8_0,
            DType::I32 => return None,
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous axis.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset of the data from the start of the file's data section.
    pub offset: u64,
    /// Bytes of data, when the type is one the worker takes (`None` otherwise).
    pub size: Option<u64>,
}

impl TensorInfo {
    /// The worker dtype, or [`GgufError::UnsupportedType`] naming the ggml type.
    pub fn dtype(&self) -> Result<DType> {
        self.ggml_type.dtype().ok_or_else(|| GgufError::UnsupportedType {
            name: self.name.clone(),
            id: self.ggml_type.0,
            type_name: self.ggml_type.name().to_owned(),
        })
    }

    /// The row-major shape (`dims` reversed).
    pub fn shape(&self) -> Vec<usize> {
        // Each dim was checked to fit in usize (and the element count in u64) at parse time.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Elements in all.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Rows and bytes per row of the row-major matrix view `[numel / last, last]`.
    pub fn rows(&self) -> Result<(u64, u64)> {
        let dtype = self.dtype()?;
        let last = self.dims.first().copied().unwrap_or(1);
        let row_bytes = last / dtype.block_len() as u64 * dtype.block_bytes() as u64;
        Ok((self.numel() / last.max(1), row_bytes))
    }
}

/// A parsed GGUF header: what the file holds and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    pub version: u32,
    /// Every metadata key/value, in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    /// The length of the file the header was read from.
    pub file_len: u64,
    index: BTreeMap<String, usize>,
}

impl Gguf {
    /// Parses a whole file held in memory.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        Self::from_reader(bytes, bytes.len() as u64)
    }

    /// Parses the header of the file at `path` (the tensor data is not read).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| io_err(path, &e))?;
        let len = file.metadata().map_err(|e| io_err(path, &e))?.len();
        Self::from_reader(std::io::BufReader::new(file), len)
    }

    /// Parses a header from `reader`, which must hold `file_len` bytes from its current position.
    pub fn from_reader(reader: impl Read, file_len: u64) -> Result<Self> {
        let mut r = Src { r: reader, pos: 0, len: file_len };
        let magic: [u8; 4] = r.array("magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        match version {
            2 | 3 => {}
            // A big-endian file stores 2 or 3 byte-swapped.
            0x0200_0000 | 0x0300_0000 => return Err(GgufError::BigEndian),
            v => return Err(GgufError::UnsupportedVersion(v)),
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        // Each key/value needs at least 8 (key length) + 4 (type) + 1 bytes, each tensor info
        // 8 + 4 + 8 + 4 + 8: refuse counts the rest of the file cannot hold before looping.
        r.check_room("metadata", kv_count, 13)?;
        let mut metadata = Vec::new();
        let mut keys = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.name(&format!("metadata key {i}"))?;
            let code = r.u32(&format!("type of {key}"))?;
            let ty = ValueType::from_code(code).ok_or_else(|| invalid(format!("metadata {key}: unknown value type {code}")))?;
            let value = r.value(&key, ty, 0)?;
            if keys.insert(key.clone(), metadata.len()).is_some() {
                return Err(invalid(format!("metadata key {key} appears twice")));
            }
            metadata.push((key, value));
        }
        let alignment = match keys.get("general.alignment").and_then(|&i: &usize| metadata.get(i)).map(|(_, v)| v) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
            Some(other) => return Err(invalid(format!("general.alignment must be a power-of-two u32, got {other:?}"))),
        };
        r.check_room("tensor infos", tensor_count, 32)?;
        let mut tensors = Vec::new();
        let mut index = BTreeMap::new();
        for i in 0..tensor_count {
            let name = r.name(&format!("name of tensor {i}"))?;
            let n_dims = r.u32(&format!("rank of {name}"))?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(invalid(format!("tensor {name}: rank {n_dims} is outside 1..={MAX_DIMS}")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("dims of {name}"))?);
            }
            let ggml_type = GgmlType(r.u32(&format!("type of {name}"))?);
            let offset = r.u64(&format!("offset of {name}"))?;
            let numel = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d).filter(|_| d > 0 && usize::try_from(d).is_ok()));
            let numel = numel.ok_or_else(|| invalid(format!("tensor {name}: dims {dims:?} are zero or too large")))?;
            let size = match ggml_type.dtype() {
                None => None,
                Some(dtype) => {
                    let bl = dtype.block_len() as u64;
                    if dims[0] % bl != 0 {
                        return Err(invalid(format!(
                            "tensor {name}: a {} tensor needs its first ggml dimension to be a multiple of {bl}, got {dims:?}",
                            ggml_type.name()
                        )));
                    }
                    Some(numel / bl * dtype.block_bytes() as u64)
                }
            };
            if offset % alignment != 0 {
                return Err(invalid(format!("tensor {name}: offset {offset} is not a multiple of the alignment {alignment}")));
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(invalid(format!("tensor {name} appears twice")));
            }
            tensors.push(TensorInfo { name, dims, ggml_type, offset, size });
        }
        let data_offset = r.pos.div_ceil(alignment).checked_mul(alignment).ok_or_else(|| invalid("data offset overflows"))?;
        if data_offset > file_len && !tensors.is_empty() {
            return Err(GgufError::Truncated { what: "data section".into(), at: r.pos, need: data_offset - r.pos, left: r.left() });
        }
        let data_len = file_len.saturating_sub(data_offset);
        for t in &tensors {
            if let Some(size) = t.size
                && t.offset.checked_add(size).is_none_or(|end| end > data_len)
            {
                return Err(GgufError::Truncated {
                    what: format!("data of tensor {}", t.name),
                    at: data_offset.saturating_add(t.offset),
                    need: size,
                    left: data_len.saturating_sub(t.offset),
                });
            }
        }
        Ok(Self { version, metadata, tensors, alignment, data_offset, file_len, index })
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A required non-negative integer key.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key).ok_or_else(|| invalid(format!("metadata {key} is missing")))?;
        v.as_u64().ok_or_else(|| invalid(format!("metadata {key} must be a non-negative integer, got {v:?}")))
    }

    /// A required float key.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key).ok_or_else(|| invalid(format!("metadata {key} is missing")))?;
        v.as_f64().ok_or_else(|| invalid(format!("metadata {key} must be a float, got {v:?}")))
    }

    /// A required string key.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| invalid(format!("metadata {key} is missing")))?;
        v.as_str().ok_or_else(|| invalid(format!("metadata {key} must be a string, got {v:?}")))
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The absolute byte range of a tensor's data in the file (checked against the file length at
    /// parse time); an error for types the worker does not take.
    pub fn data_range(&self, t: &TensorInfo) -> Result<std::ops::Range<u64>> {
        t.dtype()?;
        let size = t.size.ok_or_else(|| invalid(format!("tensor {}: unknown size", t.name)))?;
        let start = self.data_offset + t.offset;
        Ok(start..start + size)
    }

    /// A tensor's bytes out of the whole file held in memory.
    pub fn tensor_bytes<'a>(&self, file: &'a [u8], t: &TensorInfo) -> Result<&'a [u8]> {
        let r = self.data_range(t)?;
        let len = file.len() as u64;
        if len != self.file_len {
            return Err(invalid(format!("the buffer is {len} bytes, the parsed file {}", self.file_len)));
        }
        // In range: the parse checked it against file_len.
        file.get(r.start as usize..r.end as usize).ok_or_else(|| invalid(format!("tensor {} is outside the file", t.name)))
    }

    /// Reads `rows` rows starting at `first_row` of a tensor (seen as `[rows, last]`) from a file.
    pub fn read_rows(&self, file: &mut (impl Read + Seek), t: &TensorInfo, first_row: u64, rows: u64) -> Result<Vec<u8>> {
        let range = self.data_range(t)?;
        let (total, row_bytes) = t.rows()?;
        if first_row.checked_add(rows).is_none_or(|end| end > total) {
            return Err(invalid(format!("tensor {}: rows [{first_row}, +{rows}) are outside its {total} rows", t.name)));
        }
        let len = usize::try_from(rows * row_bytes).map_err(|_| invalid("read too large"))?;
        let mut buf = vec![0u8; len];
        let at = range.start + first_row * row_bytes;
        let io = |e: std::io::Error| GgufError::Io { path: format!("tensor {} at byte {at}", t.name), message: e.to_string() };
        file.seek(SeekFrom::Start(at)).map_err(io)?;
        file.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }
}

fn io_err(path: &Path, e: &std::io::Error) -> GgufError {
    GgufError::Io { path: path.display().to_string(), message: e.to_string() }
}

/// A reader that knows its position and how many bytes are left.
struct Src<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Src<R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails unless `count` items of at least `min` bytes each fit in what is left.
    fn check_room(&self, what: &str, count: u64, min: u64) -> Result<()> {
        match count.checked_mul(min) {
            Some(need) if need <= self.left() => Ok(()),
            _ => Err(GgufError::Truncated {
                what: format!("{what} (count {count})"),
                at: self.pos,
                need: count.saturating_mul(min),
                left: self.left(),
            }),
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let need = buf.len() as u64;
        if need > self.left() {
            return Err(GgufError::Truncated { what: what.to_owned(), at: self.pos, need, left: self.left() });
        }
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => GgufError::Truncated { what: what.to_owned(), at: self.pos, need, left: 0 },
            _ => GgufError::Io { path: format!("{what} at byte {}", self.pos), message: e.to_string() },
        })?;
        self.pos += need;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn bytes(&mut self, len: u64, what: &str) -> Result<Vec<u8>> {
        if len > self.left() {
            return Err(GgufError::Truncated { what: what.to_owned(), at: self.pos, need: len, left: self.left() });
        }
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    /// A key or tensor name: strict UTF-8, at most [`MAX_NAME_LEN`] bytes.
    fn name(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > MAX_NAME_LEN {
            return Err(invalid(format!("{what}: a name of {len} bytes is longer than {MAX_NAME_LEN}")));
        }
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes).map_err(|_| invalid(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, key: &str, ty: ValueType, depth: usize) -> Result<Value> {
        let what = format!("value of {key}");
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(&what)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(&what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => Value::U32(self.u32(&what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => Value::U64(self.u64(&what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(invalid(format!("metadata {key}: bool byte {b} is neither 0 nor 1"))),
            },
            // Metadata strings are UTF-8 by the spec; some tokenizer vocabularies hold stray bytes,
            // which are replaced (U+FFFD) rather than failing the whole file.
            ValueType::String => {
                let len = self.u64(&what)?;
                Value::String(String::from_utf8_lossy(&self.bytes(len, &what)?).into_owned())
            }
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(invalid(format!("metadata {key}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let code = self.u32(&what)?;
                let elem =
                    ValueType::from_code(code).ok_or_else(|| invalid(format!("metadata {key}: unknown array element type {code}")))?;
                let count = self.u64(&what)?;
                self.check_room(&format!("array {key}"), count, elem.min_size())?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(key, elem, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds GGUF bytes by hand.
    #[derive(Default)]
    pub(crate) struct Builder {
        pub kvs: Vec<u8>,
        pub n_kv: u64,
        pub infos: Vec<u8>,
        pub n_tensors: u64,
        pub data: Vec<u8>,
        pub version: u32,
        pub alignment: u64,
    }

    pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Self { version: 3, alignment: 32, ..Self::default() }
        }

        pub(crate) fn kv(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
            string(&mut self.kvs, key);
            self.kvs.extend(ty.to_le_bytes());
            self.kvs.extend(value);
            self.n_kv += 1;
            self
        }

        pub(crate) fn kv_u32(self, key: &str, v: u32) -> Self {
            self.kv(key, 4, &v.to_le_bytes())
        }

        pub(crate) fn kv_f32(self, key: &str, v: f32) -> Self {
            self.kv(key, 6, &v.to_le_bytes())
        }

        pub(crate) fn kv_str(self, key: &str, v: &str) -> Self {
            let mut b = Vec::new();
            string(&mut b, v);
            self.kv(key, 8, &b)
        }

        /// A tensor with data (padded to the alignment after it).
        pub(crate) fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: &[u8]) -> Self {
            string(&mut self.infos, name);
            self.infos.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend(d.to_le_bytes());
            }
            self.infos.extend(ty.to_le_bytes());
            self.infos.extend((self.data.len() as u64).to_le_bytes());
            self.n_tensors += 1;
            self.data.extend(data);
            while !(self.data.len() as u64).is_multiple_of(self.alignment) {
                self.data.push(0);
            }
            self
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend(self.n_tensors.to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend(&self.kvs);
            out.extend(&self.infos);
            while !(out.len() as u64).is_multiple_of(self.alignment) {
                out.push(0);
            }
            out.extend(&self.data);
            out
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn sample() -> Builder {
        let mut arr = Vec::new();
        arr.extend(8u32.to_le_bytes());
        arr.extend(2u64.to_le_bytes());
        string(&mut arr, "a");
        string(&mut arr, "bc");
        let mut nested = Vec::new();
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
        nested.extend(5u32.to_le_bytes());
        nested.extend(2u64.to_le_bytes());
        nested.extend((-3i32).to_le_bytes());
        nested.extend(7i32.to_le_bytes());
        let q8 = {
            // One Q8_0 block: d = 0.5 (f16 0x3800), qs = 0..32.
            let mut b = vec![0x00, 0x38];
            b.extend(0..32u8);
            b
        };
        Builder::new()
            .kv_str("general.architecture", "llama")
            .kv_u32("llama.block_count", 2)
            .kv_f32("llama.rope.freq_base", 10000.0)
            .kv("flag", 7, &[1])
            .kv("small", 0, &[200])
            .kv("neg", 1, &[0xff])
            .kv("u16", 2, &513u16.to_le_bytes())
            .kv("i16", 3, &(-2i16).to_le_bytes())
            .kv("i32", 5, &(-9i32).to_le_bytes())
            .kv("u64", 10, &(1u64 << 40).to_le_bytes())
            .kv("i64", 11, &(-1i64).to_le_bytes())
            .kv("f64", 12, &0.25f64.to_le_bytes())
            .kv("names", 9, &arr)
            .kv("nested", 9, &nested)
            .tensor("norm", &[3], 0, &f32_bytes(&[1.0, 2.0, 3.0]))
            .tensor("emb", &[32, 1], 8, &q8)
    }

    #[test]
    fn parses_metadata_tensors_and_offsets() {
        let bytes = sample().build();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(g.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(g.get("flag"), Some(&Value::Bool(true)));
        assert_eq!(g.get("small"), Some(&Value::U8(200)));
        assert_eq!(g.get("neg"), Some(&Value::I8(-1)));
        assert_eq!(g.get("neg").unwrap().as_u64(), None);
        assert_eq!(g.get("u16"), Some(&Value::U16(513)));
        assert_eq!(g.get("i16"), Some(&Value::I16(-2)));
        assert_eq!(g.get("i32"), Some(&Value::I32(-9)));
        assert_eq!(g.get_u64("u64").unwrap(), 1 << 40);
        assert_eq!(g.get("i64"), Some(&Value::I64(-1)));
        assert_eq!(g.get_f64("f64").unwrap(), 0.25);
        assert_eq!(g.get("names"), Some(&Value::Array(ValueType::String, vec![Value::String("a".into()), Value::String("bc".into())])));
        assert_eq!(
            g.get("nested"),
            Some(&Value::Array(ValueType::Array, vec![Value::Array(ValueType::I32, vec![Value::I32(-3), Value::I32(7)])]))
        );
        assert!(g.get_u64("general.architecture").is_err());
        assert!(g.get_u64("missing").is_err());
        assert_eq!(g.alignment, 32);
        assert_eq!(g.data_offset % 32, 0);
        assert_eq!(g.tensors.len(), 2);

        let norm = g.tensor("norm").unwrap();
        assert_eq!(norm.dtype().unwrap(), DType::F32);
        assert_eq!(norm.shape(), vec![3]);
        assert_eq!(g.tensor_bytes(&bytes, norm).unwrap(), f32_bytes(&[1.0, 2.0, 3.0]).as_slice());
        let emb = g.tensor("emb").unwrap();
        assert_eq!(emb.dtype().unwrap(), DType::Q8_0);
        assert_eq!(emb.shape(), vec![1, 32]);
        assert_eq!(emb.offset, 32);
        assert_eq!(emb.size, Some(34));
        assert_eq!(emb.rows().unwrap(), (1, 34));
        let data = g.tensor_bytes(&bytes, emb).unwrap();
        assert_eq!(&data[..2], &[0x00, 0x38]);
        assert_eq!(data[33], 31);
        // Reading through a file handle gives the same bytes.
        let mut cur = std::io::Cursor::new(bytes.clone());
        assert_eq!(g.read_rows(&mut cur, emb, 0, 1).unwrap(), data);
        assert!(g.read_rows(&mut cur, emb, 1, 1).is_err());
        // The same file as version 2 parses the same.
        let mut b = sample();
        b.version = 2;
        assert_eq!(Gguf::parse(&b.build()).unwrap().tensors, g.tensors);
    }

    #[test]
    fn alignment_key_moves_the_data() {
        let mut b = sample().kv_u32("general.alignment", 64);
        b.alignment = 64;
        b.data.clear();
        b.infos.clear();
        b.n_tensors = 0;
        let b = b.tensor("x", &[2], 0, &f32_bytes(&[5.0, 6.0])).tensor("y", &[1], 0, &f32_bytes(&[7.0]));
        let bytes = b.build();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.alignment, 64);
        assert_eq!(g.data_offset % 64, 0);
        assert_eq!(g.tensor("y").unwrap().offset, 64);
        assert_eq!(g.tensor_bytes(&bytes, g.tensor("y").unwrap()).unwrap(), 7.0f32.to_le_bytes());
        let bad = sample().kv_u32("general.alignment", 48).build();
        assert!(matches!(Gguf::parse(&bad), Err(GgufError::Invalid(m)) if m.contains("alignment")));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().build();
        // The last tensor (34 bytes at data offset 32) ends before the trailing padding.
        let end = Gguf::parse(&bytes).unwrap().data_offset as usize + 32 + 34;
        assert!(Gguf::parse(&bytes[..end]).is_ok());
        for n in 0..end {
            match Gguf::parse(&bytes[..n]) {
                Err(GgufError::Truncated { .. }) => {}
                other => panic!("prefix of {n} bytes: {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_bad_headers() {
        let mut bytes = sample().build();
        bytes[0] = b'X';
        assert!(matches!(Gguf::parse(&bytes), Err(GgufError::BadMagic(_))));
        for (version, want) in [(1u32, "UnsupportedVersion"), (4, "UnsupportedVersion"), (0x0300_0000, "BigEndian")] {
            let mut b = sample();
            b.version = version;
            let e = Gguf::parse(&b.build()).unwrap_err();
            assert!(format!("{e:?}").starts_with(want), "{version}: {e:?}");
        }
        // Absurd counts fail before allocating anything.
        let mut b = sample().build();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Truncated { .. })));
        let mut b = sample().build();
        b[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Truncated { .. })));
        // An array claiming 2^60 elements, a string claiming 2^60 bytes.
        let mut arr = Vec::new();
        arr.extend(0u32.to_le_bytes());
        arr.extend((1u64 << 60).to_le_bytes());
        assert!(matches!(Gguf::parse(&Builder::new().kv("a", 9, &arr).build()), Err(GgufError::Truncated { .. })));
        let huge = (1u64 << 60).to_le_bytes();
        assert!(matches!(Gguf::parse(&Builder::new().kv("s", 8, &huge).build()), Err(GgufError::Truncated { .. })));
        // A key claiming a huge name.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend((1u64 << 40).to_le_bytes());
        b.extend([0u8; 64]);
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Invalid(m)) if m.contains("longer")));
        // Unknown value type, bad bool, deep nesting, duplicate key.
        assert!(Gguf::parse(&Builder::new().kv("t", 13, &[0; 8]).build()).is_err());
        assert!(Gguf::parse(&Builder::new().kv("b", 7, &[2]).build()).is_err());
        let mut deep = Vec::new();
        for _ in 0..=MAX_ARRAY_DEPTH {
            deep.extend(9u32.to_le_bytes());
            deep.extend(1u64.to_le_bytes());
        }
        deep.extend(0u32.to_le_bytes());
        deep.extend(0u64.to_le_bytes());
        assert!(matches!(Gguf::parse(&Builder::new().kv("d", 9, &deep).build()), Err(GgufError::Invalid(m)) if m.contains("nested")));
        let dup = Builder::new().kv_u32("k", 1).kv_u32("k", 2).build();
        assert!(matches!(Gguf::parse(&dup), Err(GgufError::Invalid(m)) if m.contains("twice")));
    }

    #[test]
    fn refuses_bad_tensors() {
        let f = f32_bytes(&[1.0, 2.0]);
        let cases: Vec<(Builder, &str)> = vec![
            (Builder::new().tensor("x", &[], 0, &f), "rank"),
            (Builder::new().tensor("x", &[1, 1, 1, 1, 1], 0, &f), "rank"),
            (Builder::new().tensor("x", &[0], 0, &f), "zero"),
            (Builder::new().tensor("x", &[u64::MAX, 2], 0, &f), "too large"),
            (Builder::new().tensor("x", &[33], 8, &f), "multiple of 32"),
            (Builder::new().tensor("x", &[2], 0, &f).tensor("x", &[2], 0, &f), "twice"),
        ];
        for (b, want) in cases {
            match Gguf::parse(&b.build()) {
                Err(GgufError::Invalid(m)) if m.contains(want) => {}
                other => panic!("want {want}: {other:?}"),
            }
        }
        // Data past the end of the file.
        let mut b = Builder::new().tensor("x", &[64], 0, &f);
        b.data.truncate(8);
        assert!(matches!(Gguf::parse(&b.build()), Err(GgufError::Truncated { what, .. }) if what.contains("tensor x")));
        // A misaligned offset.
        let mut b = Builder::new().tensor("x", &[2], 0, &f);
        let at = b.infos.len() - 8;
        b.infos[at..].copy_from_slice(&4u64.to_le_bytes());
        assert!(matches!(Gguf::parse(&b.build()), Err(GgufError::Invalid(m)) if m.contains("alignment")));
        // An unsupported type parses, and is refused by name when used.
        let g = Gguf::parse(&Builder::new().tensor("k", &[256], 14, &[0; 210]).build()).unwrap();
        let t = g.tensor("k").unwrap();
        assert_eq!(t.size, None);
        let e = t.dtype().unwrap_err();
        assert_eq!(e.to_string(), "tensor k: ggml type q6_K (id 14) is not supported (f32, f16, q8_0, q4_0 and q4_1 are)");
        assert!(g.data_range(t).is_err());
        assert_eq!(GgmlType(999).name(), "unknown");
    }

    #[test]
    fn ggml_types_map_to_dtypes() {
        for d in DType::ALL {
            match GgmlType::of(d) {
                Some(g) => assert_eq!(g.dtype(), Some(d)),
                None => assert_eq!(d, DType::I32),
            }
        }
        assert_eq!(GgmlType::Q4_1.name(), "q4_1");
        assert_eq!(GgmlType::Q8_0.to_string(), "q8_0");
    }
}
