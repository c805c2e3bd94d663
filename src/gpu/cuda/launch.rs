//! Host-side launch preparation for the CUDA kernels, free of any CUDA call so it is unit-tested everywhere:
//! the parameter structs that mirror the C structs in `kernels/*.cu`, launch geometry, the NVRTC
//! target for a device, and the row-major to column-major mapping of cuBLAS GEMM calls.

use crate::gpu::shape::{Broadcast, MatmulDims};

/// Threads per block of every kernel (the kernels' shared-memory sizes assume it).
pub(crate) const BLOCK: u32 = 256;

/// The most blocks a launch asks for. Every kernel is a grid-stride loop, so fewer blocks than
/// work items is always correct; this cap keeps `index + gridDim * blockDim` below 2^32 for the
/// u32 index arithmetic of the kernels (tensors stay below 2^30 elements).
pub(crate) const MAX_GRID: u32 = 1 << 20;

/// Warps (outputs) per block of the matrix-vector kernels.
pub(crate) const MATVEC_OUTPUTS_PER_BLOCK: usize = (BLOCK / 32) as usize;

/// Output tile of the tiled matmul kernels (`BM` x `BN` in kernels/matmul.cu).
pub(crate) const MATMUL_TILE: usize = 128;

/// Blocks for `items` work items at `per_block` items per block: at least 1, at most [`MAX_GRID`].
pub(crate) fn grid_for(items: usize, per_block: usize) -> u32 {
    let blocks = items.div_ceil(per_block.max(1));
    blocks.clamp(1, MAX_GRID as usize) as u32
}

/// Blocks for a tiled matmul: one per (batch, 128 x 128 output tile).
pub(crate) fn matmul_grid(d: &MatmulDims) -> u32 {
    let tiles = d.m.div_ceil(MATMUL_TILE) * d.n.div_ceil(MATMUL_TILE);
    grid_for(d.batch.saturating_mul(tiles), 1)
}

/// A tensor dimension or index as the kernels' u32 (shapes are checked to stay below 2^30
/// elements before they reach a kernel, so this never truncates).
pub(crate) fn u32_of(v: usize) -> u32 {
    debug_assert!(v <= u32::MAX as usize, "{v} does not fit a kernel's u32");
    v as u32
}

/// Plain-old-data kernel parameters.
///
/// # Safety
/// Implementors are `repr(C)`, contain only `u32` / `f32` fields (no padding, every bit pattern
/// valid) and match their C struct in `kernels/*.cu` field for field.
pub(crate) unsafe trait Pod: Copy {}

/// The bytes of a parameter struct, as the kernel receives them.
pub(crate) fn bytes_of<T: Pod>(t: &T) -> &[u8] {
    // SAFETY: `T: Pod` is repr(C) without padding, so all `size_of::<T>()` bytes are initialized.
    unsafe { std::slice::from_raw_parts((t as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// `struct Broadcast4` in kernels/elementwise.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Broadcast4 {
    pub d1: u32,
    pub d2: u32,
    pub d3: u32,
    pub a_strides: [u32; 4],
    pub b_strides: [u32; 4],
}
// SAFETY: repr(C), u32 fields only, as the C struct.
unsafe impl Pod for Broadcast4 {}

impl Broadcast4 {
    pub fn new(bc: &Broadcast) -> Self {
        Self {
            d1: u32_of(bc.out4[1]),
            d2: u32_of(bc.out4[2]),
            d3: u32_of(bc.out4[3]),
            a_strides: bc.a_strides.map(u32_of),
            b_strides: bc.b_strides.map(u32_of),
        }
    }
}

/// `struct MatmulParams` in kernels/matmul.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MatmulParams {
    pub batch: u32,
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub stride_a: u32,
    pub stride_b: u32,
    pub ta: u32,
    pub tb: u32,
}
// SAFETY: repr(C), u32 fields only, as the C struct.
unsafe impl Pod for MatmulParams {}

impl MatmulParams {
    pub fn new(d: &MatmulDims) -> Self {
        Self {
            batch: u32_of(d.batch),
            m: u32_of(d.m),
            n: u32_of(d.n),
            k: u32_of(d.k),
            stride_a: u32_of(d.stride_a),
            stride_b: u32_of(d.stride_b),
            ta: d.transpose_a as u32,
            tb: d.transpose_b as u32,
        }
    }
}

/// `struct GatherParams` in kernels/gather.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GatherParams {
    pub n_ids: u32,
    pub vocab: u32,
    pub dim: u32,
}
// SAFETY: repr(C), u32 fields only, as the C struct.
unsafe impl Pod for GatherParams {}

/// `struct RopeParams` in kernels/rope.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RopeParams {
    pub pairs: u32,
    pub seq: u32,
    pub heads: u32,
    pub dim: u32,
    /// 0 interleaved, 2 NeoX (GGML's numbering, as `RopeMode::from_code`).
    pub mode: u32,
}
// SAFETY: repr(C), u32 fields only, as the C struct.
unsafe impl Pod for RopeParams {}

