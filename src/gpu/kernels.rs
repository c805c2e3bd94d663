//! The one kernel registry: every file in `shaders/` (WGSL, wgpu backend) and `kernels/` (CUDA C++,
//! NVRTC) is embedded here with `include_str!`, with its entry points and each entry point's
//! determinism class, and so is every header those files include (`kernels/*.cuh`, [`HEADERS`]).
//! Backends look kernels up by entry-point name; `tests/all/kernels_registered.rs` checks that every
//! file on disk is listed, every listed file exists, and every WGSL file validates.

/// How far a kernel's results can be trusted to match across backends and devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelClass {
    /// Elementwise with IEEE-exact operations (+, -, *, /, max, compare): bitwise equal everywhere.
    Exact,
    /// A fixed sequence of IEEE +, -, * (and /, sqrt where noted) with no FMA contraction, such as a
    /// reduction in a fixed order or the portable exp / tanh / silu / gelu of `gpu`: bitwise equal
    /// between backends that implement the same sequence (CPU, wgpu and CUDA in reproducible mode).
    ReproducibleReduction,
    /// Uses transcendental built-ins (exp, tanh) or a device-chosen order: compare with a tolerance.
    DeviceDependent,
}

/// The language of a kernel file, which decides the backend that compiles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lang {
    Wgsl,
    Cuda,
}

/// One entry point of a kernel file.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub name: &'static str,
    pub class: KernelClass,
}

/// One kernel file: its path relative to the crate root, language, source and entry points.
#[derive(Debug)]
pub struct KernelFile {
    pub path: &'static str,
    pub lang: Lang,
    pub source: &'static str,
    /// WGSL only: the headers of [`HEADERS`] (by path) that go in front of this file after
    /// [`WGSL_PRELUDE`], in this order. CUDA files `#include` theirs.
    pub headers: &'static [&'static str],
    pub entries: &'static [Entry],
}

/// A header that kernel files of one language include by file name (`#include "common.cuh"`). The
/// compilers get it under that name (NVRTC as a named header, see `src/gpu/cuda/compile.rs`), and
/// it is part of every compiled-kernel cache key.
#[derive(Debug)]
pub struct KernelHeader {
    /// Relative to the crate root, such as `kernels/common.cuh`.
    pub path: &'static str,
    pub lang: Lang,
    pub source: &'static str,
}

impl KernelHeader {
    /// The name kernel files include it by: its file name.
    pub fn include_name(&self) -> &'static str {
        self.path.rsplit('/').next().unwrap_or(self.path)
    }
}

/// The WGSL header that goes in front of every WGSL file.
pub const WGSL_PRELUDE: &str = "shaders/common.wgsl";

/// Every header of the kernel files (helpers shared by several files, defined once).
pub static HEADERS: &[KernelHeader] = &[
    KernelHeader { path: "kernels/common.cuh", lang: Lang::Cuda, source: include_str!("../../kernels/common.cuh") },
    // WGSL has no #include: `compiled_source` puts the prelude in front of every WGSL file, and the
    // others in front of the files that name them in `headers`.
    KernelHeader { path: "shaders/common.wgsl", lang: Lang::Wgsl, source: include_str!("../../shaders/common.wgsl") },
    KernelHeader { path: "shaders/quant.wgsl", lang: Lang::Wgsl, source: include_str!("../../shaders/quant.wgsl") },
    KernelHeader { path: "shaders/matmul_common.wgsl", lang: Lang::Wgsl, source: include_str!("../../shaders/matmul_common.wgsl") },
];

/// The headers of language `lang`, in registry order.
pub fn headers(lang: Lang) -> impl Iterator<Item = &'static KernelHeader> {
    HEADERS.iter().filter(move |h| h.lang == lang)
}

/// The registered header at `path`.
pub fn header(path: &str) -> Option<&'static KernelHeader> {
    HEADERS.iter().find(|h| h.path == path)
}

