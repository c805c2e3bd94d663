//! Element conversions shared by every backend: f16 bits, the GGUF reference quantizers, and THE
//! definition of dequantization, plus fast and fixed-order dot products of one weight row with an
//! f32 vector (the inner loop of the CPU backend's f16 / quantized matmul).
//!
//! # Dequantization: the definition every backend reproduces bitwise
//!
//! Element `j` of a block (see the table in [`super::dtype`]) dequantizes in f32 arithmetic as:
//!
//! * `f16`: [`f16_value`] (exact; every f16 is an f32).
//! * `i32`: `v as f32` (round to nearest even).
//! * `q8_0`: `d * q` with `d = f16_value(block.d)` and `q = qs[j] as i8 as f32`: one f32 multiply.
//! * `q4_0`: `d * q` with `q = (nibble - 8) as f32` (an integer in -8..=7 converted to f32); the
//!   nibble of element `j < 16` is `qs[j] & 15`, of element `j >= 16` is `qs[j - 16] >> 4`.
//! * `q4_1`: `d * q + m` with `q = nibble as f32` and `m = f16_value(block.m)`: a multiply, rounded
//!   to f32, then a separate add (never a fused multiply-add).
//!
//! Reproducible matmul over such weights is exactly `matmul` over the f32 matrix these rules give,
//! summed in index order: [`dot_row_ordered`].
//!
//! # Quantization
//!
//! [`quantize`] is GGUF's reference quantizer (llama.cpp `quantize_row_*_ref`), computed in f32 with
//! `d` (and `m`) rounded to f16 only when stored; the codes use the unrounded f32 `1 / d`.

// `acc = acc + x` is spelled out to mirror the GPU kernels line for line (Rust never contracts it).
#![allow(clippy::assign_op_pattern)]

use super::dtype::dtype_err;
use super::{DType, QK, Result};

// ---- f16 ----

/// The IEEE binary16 bits nearest to `v` (round to nearest, ties to even). Overflow gives ±inf,
/// values below half the smallest subnormal give ±0, subnormals are rounded correctly, infinities
/// stay infinite and NaN stays NaN (quiet, keeping the top payload bits).
pub fn f16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let man = x & 0x007f_ffff;
    if exp == 0xff {
        return if man == 0 { sign | 0x7c00 } else { sign | 0x7e00 | (man >> 13) as u16 };
    }
    // The f16 biased exponent of a normal result.
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal (or zero): the value is m * 2^(exp - 150) with the implicit bit in m, and an f16
        // subnormal is q * 2^-24, so q = m >> (14 - e), rounded. f32 subnormals (exp 0) are far
        // below 2^-25 and land in the `shift > 24` case.
        let shift = (14 - e) as u32;
        if shift > 24 {
            return sign;
        }
        let m = man | 0x0080_0000;
        let q = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        let up = rem > half || (rem == half && q & 1 == 1);
        // A carry out of the subnormal range gives the smallest normal, which is the right bits.
        return sign | (q + up as u32) as u16;
    }
    let h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    let up = rem > 0x1000 || (rem == 0x1000 && h & 1 == 1);
    // A carry from the mantissa into the exponent is correct rounding, up to +inf.
    sign | (h + up as u32) as u16
}

/// The f32 value of IEEE binary16 bits (exact; NaN payloads kept, as the top mantissa bits).
/// Written with selects rather than branches so dequantization loops vectorize.
pub fn f16_value(bits: u16) -> f32 {
    let sign = (bits as u32 & 0x8000) << 16;
    let em = bits as u32 & 0x7fff;
    // Normal numbers: rebias the exponent (15 -> 127) and widen the mantissa.
    let normal = (em << 13) + ((127 - 15) << 23);
    // Subnormals (and zero): m * 2^-24, exact in f32.
    let sub = (em as f32 * f32::from_bits(0x3380_0000)).to_bits();
    // Infinities and NaN.
    let special = (em << 13) | 0x7f80_0000;
    let magnitude = if em < 0x0400 {
        sub
    } else if em >= 0x7c00 {
        special
    } else {
        normal
    };
    f32::from_bits(sign | magnitude)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_value(u16::from_le_bytes([b[i], b[i + 1]]))
}

// ---- encodings ----

fn check_blocks(op: &'static str, dtype: DType, n: usize) -> Result<()> {
    if !n.is_multiple_of(dtype.block_len()) {
        return Err(dtype_err(op, format!("{dtype} needs a multiple of {QK} values, got {n}")));
    }
    Ok(())
}

