//! The one kernel registry: every file in `shaders/` (WGSL, wgpu backend) and `kernels/` (CUDA C++,
//! NVRTC) is embedded here with `include_str!`, with its entry points and each entry point's
//! determinism class. Backends look kernels up by entry-point name; `tests/kernels_registered.rs`
//! checks that every file on disk is listed, every listed file exists, and every WGSL file validates.

/// How far a kernel's results can be trusted to match across backends and devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelClass {
    /// Elementwise with IEEE-exact operations (+, -, *, /, max, compare): bitwise equal everywhere.
    Exact,
    /// A reduction in a fixed order with no FMA contraction: bitwise equal between backends that
    /// implement the same order (CPU and wgpu in reproducible mode).
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
    pub entries: &'static [Entry],
}

const fn e(name: &'static str, class: KernelClass) -> Entry {
    Entry { name, class }
}

use KernelClass::{DeviceDependent, Exact, ReproducibleReduction};

/// Every kernel file of the crate. Entry-point names are unique per language.
pub static FILES: &[KernelFile] = &[
    KernelFile {
        path: "shaders/matmul.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/matmul.wgsl"),
        entries: &[
            // One thread per output, k in order: the reproducible kernel.
            e("matmul_naive", ReproducibleReduction),
            // 64x64 output tiles, 4x4 per thread; each output still sums k in order, so on devices
            // without FMA contraction it also matches, but it is only promised within a tolerance.
            e("matmul_tiled", DeviceDependent),
        ],
    },
    KernelFile {
        path: "shaders/elementwise.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/elementwise.wgsl"),
        entries: &[
            e("add", Exact),
            e("sub", Exact),
            e("mul", Exact),
            e("div", Exact),
            e("scale", Exact),
            e("relu", Exact),
            e("gelu", DeviceDependent),
            e("silu", DeviceDependent),
            e("tanh_op", DeviceDependent),
            e("exp_op", DeviceDependent),
        ],
    },
    KernelFile {
        path: "shaders/reduce.wgsl",
        lang: Lang::Wgsl,
        source: include_str!("../../shaders/reduce.wgsl"),
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
        entries: &[e("rmsnorm", ReproducibleReduction), e("layernorm", ReproducibleReduction)],
    },
    KernelFile {
        path: "kernels/elementwise.cu",
        lang: Lang::Cuda,
        source: include_str!("../../kernels/elementwise.cu"),
        entries: &[
            e("add_f32", Exact),
            e("sub_f32", Exact),
            e("mul_f32", Exact),
            e("div_f32", Exact),
            e("scale_f32", Exact),
            e("relu_f32", Exact),
            e("gelu_f32", DeviceDependent),
            e("silu_f32", DeviceDependent),
            e("tanh_f32", DeviceDependent),
            e("exp_f32", DeviceDependent),
        ],
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
