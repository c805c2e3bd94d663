//! Tensor ops on every available backend, with throughput, at small, medium and large sizes.
//!
//! Run with `cargo bench --bench tensor [-- FILTER]` (release; the dev profile is not for timing).
//! Names are `GROUP/BACKEND/SIZE`, e.g. `matmul_f32/wgpu/1024`. Environment:
//! - `AO_BENCH_BACKENDS=cpu,wgpu,cuda`: the backends to run (default: all three); one that cannot
//!   start here (no adapter, no CUDA driver) is skipped with a printed note.
//! - `AO_BENCH_MODE=fast|reproducible`: the determinism mode of those backends (default: fast).
//!   `matmul_f32_reproducible` always measures reproducible matmul next to it.
//!
//! An op a backend answers `Unsupported` (not implemented there yet) is skipped with a printed
//! note, so the suite runs today and picks ops up as they land.
//!
//! What an iteration is (see `ao_gpu_worker::bench`): the op on inputs uploaded once, the free of
//! its output, and a device sync, a read of a 1-element sentinel tensor, which on wgpu waits for
//! every earlier submission on the queue (so the figure is execution, not enqueue) and on CUDA
//! follows the kernel on its stream. `sync/BACKEND/read_1` is that sync alone: subtract it for the
//! kernel time of small ops.
//!
//! Throughput: compute-bound ops (matmul, attention) as elements/s where one element is one FLOP,
//! so criterion's "Gelem/s" reads as GFLOP/s; memory-bound ops and transfers as decimal bytes/s
//! (GB/s), counting each input read and each output written once.
//!
//! Groups: `matmul_f32` (64³, 256³, 1024³ and a batched 8×128³), `matmul_f32_reproducible`,
//! `cpu_gemm_1024` (the CPU backend in fast mode next to `matrixmultiply::sgemm` called directly:
//! the "within 10%" target), `qmatmul` (Q8_0 / Q4_0 / Q4_1 weights × f32, matrix-vector and
//! matrix-matrix), `binary`, `unary`, `softmax`, `norm`, `reduce`, `attention`, `rope`,
//! `gather`, `layout`, `transfer` (upload and read at 1, 16 and 64 MiB), `sync`, and `batch100`
//! (100 small ops one by one versus inside `begin_batch` / `end_batch`).
//!
//! Budget: 10 samples, 0.3 s warm-up and 1 s measurement per benchmark; the whole file takes a few
//! minutes on a 2-core machine with lavapipe.

use std::sync::OnceLock;
use std::time::Duration;

use ao_gpu_worker::bench::{self, Input, Skip, Work, Workload, host};
use ao_gpu_worker::gpu::{Backend, BackendKind, DType, Determinism, RawTensor, ReduceOp, RopeMode, TensorId, TensorOps, UnaryOp};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};

/// The backends under test, each with its name.
struct Backends(Vec<(&'static str, Backend)>);

impl Backends {
    fn start(kinds: &[BackendKind], mode: Determinism) -> Self {
        let mut list = Vec::new();
        for &kind in kinds {
            match Backend::new(kind, mode) {
                Ok(b) => {
                    eprintln!("tensor benches: {kind}: {} [{}]", b.describe(), mode.as_str());
                    list.push((kind.as_str(), b));
                }
                Err(e) => eprintln!("tensor benches: skipping {kind}: {e}"),
            }
        }
        Backends(list)
    }
}

fn kinds_from_env() -> Vec<BackendKind> {
    match std::env::var("AO_BENCH_BACKENDS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .filter_map(|s| {
                let kind = BackendKind::parse(s.trim());
                if kind.is_none() {
                    eprintln!("tensor benches: AO_BENCH_BACKENDS: unknown backend {s:?}");
                }
                kind
            })
            .collect(),
        _ => vec![BackendKind::Cpu, BackendKind::Wgpu, BackendKind::Cuda],
    }
}

fn mode_from_env() -> Determinism {
    std::env::var("AO_BENCH_MODE").ok().and_then(|m| Determinism::parse(m.trim())).unwrap_or(Determinism::Fast)
}

