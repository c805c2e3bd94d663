//! Guest misuse: statuses for bad arguments (the evaluation goes on), traps for pointers outside
//! memory.

use super::*;

#[test]
fn guest_misuse_returns_statuses_and_the_evaluation_succeeds() {
    let f = runtime();
    let mut body = String::new();
    body += &status(0, &upload_a(0));
    body += &status(1, &format!("(call $matmul {} {} (i32.const 0) (i32.const 0) (i32.const {}))", load(0), load(0), h(1)));
    body +=
        &status(2, &format!("(call $tensor_f32 (i32.const {A}) (i32.const 5) (i32.const {SHAPE_A}) (i32.const 2) (i32.const {}))", h(2)));
    body +=
        &status(3, &format!("(call $tensor_f32 (i32.const {A}) (i32.const 6) (i32.const {SHAPE_A}) (i32.const 0) (i32.const {}))", h(2)));
    body += &status(4, &format!("(call $binary (i32.const 9) {} {} (i32.const {}))", load(0), load(0), h(2)));
    body += &status(5, &format!("(call $reduce (i32.const 7) {} (i32.const {}))", load(0), h(2)));
    body += &status(6, &format!("(call $read_f32 {} (i32.const {}) (i32.const 5))", load(0), OUT + 64));
    body += &status(7, &format!("(call $rmsnorm {} {} (f32.const 1e-5) (i32.const {}))", load(0), load(0), h(2)));
    body += &status(8, "(call $shape (i32.const 77) (i32.const 0x6100) (i32.const 0x6110))");
    body += &status(9, &format!("(call $free {})", load(0)));
    body += &status(10, &format!("(call $free {})", load(0)));
    body += &status(11, &format!("(call $read_f32 {} (i32.const {}) (i32.const 8))", load(0), OUT + 64));
    body += &status(12, "(call $free (i32.const 0))");
    body += &status(13, "(call $unary (i32.const 0) (i32.const -1) (i32.const 0x6100))");
    body += &format!("(call $respond (i32.const {OUT}) (i32.const 56))");
    let e = run(&f, &actor(&body, 2), None, LIMITS);
    let out = output(&e);
    let got: Vec<Option<GpuStatus>> = (0..14).map(|i| GpuStatus::from_code(i32_at(&out, i))).collect();
    use GpuStatus::*;
    let want = [
        Ok,
        ShapeMismatch,
        ShapeMismatch,
        InvalidArgument,
        InvalidArgument,
        InvalidArgument,
        BufferTooSmall,
        ShapeMismatch,
        UnknownHandle,
        Ok,
        UnknownHandle,
        UnknownHandle,
        UnknownHandle,
        UnknownHandle,
    ];
    assert_eq!(got, want.map(Some));
}

#[test]
fn out_of_bounds_pointers_trap() {
    let f = runtime();
    let cases = [
        format!("(drop {}) (drop (call $read_f32 {} (i32.const 0xffffff00) (i32.const 8))) (i32.const 0)", upload_a(0), load(0)),
        format!(
            "(drop (call $tensor_f32 (i32.const 0xfffffff0) (i32.const 6) (i32.const {SHAPE_A}) (i32.const 2) (i32.const {}))) (i32.const 0)",
            h(0)
        ),
        format!("(drop (call $tensor_f32 (i32.const {A}) (i32.const 6) (i32.const {SHAPE_A}) (i32.const 2) (i32.const -2))) (i32.const 0)"),
        format!("(drop {}) (drop (call $unary (i32.const 0) {} (i32.const 0x7ffffff0))) (i32.const 0)", upload_a(0), load(0)),
        format!("(drop {}) (drop (call $shape {} (i32.const 0xfffffffc) (i32.const 0))) (i32.const 0)", upload_a(0), load(0)),
    ];
    for body in cases {
        let e = run(&f, &actor(&body, 2), None, LIMITS);
        assert!(e.memory.is_none(), "{body}");
        match &e.outcome {
            Err(EvalError::Trap(msg)) => assert!(msg.contains("ao_gpu.") && msg.contains("outside memory"), "{msg}"),
            other => panic!("{body}: {other:?}"),
        }
    }
}

