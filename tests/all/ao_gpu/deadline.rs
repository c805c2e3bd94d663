//! The evaluation's deadline reaches the device (issue 12 §2): a hostile `run` command list of
//! chained large matmuls, far longer than the deadline, is stopped at the deadline with a timeout
//! (not after the whole list), and the device serves the next evaluation right after.

use std::time::Instant;

use ao_gpu_worker::runtime::gpu_op;

use super::*;

/// Matmuls in the hostile list, each [1024, 64] @ [64, 1024] (134 MFLOP) followed by the free of
/// its output: hundreds of GFLOP, minutes of work on a CPU.
const MATMULS: usize = 3500;
const CMDS_AT: u32 = 0x70000;
const SHAPE_TALL: u32 = 0x3040;
const SHAPE_WIDE: u32 = 0x3050;

fn hostile_actor() -> Vec<u8> {
    // Handles 1 ([1024, 64]) and 2 ([64, 1024]) are zeros read from the same memory.
    let mut cmds = Vec::new();
    for k in 0..MATMULS as i32 {
        cmds.extend(cmd(gpu_op::MATMUL, &[1, 2], &[0, 0], &[]));
        cmds.extend(cmd(gpu_op::FREE, &[out_of(2 * k)], &[], &[]));
    }
    let upload = |shape: u32, slot: u32| {
        format!("(call $tensor_f32 (i32.const {BIG_A}) (i32.const 65536) (i32.const {shape}) (i32.const 2) (i32.const {}))", h(slot))
    };
    let body = format!(
        "{}{}{}(call $respond (i32.const {OUT}) (i32.const 12))",
        status(0, &upload(SHAPE_TALL, 0)),
        status(1, &upload(SHAPE_WIDE, 1)),
        status(2, &format!("(call $run (i32.const {CMDS_AT}) (i32.const {}) (i32.const {}))", 2 * MATMULS, OUT + 12)),
    );
    actor_with(&body, 2, &[(SHAPE_TALL, u32s(&[1024, 64])), (SHAPE_WIDE, u32s(&[64, 1024])), (CMDS_AT, cmds)])
}

#[test]
fn a_hostile_command_list_is_stopped_at_the_deadline_and_the_device_is_free_after() {
    let dir = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(1);
    let cfg = RuntimeConfig { cache_dir: dir.path().join("modules"), max_memory: 16 * MIB, max_compute: 1 << 50, deadline };
    let rt = Runtime::with_gpu(cfg, GpuConfig::default()).unwrap();
    let limits = Limits { memory_bytes: 16 * MIB, compute: 1 << 50 };
    let hostile = load_module(&rt, &hostile_actor()).unwrap();
    // Admission control counts the device quota of modules that import ao_gpu, and only theirs.
    assert!(hostile.uses_gpu());
    let plain = r#"(module (memory (export "memory") 1) (func (export "malloc") (param i32) (result i32) (i32.const 0))
        (func (export "handle") (param i32 i32) (result i32) (i32.const 0)))"#;
    assert!(!load_module(&rt, &wat::parse_str(plain).unwrap()).unwrap().uses_gpu());

    let start = Instant::now();
    let e = rt.evaluate(&hostile, None, &input(limits));
    let took = start.elapsed();
    match &e.outcome {
        Err(err @ EvalError::Timeout { deadline: d }) => {
            assert_eq!(*d, deadline);
            assert!(err.to_string().contains("deadline"), "a clear error: {err}");
        }
        other => panic!("the hostile list was not stopped at its deadline: {other:?} after {took:?}"),
    }
    // A correctness bound, generous for a loaded machine: the list is minutes of matmuls, and it
    // stops within the deadline plus the command that was running (a fraction of a second).
    assert!(took < Duration::from_secs(5), "stopped only after {took:?}");

    // The device serves the next evaluation at once, with the right answer.
    let body = format!(
        "{}{}{}{}(call $respond (i32.const {OUT}) (i32.const {}))",
        status(0, &upload_a(0)),
        status(1, &upload_b(1)),
        status(2, &format!("(call $matmul {} {} (i32.const 0) (i32.const 0) (i32.const {}))", load(0), load(1), h(2))),
        status(3, &format!("(call $read_f32 {} (i32.const {}) (i32.const 8))", load(2), OUT + 16)),
        16 + 32,
    );
    let start = Instant::now();
    let next = rt.evaluate(&load_module(&rt, &actor(&body, 2)).unwrap(), None, &input(limits));
    let out = output(&next);
    assert!(start.elapsed() < deadline, "the device was still busy: {:?}", start.elapsed());
    assert_eq!(statuses(&out, 4), [Some(GpuStatus::Ok); 4]);
    assert_eq!(f32s_at(&out, 4, 8), matmul_reference());
}