/// `struct AttnParams` in kernels/attention.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AttnParams {
    pub batch: u32,
    pub tq: u32,
    pub tk: u32,
    pub hq: u32,
    pub hkv: u32,
    pub dim: u32,
    pub pos0: u32,
    pub scale: f32,
}
// SAFETY: repr(C), u32 / f32 fields only, as the C struct.
unsafe impl Pod for AttnParams {}

/// `struct PermuteParams` in kernels/layout.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PermuteParams {
    pub n: u32,
    pub d1: u32,
    pub d2: u32,
    pub d3: u32,
    pub strides: [u32; 4],
}
// SAFETY: repr(C), u32 fields only, as the C struct.
unsafe impl Pod for PermuteParams {}

impl PermuteParams {
    /// Output element (i0..i3) of `permute(x, axes)` (padded to 4-D) reads x at
    /// `sum(i_k * strides[k])`: output axis k is input axis `axes[k]`.
    pub fn new(x_shape: &[usize], axes: &[usize]) -> Self {
        let in_strides = crate::gpu::shape::strides(x_shape);
        let pad = 4 - axes.len();
        let (mut dims, mut strides) = ([1usize; 4], [0usize; 4]);
        for (k, &a) in axes.iter().enumerate() {
            dims[pad + k] = x_shape[a];
            strides[pad + k] = in_strides[a];
        }
        Self {
            n: u32_of(dims.iter().product()),
            d1: u32_of(dims[1]),
            d2: u32_of(dims[2]),
            d3: u32_of(dims[3]),
            strides: strides.map(u32_of),
        }
    }
}

/// `struct CopyParams` in kernels/layout.cu: `outer` runs of `row` contiguous elements.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CopyParams {
    pub outer: u32,
    pub row: u32,
    pub src_stride: u32,
    pub src_offset: u32,
    pub dst_stride: u32,
    pub dst_offset: u32,
}
// SAFETY: repr(C), u32 fields only, as the C struct.
unsafe impl Pod for CopyParams {}

/// What NVRTC compiles the kernels to for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    /// Machine code for exactly this architecture (`sm_XY`): no JIT at load time, and no
    /// dependence on the driver accepting this NVRTC's PTX version.
    Cubin(u32),
    /// PTX for an older virtual architecture (`compute_XY`), JIT-compiled by the driver: for a
    /// device newer than this NVRTC knows.
    Ptx(u32),
}

impl Target {
    /// The value of NVRTC's `--gpu-architecture`.
    pub fn arch(self) -> String {
        match self {
            Target::Cubin(a) => format!("sm_{a}"),
            Target::Ptx(a) => format!("compute_{a}"),
        }
    }
}

/// The target for a device of compute capability `major.minor` given the architectures this
/// NVRTC supports (`nvrtcGetSupportedArchs`, such as `[75, 80, 86, 89, 90, 100, 120]`): its own
/// architecture when listed, else PTX for the newest listed one below it; `None` when the device
/// is older than everything NVRTC supports.
pub(crate) fn choose_target(major: i32, minor: i32, supported: &[i32]) -> Option<Target> {
    let own = major.checked_mul(10)?.checked_add(minor)?;
    if supported.contains(&own) {
        return u32::try_from(own).ok().map(Target::Cubin);
    }
    supported.iter().copied().filter(|&a| a < own).max().and_then(|a| u32::try_from(a).ok()).map(Target::Ptx)
}

/// One cuBLAS `sgemm_strided_batched` call computing a row-major batched matmul.
///
/// cuBLAS is column-major, and a row-major `[r, c]` matrix is the column-major `[c, r]` matrix with
/// the same bytes. So row-major `C = op(A) @ op(B)` is column-major `C^T = op(B)^T @ op(A)^T`:
/// cuBLAS's first operand is our `B`, its second our `A`, its `m` our `n` and its `n` our `m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmPlan {
    /// Transpose cuBLAS's first operand (our `B`).
    pub trans_first: bool,
    /// Transpose cuBLAS's second operand (our `A`).
    pub trans_second: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub ld_first: i32,
    pub ld_second: i32,
    pub ldc: i32,
    pub stride_first: i64,
    pub stride_second: i64,
    pub stride_c: i64,
    pub batch: i32,
}

