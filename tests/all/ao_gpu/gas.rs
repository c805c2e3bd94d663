//! Gas and limits: fuel per op as documented, deterministic and growing with the work; the compute
//! limit; the device-memory quota, in calls and in batches.

use ao_gpu_worker::runtime::{GAS_PER_CALL, GAS_PER_COMMAND, gpu_op};

use super::*;

/// Uploads two `n` x `n` matrices, multiplies them and frees everything.
fn big_matmul_actor(n: u32) -> Vec<u8> {
    let upload = |at: u32, slot: u32| {
        format!("(call $tensor_f32 (i32.const {at}) (i32.const {}) (i32.const {SHAPE_BIG}) (i32.const 2) (i32.const {}))", n * n, h(slot))
    };
    let mut body = String::new();
    body += &status(0, &upload(BIG_A, 0));
    body += &status(1, &upload(BIG_B, 1));
    body += &status(2, &format!("(call $matmul {} {} (i32.const 0) (i32.const 1) (i32.const {}))", load(0), load(1), h(2)));
    body += &format!("(i32.store (i32.const {FLAG}) (i32.add (i32.load (i32.const {FLAG})) (i32.const 1)))\n");
    body += &format!("(call $respond (i32.const {OUT}) (i32.const 12))");
    actor(&body, n)
}

#[test]
fn gas_grows_with_the_op_and_is_deterministic() {
    let f = runtime();
    let small = run(&f, &big_matmul_actor(8), None, LIMITS);
    let big = run(&f, &big_matmul_actor(256), None, LIMITS);
    let big_again = run(&f, &big_matmul_actor(256), None, LIMITS);
    for e in [&small, &big] {
        let out = output(e);
        assert_eq!((i32_at(&out, 0), i32_at(&out, 1), i32_at(&out, 2)), (0, 0, 0));
    }
    assert_eq!(big.gas_used, big_again.gas_used);
    let n: u64 = 256;
    // The matmul alone: 3 tensors of n^2 f32 moved (3 n^2 fuel) and 2 n^3 FLOPs (n^3 fuel).
    assert!(big.gas_used - small.gas_used >= n * n * n + 3 * n * n - 3 * 64, "{} vs {}", big.gas_used, small.gas_used);
}

#[test]
fn compute_limit_too_small_for_the_op_is_out_of_fuel_and_rolls_back() {
    let f = runtime();
    let wasm = big_matmul_actor(256);
    let ok = run(&f, &wasm, None, LIMITS);
    let state = ok.memory.clone().unwrap();
    let tight = Limits { compute: 5_000_000, ..LIMITS };
    let e = run(&f, &wasm, Some(&state), tight);
    assert_eq!(e.outcome, Err(EvalError::OutOfFuel { limit: 5_000_000 }));
    assert!(e.memory.is_none(), "no state from a failed evaluation");
    assert_eq!(e.gas_used, 5_000_000);
    // The previous state is still good: the flag counts successful messages only.
    let again = run(&f, &wasm, Some(&state), LIMITS);
    assert_eq!(i32_at(&again.memory.unwrap()[FLAG as usize..], 0), 2);
}

#[test]
fn device_memory_quota_returns_a_status() {
    let f = runtime_with(GpuConfig { max_device_memory: 100_000, ..GpuConfig::default() });
    // 2 x 128x128 f32 = 128 KiB > 100 000 bytes: the first upload fits, the second does not.
    let out = output(&run(&f, &big_matmul_actor(128), None, LIMITS));
    assert_eq!(
        [i32_at(&out, 0), i32_at(&out, 1), i32_at(&out, 2)],
        [GpuStatus::Ok.code(), GpuStatus::QuotaExceeded.code(), GpuStatus::UnknownHandle.code()]
    );
    // Freeing gives the quota back within the evaluation.
    let upload = |slot: u32| {
        format!("(call $tensor_f32 (i32.const {BIG_A}) (i32.const 16384) (i32.const {SHAPE_BIG}) (i32.const 2) (i32.const {}))", h(slot))
    };
    let body = format!(
        "{}{}{}{}(call $respond (i32.const {OUT}) (i32.const 16))",
        status(0, &upload(0)),
        status(1, &format!("(call $free {})", load(0))),
        status(2, &upload(1)),
        status(3, &format!("(call $scale {} (f32.const 2) (i32.const {}))", load(1), h(2))),
    );
    let out = output(&run(&f, &actor(&body, 128), None, LIMITS));
    assert_eq!([i32_at(&out, 0), i32_at(&out, 1), i32_at(&out, 2), i32_at(&out, 3)], [0, 0, 0, GpuStatus::QuotaExceeded.code()]);
}

