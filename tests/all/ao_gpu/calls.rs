//! Calls that work: upload, ops and read-back against the CPU, every dtype, the layout, gather,
//! rotary and attention ops, handles and tensors that live for one evaluation, imports checked at
//! load, and the same actor on wgpu.

use ao_gpu_worker::gpu::{HostTensor, RopeMode, TensorOps};

use super::*;
use crate::support::reference::{Tol, assert_close};

/// Uploads A and B, multiplies, reads back, and runs every other op on A (or the product),
/// reading each result: statuses in slots 0..16, the product at 16..24, shape at 24..28 and rank 28,
/// then the op results from 32.
fn ops_actor() -> Vec<u8> {
    let mut body = String::new();
    body += &status(0, &upload_a(0));
    body += &status(1, &upload_b(1));
    body += &status(2, &format!("(call $matmul {} {} (i32.const 0) (i32.const 0) (i32.const {}))", load(0), load(1), h(2)));
    body += &status(3, &format!("(call $read_f32 {} (i32.const {}) (i32.const 8))", load(2), OUT + 4 * 16));
    body += &status(4, &format!("(call $shape {} (i32.const {}) (i32.const {}))", load(2), OUT + 4 * 24, OUT + 4 * 28));
    // Elementwise and row ops on the 2x4 product (slot 2); results in handle slots 3.. and read to 32 + 8 * i.
    let ops = [
        format!("(call $binary (i32.const 2) {} {} (i32.const {}))", load(2), load(2), h(3)),
        format!("(call $unary (i32.const 1) {} (i32.const {}))", load(2), h(4)),
        format!("(call $scale {} (f32.const 0.5) (i32.const {}))", load(2), h(5)),
        format!("(call $softmax {} (i32.const {}))", load(2), h(6)),
        format!("(call $reduce (i32.const 3) {} (i32.const {}))", load(2), h(7)),
    ];
    for (i, op) in ops.iter().enumerate() {
        let i = i as u32;
        body += &status(5 + i, op);
        body += &status(10 + i, &format!("(call $read_f32 {} (i32.const {}) (i32.const 8))", load(3 + i), OUT + 4 * (32 + 8 * i)));
    }
    body += &format!("(call $respond (i32.const {OUT}) (i32.const {}))", 4 * (32 + 8 * 5));
    actor(&body, 2)
}

#[test]
fn upload_matmul_and_ops_read_back_match_the_cpu() {
    let f = runtime();
    assert_eq!(f.rt.tensor_backend().kind, BackendKind::Cpu);
    assert_eq!(f.rt.tensor_backend().determinism, Determinism::Reproducible);
    let e = run(&f, &ops_actor(), None, LIMITS);
    let out = output(&e);
    let statuses: Vec<i32> = (0..15).map(|i| i32_at(&out, i)).collect();
    assert!(statuses.iter().all(|&s| s == 0), "{statuses:?}");
    let product: Vec<f32> = (16..24).map(|i| f32_at(&out, i)).collect();
    assert_eq!(product, matmul_reference());
    assert_eq!((i32_at(&out, 24), i32_at(&out, 25), i32_at(&out, 28)), (2, 4, 2), "shape [2, 4], rank 2");
    // The same ops straight on a CPU backend.
    let mut cpu = Backend::new(BackendKind::Cpu, Determinism::Reproducible).unwrap();
    let p = cpu.upload(&HostTensor { shape: vec![2, 4], data: product.clone() }).unwrap();
    let expect = [cpu.mul(p, p), cpu.gelu(p), cpu.scale(p, 0.5), cpu.softmax_last(p), cpu.argmax_last(p)];
    for (i, id) in expect.into_iter().enumerate() {
        let want = cpu.read(id.unwrap()).unwrap().data;
        let got: Vec<f32> = (0..want.len()).map(|j| f32_at(&out, 32 + 8 * i + j)).collect();
        assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "op {i}");
    }
}

#[test]
fn handles_do_not_survive_into_the_next_evaluation() {
    let f = runtime();
    // First message: upload and keep the handle in memory (the state). Later: ask for its shape.
    let body = format!(
        "(if (i32.eqz (i32.load (i32.const {FLAG})))
           (then {} (i32.store (i32.const {FLAG}) (i32.const 1)))
           (else {}))
         (call $respond (i32.const {OUT}) (i32.const 4))",
        status(0, &upload_a(0)),
        status(0, &format!("(call $shape {} (i32.const 0x6100) (i32.const 0x6110))", load(0))),
    );
    let wasm = actor(&body, 2);
    let first = run(&f, &wasm, None, LIMITS);
    assert_eq!(i32_at(&output(&first), 0), 0);
    let state = first.memory.unwrap();
    assert_eq!(i32_at(&state[h(0) as usize..], 0), 1, "the first handle is 1");
    let second = run(&f, &wasm, Some(&state), LIMITS);
    assert_eq!(i32_at(&output(&second), 0), GpuStatus::UnknownHandle.code());
}