fn throughput(work: Work) -> Throughput {
    match work {
        Work::Flops(n) => Throughput::Elements(n),
        Work::Bytes(n) => Throughput::BytesDecimal(n),
    }
}

/// The plain-text filter given to criterion (`cargo bench --bench tensor -- FILTER`), if any: a
/// benchmark whose full name does not contain it is not even set up (criterion would skip it
/// anyway, after its inputs were made). A filter with regex syntax disables this shortcut.
fn filter() -> &'static Option<String> {
    static FILTER: OnceLock<Option<String>> = OnceLock::new();
    FILTER.get_or_init(|| {
        const WITH_VALUE: [&str; 16] = [
            "--save-baseline",
            "--baseline",
            "--baseline-lenient",
            "--load-baseline",
            "--sample-size",
            "--warm-up-time",
            "--measurement-time",
            "--nresamples",
            "--noise-threshold",
            "--confidence-level",
            "--significance-level",
            "--output-format",
            "--color",
            "--profile-time",
            "--format",
            "--plotting-backend",
        ];
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            if WITH_VALUE.contains(&a.as_str()) || a == "-c" {
                args.next();
            } else if !a.starts_with('-') {
                return Some(a).filter(|f| !f.contains(['.', '*', '+', '?', '(', ')', '[', ']', '{', '}', '|', '^', '$', '\\']));
            }
        }
        None
    })
}

fn wanted(full_name: &str) -> bool {
    filter().as_ref().is_none_or(|f| full_name.contains(f.as_str()))
}

/// Sets up (through `make`) and benchmarks `GROUP/backend/id`, or prints why it is skipped.
fn run(
    g: &mut BenchmarkGroup<'_, WallTime>,
    group: &str,
    backend: &mut Backend,
    name: &str,
    id: &str,
    make: impl FnOnce(&mut Backend) -> Result<Workload, Skip>,
) {
    if !wanted(&format!("{group}/{name}/{id}")) {
        return;
    }
    match make(backend) {
        Ok(w) => {
            g.throughput(throughput(w.work));
            g.bench_function(BenchmarkId::new(name, id), |b| b.iter(|| w.run(backend).expect("a prepared workload runs")));
            w.release(backend);
        }
        Err(skip) => {
            eprintln!("skip {group}/{name}/{id}: {skip}{}", if skip.unsupported { " (not implemented on this backend yet)" } else { "" })
        }
    }
}

/// An elementwise-style workload: one op on f32 inputs, `bytes` moved per run.
fn simple(
    backend: &mut Backend,
    name: String,
    bytes: usize,
    inputs: Vec<Input>,
    op: impl Fn(&mut Backend, &[TensorId]) -> ao_gpu_worker::gpu::Result<TensorId> + 'static,
) -> Result<Workload, Skip> {
    Workload::prepare(backend, name, Work::Bytes(bytes as u64), inputs, move |b, ids| op(b, ids).map(Some))
}

fn f32_input(shape: &[usize], seed: u64) -> Input {
    Input::F32(host(shape, seed))
}

/// Row shapes `[rows, last]` for the row-wise ops: 4K, 256K and 4M elements.
const ROWS: [(usize, usize); 3] = [(16, 256), (256, 1024), (1024, 4096)];
/// Element counts for elementwise ops: 16 KiB, 1 MiB and 16 MiB of f32.
const ELEMENTS: [usize; 3] = [4 << 10, 256 << 10, 4 << 20];

fn matmul_f32(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "matmul_f32";
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for n in [64, 256, 1024] {
            run(&mut g, G, b, name, &n.to_string(), |b| bench::gemm(b, n));
        }
        run(&mut g, G, b, name, "8x128x128x128", |b| bench::matmul(b, 8, 128, 128, 128));
    }
    g.finish();
}

fn matmul_f32_reproducible(c: &mut Criterion, kinds: &[BackendKind]) {
    const G: &str = "matmul_f32_reproducible";
    let kinds: Vec<BackendKind> = kinds.iter().copied().filter(|&k| k != BackendKind::Cuda).collect();
    let mut set = Backends::start(&kinds, Determinism::Reproducible);
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for n in [64, 256] {
            run(&mut g, G, b, name, &n.to_string(), |b| bench::gemm(b, n));
        }
    }
    g.finish();
}