/// The cuBLAS call for `d` (k > 0, m > 0, n > 0), or `None` when a size does not fit cuBLAS's
/// 32-bit integers.
pub(crate) fn gemm_plan(d: &MatmulDims) -> Option<GemmPlan> {
    let i = |v: usize| i32::try_from(v).ok();
    let l = |v: usize| i64::try_from(v).ok();
    Some(GemmPlan {
        // Our B is [k, n] (col-major [n, k], ld n: already op(B)^T) or, transposed, [n, k]
        // (col-major [k, n], ld k: transpose it).
        trans_first: d.transpose_b,
        // Our A is [m, k] (col-major [k, m], ld k: already op(A)^T) or, transposed, [k, m]
        // (col-major [m, k], ld m: transpose it).
        trans_second: d.transpose_a,
        m: i(d.n)?,
        n: i(d.m)?,
        k: i(d.k)?,
        ld_first: i(if d.transpose_b { d.k } else { d.n })?,
        ld_second: i(if d.transpose_a { d.m } else { d.k })?,
        ldc: i(d.n)?,
        stride_first: l(d.stride_b)?,
        stride_second: l(d.stride_a)?,
        stride_c: l(d.m.checked_mul(d.n)?)?,
        batch: i(d.batch)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::{FILES, Lang};
    use crate::gpu::shape::{broadcast, matmul_dims};

    #[test]
    fn grids_cover_the_work_and_stay_capped() {
        assert_eq!(grid_for(0, 256), 1);
        assert_eq!(grid_for(1, 256), 1);
        assert_eq!(grid_for(256, 256), 1);
        assert_eq!(grid_for(257, 256), 2);
        assert_eq!(grid_for(5, 1), 5);
        assert_eq!(grid_for(usize::MAX, 1), MAX_GRID);
        assert_eq!(grid_for(3, 0), 3, "a zero divisor is treated as 1");
        // Largest index a thread reaches plus one stride stays below 2^32 for tensors < 2^30.
        assert!((1u64 << 30) + MAX_GRID as u64 * BLOCK as u64 <= u32::MAX as u64);
        let (d, _) = matmul_dims(&[3, 200, 70], &[70, 300], false, false).unwrap();
        assert_eq!(matmul_grid(&d), 3 * 2 * 3);
        let (d, _) = matmul_dims(&[1, 64], &[64, 1], false, false).unwrap();
        assert_eq!(matmul_grid(&d), 1);
    }

    #[test]
    fn params_have_no_padding() {
        use std::mem::size_of;
        assert_eq!(size_of::<Broadcast4>(), 11 * 4);
        assert_eq!(size_of::<MatmulParams>(), 8 * 4);
        assert_eq!(size_of::<GatherParams>(), 3 * 4);
        assert_eq!(size_of::<RopeParams>(), 5 * 4);
        assert_eq!(size_of::<AttnParams>(), 8 * 4);
        assert_eq!(size_of::<PermuteParams>(), 8 * 4);
        assert_eq!(size_of::<CopyParams>(), 6 * 4);
        let p = GatherParams { n_ids: 1, vocab: 2, dim: 0x0403_0201 };
        assert_eq!(bytes_of(&p), &[1, 0, 0, 0, 2, 0, 0, 0, 1, 2, 3, 4]);
    }

    /// Each Rust parameter struct has as many 4-byte words as its C struct in kernels/*.cu
    /// (u32 / float fields, arrays counted by length).
    #[test]
    fn params_match_the_c_structs() {
        let sizes: &[(&str, usize)] = &[
            ("Broadcast4", std::mem::size_of::<Broadcast4>()),
            ("MatmulParams", std::mem::size_of::<MatmulParams>()),
            ("GatherParams", std::mem::size_of::<GatherParams>()),
            ("RopeParams", std::mem::size_of::<RopeParams>()),
            ("AttnParams", std::mem::size_of::<AttnParams>()),
            ("PermuteParams", std::mem::size_of::<PermuteParams>()),
            ("CopyParams", std::mem::size_of::<CopyParams>()),
        ];
        for &(name, size) in sizes {
            let mut found = 0;
            for f in FILES.iter().filter(|f| f.lang == Lang::Cuda) {
                let Some(start) = f.source.find(&format!("struct {name} {{")) else { continue };
                let body = &f.source[start..];
                let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
                let mut words = 0;
                for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
                    let decl = decl.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join(" ");
                    let mut parts = decl.split_whitespace();
                    let ty = parts.next().unwrap();
                    assert!(matches!(ty, "u32" | "float"), "{}: {name} has a field of type {ty}", f.path);
                    for var in decl[ty.len()..].split(',') {
                        let var = var.trim();
                        words += match var.find('[') {
                            Some(b) => var[b + 1..var.len() - 1].parse::<usize>().unwrap(),
                            None => 1,
                        };
                    }
                }
                assert_eq!(words * 4, size, "{}: struct {name}", f.path);
                found += 1;
            }
            assert!(found >= 1, "struct {name} is not in any kernel file");
        }
    }

    #[test]
    fn broadcast_and_permute_params() {
        let bc = broadcast("add", &[2, 1, 3], &[4, 1]).unwrap();
        let p = Broadcast4::new(&bc);
        assert_eq!((p.d1, p.d2, p.d3), (2, 4, 3));
        assert_eq!(p.a_strides, [0, 3, 0, 1]);
        assert_eq!(p.b_strides, [0, 0, 1, 0]);
        // x [2, 3, 4], axes [2, 0, 1] -> out [4, 2, 3]; out axis 0 walks x's axis 2 (stride 1).
        let p = PermuteParams::new(&[2, 3, 4], &[2, 0, 1]);
        assert_eq!((p.n, p.d1, p.d2, p.d3), (24, 4, 2, 3));
        assert_eq!(p.strides, [0, 1, 12, 4]);
    }

    #[test]
    fn targets() {
        let archs = [50, 52, 60, 70, 75, 80, 86, 89, 90, 100, 120];
        assert_eq!(choose_target(9, 0, &archs), Some(Target::Cubin(90)));
        assert_eq!(choose_target(8, 9, &archs), Some(Target::Cubin(89)));
        // A device newer than this NVRTC: PTX for the newest older architecture, JIT by the driver.
        assert_eq!(choose_target(12, 1, &archs), Some(Target::Ptx(120)));
        assert_eq!(choose_target(8, 7, &archs), Some(Target::Ptx(86)));
        assert_eq!(choose_target(3, 5, &archs), None);
        assert_eq!(Target::Cubin(90).arch(), "sm_90");
        assert_eq!(Target::Ptx(120).arch(), "compute_120");
    }

    /// A column-major strided-batched SGEMM, as cuBLAS defines it, in f64.
    fn colmajor_gemm(p: &GemmPlan, first: &[f64], second: &[f64], c: &mut [f64]) {
        for bi in 0..p.batch as usize {
            let (f0, s0, c0) = (bi * p.stride_first as usize, bi * p.stride_second as usize, bi * p.stride_c as usize);
            for i in 0..p.m as usize {
                for j in 0..p.n as usize {
                    let mut acc = 0.0;
                    for l in 0..p.k as usize {
                        // Column-major element (row, col) of a matrix with leading dimension ld is row + col * ld.
                        let a =
                            if p.trans_first { first[f0 + l + i * p.ld_first as usize] } else { first[f0 + i + l * p.ld_first as usize] };
                        let b = if p.trans_second {
                            second[s0 + j + l * p.ld_second as usize]
                        } else {
                            second[s0 + l + j * p.ld_second as usize]
                        };
                        acc += a * b;
                    }
                    c[c0 + i + j * p.ldc as usize] = acc;
                }
            }
        }
    }

    /// The cuBLAS plan, run through a column-major GEMM, gives the row-major matmul.
    #[test]
    fn gemm_plan_computes_the_row_major_product() {
        let cases: &[(&[usize], &[usize], bool, bool)] = &[
            (&[3, 5], &[5, 7], false, false),
            (&[5, 3], &[5, 7], true, false),
            (&[3, 5], &[7, 5], false, true),
            (&[5, 3], &[7, 5], true, true),
            (&[2, 4, 6], &[2, 6, 3], false, false),
            (&[2, 6, 4], &[3, 6], true, true),
            (&[4, 6], &[3, 6, 2], false, false),
        ];
        for (case, &(sa, sb, ta, tb)) in cases.iter().enumerate() {
            let (d, out_shape) = matmul_dims(sa, sb, ta, tb).unwrap();
            let a: Vec<f64> = (0..sa.iter().product::<usize>()).map(|i| ((i * 7 + case) % 11) as f64 - 5.0).collect();
            let b: Vec<f64> = (0..sb.iter().product::<usize>()).map(|i| ((i * 5 + 3) % 13) as f64 - 6.0).collect();
            let mut want = vec![0.0; out_shape.iter().product()];
            for bi in 0..d.batch {
                for i in 0..d.m {
                    for j in 0..d.n {
                        let mut acc = 0.0;
                        for p in 0..d.k {
                            let av = if ta { a[bi * d.stride_a + p * d.m + i] } else { a[bi * d.stride_a + i * d.k + p] };
                            let bv = if tb { b[bi * d.stride_b + j * d.k + p] } else { b[bi * d.stride_b + p * d.n + j] };
                            acc += av * bv;
                        }
                        want[bi * d.m * d.n + i * d.n + j] = acc;
                    }
                }
            }
            let plan = gemm_plan(&d).unwrap();
            let mut got = vec![f64::NAN; want.len()];
            colmajor_gemm(&plan, &b, &a, &mut got);
            assert_eq!(got, want, "{sa:?} {ta} @ {sb:?} {tb}: {plan:?}");
        }
    }
}
