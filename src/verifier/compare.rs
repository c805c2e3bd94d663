//! Leaf by leaf: the first host call whose leaf differs between the re-execution and the worker's
//! trace, and how far apart what it read back is (max absolute and ULP difference, f32).
//!
//! Fast mode ([`TOLERANCE`]): a leaf whose text differs only in its `read=` digest, and whose
//! read-back evidence is f32 with every element within the tolerance, agrees. A read-back larger
//! than `attest::trace::EVIDENCE_MAX_BYTES` has no evidence and cannot be compared within a
//! tolerance: it is a difference.

use crate::attest::trace::{Leaf, Trace};

use super::CallDiff;

/// Fast mode: `|a - b| <= ABS + REL * |b|` for every f32 element read back.
pub const TOLERANCE: (f32, f32) = (1e-4, 1e-3);
pub const TOLERANCE_TEXT: &str =
    "|a - b| <= 1e-4 + 1e-3 * |b| for every f32 element read back; the ops, shapes and inputs must match exactly";

/// Whether `a` is within the fast-mode tolerance of `b` (NaN agrees only with NaN).
pub fn within(a: f32, b: f32) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    (a - b).abs() <= TOLERANCE.0 + TOLERANCE.1 * b.abs()
}

/// Units in the last place between two f32 values (0 for equal values, +0 and -0 included).
pub fn ulp_distance(a: f32, b: f32) -> u64 {
    fn ordered(x: f32) -> i64 {
        let bits = x.to_bits() as i32 as i64;
        if bits < 0 { i32::MIN as i64 - bits } else { bits }
    }
    ordered(a).abs_diff(ordered(b))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Whether the leaf read back f32 values (`read_f32`, or `read` of an f32 tensor).
fn reads_f32(leaf: &Leaf) -> bool {
    leaf.call() == "read_f32" || (leaf.call() == "read" && leaf.field("of").is_some_and(|m| m.starts_with("f32[")))
}

/// The text without its `read=` digest.
fn without_read(text: &str) -> String {
    text.split(' ').filter(|f| !f.starts_with("read=")).collect::<Vec<_>>().join(" ")
}

/// Max absolute and ULP difference of two f32 read-backs of the same length.
fn distance(ours: &[u8], theirs: &[u8]) -> Option<(f64, u64, bool)> {
    let (a, b) = (f32s(ours), f32s(theirs));
    if a.len() != b.len() || ours.len() != theirs.len() {
        return None;
    }
    let mut max_abs = 0f64;
    let mut max_ulp = 0u64;
    let mut all_within = true;
    for (x, y) in a.iter().zip(&b) {
        max_abs = max_abs.max((f64::from(*x) - f64::from(*y)).abs());
        max_ulp = max_ulp.max(ulp_distance(*x, *y));
        all_within &= within(*x, *y);
    }
    Some((max_abs, max_ulp, all_within))
}

/// The first leaf where `ours` (the re-execution) and `theirs` (the worker's) differ; `None` when
/// they agree (bitwise, or in `fast` mode within the tolerance).
pub fn first_difference(ours: &Trace, theirs: &Trace, fast: bool) -> Option<CallDiff> {
    let n = ours.leaves.len().max(theirs.leaves.len());
    for index in 0..n {
        let (o, t) = (ours.leaves.get(index), theirs.leaves.get(index));
        if let (Some(o), Some(t)) = (o, t)
            && o.text == t.text
        {
            continue;
        }
        let mut diff = CallDiff {
            index,
            call: o.or(t).map(|l| l.call().to_owned()).unwrap_or_default(),
            recomputed_leaf: o.map(|l| l.text.clone()),
            claimed_leaf: t.map(|l| l.text.clone()),
            max_abs_diff: None,
            max_ulp_diff: None,
            note: None,
        };
        let (Some(o), Some(t)) = (o, t) else {
            diff.note = Some(format!("the worker's trace has {} host calls, the re-execution {}", theirs.leaves.len(), ours.leaves.len()));
            return Some(diff);
        };
        let same_call = without_read(&o.text) == without_read(&t.text);
        if same_call && reads_f32(o) {
            match (o.evidence.as_deref(), t.evidence.as_deref()) {
                (Some(a), Some(b)) => {
                    if let Some((abs, ulp, all_within)) = distance(a, b) {
                        diff.max_abs_diff = Some(abs);
                        diff.max_ulp_diff = Some(ulp);
                        if fast && all_within {
                            continue;
                        }
                    }
                }
                _ => diff.note = Some("the values read back are too large to be kept as evidence: only their digests differ".into()),
            }
        } else if !same_call {
            diff.note = Some("the calls themselves differ (op, parameters, shapes, inputs or status)".into());
        }
        return Some(diff);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::trace::LeafText;

    fn read(values: &[f32]) -> Leaf {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut l = LeafText::new("read_f32");
        l.field("of", "f32[2]");
        l.read_back(&bytes);
        l.finish(0)
    }

    fn op(name: &str) -> Leaf {
        let mut l = LeafText::new(name);
        l.field("out", "f32[2]");
        l.finish(0)
    }

    #[test]
    fn ulps_count_representable_steps() {
        assert_eq!(ulp_distance(1.0, 1.0), 0);
        assert_eq!(ulp_distance(0.0, -0.0), 0);
        assert_eq!(ulp_distance(1.0, f32::from_bits(1.0f32.to_bits() + 3)), 3);
        assert_eq!(ulp_distance(-f32::from_bits(1), f32::from_bits(1)), 2);
        assert!(within(1.0, 1.0005) && !within(1.0, 1.01) && within(f32::NAN, f32::NAN) && !within(0.0, f32::NAN));
    }

    #[test]
    fn the_first_differing_call_is_named_with_its_distance() {
        let ours = Trace { leaves: vec![op("matmul"), read(&[1.0, 2.0]), op("add")] };
        assert!(first_difference(&ours, &ours.clone(), false).is_none());
        let theirs = Trace { leaves: vec![op("matmul"), read(&[1.0, 2.0 + 1.0 / 1024.0]), op("add")] };
        let d = first_difference(&ours, &theirs, false).unwrap();
        assert_eq!((d.index, d.call.as_str()), (1, "read_f32"));
        assert_eq!(d.max_abs_diff, Some(1.0 / 1024.0));
        assert_eq!(d.max_ulp_diff, Some(ulp_distance(2.0, 2.0 + 1.0 / 1024.0)));
        assert!(first_difference(&ours, &theirs, true).is_none(), "within the fast-mode tolerance");
        let far = Trace { leaves: vec![op("matmul"), read(&[1.0, 3.0]), op("add")] };
        assert_eq!(first_difference(&ours, &far, true).unwrap().index, 1);
        let shorter = Trace { leaves: vec![op("matmul"), read(&[1.0, 2.0])] };
        let d = first_difference(&ours, &shorter, false).unwrap();
        assert_eq!((d.index, d.claimed_leaf.is_none()), (2, true));
        let other_op = Trace { leaves: vec![op("matmul"), read(&[1.0, 2.0]), op("sub")] };
        assert!(first_difference(&ours, &other_op, true).unwrap().note.unwrap().contains("calls themselves differ"));
    }
}