/// Encodes `values` as storage bytes of `dtype`: little-endian f32 / f16 (round to nearest even) /
/// i32 (toward zero, saturating, NaN to 0), or GGUF's reference quantizer for the block types
/// (`values.len()` a multiple of 32, else [`super::GpuError::DType`]).
///
/// * q8_0: `amax = max |x|`, `d = amax / 127`, `id = d != 0 ? 1 / d : 0`, `q = round(x * id)`
///   (half away from zero).
/// * q4_0: `max` = the value of largest magnitude (signed, first one wins), `d = max / -8`,
///   `q = min(15, trunc(x * id + 8.5))`.
/// * q4_1: `d = (max - min) / 15`, `m = min`, `q = min(15, trunc((x - min) * id + 0.5))`.
pub fn quantize(dtype: DType, values: &[f32]) -> Result<Vec<u8>> {
    check_blocks("quantize", dtype, values.len())?;
    let mut out = Vec::with_capacity(values.len() / dtype.block_len() * dtype.block_bytes());
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::F16 => values.iter().for_each(|&v| out.extend(f16_bits(v).to_le_bytes())),
        DType::I32 => values.iter().for_each(|&v| out.extend((v as i32).to_le_bytes())),
        DType::Q8_0 => values.chunks_exact(QK).for_each(|x| quantize_q8_0(x, &mut out)),
        DType::Q4_0 => values.chunks_exact(QK).for_each(|x| quantize_q4_0(x, &mut out)),
        DType::Q4_1 => values.chunks_exact(QK).for_each(|x| quantize_q4_1(x, &mut out)),
    }
    Ok(out)
}

fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let mut amax = 0.0f32;
    for &v in x {
        // `max` ignores NaN, as C's `MAX(amax, fabsf(v))` with NaN on the right does.
        if v.abs() > amax {
            amax = v.abs();
        }
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16_bits(d).to_le_bytes());
    // `as i8` saturates and maps NaN to 0; the rounded codes are within -127..=127 otherwise.
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

fn quantize_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16_bits(d).to_le_bytes());
    let code = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    out.extend((0..QK / 2).map(|j| code(x[j]) | (code(x[j + QK / 2]) << 4)));
}

fn quantize_q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16_bits(d).to_le_bytes());
    out.extend(f16_bits(min).to_le_bytes());
    let code = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
    out.extend((0..QK / 2).map(|j| code(x[j]) | (code(x[j + QK / 2]) << 4)));
}

/// Decodes `numel` elements of `dtype` from exactly their storage bytes, by the definition at the
/// top of this module. A length that does not match (or, for the block types, a `numel` that is not
/// a multiple of 32) is a [`super::GpuError::DType`] error.
pub fn dequantize(dtype: DType, bytes: &[u8], numel: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; numel];
    dequantize_into(dtype, bytes, &mut out)?;
    Ok(out)
}

/// [`dequantize`] into `out` (`out.len()` elements).
pub fn dequantize_into(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    check_len("dequantize", dtype, bytes.len(), out.len())?;
    dequantize_unchecked(dtype, bytes, out);
    Ok(())
}

/// Checks that `bytes` is exactly the storage of `n` elements of `dtype`.
fn check_len(op: &'static str, dtype: DType, bytes: usize, n: usize) -> Result<()> {
    check_blocks(op, dtype, n)?;
    let want = n / dtype.block_len() * dtype.block_bytes();
    if bytes != want {
        return Err(dtype_err(op, format!("{n} {dtype} elements are {want} bytes, got {bytes}")));
    }
    Ok(())
}

/// Decodes one block (`QK` elements) of a quantized type into `out` (written as two half-block
/// loops over the code bytes so the compiler vectorizes them; the arithmetic is the definition).
fn dequantize_block(dtype: DType, blk: &[u8], out: &mut [f32]) {
    let (lo, hi) = out.split_at_mut(QK / 2);
    match dtype {
        DType::Q8_0 => {
            let d = f16_at(blk, 0);
            for (o, &q) in out.iter_mut().zip(&blk[2..2 + QK]) {
                *o = d * (q as i8 as f32);
            }
        }
        DType::Q4_0 => {
            let d = f16_at(blk, 0);
            for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&blk[2..2 + QK / 2]) {
                *l = d * (((q & 15) as i32 - 8) as f32);
                *h = d * (((q >> 4) as i32 - 8) as f32);
            }
        }
        DType::Q4_1 => {
            let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
            for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&blk[4..4 + QK / 2]) {
                *l = d * ((q & 15) as f32) + m;
                *h = d * ((q >> 4) as f32) + m;
            }
        }
        DType::F32 | DType::F16 | DType::I32 => {}
    }
}

/// The decoding loop; `bytes` and `out` have matching lengths (checked by the callers).
pub(crate) fn dequantize_unchecked(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.as_chunks::<2>().0) {
                *o = f16_value(u16::from_le_bytes(*c));
            }
        }
        DType::I32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
            }
        }
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(dtype.block_bytes())) {
                dequantize_block(dtype, blk, o);
            }
        }
    }
}

// ---- dot products of one weight row with an f32 vector ----

/// A dot-product kernel: `row` holds the storage of `x.len()` elements (checked by the caller).
pub(crate) type DotKernel = fn(&[u8], &[f32]) -> f32;

fn check_dot(op: &'static str, dtype: DType, row: &[u8], x: &[f32]) -> Result<()> {
    if dtype == DType::I32 {
        return Err(dtype_err(op, "weights must be f32, f16 or quantized, got i32"));
    }
    check_len(op, dtype, row.len(), x.len())
}

/// `sum_j w_j * x_j` for one row of weights `row` (the storage bytes of `x.len()` elements of
/// `dtype`: f32, f16 or a block type) in fast mode: AVX2 + FMA (and F16C for f16) when the CPU has
/// them, a portable blocked loop otherwise. The summation order, FMA use and (for q4_1) the
/// factoring `d * sum(q * x) + m * sum(x)` are unspecified; the result is within a few ULP of the
/// exact dot of the dequantized row relative to `sum_j |w_j * x_j|`.
pub fn dot_row(dtype: DType, row: &[u8], x: &[f32]) -> Result<f32> {
    check_dot("dot_row", dtype, row, x)?;
    Ok(fast_kernel(dtype)(row, x))
}