/// Handles 1..=8 of [`gas_setup`].
const GA: i32 = 1;
const GB: i32 = 2;
const GIDS: i32 = 3;
const GX: i32 = 4;
const GQ: i32 = 5;
const GK: i32 = 6;
const GCACHE: i32 = 7;
const GHALF: i32 = 8;

/// Uploads A [2, 3], B [3, 4], ids i32 [2], x [2, 1, 4], q [2, 2, 4], k [3, 1, 4], an empty cache
/// [0, 3] and an f16 [4]: handles 1..=8.
fn gas_setup(p: &mut Prog) {
    p.st(upload_a(0));
    p.st(upload_b(1));
    p.upload(DType::I32, i32s(&[2, 0]), &[2], 2);
    p.upload(DType::F32, f32s(&X_ROPE), &[2, 1, 4], 3);
    p.upload(DType::F32, f32s(&Q_ATT), &[2, 2, 4], 4);
    p.upload(DType::F32, f32s(&K_ATT), &[3, 1, 4], 5);
    p.upload(DType::F32, Vec::new(), &[0, 3], 6);
    p.upload(DType::F16, f16s(&[0x3c00; 4]), &[4], 7);
}

/// Fuel of an evaluation of [`gas_setup`] plus `call` (with `{X}` replaced by `x`).
fn gas_of(f: &Fixture, call: &str, x: i32) -> (u64, i32) {
    let mut p = Prog::new();
    gas_setup(&mut p);
    let (s32, axes10) = (p.put(u32s(&[3, 2])), p.put(u32s(&[1, 0])));
    let call = call.replace("{X}", &x.to_string()).replace("{S32}", &s32.to_string()).replace("{AX10}", &axes10.to_string());
    let s = p.st(call);
    let e = run(f, &p.wasm(), None, LIMITS);
    let out = output(&e);
    assert!(statuses(&out, s).iter().all(|st| *st == Some(GpuStatus::Ok)), "setup failed");
    (e.gas_used, i32_at(&out, s))
}