/// The CPU GEMM target: the CPU backend in fast mode against `matrixmultiply::sgemm` called directly
/// into a preallocated output, both 1024³ f32 with the same threading (matrixmultiply's default).
fn cpu_gemm_1024(c: &mut Criterion) {
    const G: &str = "cpu_gemm_1024";
    const N: usize = 1024;
    if !wanted(&format!("{G}/backend_fast")) && !wanted(&format!("{G}/matrixmultiply_sgemm")) {
        return;
    }
    let mut g = c.benchmark_group(G);
    g.throughput(Throughput::Elements(2 * (N * N * N) as u64));
    let mut backend = Backend::new(BackendKind::Cpu, Determinism::Fast).expect("the cpu backend starts");
    let w = bench::gemm(&mut backend, N).expect("cpu gemm");
    g.bench_function("backend_fast", |b| b.iter(|| w.run(&mut backend).expect("cpu gemm runs")));
    w.release(&mut backend);
    let (a, bm) = (bench::values(N * N, 1), bench::values(N * N, 2));
    let mut out = vec![0.0f32; N * N];
    g.bench_function("matrixmultiply_sgemm", |b| {
        b.iter(|| {
            // SAFETY: `a`, `bm` and `out` each hold N*N f32 laid out row-major ([N, N], row stride N,
            // column stride 1), and `out` is not aliased.
            unsafe {
                matrixmultiply::sgemm(
                    N,
                    N,
                    N,
                    1.0,
                    a.as_ptr(),
                    N as isize,
                    1,
                    bm.as_ptr(),
                    N as isize,
                    1,
                    0.0,
                    out.as_mut_ptr(),
                    N as isize,
                    1,
                );
            }
            std::hint::black_box(&out);
        })
    });
    g.finish();
}

fn qmatmul(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "qmatmul";
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            for (m, k, n) in [(1, 1024, 1024), (1, 4096, 4096), (64, 1024, 1024)] {
                run(&mut g, G, b, name, &format!("{dtype}/{m}x{k}x{n}"), |b| bench::qmatmul(b, dtype, m, k, n));
            }
        }
    }
    g.finish();
}

fn binary(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "binary";
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for n in ELEMENTS {
            run(&mut g, G, b, name, &format!("add/{n}"), |b| {
                simple(b, format!("add {n}"), 3 * 4 * n, vec![f32_input(&[n], 1), f32_input(&[n], 2)], |b, ids| b.add(ids[0], ids[1]))
            });
        }
        for n in ELEMENTS {
            let (rows, d) = (n / 1024, 1024);
            run(&mut g, G, b, name, &format!("mul_broadcast/{rows}x{d}"), |b| {
                let inputs = vec![f32_input(&[rows, d], 1), f32_input(&[d], 2)];
                simple(b, format!("mul broadcast {rows}x{d}"), (2 * n + d) * 4, inputs, |b, ids| b.mul(ids[0], ids[1]))
            });
        }
    }
    g.finish();
}

fn unary(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "unary";
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for op in [UnaryOp::Relu, UnaryOp::Gelu, UnaryOp::Exp, UnaryOp::Scale(0.5)] {
            for n in ELEMENTS {
                run(&mut g, G, b, name, &format!("{}/{n}", op.name()), |b| {
                    simple(b, format!("{} {n}", op.name()), 2 * 4 * n, vec![f32_input(&[n], 1)], move |b, ids| b.unary(op, ids[0]))
                });
            }
        }
    }
    g.finish();
}

fn softmax(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "softmax";
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for (rows, last) in ROWS {
            run(&mut g, G, b, name, &format!("{rows}x{last}"), |b| {
                simple(b, format!("softmax {rows}x{last}"), 2 * 4 * rows * last, vec![f32_input(&[rows, last], 1)], |b, ids| {
                    b.softmax_last(ids[0])
                })
            });
        }
    }
    g.finish();
}

