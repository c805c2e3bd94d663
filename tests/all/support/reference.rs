//! f64 references and the tolerances results are held to against them, shared by the suites that
//! check the tensor ops (`gpu_conformance`, `wgpu_matmul`, `ao_gpu`).

/// An error allowance: `|actual - expected| <= abs + rel * |expected|`; both zero means identical bits.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub abs: f64,
    pub rel: f64,
}

/// NaN matches NaN, infinities must match exactly, zero tolerance means identical bits
/// (except NaN payloads); otherwise `|a - e| <= abs + rel * |e|`. Reports index, actual, expected, diff.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f64], tol: Tol) {
    assert_eq!(actual.len(), expected.len(), "{what}: length {} vs {}", actual.len(), expected.len());
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let ok = if a.is_nan() || e.is_nan() {
            a.is_nan() && e.is_nan()
        } else if a.is_infinite() || e.is_infinite() {
            a as f64 == e
        } else if tol.abs == 0.0 && tol.rel == 0.0 {
            a.to_bits() == (e as f32).to_bits()
        } else {
            (a as f64 - e).abs() <= tol.abs + tol.rel * e.abs()
        };
        assert!(ok, "{what}: index {i}: actual {a:e} (bits {:#010x}), expected {e:e}, diff {:e}, tol {tol:?}", a.to_bits(), a as f64 - e);
    }
}

/// The f64 product `op(a) @ op(b)` (op = optional transpose of the last two axes; a stride of 0
/// broadcasts a 2-D operand over the batch) of the values `a` and `b` with shapes `sa` and `sb`,
/// and, per output, the sum of the terms' magnitudes; with k, the number of terms.
pub fn matmul_f64(a: &[f32], sa: &[usize], b: &[f32], sb: &[usize], ta: bool, tb: bool) -> (Vec<f64>, Vec<f64>, usize) {
    let (ra, rb) = (sa.len(), sb.len());
    let (m, k) = if ta { (sa[ra - 1], sa[ra - 2]) } else { (sa[ra - 2], sa[ra - 1]) };
    let n = if tb { sb[rb - 2] } else { sb[rb - 1] };
    let batch = sa[..ra - 2].iter().product::<usize>().max(sb[..rb - 2].iter().product());
    let stride_a = if ra > 2 { m * k } else { 0 };
    let stride_b = if rb > 2 { k * n } else { 0 };
    let (mut out, mut bound) = (Vec::new(), Vec::new());
    for bi in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut abs) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let av = if ta { a[bi * stride_a + p * m + i] } else { a[bi * stride_a + i * k + p] } as f64;
                    let bv = if tb { b[bi * stride_b + j * k + p] } else { b[bi * stride_b + p * n + j] } as f64;
                    s += av * bv;
                    abs += (av * bv).abs();
                }
                out.push(s);
                bound.push(abs);
            }
        }
    }
    (out, bound, k)
}

/// Per-element check against an f64 reference with an error bound proportional to `bound[i]`
/// (the sum of absolute terms) and the number of terms: `terms * 4 * 2^-24 * bound + 1e-30`.
pub fn assert_within_bound(what: &str, actual: &[f32], reference: &[f64], bound: &[f64], terms: usize) {
    assert_eq!(actual.len(), reference.len(), "{what}: length");
    for i in 0..actual.len() {
        let tol = (terms.max(1) as f64) * 4.0 * f32::EPSILON as f64 / 2.0 * bound[i] + 1e-30;
        let diff = (actual[i] as f64 - reference[i]).abs();
        assert!(diff <= tol, "{what}: index {i}: actual {:e}, expected {:e}, diff {diff:e}, tol {tol:e}", actual[i], reference[i]);
    }
}