/// The reproducible dot product: each weight dequantized as defined at the top of this module, then
/// `acc = acc + x_j * w_j` for `j` in index order from `acc = 0`, with no fused multiply-add.
pub fn dot_row_ordered(dtype: DType, row: &[u8], x: &[f32]) -> Result<f32> {
    check_dot("dot_row_ordered", dtype, row, x)?;
    Ok(ordered_kernel(dtype)(row, x))
}

/// The fixed-order kernel for `dtype` (see [`dot_row_ordered`]).
pub(crate) fn ordered_kernel(dtype: DType) -> DotKernel {
    match dtype {
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => dot_ordered_blocks_of(dtype),
        DType::F16 => |row, x| {
            let mut acc = 0.0f32;
            for (c, &xv) in row.chunks_exact(2).zip(x) {
                acc = acc + xv * f16_value(u16::from_le_bytes([c[0], c[1]]));
            }
            acc
        },
        DType::F32 | DType::I32 => |row, x| {
            let mut acc = 0.0f32;
            for (c, &xv) in row.chunks_exact(4).zip(x) {
                acc = acc + xv * f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            acc
        },
    }
}

fn dot_ordered_blocks_of(dtype: DType) -> DotKernel {
    fn run(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
        let mut w = [0.0f32; QK];
        let mut acc = 0.0f32;
        for (blk, xs) in row.chunks_exact(dtype.block_bytes()).zip(x.chunks_exact(QK)) {
            dequantize_block(dtype, blk, &mut w);
            for (&xv, &wv) in xs.iter().zip(&w) {
                acc = acc + xv * wv;
            }
        }
        acc
    }
    match dtype {
        DType::Q8_0 => |r, x| run(DType::Q8_0, r, x),
        DType::Q4_0 => |r, x| run(DType::Q4_0, r, x),
        _ => |r, x| run(DType::Q4_1, r, x),
    }
}

/// The fastest kernel this CPU has for `dtype` (see [`dot_row`]).
pub(crate) fn fast_kernel(dtype: DType) -> DotKernel {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        match dtype {
            DType::Q8_0 => return avx2::dot_q8_0_entry,
            DType::Q4_0 => return avx2::dot_q4_0_entry,
            DType::Q4_1 => return avx2::dot_q4_1_entry,
            DType::F32 => return avx2::dot_f32_entry,
            DType::F16 if std::arch::is_x86_feature_detected!("f16c") => return avx2::dot_f16_entry,
            _ => {}
        }
    }
    portable_kernel(dtype)
}

/// A fast f32 dot product kernel for this CPU (AVX2 + FMA when available): order unspecified,
/// within `(len + 8) * 2^-24` of the exact dot relative to `sum |a_i * b_i|`. Extra elements of
/// the longer slice are ignored.
pub fn fast_dot_f32() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return avx2::dot_f32s_entry;
    }
    dot8
}