#[test]
fn misuse_of_the_new_functions_returns_statuses() {
    let f = runtime();
    let mut p = Prog::new();
    p.st(upload_a(0)); // 0: f32 [2, 3]
    p.upload(DType::I32, i32s(&[0, 5]), &[2], 1); // 1
    p.upload(DType::Q4_0, vec![0; 18], &[32], 2); // 2
    let four = p.put(u32s(&[4]));
    let mut expect: Vec<(usize, GpuStatus)> = Vec::new();
    let mut case = |p: &mut Prog, call: String, want: GpuStatus| {
        let s = p.st(call);
        expect.push((s, want));
    };
    use GpuStatus::*;
    // Uploads: a bad dtype code, a length that is not the shape's size, a quantized row that is not whole blocks.
    let bytes16 = p.put(vec![0; 16]);
    case(
        &mut p,
        format!("(call $tensor (i32.const 6) (i32.const {bytes16}) (i32.const 16) (i32.const {four}) (i32.const 1) (i32.const {}))", h(9)),
        InvalidArgument,
    );
    case(
        &mut p,
        format!("(call $tensor (i32.const -1) (i32.const {bytes16}) (i32.const 16) (i32.const {four}) (i32.const 1) (i32.const {}))", h(9)),
        InvalidArgument,
    );
    case(
        &mut p,
        format!("(call $tensor (i32.const 0) (i32.const {bytes16}) (i32.const 12) (i32.const {four}) (i32.const 1) (i32.const {}))", h(9)),
        ShapeMismatch,
    );
    case(
        &mut p,
        format!("(call $tensor (i32.const 3) (i32.const {bytes16}) (i32.const 16) (i32.const {four}) (i32.const 1) (i32.const {}))", h(9)),
        DtypeMismatch,
    );
    case(
        &mut p,
        format!("(call $tensor (i32.const 0) (i32.const {bytes16}) (i32.const 16) (i32.const {four}) (i32.const 5) (i32.const {}))", h(9)),
        InvalidArgument,
    );
    // Ops on operands of the wrong dtype.
    case(&mut p, format!("(call $softmax {} (i32.const {}))", load(1), h(9)), DtypeMismatch);
    case(&mut p, format!("(call $matmul {} {} (i32.const 0) (i32.const 0) (i32.const {}))", load(0), load(1), h(9)), DtypeMismatch);
    case(&mut p, format!("(call $cast {} (i32.const 1) (i32.const {}))", load(1), h(9)), DtypeMismatch);
    case(&mut p, format!("(call $cast {} (i32.const 7) (i32.const {}))", load(0), h(9)), InvalidArgument);
    case(&mut p, format!("(call $permute {} (i32.const {four}) (i32.const 1) (i32.const {}))", load(2), h(9)), DtypeMismatch);
    case(&mut p, format!("(call $gather {} {} (i32.const {}))", load(0), load(0), h(9)), DtypeMismatch);
    case(&mut p, format!("(call $append {} {})", load(0), load(1)), DtypeMismatch);
    // Shapes.
    case(&mut p, format!("(call $reshape {} (i32.const {four}) (i32.const 1) (i32.const {}))", load(0), h(9)), ShapeMismatch);
    case(&mut p, format!("(call $permute {} (i32.const {four}) (i32.const 1) (i32.const {}))", load(0), h(9)), ShapeMismatch);
    case(&mut p, format!("(call $slice {} (i32.const 1) (i32.const 2) (i32.const 2) (i32.const {}))", load(0), h(9)), ShapeMismatch);
    case(&mut p, format!("(call $slice {} (i32.const 1) (i32.const -1) (i32.const 2) (i32.const {}))", load(0), h(9)), InvalidArgument);
    case(&mut p, format!("(call $concat {} {} (i32.const 2) (i32.const {}))", load(0), load(0), h(9)), ShapeMismatch);
    case(&mut p, format!("(call $rope {} (i32.const 0) (f32.const 10000) (i32.const 0) (i32.const {}))", load(0), h(9)), ShapeMismatch);
    case(
        &mut p,
        format!("(call $attention {} {} {} (i32.const 0) (f32.const 1) (i32.const {}))", load(0), load(0), load(0), h(9)),
        ShapeMismatch,
    );
    // A gather id outside the table (5 >= 2 rows of A).
    case(&mut p, format!("(call $gather {} {} (i32.const {}))", load(0), load(1), h(9)), ShapeMismatch);
    // Codes and negative positions.
    case(&mut p, format!("(call $rope {} (i32.const 0) (f32.const 10000) (i32.const 1) (i32.const {}))", load(0), h(9)), InvalidArgument);
    case(&mut p, format!("(call $rope {} (i32.const -3) (f32.const 10000) (i32.const 0) (i32.const {}))", load(0), h(9)), InvalidArgument);
    case(
        &mut p,
        format!("(call $attention {} {} {} (i32.const -1) (f32.const 1) (i32.const {}))", load(0), load(0), load(0), h(9)),
        InvalidArgument,
    );
    // Unknown handles everywhere.
    for call in [
        format!("(call $cast (i32.const 99) (i32.const 0) (i32.const {}))", h(9)),
        format!("(call $reshape (i32.const 99) (i32.const {four}) (i32.const 1) (i32.const {}))", h(9)),
        format!("(call $append {} (i32.const 99))", load(0)),
        format!("(call $append (i32.const 99) {})", load(0)),
        format!("(call $gather {} (i32.const 0) (i32.const {}))", load(0), h(9)),
        format!("(call $read (i32.const 99) (i32.const {OUT}) (i32.const 0) (i32.const {OUT}))"),
        "(call $dtype (i32.const 0))".to_owned(),
    ] {
        case(&mut p, call, UnknownHandle);
    }
    // `constant` on a runtime without a constant source.
    let (id, sha) = (p.put(b64_id(1).into_bytes()), p.put(vec![0; 32]));
    case(
        &mut p,
        format!("(call $constant (i32.const {id}) (i32.const {sha}) (i32.const 0) (i32.const {four}) (i32.const 1) (i32.const {}))", h(9)),
        Unsupported,
    );
    // A malformed item id is refused before that.
    let bad_id = p.put(vec![b'!'; 43]);
    case(
        &mut p,
        format!(
            "(call $constant (i32.const {bad_id}) (i32.const {sha}) (i32.const 0) (i32.const {four}) (i32.const 1) (i32.const {}))",
            h(9)
        ),
        InvalidArgument,
    );
    let out = output(&run(&f, &p.wasm(), None, LIMITS));
    let st = statuses(&out, p.statuses as usize);
    assert_eq!(&st[..3], [Some(GpuStatus::Ok); 3]);
    let got: Vec<(usize, Option<GpuStatus>)> = expect.iter().map(|&(s, _)| (s, st[s])).collect();
    let want: Vec<(usize, Option<GpuStatus>)> = expect.iter().map(|&(s, w)| (s, Some(w))).collect();
    assert_eq!(got, want);
}

