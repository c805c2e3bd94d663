//! Matmul kernel selection for the wgpu backend: which entry point of [`FILES`] runs a call, with which override constants, on which grid. Every combination of constants is its own
//! pipeline (no per-element branch on the dtype or layout is left in the kernels), compiled on first
//! use and cached for the life of the backend.
//!
//! Two kernel sets, chosen from the adapter type ([`MatmulKernels::for_adapter`]):
//! * [`MatmulKernels::Cpu`] (lavapipe and other CPU adapters): `mm_rb` (8 x 16 outputs per
//!   invocation, direct 16-byte loads, quantized tiles decoded into workgroup memory) and, for fewer
//!   than [`SMALL_M`] rows, `mv_rb` (1, 2 or 4 rows x 4 columns per invocation, quantized blocks
//!   decoded in registers).
//! * [`MatmulKernels::Gpu`]: `mm_tiled` (64 x 64 tiles staged in workgroup memory with coalesced
//!   loads); for m = 1 with `transpose_b`, `mv_staged` (reproducible: 64 weight rows staged as words,
//!   one invocation per output) or `mv_split` (fast: 32 invocations per output and a tree); for m = 1
//!   without it, `mv_rb` (consecutive invocations read consecutive columns).
//!
//! All of them but `mv_split` sum every output over k in index order with a separate multiply and
//! add, so both sets give the CPU reference's bits in reproducible mode (on devices that do not fuse
//! the multiply-add).

use std::collections::HashMap;

use super::super::kernels::{KernelFile, compiled_source};
use super::super::shape::MatmulDims;
use super::super::{DType, Determinism, Result};
use super::stream::{Gpu, Kernel, device_err};

/// Below this many rows of `op(a)` the CPU set uses `mv_rb` (measured on lavapipe: `mm_rb` computes
/// 64-row tiles, so it wastes most of its work on a few rows).
const SMALL_M: usize = 16;

/// The kernel set the backend dispatches matmuls to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulKernels {
    /// Register-blocked kernels with direct loads, for CPU adapters (lavapipe).
    Cpu,
    /// Kernels with tiles staged in workgroup memory and coalesced loads, for GPUs.
    Gpu,
}

impl MatmulKernels {
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Self {
        if info.device_type == wgpu::DeviceType::Cpu { Self::Cpu } else { Self::Gpu }
    }
}

/// An entry point with its override constants (see the top of `shaders/matmul_common.wgsl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Variant {
    pub entry: &'static str,
    pub ta: bool,
    pub tb: bool,
    pub dtype: u32,
    pub av: bool,
    pub bv: bool,
    pub rows: u32,
}

/// One dispatch: the pipeline and the workgroup grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    pub variant: Variant,
    pub groups: [u32; 3],
}

fn groups3(x: usize, y: usize, z: usize) -> [u32; 3] {
    // Dimensions past u32 are refused by the dispatch's size check like any other too-large grid.
    [x, y, z].map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

/// The kernel, constants and grid for a matmul with weight dtype `dtype` (`d.m * d.n > 0`).
pub(super) fn plan(set: MatmulKernels, det: Determinism, d: &MatmulDims, dtype: DType, gpu: &Gpu) -> Plan {
    let (m, n, k, batch) = (d.m, d.n, d.k, d.batch);
    // With one row, a^T ([k, 1]) is laid out like a ([1, k]).
    let ta = d.transpose_a && m > 1;
    let tb = d.transpose_b;
    // 16-byte loads along each operand's contiguous axis start at multiples of 4 elements (the
    // kernels load from multiples of 4 along that axis and batch offsets are whole matrices).
    let av = if ta { m % 4 == 0 } else { k % 4 == 0 };
    let bv = !dtype.is_quantized() && if tb { k % 4 == 0 } else { n % 4 == 0 };
    let variant = |entry, rows| Variant { entry, ta, tb, dtype: dtype.code() as u32, av, bv, rows };
    let mv_rb =
        |rows: usize| Plan { variant: variant("mv_rb", rows as u32), groups: gpu.grid(batch * m.div_ceil(rows) * n.div_ceil(4), 64) };
    match set {
        MatmulKernels::Cpu if m < SMALL_M => mv_rb(match m {
            1 => 1,
            2 => 2,
            _ => 4,
        }),
        MatmulKernels::Cpu => Plan { variant: variant("mm_rb", 1), groups: groups3(n.div_ceil(128), m.div_ceil(64), batch) },
        MatmulKernels::Gpu if m == 1 && tb => match det {
            Determinism::Reproducible => Plan { variant: variant("mv_staged", 1), groups: gpu.grid(batch * n, 64) },
            Determinism::Fast => Plan { variant: variant("mv_split", 1), groups: gpu.grid(batch * n, 8) },
        },
        MatmulKernels::Gpu if m == 1 => mv_rb(1),
        MatmulKernels::Gpu => Plan { variant: variant("mm_tiled", 1), groups: groups3(n.div_ceil(64), m.div_ceil(64), batch) },
    }
}

/// The kernel files of the matmul entry points (over `shaders/matmul_common.wgsl`).
pub(super) const FILES: [&str; 3] = ["shaders/matmul_cpu.wgsl", "shaders/matmul_tiled.wgsl", "shaders/matvec.wgsl"];

/// The matmul shader modules and the pipelines compiled from them so far.
pub(super) struct MatmulPipelines {
    pub set: MatmulKernels,
    /// The module of each entry point.
    modules: HashMap<&'static str, wgpu::ShaderModule>,
    files: Vec<&'static str>,
    cache: HashMap<Variant, Kernel>,
}

impl MatmulPipelines {
    pub fn new(set: MatmulKernels) -> Self {
        Self { set, modules: HashMap::new(), files: Vec::new(), cache: HashMap::new() }
    }

    /// Compiles the module of `file`, one of [`FILES`] (validation errors go to the caller's error scope).
    pub fn add(&mut self, device: &wgpu::Device, file: &KernelFile) {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(file.path),
            source: wgpu::ShaderSource::Wgsl(compiled_source(file)),
        });
        for entry in file.entries {
            self.modules.insert(entry.name, module.clone());
        }
        self.files.push(file.path);
    }

    /// Itself once every file of [`FILES`] is added.
    pub fn complete(self) -> Result<Self> {
        match FILES.iter().find(|path| !self.files.contains(path)) {
            Some(path) => Err(device_err(format!("{path} is not registered"))),
            None => Ok(self),
        }
    }

    /// The pipeline for `v`, compiled now if it is new.
    pub fn get(&mut self, gpu: &Gpu, v: Variant) -> Result<&Kernel> {
        if !self.cache.contains_key(&v) {
            let flag = |b: bool| if b { 1.0 } else { 0.0 };
            let constants = [
                ("TA", flag(v.ta)),
                ("TB", flag(v.tb)),
                ("DT", f64::from(v.dtype)),
                ("AV", flag(v.av)),
                ("BV", flag(v.bv)),
                ("ROWS", f64::from(v.rows)),
            ];
            let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
            let pipeline = gpu.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(v.entry),
                layout: None,
                module: self.modules.get(v.entry).ok_or_else(|| device_err(format!("no matmul kernel {}", v.entry)))?,
                entry_point: Some(v.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    // Every kernel writes the workgroup memory it reads before a barrier.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
            let layout = pipeline.get_bind_group_layout(0);
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(device_err(format!("compiling matmul kernel {v:?} on {}: {e}", gpu.info.name)));
            }
            self.cache.insert(v, Kernel { pipeline, layout });
        }
        self.cache.get(&v).ok_or_else(|| device_err("matmul pipeline cache"))
    }
}
