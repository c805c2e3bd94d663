//! include/ao_gpu.h and docs/abi.md against the host's functions, codes and record layout.

use std::collections::HashMap;

use ao_gpu_worker::gpu::RopeMode;
use ao_gpu_worker::runtime::gpu_op;

use super::*;

/// `#define NAME VALUE` lines of include/ao_gpu.h.
fn header_defines(header: &str) -> HashMap<String, i32> {
    header
        .lines()
        .filter_map(|l| l.strip_prefix("#define "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (name, value) = (it.next()?, it.next()?);
            let value = value.trim_matches(|c| c == '(' || c == ')').parse().ok()?;
            Some((name.to_owned(), value))
        })
        .collect()
}

#[test]
fn the_header_and_the_abi_doc_match_the_host() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = std::fs::read_to_string(root.join("include/ao_gpu.h")).unwrap();
    let doc = std::fs::read_to_string(root.join("docs/abi.md")).unwrap();
    // Every function is declared in the header and listed in the doc's table, and nothing else.
    let mut declared: Vec<&str> =
        header.lines().filter_map(|l| l.strip_prefix("AO_GPU_IMPORT(\"")).filter_map(|l| l.split('"').next()).collect();
    let table =
        doc.lines().skip_while(|l| !l.starts_with("`ao_gpu`")).skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|'));
    let mut documented: Vec<&str> = table.skip(2).filter_map(|row| row.split('`').nth(1)).collect();
    let mut linked: Vec<&str> = GPU_FUNCTIONS.iter().map(|(n, _)| *n).collect();
    declared.sort_unstable();
    documented.sort_unstable();
    linked.sort_unstable();
    assert_eq!(declared, linked, "include/ao_gpu.h");
    assert_eq!(documented, linked, "docs/abi.md");
    let defines = header_defines(&header);
    for s in GpuStatus::ALL {
        assert_eq!(defines.get(&format!("AO_GPU_{}", s.name())), Some(&s.code()), "{s:?}");
    }
    for d in DType::ALL {
        assert_eq!(defines.get(&format!("AO_GPU_{}", d.as_str().to_uppercase())), Some(&d.code()), "{d}");
    }
    let ops = [
        ("MATMUL", gpu_op::MATMUL),
        ("BINARY", gpu_op::BINARY),
        ("UNARY", gpu_op::UNARY),
        ("SCALE", gpu_op::SCALE),
        ("SOFTMAX", gpu_op::SOFTMAX),
        ("RMSNORM", gpu_op::RMSNORM),
        ("LAYERNORM", gpu_op::LAYERNORM),
        ("REDUCE", gpu_op::REDUCE),
        ("CAST", gpu_op::CAST),
        ("RESHAPE", gpu_op::RESHAPE),
        ("PERMUTE", gpu_op::PERMUTE),
        ("SLICE", gpu_op::SLICE),
        ("CONCAT", gpu_op::CONCAT),
        ("APPEND", gpu_op::APPEND),
        ("GATHER", gpu_op::GATHER),
        ("ROPE", gpu_op::ROPE),
        ("ATTENTION", gpu_op::ATTENTION),
        ("FREE", gpu_op::FREE),
    ];
    for (name, code) in ops {
        assert_eq!(defines.get(&format!("AO_GPU_OP_{name}")), Some(&code), "{name}");
    }
    assert_eq!(
        defines.len() - defines.keys().filter(|k| !k.starts_with("AO_GPU_OP_")).count(),
        ops.len(),
        "an op code the test does not know"
    );
    use ao_gpu_worker::runtime::{CMD_F, CMD_I, CMD_IN, CMD_OP, CMD_OUT, CMD_RESERVED};
    for (field, offset) in [("op", CMD_OP), ("in", CMD_IN), ("i", CMD_I), ("f", CMD_F), ("out", CMD_OUT), ("reserved", CMD_RESERVED)] {
        assert!(header.contains(&format!("offsetof(ao_gpu_cmd, {field}) == {offset}")), "{field} at {offset}");
    }
    assert!(header.contains(&format!("sizeof(ao_gpu_cmd) == {CMD_SIZE}")));
    assert_eq!((defines["AO_GPU_ROPE_NORMAL"], defines["AO_GPU_ROPE_NEOX"]), (0, 2));
    assert_eq!(ao_gpu_worker::runtime::host::gpu::abi::rope_mode(0), Some(RopeMode::Interleaved));
    assert_eq!(RopeMode::Neox.ggml_code(), 2, "the kernels take the ABI numbering");
    assert_eq!(ao_gpu_worker::runtime::host::gpu::abi::rope_mode(2), Some(RopeMode::Neox));
}