fn norm(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "norm";
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for (rows, last) in ROWS {
            let bytes = (2 * rows * last + last) * 4;
            run(&mut g, G, b, name, &format!("rmsnorm/{rows}x{last}"), |b| {
                let inputs = vec![f32_input(&[rows, last], 1), f32_input(&[last], 2)];
                simple(b, format!("rmsnorm {rows}x{last}"), bytes, inputs, |b, ids| b.rmsnorm(ids[0], ids[1], 1e-5))
            });
            run(&mut g, G, b, name, &format!("layernorm/{rows}x{last}"), |b| {
                let inputs = vec![f32_input(&[rows, last], 1), f32_input(&[last], 2), f32_input(&[last], 3)];
                simple(b, format!("layernorm {rows}x{last}"), bytes + last * 4, inputs, |b, ids| b.layernorm(ids[0], ids[1], ids[2], 1e-5))
            });
        }
    }
    g.finish();
}

fn reduce(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "reduce";
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Argmax] {
            for (rows, last) in ROWS {
                run(&mut g, G, b, name, &format!("{}/{rows}x{last}", op.name()), |b| {
                    let bytes = (rows * last + rows) * 4;
                    simple(b, format!("{} {rows}x{last}", op.name()), bytes, vec![f32_input(&[rows, last], 1)], move |b, ids| {
                        b.reduce_last(op, ids[0])
                    })
                });
            }
        }
    }
    g.finish();
}

/// FLOPs of causal attention: per query row `i` (position `pos0 + i`), `min(pos0 + i + 1, tk)` keys,
/// each a `d`-long dot product for the score and a `d`-long accumulation of `v`, per query head.
fn attention_flops(tq: usize, tk: usize, hq: usize, d: usize, pos0: usize) -> u64 {
    let keys: usize = (0..tq).map(|i| (pos0 + i + 1).min(tk)).sum();
    (4 * keys * hq * d) as u64
}

fn attention(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "attention";
    // (label, tq, tk, hq, hkv, d, pos0): a prefill, a longer prefill, one decode step with GQA.
    let cases = [
        ("prefill_128x8x64", 128, 128, 8, 8, 64, 0),
        ("prefill_512x8x64", 512, 512, 8, 8, 64, 0),
        ("decode_1of1024_32x8x128", 1, 1024, 32, 8, 128, 1023),
    ];
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for (label, tq, tk, hq, hkv, d, pos0) in cases {
            run(&mut g, G, b, name, label, |b| {
                let scale = 1.0 / (d as f32).sqrt();
                let inputs = vec![f32_input(&[tq, hq, d], 1), f32_input(&[tk, hkv, d], 2), f32_input(&[tk, hkv, d], 3)];
                let work = Work::Flops(attention_flops(tq, tk, hq, d, pos0));
                Workload::prepare(b, format!("attention {label}"), work, inputs, move |b, ids| {
                    b.attention(ids[0], ids[1], ids[2], pos0 as u32, scale).map(Some)
                })
            });
        }
    }
    g.finish();
}

fn rope(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "rope";
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for (seq, heads, d) in [(1, 32, 128), (128, 32, 128), (512, 32, 128)] {
            run(&mut g, G, b, name, &format!("{seq}x{heads}x{d}"), |b| {
                let bytes = 2 * 4 * seq * heads * d;
                simple(b, format!("rope {seq}x{heads}x{d}"), bytes, vec![f32_input(&[seq, heads, d], 1)], |b, ids| {
                    b.rope(ids[0], 7, 10_000.0, RopeMode::Neox)
                })
            });
        }
    }
    g.finish();
}