#[test]
fn each_op_charges_the_documented_gas() {
    let f = runtime();
    let o = h(20);
    // (call with the first operand {X}, fuel beyond GAS_PER_CALL from the table in include/ao_gpu.h, by hand)
    let cases: Vec<(String, u64)> = vec![
        // bytes 24 + 48 + 32 = 104 -> 26; flops 2*2*4*3 = 48 -> 24.
        (format!("(call $matmul (i32.const {{X}}) (i32.const {GB}) (i32.const 0) (i32.const 0) (i32.const {o}))"), 50),
        // 24 + 12 bytes -> 9; 2 per element: 12 -> 6.
        (format!("(call $cast (i32.const {{X}}) (i32.const 1) (i32.const {o}))"), 15),
        // 24 + 24 -> 12.
        (format!("(call $reshape (i32.const {{X}}) (i32.const {{S32}}) (i32.const 2) (i32.const {o}))"), 12),
        (format!("(call $permute (i32.const {{X}}) (i32.const {{AX10}}) (i32.const 2) (i32.const {o}))"), 12),
        // B [3, 4] rows 1..3: 48 + 32 -> 20.
        (format!("(call $slice (i32.const {{X}}) (i32.const 0) (i32.const 1) (i32.const 2) (i32.const {o}))"), 20),
        // 24 + 24 + 48 -> 24.
        (format!("(call $concat (i32.const {{X}}) (i32.const {GA}) (i32.const 0) (i32.const {o}))"), 24),
        // ids 8 + 2 rows of 16 + out 32 = 72 -> 18; 8 elements -> 4.
        (format!("(call $gather (i32.const {{X}}) (i32.const {GIDS}) (i32.const {o}))"), 22),
        // 32 + 32 -> 16; 3 per element: 24 -> 12.
        (format!("(call $rope (i32.const {{X}}) (i32.const 3) (f32.const 10000) (i32.const 0) (i32.const {o}))"), 28),
        // 64 + 48 + 48 + 64 = 224 -> 56; pairs min(2,3) + min(3,3) = 5; 2 heads * 5 * (16 + 8) = 240 -> 120.
        (
            format!("(call $attention (i32.const {{X}}) (i32.const {GK}) (i32.const {GK}) (i32.const 1) (f32.const 0.5) (i32.const {o}))"),
            176,
        ),
        // 2 * 24 -> 12.
        (format!("(call $append (i32.const {{X}}) (i32.const {GA}))"), 12),
        // 24 + 24 -> 12; 8 per element: 48 -> 24.
        (format!("(call $softmax (i32.const {{X}}) (i32.const {o}))"), 36),
        // argmax of B: 48 + 12 -> 15; 12 -> 6.
        (format!("(call $reduce (i32.const 3) (i32.const {{X}}) (i32.const {o}))"), 21),
        // The storage bytes of A: 24 -> 6; read_f32 of an f16 [4]: 16 f32 bytes -> 4.
        (format!("(call $read (i32.const {{X}}) (i32.const {}) (i32.const 24) (i32.const {}))", OUT + 0x400, OUT + 0x3fc), 6),
        (format!("(call $read_f32 (i32.const {{X}}) (i32.const {}) (i32.const 4))", OUT + 0x400), 4),
    ];
    let first = [GA, GA, GA, GA, GB, GA, GB, GX, GQ, GCACHE, GA, GB, GA, GHALF];
    for ((call, want), x) in cases.iter().zip(first) {
        let (ok, status) = gas_of(&f, call, x);
        assert_eq!(status, 0, "{call}");
        let (refused, status) = gas_of(&f, call, 999);
        assert_eq!(status, GpuStatus::UnknownHandle.code(), "{call}");
        assert_eq!(ok - refused, *want, "{call}");
    }
    // An upload: an f16 [3] is 6 bytes -> 2; the refused variant has a bad dtype code.
    let upload = "(call $tensor (i32.const {X}) (i32.const 4096) (i32.const 6) (i32.const 12304) (i32.const 1) (i32.const 12800))";
    let (ok, s1) = gas_of(&f, upload, 1);
    let (refused, s2) = gas_of(&f, upload, 6);
    assert_eq!((s1, s2), (0, GpuStatus::InvalidArgument.code()));
    assert_eq!(ok - refused, 2);
    assert_eq!(GAS_PER_CALL, 100);
    assert_eq!(GAS_PER_COMMAND, 20);
}

#[test]
fn quota_counts_append_growth_in_calls_and_batches() {
    // 100 bytes: rows [1, 4] (16) and a cache that grows by 16 per append.
    let f = runtime_with(GpuConfig { max_device_memory: 100, ..GpuConfig::default() });
    let mut p = Prog::new();
    p.upload(DType::F32, Vec::new(), &[0, 4], 0);
    p.upload(DType::F32, f32s(&[1.0, 2.0, 3.0, 4.0]), &[1, 4], 1);
    let appends: Vec<usize> = (0..6).map(|_| p.st(format!("(call $append {} {})", load(0), load(1)))).collect();
    let shape_at = p.results;
    p.results += 5;
    p.st(format!("(call $shape {} (i32.const {}) (i32.const {}))", load(0), OUT + 4 * shape_at, OUT + 4 * (shape_at + 4)));
    // In a batch: the same append fails the same way at command 0.
    let list = p.put(cmd(gpu_op::APPEND, &[1, 2], &[], &[]));
    let done = p.results;
    p.results += 1;
    let batch = p.st(format!("(call $run (i32.const {list}) (i32.const 1) (i32.const {}))", OUT + 4 * done));
    // Freeing the rows gives 16 bytes back: a 16-byte upload fits again.
    p.st(format!("(call $free {})", load(1)));
    let again = p.upload(DType::F32, f32s(&[1.0, 2.0, 3.0, 4.0]), &[1, 4], 2);
    let out = output(&run(&f, &p.wasm(), None, LIMITS));
    let st: Vec<i32> = appends.iter().map(|&s| i32_at(&out, s)).collect();
    let q = GpuStatus::QuotaExceeded.code();
    assert_eq!(st, [0, 0, 0, 0, 0, q], "16 + 5 * 16 = 96 fits, 112 does not");
    assert_eq!(
        (i32_at(&out, shape_at as usize), i32_at(&out, shape_at as usize + 1)),
        (5, 4),
        "the refused append left the cache as it was"
    );
    assert_eq!((i32_at(&out, batch), i32_at(&out, done as usize)), (q, 0));
    assert_eq!(i32_at(&out, again), 0);
}