/// 8 independent partial sums the compiler can vectorize.
fn dot8(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (w, x) = (&w[..n], &x[..n]);
    let mut acc = [0.0f32; 8];
    let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
    let tail: f32 = wc.remainder().iter().zip(xc.remainder()).map(|(a, b)| a * b).sum();
    for (w8, x8) in wc.zip(xc) {
        for l in 0..8 {
            acc[l] = acc[l] + w8[l] * x8[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The portable fast kernels: 8 independent partial sums the compiler can vectorize.
pub(crate) fn portable_kernel(dtype: DType) -> DotKernel {
    fn blocks(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
        let mut w = [0.0f32; QK];
        let mut acc = 0.0f32;
        for (blk, xs) in row.chunks_exact(dtype.block_bytes()).zip(x.chunks_exact(QK)) {
            dequantize_block(dtype, blk, &mut w);
            acc = acc + dot8(&w, xs);
        }
        acc
    }
    fn plain(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
        let mut w = [0.0f32; 256];
        let bytes = dtype.block_bytes();
        let mut acc = 0.0f32;
        for (rc, xc) in row.chunks(256 * bytes).zip(x.chunks(256)) {
            let w = &mut w[..xc.len()];
            dequantize_unchecked(dtype, rc, w);
            acc = acc + dot8(w, xc);
        }
        acc
    }
    match dtype {
        DType::Q8_0 => |r, x| blocks(DType::Q8_0, r, x),
        DType::Q4_0 => |r, x| blocks(DType::Q4_0, r, x),
        DType::Q4_1 => |r, x| blocks(DType::Q4_1, r, x),
        DType::F16 => |r, x| plain(DType::F16, r, x),
        DType::F32 | DType::I32 => |r, x| plain(DType::F32, r, x),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA kernels. The `*_entry` wrappers are only handed out by `fast_kernel` after
    //! runtime detection of the features their callee is compiled for.

    use std::arch::x86_64::*;

    use super::{QK, f16_at};

    /// The sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// 8 lanes of `x` at `xs[at..at + 8]`.
    #[target_feature(enable = "avx2,fma")]
    fn load8(xs: &[f32], at: usize) -> __m256 {
        let v = &xs[at..at + 8];
        // SAFETY: `v` is 8 in-bounds f32s; the load is unaligned.
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    }

    /// The 16 code bytes of a q4 block as a vector.
    #[target_feature(enable = "avx2,fma")]
    fn load16(b: &[u8]) -> __m128i {
        let v = &b[..16];
        // SAFETY: `v` is 16 in-bounds bytes; `loadu` has no alignment requirement.
        unsafe { _mm_loadu_si128(v.as_ptr().cast()) }
    }

    /// The 8 signed bytes `q[at..at + 8]` widened to i32 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn load8_i8(q: &[u8], at: usize) -> __m256i {
        let v = &q[at..at + 8];
        // SAFETY: `v` is 8 in-bounds bytes and `loadl_epi64` reads exactly 8, unaligned.
        _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(v.as_ptr().cast()) })
    }

    /// `sum(codes * x)` for one block whose 32 codes are the 4 groups of 8 i32 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn block_dot(q: [__m256i; 4], xs: &[f32]) -> __m256 {
        let s0 = _mm256_mul_ps(_mm256_cvtepi32_ps(q[0]), load8(xs, 0));
        let s1 = _mm256_mul_ps(_mm256_cvtepi32_ps(q[1]), load8(xs, 8));
        let s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[2]), load8(xs, 16), s0);
        let s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[3]), load8(xs, 24), s1);
        _mm256_add_ps(s0, s1)
    }

    /// Lo/hi nibbles of 16 code bytes: elements 0..16 and 16..32 as bytes.
    #[target_feature(enable = "avx2,fma")]
    fn nibbles(qs: __m128i) -> (__m128i, __m128i) {
        let mask = _mm_set1_epi8(15);
        (_mm_and_si128(qs, mask), _mm_and_si128(_mm_srli_epi16::<4>(qs), mask))
    }

    #[target_feature(enable = "avx2,fma")]
    fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (blk, xs) in row.chunks_exact(2 + QK).zip(x.chunks_exact(QK)) {
            let d = _mm256_set1_ps(f16_at(blk, 0));
            let q = &blk[2..2 + QK];
            let q = [load8_i8(q, 0), load8_i8(q, 8), load8_i8(q, 16), load8_i8(q, 24)];
            acc = _mm256_fmadd_ps(d, block_dot(q, xs), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    fn dot_q4_0(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let eight = _mm_set1_epi8(8);
        for (blk, xs) in row.chunks_exact(2 + QK / 2).zip(x.chunks_exact(QK)) {
            let d = _mm256_set1_ps(f16_at(blk, 0));
            let (lo, hi) = nibbles(load16(&blk[2..]));
            let (lo, hi) = (_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight));
            let q = [
                _mm256_cvtepi8_epi32(lo),
                _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo)),
                _mm256_cvtepi8_epi32(hi),
                _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi)),
            ];
            acc = _mm256_fmadd_ps(d, block_dot(q, xs), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    fn dot_q4_1(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (blk, xs) in row.chunks_exact(4 + QK / 2).zip(x.chunks_exact(QK)) {
            let (d, m) = (_mm256_set1_ps(f16_at(blk, 0)), _mm256_set1_ps(f16_at(blk, 2)));
            let (lo, hi) = nibbles(load16(&blk[4..]));
            let q = [
                _mm256_cvtepu8_epi32(lo),
                _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)),
                _mm256_cvtepu8_epi32(hi),
                _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)),
            ];
            let xsum = _mm256_add_ps(_mm256_add_ps(load8(xs, 0), load8(xs, 8)), _mm256_add_ps(load8(xs, 16), load8(xs, 24)));
            acc = _mm256_fmadd_ps(d, block_dot(q, xs), acc);
            acc = _mm256_fmadd_ps(m, xsum, acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let n8 = x.len() / 8 * 8;
        let mut i = 0;
        while i < n8 {
            let w = &row[4 * i..4 * i + 32];
            // SAFETY: `w` is 32 in-bounds bytes (8 f32s, little-endian as x86 is); unaligned load.
            let wv = unsafe { _mm256_loadu_ps(w.as_ptr().cast()) };
            if i % 16 == 0 {
                a0 = _mm256_fmadd_ps(wv, load8(x, i), a0);
            } else {
                a1 = _mm256_fmadd_ps(wv, load8(x, i), a1);
            }
            i += 8;
        }
        let mut tail = 0.0f32;
        for (c, &xv) in row[4 * n8..].chunks_exact(4).zip(&x[n8..]) {
            tail += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * xv;
        }
        hsum(_mm256_add_ps(a0, a1)) + tail
    }

    #[target_feature(enable = "avx2,fma")]
    fn dot_f32s(w: &[f32], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (mut a0, mut a1, mut a2, mut a3) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        let n32 = n / 32 * 32;
        let mut i = 0;
        while i < n32 {
            a0 = _mm256_fmadd_ps(load8(w, i), load8(x, i), a0);
            a1 = _mm256_fmadd_ps(load8(w, i + 8), load8(x, i + 8), a1);
            a2 = _mm256_fmadd_ps(load8(w, i + 16), load8(x, i + 16), a2);
            a3 = _mm256_fmadd_ps(load8(w, i + 24), load8(x, i + 24), a3);
            i += 32;
        }
        while i + 8 <= n {
            a0 = _mm256_fmadd_ps(load8(w, i), load8(x, i), a0);
            i += 8;
        }
        let mut tail = 0.0f32;
        for (&a, &b) in w[i..n].iter().zip(&x[i..n]) {
            tail += a * b;
        }
        hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let n8 = x.len() / 8 * 8;
        let mut i = 0;
        while i < n8 {
            let w = &row[2 * i..2 * i + 16];
            // SAFETY: `w` is 16 in-bounds bytes (8 f16s); unaligned load.
            let wv = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(w.as_ptr().cast()) });
            if i % 16 == 0 {
                a0 = _mm256_fmadd_ps(wv, load8(x, i), a0);
            } else {
                a1 = _mm256_fmadd_ps(wv, load8(x, i), a1);
            }
            i += 8;
        }
        let mut tail = 0.0f32;
        for (i, &xv) in x.iter().enumerate().skip(n8) {
            tail += f16_at(row, 2 * i) * xv;
        }
        hsum(_mm256_add_ps(a0, a1)) + tail
    }

    // SAFETY (all entries): `fast_kernel` returns these only after `is_x86_feature_detected!`
    // confirmed avx2 and fma (and f16c for `dot_f16_entry`), the features the callees enable.
    pub(super) fn dot_q8_0_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: see above.
        unsafe { dot_q8_0(row, x) }
    }
    pub(super) fn dot_q4_0_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: see above.
        unsafe { dot_q4_0(row, x) }
    }
    pub(super) fn dot_q4_1_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: see above.
        unsafe { dot_q4_1(row, x) }
    }
    pub(super) fn dot_f32_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: see above.
        unsafe { dot_f32(row, x) }
    }
    pub(super) fn dot_f32s_entry(w: &[f32], x: &[f32]) -> f32 {
        // SAFETY: see above (`fast_dot_f32` checks avx2 and fma).
        unsafe { dot_f32s(w, x) }
    }
    pub(super) fn dot_f16_entry(row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: see above.
        unsafe { dot_f16(row, x) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuError;

    /// Every finite f16 value from first principles (sign, exponent, mantissa) in f64.
    fn f16_reference(bits: u16) -> f64 {
        let s = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
        let e = ((bits >> 10) & 0x1f) as i32;
        let m = (bits & 0x3ff) as f64;
        if e == 0 { s * m * 2f64.powi(-24) } else { s * (1.0 + m / 1024.0) * 2f64.powi(e - 15) }
    }

    #[test]
    fn f16_value_matches_first_principles_for_every_pattern() {
        for bits in 0..=u16::MAX {
            let v = f16_value(bits);
            match (bits >> 10) & 0x1f {
                0x1f if bits & 0x3ff == 0 => assert_eq!(v, if bits & 0x8000 != 0 { f32::NEG_INFINITY } else { f32::INFINITY }),
                0x1f => assert!(v.is_nan(), "{bits:#x}"),
                _ => assert_eq!(v as f64, f16_reference(bits), "{bits:#x}"),
            }
            assert_eq!(v.is_sign_negative(), bits & 0x8000 != 0, "{bits:#x}");
        }
    }

    #[test]
    fn f16_bits_round_trips_and_rounds_ties_to_even() {
        for bits in 0..=u16::MAX {
            let v = f16_value(bits);
            if v.is_nan() {
                assert!(f16_value(f16_bits(v)).is_nan());
                continue;
            }
            assert_eq!(f16_bits(v), bits, "{bits:#x}");
            // Between this finite value and the next one up in magnitude: the f64 midpoint and
            // points just around it (all exact in f32, as the spacing is >= 2^-24).
            let next = bits.wrapping_add(1);
            if bits & 0x7fff >= 0x7bff {
                continue;
            }
            let (a, b) = (f16_reference(bits), f16_reference(next));
            let mid = (a + b) / 2.0;
            let below = mid - (b - a) / 8.0;
            let above = mid + (b - a) / 8.0;
            assert_eq!(f16_bits(below as f32), bits, "below midpoint of {bits:#x}");
            assert_eq!(f16_bits(above as f32), next, "above midpoint of {bits:#x}");
            let even = if bits & 1 == 0 { bits } else { next };
            assert_eq!(f16_bits(mid as f32), even, "midpoint of {bits:#x}");
        }
    }

    #[test]
    fn f16_bits_edges() {
        assert_eq!(f16_bits(65504.0), 0x7bff);
        assert_eq!(f16_bits(65519.99), 0x7bff);
        assert_eq!(f16_bits(65520.0), 0x7c00, "the midpoint to the next binade rounds to inf");
        assert_eq!(f16_bits(1e10), 0x7c00);
        assert_eq!(f16_bits(-1e10), 0xfc00);
        assert_eq!(f16_bits(f32::INFINITY), 0x7c00);
        assert_eq!(f16_bits(f32::NEG_INFINITY), 0xfc00);
        assert_eq!(f16_bits(-0.0), 0x8000);
        assert_eq!(f16_bits(2f32.powi(-25)), 0, "half the smallest subnormal ties to even (zero)");
        assert_eq!(f16_bits(2f32.powi(-25) * 1.000_001), 1);
        assert_eq!(f16_bits(-3.0 * 2f32.powi(-25)), 0x8002, "1.5 subnormal steps tie to 2");
        assert_eq!(f16_bits(f32::from_bits(1)), 0, "f32 subnormals flush to zero as they are far below");
        assert_eq!(f16_bits(2f32.powi(-14) * (1.0 - 2f32.powi(-12))), 0x0400, "rounds up into the normals");
        assert_eq!(f16_bits(f32::NAN) & 0x7e00, 0x7e00);
        assert_eq!(f16_bits(1.0 + 2f32.powi(-11)), 0x3c00, "tie to even");
        assert_eq!(f16_bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02, "tie to even (up)");
    }

    #[test]
    fn plain_encodings() {
        let v = [1.5f32, -2.75, 3.9e9, -1e12, f32::NAN, 0.5];
        let b = quantize(DType::I32, &v).unwrap();
        let ints: Vec<i32> = b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(ints, [1, -2, i32::MAX, i32::MIN, 0, 0]);
        assert_eq!(dequantize(DType::I32, &b, 6).unwrap(), [1.0, -2.0, 2147483648.0, -2147483648.0, 0.0, 0.0]);
        let b = quantize(DType::F32, &v).unwrap();
        assert_eq!(b.len(), 24);
        let back = dequantize(DType::F32, &b, 6).unwrap();
        assert!(back.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()));
        let b = quantize(DType::F16, &[1.0, -2.0, 0.1]).unwrap();
        assert_eq!(b, [0x00, 0x3c, 0x00, 0xc0, 0x66, 0x2e]);
        assert_eq!(dequantize(DType::F16, &b, 3).unwrap(), [1.0, -2.0, f16_value(0x2e66)]);
    }

    /// A block of 32 values with a known largest magnitude.
    fn ramp(scale: f32, offset: f32) -> Vec<f32> {
        (0..32).map(|i| (i as f32 - offset) * scale).collect()
    }

    #[test]
    fn q8_0_block_by_hand() {
        // x_i = i - 16 over 0..32: amax 16, d = 16/127, codes round(x * 127/16).
        let x = ramp(1.0, 16.0);
        let b = quantize(DType::Q8_0, &x).unwrap();
        assert_eq!(b.len(), 34);
        let d = 16.0f32 / 127.0;
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), f16_bits(d));
        // By hand: -16 -> -127, -1 -> round(-7.9375) = -8, 1 -> 8, 2 -> round(15.875) = 16,
        // 8 -> 63.5 in real arithmetic: the f32 product decides, so check the neighbours.
        assert_eq!(b[2] as i8, -127);
        assert_eq!(b[2 + 15] as i8, -8);
        assert_eq!(b[2 + 16] as i8, 0);
        assert_eq!(b[2 + 17] as i8, 8);
        assert_eq!(b[2 + 18] as i8, 16);
        assert_eq!(b[2 + 31] as i8, 119, "15 * 7.9375 = 119.06");
        let y = dequantize(DType::Q8_0, &b, 32).unwrap();
        let dh = f16_value(f16_bits(d));
        assert_eq!(y[0], dh * -127.0);
        for (xi, yi) in x.iter().zip(&y) {
            assert!((xi - yi).abs() <= 0.5 * d * 1.01 + 16.0 * 1e-3, "{xi} vs {yi}");
        }
        // Half away from zero: 0.5 and -0.5 code steps.
        let mut x = vec![0.0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = -0.5;
        x[3] = 2.5;
        let b = quantize(DType::Q8_0, &x).unwrap();
        assert_eq!(f16_value(u16::from_le_bytes([b[0], b[1]])), 1.0);
        assert_eq!([b[2] as i8, b[3] as i8, b[4] as i8, b[5] as i8], [127, 1, -1, 3]);
    }

    #[test]
    fn q4_0_block_by_hand() {
        // Largest magnitude -8 (signed): d = -8 / -8 = 1, id = 1, codes trunc(x + 8.5) capped at 15.
        let mut x = vec![0.0f32; 32];
        x[0] = -8.0;
        x[1] = 7.0;
        x[2] = 7.4; // trunc(15.9) = 15
        x[16] = 3.0; // 11, high nibble of byte 0
        x[17] = -0.6; // trunc(7.9) = 7
        x[31] = 1.5; // trunc(10.0) = 10
        let b = quantize(DType::Q4_0, &x).unwrap();
        assert_eq!(b.len(), 18);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x3c00);
        assert_eq!(b[2], 11 << 4, "codes 0 (low) and 11 (high)");
        assert_eq!(b[3], 15 | (7 << 4));
        assert_eq!(b[4], 15 | (8 << 4));
        assert_eq!(b[2 + 15], 8 | (10 << 4));
        let y = dequantize(DType::Q4_0, &b, 32).unwrap();
        assert_eq!(&y[..3], &[-8.0, 7.0, 7.0]);
        assert_eq!((y[16], y[17], y[31]), (3.0, -1.0, 2.0));
        // A positive largest value gives a negative d and the code 0 at that element; 8 is capped.
        let mut x = vec![0.0f32; 32];
        x[5] = 4.0;
        x[6] = -4.0;
        let b = quantize(DType::Q4_0, &x).unwrap();
        assert_eq!(f16_value(u16::from_le_bytes([b[0], b[1]])), -0.5);
        assert_eq!(b[2 + 5] & 15, 0);
        assert_eq!(b[2 + 6] & 15, 15, "trunc(8 + 8.5) = 16 is capped at 15");
        let y = dequantize(DType::Q4_0, &b, 32).unwrap();
        assert_eq!((y[5], y[6], y[0]), (4.0, -3.5, -0.0));
    }

    #[test]
    fn q4_1_block_by_hand() {
        // min -1, max 14: d = 1, m = -1, codes trunc(x + 1 + 0.5).
        let mut x: Vec<f32> = (0..32).map(|i| (i % 16) as f32 - 1.0).collect();
        x[20] = 2.4; // trunc(3.9) = 3
        x[21] = 2.6; // trunc(4.1) = 4
        let b = quantize(DType::Q4_1, &x).unwrap();
        assert_eq!(b.len(), 20);
        assert_eq!(f16_value(u16::from_le_bytes([b[0], b[1]])), 1.0);
        assert_eq!(f16_value(u16::from_le_bytes([b[2], b[3]])), -1.0);
        for j in 0..16 {
            let hi = if j == 4 {
                3
            } else if j == 5 {
                4
            } else {
                j as u8
            };
            assert_eq!(b[4 + j], j as u8 | (hi << 4), "byte {j}");
        }
        let y = dequantize(DType::Q4_1, &b, 32).unwrap();
        assert_eq!((y[0], y[15], y[20], y[21]), (-1.0, 14.0, 2.0, 3.0));
        // A constant block: d = 0, id = 0, all codes 0, the value is m.
        let b = quantize(DType::Q4_1, &[0.25f32; 32]).unwrap();
        assert_eq!(&b[..4], &[0, 0, 0x00, 0x34]);
        assert!(b[4..].iter().all(|&q| q == 0));
        assert_eq!(dequantize(DType::Q4_1, &b, 32).unwrap(), vec![0.25; 32]);
    }

    #[test]
    fn dequantize_is_the_documented_f32_arithmetic() {
        // d and m chosen so d * q + m rounds differently from the exact value (FMA would differ).
        let mut b = vec![0u8; 20];
        b[..2].copy_from_slice(&f16_bits(0.1).to_le_bytes());
        b[2..4].copy_from_slice(&f16_bits(-0.3).to_le_bytes());
        for (j, byte) in b[4..].iter_mut().enumerate() {
            *byte = (j as u8) | ((15 - j as u8) << 4);
        }
        let (d, m) = (f16_value(f16_bits(0.1)), f16_value(f16_bits(-0.3)));
        let y = dequantize(DType::Q4_1, &b, 32).unwrap();
        for (j, yj) in y.iter().enumerate() {
            let q = if j < 16 { j } else { 15 - (j - 16) } as f32;
            let prod = (d as f64 * q as f64) as f32; // f32 rounding of the product
            let want = (prod as f64 + m as f64) as f32;
            assert_eq!(yj.to_bits(), want.to_bits(), "element {j}");
        }
    }

    #[test]
    fn quantize_round_trips_within_half_a_step() {
        let mut rng = fastrand::Rng::with_seed(7);
        let x: Vec<f32> = (0..32 * 40).map(|_| (rng.f32() - 0.5) * 6.0).collect();
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let b = quantize(dtype, &x).unwrap();
            assert_eq!(b.len(), 40 * dtype.block_bytes());
            let y = dequantize(dtype, &b, x.len()).unwrap();
            for (blk, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let (lo, hi) = xs.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let amax = lo.abs().max(hi.abs()) as f64;
                let step = match dtype {
                    DType::Q8_0 => amax / 127.0,
                    DType::Q4_0 => amax / 8.0,
                    _ => (hi - lo) as f64 / 15.0,
                };
                for (xv, yv) in xs.iter().zip(ys) {
                    // Half a step, plus the f16 rounding of d (and m) scaled by the largest code.
                    let slack = step * 0.5 + amax * 2e-3 + 1e-6;
                    let err = (*xv as f64 - *yv as f64).abs();
                    // q4_0 caps the code at 15, so the largest positive values lose up to a step.
                    let bound = if dtype == DType::Q4_0 { step * 1.0 + amax * 2e-3 } else { slack };
                    assert!(err <= bound, "{dtype} block {blk}: {xv} -> {yv} (step {step})");
                }
            }
        }
    }

    #[test]
    fn misaligned_and_mismatched_lengths_are_dtype_errors() {
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            assert!(matches!(quantize(dtype, &[0.0; 33]), Err(GpuError::DType { .. })));
            assert!(matches!(dequantize(dtype, &vec![0; dtype.block_bytes()], 31), Err(GpuError::DType { .. })));
            assert!(matches!(dequantize(dtype, &vec![0; dtype.block_bytes() + 1], 32), Err(GpuError::DType { .. })));
            assert!(matches!(dot_row(dtype, &vec![0; dtype.block_bytes()], &[0.0; 31]), Err(GpuError::DType { .. })));
            assert!(matches!(dot_row_ordered(dtype, &[], &[0.0; 32]), Err(GpuError::DType { .. })));
        }
        assert!(matches!(dequantize(DType::F16, &[0; 3], 2), Err(GpuError::DType { .. })));
        assert!(matches!(dot_row(DType::I32, &[0; 4], &[0.0]), Err(GpuError::DType { .. })));
        assert_eq!(quantize(DType::Q8_0, &[]).unwrap(), Vec::<u8>::new());
        assert_eq!(dequantize(DType::Q4_1, &[], 0).unwrap(), Vec::<f32>::new());
        assert_eq!(dot_row(DType::Q4_0, &[], &[]).unwrap(), 0.0);
    }

    /// The f64 dot of `x` with the dequantized row, and the sum of |terms| for error bounds.
    fn dot_f64(dtype: DType, row: &[u8], x: &[f32]) -> (f64, f64) {
        let w = dequantize(dtype, row, x.len()).unwrap();
        w.iter().zip(x).fold((0.0, 0.0), |(s, a), (&w, &x)| (s + w as f64 * x as f64, a + (w as f64 * x as f64).abs()))
    }

    #[test]
    fn ordered_dot_is_the_sequential_sum_of_dequantized_products() {
        let mut rng = fastrand::Rng::with_seed(11);
        for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            for k in [0usize, 32, 64, 96, 576] {
                let w: Vec<f32> = (0..k).map(|_| rng.f32() * 2.0 - 1.0).collect();
                let x: Vec<f32> = (0..k).map(|_| rng.f32() * 2.0 - 1.0).collect();
                let row = quantize(dtype, &w).unwrap();
                let deq = dequantize(dtype, &row, k).unwrap();
                let mut want = 0.0f32;
                for j in 0..k {
                    want = want + x[j] * deq[j];
                }
                assert_eq!(dot_row_ordered(dtype, &row, &x).unwrap().to_bits(), want.to_bits(), "{dtype} k={k}");
            }
        }
    }

    /// Fast kernels (SIMD where available, and the portable ones always) against f64: within
    /// `(k + 8) * 2^-23` of the sum of |terms| (a generous bound for any summation order; the
    /// reproducible kernel is checked against the same bound).
    #[test]
    fn fast_dots_match_f64() {
        let mut rng = fastrand::Rng::with_seed(12);
        for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            for k in [0usize, 32, 64, 160, 576, 2048] {
                // f32/f16 also take lengths that are not multiples of 8.
                let k = if dtype.is_quantized() { k } else { k + 13 };
                let w: Vec<f32> = (0..k).map(|_| (rng.f32() * 2.0 - 1.0) * 3.0).collect();
                let x: Vec<f32> = (0..k).map(|_| rng.f32() * 2.0 - 1.0).collect();
                let row = quantize(dtype, &w).unwrap();
                let (want, abs) = dot_f64(dtype, &row, &x);
                let tol = (k as f64 + 8.0) * 2f64.powi(-23) * abs + 1e-30;
                let kernels: [(&str, DotKernel); 3] =
                    [("fast", fast_kernel(dtype)), ("portable", portable_kernel(dtype)), ("ordered", ordered_kernel(dtype))];
                for (name, f) in kernels {
                    let got = f(&row, &x) as f64;
                    assert!((got - want).abs() <= tol, "{name} {dtype} k={k}: {got} vs {want} (tol {tol})");
                }
                assert_eq!(dot_row(dtype, &row, &x).unwrap(), fast_kernel(dtype)(&row, &x));
            }
        }
    }

    #[test]
    fn fast_f32_dot_matches_f64() {
        let mut rng = fastrand::Rng::with_seed(13);
        for n in [0usize, 1, 7, 8, 31, 32, 33, 100, 1000] {
            let a: Vec<f32> = (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect();
            let b: Vec<f32> = (0..n + 3).map(|_| rng.f32() * 2.0 - 1.0).collect();
            let (want, abs) =
                a.iter().zip(&b).fold((0.0f64, 0.0f64), |(s, t), (&x, &y)| (s + x as f64 * y as f64, t + (x as f64 * y as f64).abs()));
            for (name, f) in [("fast", fast_dot_f32()), ("portable", dot8 as fn(&[f32], &[f32]) -> f32)] {
                let got = f(&a, &b) as f64;
                assert!((got - want).abs() <= (n as f64 + 8.0) * 2f64.powi(-24) * abs, "{name} n={n}: {got} vs {want}");
            }
        }
    }

    /// Codes at the extremes of every nibble and byte, so sign handling in the SIMD unpacking shows.
    #[test]
    fn fast_dots_handle_every_code() {
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let mut row = Vec::new();
            for blk in 0..8u8 {
                row.extend(f16_bits(0.5 + blk as f32).to_le_bytes());
                if dtype == DType::Q4_1 {
                    row.extend(f16_bits(-1.25).to_le_bytes());
                }
                let codes = if dtype == DType::Q8_0 { 32 } else { 16 };
                row.extend((0..codes).map(|j| (blk as usize * 37 + j * 29) as u8));
            }
            let x: Vec<f32> = (0..256).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let (want, _) = dot_f64(dtype, &row, &x);
            // Small integers times halves: every kernel is exact here.
            assert_eq!(fast_kernel(dtype)(&row, &x) as f64, want, "{dtype}");
            assert_eq!(portable_kernel(dtype)(&row, &x) as f64, want, "{dtype}");
            assert_eq!(dot_row_ordered(dtype, &row, &x).unwrap() as f64, want, "{dtype}");
        }
    }
}