fn gather(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "gather";
    let (vocab, d) = (8192, 512);
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for rows in [1, 256] {
            run(&mut g, G, b, name, &format!("{rows}_of_{vocab}x{d}"), |b| {
                let ids: Vec<i32> = (0..rows).map(|i| ((i * 7919) % vocab) as i32).collect();
                let ids = RawTensor::from_i32(vec![rows], &ids).map_err(|e| Skip { reason: e.to_string(), unsupported: false })?;
                let inputs = vec![f32_input(&[vocab, d], 1), Input::Raw(ids)];
                simple(b, format!("gather {rows} of {vocab}x{d}"), 2 * 4 * rows * d, inputs, |b, ids| b.gather_rows(ids[0], ids[1]))
            });
        }
    }
    g.finish();
}

fn layout(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "layout";
    let n = 64 * 64 * 64;
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        run(&mut g, G, b, name, "permute/64x64x64", |b| {
            simple(b, "permute 64^3".to_owned(), 2 * 4 * n, vec![f32_input(&[64, 64, 64], 1)], |b, ids| b.permute(ids[0], &[2, 0, 1]))
        });
        run(&mut g, G, b, name, "concat/64x(64+64)x64", |b| {
            let inputs = vec![f32_input(&[64, 64, 64], 1), f32_input(&[64, 64, 64], 2)];
            simple(b, "concat".to_owned(), 2 * 2 * 4 * n, inputs, |b, ids| b.concat(ids[0], ids[1], 1))
        });
        run(&mut g, G, b, name, "slice/64x64x(32of64)", |b| {
            simple(b, "slice".to_owned(), 4 * n, vec![f32_input(&[64, 64, 64], 1)], |b, ids| b.slice(ids[0], 2, 16, 32))
        });
    }
    g.finish();
}

fn transfer(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "transfer";
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for mib in [1usize, 16, 64] {
            let bytes = mib << 20;
            run(&mut g, G, b, name, &format!("upload/{mib}MiB"), |b| bench::upload(b, bytes));
            run(&mut g, G, b, name, &format!("read/{mib}MiB"), |b| bench::download(b, bytes));
        }
    }
    g.finish();
}

fn sync(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "sync";
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        run(&mut g, G, b, name, "read_1", |b| Workload::prepare(b, "sync", Work::Bytes(4), vec![], |_, _| Ok(None)));
    }
    g.finish();
}

/// 100 `scale` ops on a 64-element tensor, each on the previous result (intermediates freed as the
/// chain goes), then the sync; one by one, and inside `begin_batch` / `end_batch`. Throughput in
/// elements/s where one element is one op.
fn batch100(c: &mut Criterion, set: &mut Backends) {
    const G: &str = "batch100";
    fn chain(b: &mut Backend, x: TensorId) -> ao_gpu_worker::gpu::Result<TensorId> {
        let mut cur = x;
        for _ in 0..100 {
            let next = b.scale(cur, 1.0001)?;
            if cur != x {
                b.free(cur)?;
            }
            cur = next;
        }
        Ok(cur)
    }
    let mut g = c.benchmark_group(G);
    for (name, b) in &mut set.0 {
        for batched in [false, true] {
            run(&mut g, G, b, name, if batched { "batched" } else { "one_by_one" }, |b| {
                Workload::prepare(b, "100 scales", Work::Flops(100), vec![f32_input(&[64], 1)], move |b, ids| {
                    if !batched {
                        return chain(b, ids[0]).map(Some);
                    }
                    b.begin_batch();
                    let out = chain(b, ids[0]);
                    b.end_batch()?;
                    out.map(Some)
                })
            });
        }
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    let (kinds, mode) = (kinds_from_env(), mode_from_env());
    cpu_gemm_1024(&mut c);
    let mut set = Backends::start(&kinds, mode);
    matmul_f32(&mut c, &mut set);
    matmul_f32_reproducible(&mut c, &kinds);
    qmatmul(&mut c, &mut set);
    binary(&mut c, &mut set);
    unary(&mut c, &mut set);
    softmax(&mut c, &mut set);
    norm(&mut c, &mut set);
    reduce(&mut c, &mut set);
    attention(&mut c, &mut set);
    rope(&mut c, &mut set);
    gather(&mut c, &mut set);
    layout(&mut c, &mut set);
    transfer(&mut c, &mut set);
    sync(&mut c, &mut set);
    batch100(&mut c, &mut set);
    c.final_summary();
}