/// The text a backend compiles for `file`. CUDA files include their headers themselves (NVRTC gets
/// them as named headers); WGSL has no `#include`, so [`WGSL_PRELUDE`] comes first, then the
/// file's own `headers`, then the file.
pub fn compiled_source(file: &KernelFile) -> std::borrow::Cow<'static, str> {
    match file.lang {
        Lang::Cuda => std::borrow::Cow::Borrowed(file.source),
        Lang::Wgsl => {
            // Every named header is registered (tests/all/kernels_registered.rs).
            let mut text: String =
                std::iter::once(WGSL_PRELUDE).chain(file.headers.iter().copied()).filter_map(header).map(|h| h.source).collect();
            text.push_str(file.source);
            std::borrow::Cow::Owned(text)
        }
    }
}

const fn e(name: &'static str, class: KernelClass) -> Entry {
    Entry { name, class }
}

use KernelClass::{DeviceDependent, Exact, ReproducibleReduction};

/// The headers of the three matmul files: dequantization, then the matmul parameters and helpers.
const MATMUL_HEADERS: &[&str] = &["shaders/quant.wgsl", "shaders/matmul_common.wgsl"];

/// Every kernel file of the crate. Entry-point names are unique per language.
pub static FILES: &[KernelFile] = &[
    // Matmul: specialized per call with override constants (src/gpu/wgpu/matmul.rs), over one
    // header. Every entry but `mv_split` sums each output over k in index order with a separate
    // multiply and add.
    KernelFile {
        path: "shaders/matmul_cpu.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/matmul_cpu.wgsl"),
        headers: MATMUL_HEADERS,
        // CPU adapters: 8x16 outputs per invocation (64x128 tiles) / few rows, 4 columns each.
        entries: &[e("mm_rb", ReproducibleReduction), e("mv_rb", ReproducibleReduction)],
    },
    KernelFile {
        path: "shaders/matmul_tiled.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/matmul_tiled.wgsl"),
        headers: MATMUL_HEADERS,
        // GPUs: 64x64 tiles staged in workgroup memory.
        entries: &[e("mm_tiled", ReproducibleReduction)],
    },
    KernelFile {
        path: "shaders/matvec.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/matvec.wgsl"),
        headers: MATMUL_HEADERS,
        entries: &[
            // GPUs, m = 1: 64 weight rows staged as words.
            e("mv_staged", ReproducibleReduction),
            // GPUs, fast mode, m = 1: 32 invocations per output and a tree of partial sums.
            e("mv_split", DeviceDependent),
        ],
    },
    KernelFile {
        path: "shaders/convert.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/convert.wgsl"),
        headers: &["shaders/quant.wgsl"],
        entries: &[
            // Integer bit manipulation and single correctly rounded f32 operations.
            e("cast_f32_f16", Exact),
            e("cast_f32_i32", Exact),
            e("cast_i32_f32", Exact),
            // q4_1 decodes as `d * q + m`: bitwise only without FMA contraction.
            e("dequantize", ReproducibleReduction),
            e("gather_rows", ReproducibleReduction),
        ],
    },
    KernelFile {
        path: "shaders/layout.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/layout.wgsl"),
        headers: &[],
        entries: &[e("copy32", Exact), e("copy16", Exact)],
    },
    KernelFile {
        path: "shaders/rope.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/rope.wgsl"),
        headers: &[],
        // The host computes the cos/sin table; the kernel only multiplies and adds (`a * c - b * s`:
        // bitwise only without FMA contraction).
        entries: &[e("rope", ReproducibleReduction)],
    },
    KernelFile {
        path: "shaders/attention.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/attention.wgsl"),
        headers: &[],
        entries: &[
            e("attn_scores", ReproducibleReduction),
            e("attn_softmax_repro", ReproducibleReduction),
            e("attn_softmax_fast", DeviceDependent),
            e("attn_values", ReproducibleReduction),
        ],
    },
    KernelFile {
        path: "shaders/elementwise.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/elementwise.wgsl"),
        headers: &[],
        entries: &[
            e("add", Exact),
            e("sub", Exact),
            e("mul", Exact),
            e("div", Exact),
            e("scale", Exact),
            e("relu", Exact),
            // Fast mode: the device's built-in exp / tanh.
            e("gelu", DeviceDependent),
            e("silu", DeviceDependent),
            e("tanh_op", DeviceDependent),
            e("exp_op", DeviceDependent),
            // Reproducible mode: the portable functions of `gpu` (`repro_gelu`, `repro_silu`,
            // `repro_tanh`, `repro_exp_full`) from +, -, * in a fixed order: bitwise only without FMA
            // contraction.
            e("gelu_repro", ReproducibleReduction),
            e("silu_repro", ReproducibleReduction),
            e("tanh_repro", ReproducibleReduction),
            e("exp_repro", ReproducibleReduction),
        ],
    },
    KernelFile {
        path: "shaders/reduce.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/reduce.wgsl"),
        headers: &[],
        entries: &[
            e("sum_last", ReproducibleReduction),
            e("mean_last", ReproducibleReduction),
            e("max_last", Exact),
            e("argmax_last", Exact),
            e("softmax_repro", ReproducibleReduction),
            e("softmax_fast", DeviceDependent),
        ],
    },
    KernelFile {
        path: "shaders/norm.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/norm.wgsl"),
        headers: &[],
        entries: &[e("rmsnorm", ReproducibleReduction), e("layernorm", ReproducibleReduction)],
    },
    KernelFile {
        path: "kernels/elementwise.cu",
        lang: Lang::Cuda,
        source: include_str!("../../kernels/elementwise.cu"),
        headers: &[],
        entries: &[
            e("add_f32", Exact),
            e("sub_f32", Exact),
            e("mul_f32", Exact),
            e("div_f32", Exact),
            e("scale_f32", Exact),
            e("relu_f32", Exact),
            // Fast mode: the CUDA math library (expf, tanhf).
            e("gelu_f32", DeviceDependent),
            e("silu_f32", DeviceDependent),
            e("tanh_f32", DeviceDependent),
            e("exp_f32", DeviceDependent),
            // Reproducible mode: the portable functions of `gpu`, correctly rounded intrinsics.
            e("gelu_repro_f32", ReproducibleReduction),
            e("silu_repro_f32", ReproducibleReduction),
            e("tanh_repro_f32", ReproducibleReduction),
            e("exp_repro_f32", ReproducibleReduction),
        ],
    },
    // The remaining CUDA files (src/gpu/cuda/, kernels/README.md); they include kernels/common.cuh
    // (`HEADERS`). `_repro` kernels sum in the CPU's order with correctly rounded operations; the
    // others use fmaf and tree reductions.
    KernelFile {
        path: "kernels/matmul.cu",
        lang: Lang::Cuda,
        source: include_str!("../../kernels/matmul.cu"),
        headers: &[],
        entries: &[
            e("matmul_f32", DeviceDependent),
            e("matmul_f32_repro", ReproducibleReduction),
            e("matmul_f16", DeviceDependent),
            e("matmul_f16_repro", ReproducibleReduction),
            e("matmul_q8_0", DeviceDependent),
            e("matmul_q8_0_repro", ReproducibleReduction),
            e("matmul_q4_0", DeviceDependent),
            e("matmul_q4_0_repro", ReproducibleReduction),
            e("matmul_q4_1", DeviceDependent),
            e("matmul_q4_1_repro", ReproducibleReduction),
            e("matvec_f32", DeviceDependent),
            e("matvec_f32_repro", ReproducibleReduction),
            e("matvec_f16", DeviceDependent),
            e("matvec_f16_repro", ReproducibleReduction),
            e("matvec_q8_0", DeviceDependent),
            e("matvec_q8_0_repro", ReproducibleReduction),
            e("matvec_q4_0", DeviceDependent),
            e("matvec_q4_0_repro", ReproducibleReduction),
            e("matvec_q4_1", DeviceDependent),
            e("matvec_q4_1_repro", ReproducibleReduction),
        ],
    },
    KernelFile {
        path: "kernels/reduce.cu",
        lang: Lang::Cuda,
        source: include_str!("../../kernels/reduce.cu"),
        headers: &[],
        entries: &[
            e("sum_last_f32", ReproducibleReduction),
            e("mean_last_f32", ReproducibleReduction),
            e("sum_last_fast_f32", DeviceDependent),
            e("mean_last_fast_f32", DeviceDependent),
            e("max_last_f32", Exact),
            e("argmax_last_i32", Exact),
            e("softmax_repro_f32", ReproducibleReduction),
            e("softmax_fast_f32", DeviceDependent),
        ],
    },
    KernelFile {
        path: "kernels/norm.cu",
        lang: Lang::Cuda,
        source: include_str!("../../kernels/norm.cu"),
        headers: &[],
        entries: &[
            e("rmsnorm_f32", ReproducibleReduction),
            e("layernorm_f32", ReproducibleReduction),
            e("rmsnorm_fast_f32", DeviceDependent),
            e("layernorm_fast_f32", DeviceDependent),
        ],
    },
    KernelFile {
        path: "kernels/cast.cu",
        lang: Lang::Cuda,
        source: include_str!("../../kernels/cast.cu"),
        headers: &[],
        entries: &[
            e("cast_f32_f16", Exact),
            e("cast_f32_i32", Exact),
            e("cast_i32_f32", Exact),
            e("cast_f16_f32", Exact),
            // `d * q + m` for q4_1: bitwise only without FMA contraction (correctly rounded intrinsics).
            e("dequantize_q8_0", Exact),
            e("dequantize_q4_0", Exact),
            e("dequantize_q4_1", ReproducibleReduction),
            e("quantize_q8_0", ReproducibleReduction),
            e("quantize_q4_0", ReproducibleReduction),
            e("quantize_q4_1", ReproducibleReduction),
        ],
    },
    KernelFile {
        path: "kernels/gather.cu",
        lang: Lang::Cuda,
        source: include_str!("../../kernels/gather.cu"),
        headers: &[],
        entries: &[
            e("check_ids_i32", Exact),
            e("gather_rows_f32", Exact),
            e("gather_rows_f16", Exact),
            e("gather_rows_q8_0", Exact),
            e("gather_rows_q4_0", Exact),
            e("gather_rows_q4_1", ReproducibleReduction),
        ],
    },
    KernelFile {
        path: "kernels/layout.cu",
        lang: Lang::Cuda,
        source: include_str!("../../kernels/layout.cu"),
        headers: &[],
        entries: &[e("permute_b32", Exact), e("permute_b16", Exact), e("copy_rows_b32", Exact), e("copy_rows_b16", Exact)],
    },
    KernelFile {
        path: "kernels/rope.cu",
        lang: Lang::Cuda,
        source: include_str!("../../kernels/rope.cu"),
        headers: &[],
        // Host-computed (cos, sin) table; `x0 * c - x1 * s` with correctly rounded intrinsics.
        entries: &[e("rope_f32", ReproducibleReduction)],
    },
    KernelFile {
        path: "kernels/attention.cu",
        lang: Lang::Cuda,
        source: include_str!("../../kernels/attention.cu"),
        headers: &[],
        entries: &[e("attention_f32", DeviceDependent), e("attention_f32_repro", ReproducibleReduction)],
    },
];

/// The file that defines entry point `name` in language `lang`.
pub fn file_of(lang: Lang, name: &str) -> Option<&'static KernelFile> {
    FILES.iter().find(|f| f.lang == lang && f.entries.iter().any(|e| e.name == name))
}

/// The declared class of entry point `name` in language `lang`.
pub fn class_of(lang: Lang, name: &str) -> Option<KernelClass> {
    FILES.iter().filter(|f| f.lang == lang).flat_map(|f| f.entries).find(|e| e.name == name).map(|e| e.class)
}