#[test]
fn the_new_functions_trap_on_pointers_outside_memory() {
    let f = runtime();
    let far = "(i32.const 0xfffffff0)";
    let cases = [
        format!("(drop (call $tensor (i32.const 0) {far} (i32.const 16) (i32.const {SHAPE_A}) (i32.const 1) (i32.const {})))", h(0)),
        format!("(drop (call $tensor (i32.const 0) (i32.const {A}) (i32.const 24) {far} (i32.const 2) (i32.const {})))", h(0)),
        format!("(drop {}) (drop (call $read {} {far} (i32.const 24) (i32.const {OUT})))", upload_a(0), load(0)),
        format!("(drop {}) (drop (call $read {} (i32.const {OUT}) (i32.const 24) {far}))", upload_a(0), load(0)),
        format!("(drop {}) (drop (call $reshape {} {far} (i32.const 2) (i32.const {})))", upload_a(0), load(0), h(1)),
        format!("(drop {}) (drop (call $permute {} {far} (i32.const 2) (i32.const {})))", upload_a(0), load(0), h(1)),
        format!("(drop {}) (drop (call $slice {} (i32.const 0) (i32.const 0) (i32.const 1) {far}))", upload_a(0), load(0)),
        format!("(drop (call $constant {far} (i32.const {A}) (i32.const 0) (i32.const {SHAPE_A}) (i32.const 2) (i32.const {})))", h(0)),
        format!("(drop (call $constant (i32.const {A}) {far} (i32.const 0) (i32.const {SHAPE_A}) (i32.const 2) (i32.const {})))", h(0)),
        format!("(drop (call $run (i32.const {A}) (i32.const 0x10000000) (i32.const {OUT})))"),
        format!("(drop (call $run (i32.const {A}) (i32.const -1) (i32.const {OUT})))"),
        format!("(drop (call $run (i32.const {A}) (i32.const 1) {far}))"),
    ];
    for body in cases {
        let e = run(&f, &actor(&format!("{body} (i32.const 0)"), 2), None, LIMITS);
        match &e.outcome {
            Err(EvalError::Trap(msg)) => assert!(msg.contains("ao_gpu.") && msg.contains("outside memory"), "{msg}"),
            other => panic!("{body}: {other:?}"),
        }
    }
}