#[test]
fn tensors_are_freed_when_the_evaluation_ends_whatever_the_outcome() {
    let backend = Arc::new(Mutex::new(Backend::new(BackendKind::Cpu, Determinism::Reproducible).unwrap()));
    let f = runtime_with(GpuConfig { backend: Some(backend.clone()), ..GpuConfig::default() });
    let ok = format!("{}{}(call $respond (i32.const {OUT}) (i32.const 4))", status(0, &upload_a(0)), status(1, &upload_b(1)));
    let trap = format!("{}{}unreachable", status(0, &upload_a(0)), status(1, &upload_b(1)));
    assert!(run(&f, &actor(&ok, 2), None, LIMITS).outcome.is_ok());
    assert!(matches!(run(&f, &actor(&trap, 2), None, LIMITS).outcome, Err(EvalError::Trap(_))));
    let b = backend.lock().unwrap();
    for id in 0..10 {
        assert!(b.shape(TensorId(id)).is_err(), "tensor {id} is still live");
    }
}

#[test]
fn gpu_imports_are_checked_at_load() {
    let f = runtime();
    let base = r#"(memory (export "memory") 1)
      (func (export "malloc") (param i32) (result i32) (i32.const 0))
      (func (export "handle") (param i32 i32) (result i32) (i32.const 0)))"#;
    let refused = |import: &str| match load_module(&f.rt, &wat::parse_str(format!("(module {import} {base}")).unwrap()) {
        Err(RuntimeError::ForbiddenImport { module, name, detail }) => (module, name, detail),
        other => panic!("{import}: {other:?}"),
    };
    let (module, name, detail) = refused(r#"(import "ao_gpu" "matmul" (func (param i32) (result i32)))"#);
    assert_eq!((module.as_str(), name.as_str()), ("ao_gpu", "matmul"));
    assert!(detail.contains("(i32, i32, i32, i32, i32) -> i32"), "{detail}");
    let (_, _, detail) = refused(r#"(import "ao_gpu" "scale" (func (param i32 i32 i32) (result i32)))"#);
    assert!(detail.contains("(i32, f32, i32) -> i32"), "{detail}");
    let (_, name, _) = refused(r#"(import "ao_gpu" "conv2d" (func (param i32) (result i32)))"#);
    assert_eq!(name, "conv2d");
    let ok = wat::parse_str(format!(r#"(module (import "ao_gpu" "scale" (func (param i32 f32 i32) (result i32))) {base}"#)).unwrap();
    load_module(&f.rt, &ok).unwrap();
}

#[test]
fn the_same_actor_on_wgpu_is_bitwise_identical_in_reproducible_mode() {
    let backend = match Backend::new(BackendKind::Wgpu, Determinism::Reproducible) {
        Ok(b) => b,
        Err(e) => {
            if std::env::var("REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("REQUIRE_WGPU=1 but the wgpu backend did not start: {e}");
            }
            eprintln!("!!!!! SKIPPING the wgpu ao_gpu case: {e} (set REQUIRE_WGPU=1 to make this fail) !!!!!");
            return;
        }
    };
    let gpu = runtime_with(GpuConfig { backend: Some(Arc::new(Mutex::new(backend))), ..GpuConfig::default() });
    assert_eq!(gpu.rt.tensor_backend().kind, BackendKind::Wgpu);
    eprintln!("ao_gpu on {}", gpu.rt.tensor_backend().description);
    let cpu = runtime();
    let wasm = ops_actor();
    let on_gpu = run(&gpu, &wasm, None, LIMITS);
    let on_cpu = run(&cpu, &wasm, None, LIMITS);
    assert_eq!(output(&on_gpu), output(&on_cpu));
    assert_eq!(on_gpu.gas_used, on_cpu.gas_used, "gas does not depend on the backend");
}

/// One q8_0 block: d = 0.5 (f16 0x3800), qs[j] = j - 16, so x[j] = (j - 16) / 2.
fn q8_0_block() -> Vec<u8> {
    let mut b = 0x3800u16.to_le_bytes().to_vec();
    b.extend((0..32).map(|j| (j as i8 - 16) as u8));
    b
}

/// One q4_1 block: d = 0.25 (0x3400), m = -1 (0xbc00), qs[j] = j | (15 - j) << 4, so
/// x[j] = j / 4 - 1 and x[j + 16] = (15 - j) / 4 - 1.
fn q4_1_block() -> Vec<u8> {
    let mut b = 0x3400u16.to_le_bytes().to_vec();
    b.extend(0xbc00u16.to_le_bytes());
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    b
}

#[test]
fn dtypes_upload_read_back_convert_and_report_themselves() {
    let f = runtime();
    let mut p = Prog::new();
    // f16 [2, 2] = [1, -2, 0.5, 65504].
    let half = f16s(&[0x3c00, 0xc000, 0x3800, 0x7bff]);
    p.upload(DType::F16, half.clone(), &[2, 2], 0);
    p.upload(DType::Q8_0, q8_0_block(), &[1, 32], 1);
    p.upload(DType::Q4_1, q4_1_block(), &[32], 2);
    p.upload(DType::I32, i32s(&[7, -1, 123_456]), &[3], 3);
    let f16_vals = p.read_f32(0, 4);
    let f16_raw = p.read_raw(0, 8);
    let q8_vals = p.read_f32(1, 32);
    let q8_raw = p.read_raw(1, 36);
    let q4_vals = p.read_f32(2, 32);
    let i32_vals = p.read_f32(3, 3);
    // Too small: the status, and the length anyway.
    let small = p.read_raw(1, 0);
    let small_status = p.statuses as usize - 1;
    // dtype() returns the codes; an unknown handle is a status.
    let dtypes: Vec<usize> = (0..4).map(|s| p.st(format!("(call $dtype {})", load(s)))).collect();
    let unknown_dtype = p.st("(call $dtype (i32.const 999))");
    // cast f32 [1, -2, 0.5, 1/3] -> f16.
    let third = 1.0f32 / 3.0;
    p.upload(DType::F32, f32s(&[1.0, -2.0, 0.5, third]), &[4], 4);
    p.st(format!("(call $cast {} (i32.const 1) (i32.const {}))", load(4), h(5)));
    let cast_raw = p.read_raw(5, 8);
    let shape_at = p.results;
    p.results += 5;
    p.st(format!("(call $shape {} (i32.const {}) (i32.const {}))", load(1), OUT + 4 * shape_at, OUT + 4 * (shape_at + 4)));
    let out = output(&run(&f, &p.wasm(), None, LIMITS));

    let st = statuses(&out, p.statuses as usize);
    for s in (0..small_status).chain([p.statuses as usize - 3, p.statuses as usize - 2, p.statuses as usize - 1]) {
        assert_eq!(st[s], Some(GpuStatus::Ok), "status {s}: {st:?}");
    }
    assert_eq!(f32s_at(&out, f16_vals, 4), [1.0, -2.0, 0.5, 65504.0]);
    assert_eq!(i32_at(&out, f16_raw), 8);
    assert_eq!(&out[4 * (f16_raw + 1)..4 * (f16_raw + 1) + 8], &half[..]);
    let want_q8: Vec<f32> = (0..32).map(|j| (j as f32 - 16.0) / 2.0).collect();
    assert_eq!(f32s_at(&out, q8_vals, 32), want_q8);
    assert_eq!(i32_at(&out, q8_raw), 34);
    assert_eq!(&out[4 * (q8_raw + 1)..4 * (q8_raw + 1) + 34], &q8_0_block()[..]);
    let want_q4: Vec<f32> = (0..32).map(|j| if j < 16 { j as f32 / 4.0 - 1.0 } else { (31 - j) as f32 / 4.0 - 1.0 }).collect();
    assert_eq!(f32s_at(&out, q4_vals, 32), want_q4);
    assert_eq!(f32s_at(&out, i32_vals, 3), [7.0, -1.0, 123_456.0]);
    assert_eq!(st[small_status], Some(GpuStatus::BufferTooSmall));
    assert_eq!(i32_at(&out, small), 34, "the length is written even when the buffer is too small");
    let codes: Vec<i32> = dtypes.iter().map(|&s| i32_at(&out, s)).collect();
    assert_eq!(codes, [DType::F16.code(), DType::Q8_0.code(), DType::Q4_1.code(), DType::I32.code()]);
    assert_eq!(i32_at(&out, unknown_dtype), GpuStatus::UnknownHandle.code());
    // 1/3 in f16 rounds to 0x3555 (0.333251953125).
    assert_eq!(i32_at(&out, cast_raw), 8);
    assert_eq!(&out[4 * (cast_raw + 1)..4 * (cast_raw + 1) + 8], &f16s(&[0x3c00, 0xc000, 0x3800, 0x3555])[..]);
    assert_eq!((i32_at(&out, shape_at as usize), i32_at(&out, shape_at as usize + 1), i32_at(&out, shape_at as usize + 4)), (1, 32, 2));
}

/// f64 reference of rotary embedding in GGML's normal mode for x [seq, heads, dim].
fn rope_reference(x: &[f32], seq: usize, heads: usize, dim: usize, pos0: u32, theta: f64) -> Vec<f64> {
    let mut out = vec![0f64; x.len()];
    for t in 0..seq {
        let pos = (pos0 as usize + t) as f64;
        for hd in 0..heads {
            for i in 0..dim / 2 {
                let angle = pos * theta.powf(-2.0 * i as f64 / dim as f64);
                let (s, c) = angle.sin_cos();
                let at = (t * heads + hd) * dim + 2 * i;
                let (a, b) = (x[at] as f64, x[at + 1] as f64);
                out[at] = a * c - b * s;
                out[at + 1] = a * s + b * c;
            }
        }
    }
    out
}

/// f64 reference of causal attention with one key/value head for q [tq, hq, d], k, v [tk, 1, d].
/// `[tq, hq, tk, d]` in `dims`.
fn attention_reference(q: &[f32], k: &[f32], v: &[f32], dims: [usize; 4], pos0: usize, scale: f64) -> Vec<f64> {
    let [tq, hq, tk, d] = dims;
    let mut out = vec![0f64; q.len()];
    for i in 0..tq {
        for hd in 0..hq {
            let qrow = &q[(i * hq + hd) * d..][..d];
            let keys = (pos0 + i + 1).min(tk);
            let scores: Vec<f64> =
                (0..keys).map(|j| qrow.iter().zip(&k[j * d..][..d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale).collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..d {
                out[(i * hq + hd) * d + c] = (0..keys).map(|j| e[j] / sum * v[j * d + c] as f64).sum();
            }
        }
    }
    out
}

#[test]
fn layout_gather_rope_attention_and_quantized_matmul_match_references() {
    let f = runtime();
    let mut p = Prog::new();
    p.st(upload_a(0));
    p.st(upload_b(1));
    let dims = |p: &mut Prog, v: &[u32]| p.put(u32s(v));
    let (s32, axes10) = (dims(&mut p, &[3, 2]), dims(&mut p, &[1, 0]));
    p.st(format!("(call $reshape {} (i32.const {s32}) (i32.const 2) (i32.const {}))", load(0), h(2)));
    p.st(format!("(call $permute {} (i32.const {axes10}) (i32.const 2) (i32.const {}))", load(0), h(3)));
    p.st(format!("(call $slice {} (i32.const 1) (i32.const 1) (i32.const 2) (i32.const {}))", load(0), h(4)));
    p.st(format!("(call $concat {} {} (i32.const 0) (i32.const {}))", load(0), load(0), h(5)));
    // An empty cache [0, 3] grown by A twice, in place.
    p.upload(DType::F32, Vec::new(), &[0, 3], 6);
    p.st(format!("(call $append {} {})", load(6), load(0)));
    p.st(format!("(call $append {} {})", load(6), load(0)));
    p.upload(DType::I32, i32s(&[2, 0]), &[2], 7);
    p.st(format!("(call $gather {} {} (i32.const {}))", load(1), load(7), h(8)));
    // rope of x [2, 1, 4] at positions 3, 4; attention of q [2, 2, 4] over k, v [3, 1, 4] from position 1.
    p.upload(DType::F32, f32s(&X_ROPE), &[2, 1, 4], 9);
    p.st(format!("(call $rope {} (i32.const 3) (f32.const 10000) (i32.const 0) (i32.const {}))", load(9), h(10)));
    p.upload(DType::F32, f32s(&Q_ATT), &[2, 2, 4], 11);
    p.upload(DType::F32, f32s(&K_ATT), &[3, 1, 4], 12);
    p.upload(DType::F32, f32s(&V_ATT), &[3, 1, 4], 13);
    p.st(format!("(call $attention {} {} {} (i32.const 1) (f32.const 0.5) (i32.const {}))", load(11), load(12), load(13), h(14)));
    // x [1, 32] @ W^T for a q8_0 W [2, 32] (two identical rows of q8_0_block): [1, 2].
    let x32: Vec<f32> = (0..32).map(|j| (j as f32 - 10.0) / 8.0).collect();
    p.upload(DType::F32, f32s(&x32), &[1, 32], 15);
    p.upload(DType::Q8_0, [q8_0_block(), q8_0_block()].concat(), &[2, 32], 16);
    p.st(format!("(call $matmul {} {} (i32.const 0) (i32.const 1) (i32.const {}))", load(15), load(16), h(17)));
    // argmax gives i32.
    p.st(format!("(call $reduce (i32.const 3) {} (i32.const {}))", load(1), h(18)));
    let argmax_dtype = p.st(format!("(call $dtype {})", load(18)));
    let shape_at = p.results;
    p.results += 5;
    p.st(format!("(call $shape {} (i32.const {}) (i32.const {}))", load(6), OUT + 4 * shape_at, OUT + 4 * (shape_at + 4)));
    let reads: Vec<(u32, u32)> = vec![(2, 6), (3, 6), (4, 4), (5, 12), (6, 12), (8, 8), (10, 8), (14, 16), (17, 2), (18, 3)];
    let at: Vec<usize> = reads.iter().map(|&(slot, n)| p.read_f32(slot, n)).collect();
    let out = output(&run(&f, &p.wasm(), None, LIMITS));
    let st = statuses(&out, p.statuses as usize);
    for (i, s) in st.iter().enumerate() {
        if i != argmax_dtype {
            assert_eq!(*s, Some(GpuStatus::Ok), "status {i}: {st:?}");
        }
    }
    let got = |k: usize| f32s_at(&out, at[k], reads[k].1 as usize);
    let a = A_DATA;
    assert_eq!(got(0), a, "reshape keeps the data");
    assert_eq!(got(1), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0], "permute transposes");
    assert_eq!(got(2), [2.0, 3.0, 5.0, 6.0], "slice of columns 1..3");
    assert_eq!(got(3), [a, a].concat(), "concat along rows");
    assert_eq!(got(4), [a, a].concat(), "append twice");
    assert_eq!(
        (i32_at(&out, shape_at as usize), i32_at(&out, shape_at as usize + 1), i32_at(&out, shape_at as usize + 4)),
        (4, 3, 2),
        "the cache grew in place"
    );
    assert_eq!(got(5), [&B_DATA[8..12], &B_DATA[0..4]].concat(), "gather rows 2 and 0");
    assert_close("rope", &got(6), &rope_reference(&X_ROPE, 2, 1, 4, 3, 10000.0), Tol { abs: 1e-6, rel: 1e-6 });
    assert_close("attention", &got(7), &attention_reference(&Q_ATT, &K_ATT, &V_ATT, [2, 2, 3, 4], 1, 0.5), Tol { abs: 1e-6, rel: 1e-6 });
    let w: Vec<f64> = (0..32).map(|j| (j as f64 - 16.0) / 2.0).collect();
    let dot: f64 = x32.iter().zip(&w).map(|(x, w)| *x as f64 * w).sum();
    assert_close("q8_0 matmul", &got(8), &[dot, dot], Tol { abs: 1e-6, rel: 1e-6 });
    assert_eq!(got(9), [2.0, 1.0, 2.0], "argmax per row of B");
    assert_eq!(i32_at(&out, argmax_dtype), DType::I32.code());

    // Bitwise what the CPU backend gives for the same calls: the host adds nothing.
    let mut be = cpu();
    let x = cpu_tensor(&mut be, DType::F32, &[2, 1, 4], f32s(&X_ROPE));
    let r = be.rope(x, 3, 10000.0, RopeMode::Interleaved).unwrap();
    assert_eq!(bits(&got(6)), bits(&be.read(r).unwrap().data));
    let (q, k, v) = (
        cpu_tensor(&mut be, DType::F32, &[2, 2, 4], f32s(&Q_ATT)),
        cpu_tensor(&mut be, DType::F32, &[3, 1, 4], f32s(&K_ATT)),
        cpu_tensor(&mut be, DType::F32, &[3, 1, 4], f32s(&V_ATT)),
    );
    let o = be.attention(q, k, v, 1, 0.5).unwrap();
    assert_eq!(bits(&got(7)), bits(&be.read(o).unwrap().data));
    let (xx, ww) = (
        cpu_tensor(&mut be, DType::F32, &[1, 32], f32s(&x32)),
        cpu_tensor(&mut be, DType::Q8_0, &[2, 32], [q8_0_block(), q8_0_block()].concat()),
    );
    let y = be.matmul(xx, ww, false, true).unwrap();
    assert_eq!(bits(&got(8)), bits(&be.read(y).unwrap().data));
}
