//! docs/attestation.md against a real item: the committed vector (tests/vectors/attestation-v2,
//! written by `verify::regenerate_attestation_vector` from a devnet run of the MLP actor) parses,
//! its signature verifies, its tags decode to the expected fields, its data repeats them and
//! satisfies docs/attestation.schema.json, and its trace leaves hash to its `Trace-Root`.
//!
//! The schema is checked by a small structural validator (the keywords the schema uses: type,
//! const, enum, required, additionalProperties, minimum, and its three patterns, recognised
//! literally), not by a JSON Schema library: none is in the dependency tree.

use std::path::Path;

use ao_gpu_worker::attest::attestation::{Attestation, VERSION};
use ao_gpu_worker::attest::trace::{Leaf, Trace, root_of};
use ao_gpu_worker::protocol::{DataItem, b64};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn vector() -> (DataItem, Value) {
    let dir = root().join("tests/vectors/attestation-v2");
    let bytes = b64::decode(std::fs::read_to_string(dir.join("item.b64")).unwrap().trim()).unwrap();
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (DataItem::parse(&bytes).unwrap(), expected)
}

fn matches_pattern(pattern: &str, s: &str) -> bool {
    let id = |s: &str| s.len() == 43 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match pattern {
        "^[A-Za-z0-9_-]{43}$" => id(s),
        "^[0-9a-f]{64}$" => s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "^(cpu|wgpu|cuda)/(reproducible|fast)$" => {
            s.split_once('/').is_some_and(|(k, m)| ["cpu", "wgpu", "cuda"].contains(&k) && ["reproducible", "fast"].contains(&m))
        }
        other => panic!("the validator does not know the pattern {other}"),
    }
}

/// The schema's keywords, structurally; returns the violations.
fn violations(schema: &Value, v: &Value, at: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = schema.get("const")
        && c != v
    {
        out.push(format!("{at}: {v} is not {c}"));
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        out.push(format!("{at}: {v} is not one of {e:?}"));
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => panic!("type {t}"),
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "string" => v.is_string(),
            "integer" => v.is_u64() || v.is_i64(),
            "null" => v.is_null(),
            other => panic!("the validator does not know the type {other}"),
        });
        if !ok {
            out.push(format!("{at}: {v} is not of type {types:?}"));
        }
    }
    if let (Some(p), Some(s)) = (schema.get("pattern").and_then(Value::as_str), v.as_str())
        && !matches_pattern(p, s)
    {
        out.push(format!("{at}: {s:?} does not match {p}"));
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_i64), v.as_i64())
        && n < min
    {
        out.push(format!("{at}: {n} < {min}"));
    }
    if let Some(obj) = v.as_object() {
        for r in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !obj.contains_key(r.as_str().unwrap()) {
                out.push(format!("{at}: {r} is required"));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (k, value) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => out.extend(violations(s, value, &format!("{at}/{k}"))),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => out.push(format!("{at}: unknown key {k}")),
                None => {}
            }
        }
    }
    out
}

fn schema() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("docs/attestation.schema.json")).unwrap()).unwrap()
}

#[test]
fn the_v2_vector_verifies_and_decodes_to_its_fields() {
    let (item, expected) = vector();
    item.verify().expect("the vector's signature verifies");
    assert_eq!(item.id(), expected["id"].as_str().unwrap());
    assert_eq!(item.owner_address(), expected["signer"].as_str().unwrap());
    assert_eq!(item.target.map(|t| b64::encode(&t)).as_deref(), expected["target"].as_str());
    let att = Attestation::from_item(&item).unwrap();
    assert_eq!(att.version, VERSION);
    // The tags decode to exactly the expected fields, and the data repeats them.
    assert_eq!(serde_json::to_value(&att).unwrap(), expected["data"]);
    let data: Value = serde_json::from_slice(&item.data).unwrap();
    assert_eq!(data, expected["data"], "the data repeats the tags");
    assert_eq!(item.tag("Content-Type"), Some("application/json"));
    assert_eq!(item.tag("Action"), Some("Compute-Attestation"));
}

#[test]
fn the_vector_data_satisfies_the_schema_and_the_schema_catches_bad_data() {
    let (item, _) = vector();
    let schema = schema();
    let data: Value = serde_json::from_slice(&item.data).unwrap();
    assert_eq!(violations(&schema, &data, ""), Vec::<String>::new());
    let mut bad = data.clone();
    bad["trace-root"] = "XYZ".into();
    bad["nonce"] = "1".into();
    bad.as_object_mut().unwrap().remove("previous-attestation");
    bad["extra"] = 1.into();
    let found = violations(&schema, &bad, "");
    assert_eq!(found.len(), 4, "{found:?}");
}

#[test]
fn the_vector_trace_hashes_to_its_root() {
    let (item, expected) = vector();
    let leaves: Vec<Leaf> =
        expected["leaves"].as_array().unwrap().iter().map(|l| Leaf::new(l["text"].as_str().unwrap().to_owned(), None)).collect();
    for (l, e) in leaves.iter().zip(expected["leaves"].as_array().unwrap()) {
        assert_eq!(l.hash_hex(), e["hash"].as_str().unwrap(), "leaf hash = sha256(0x00 || text)");
    }
    let trace = Trace { leaves };
    assert_eq!(trace.root(), expected["trace_root"].as_str().unwrap());
    assert_eq!(item.tag("Trace-Root"), expected["trace_root"].as_str());
    assert_eq!(item.tag("Trace-Length").unwrap(), trace.leaves.len().to_string());
    // The tree by hand for this length: RFC 6962's split at the largest power of two below n.
    let hashes: Vec<[u8; 32]> = trace.leaves.iter().map(Leaf::hash).collect();
    assert_eq!(hex::encode(root_of(&hashes)), trace.root());
    let calls: Vec<&str> = trace.leaves.iter().map(Leaf::call).collect();
    assert_eq!(calls.iter().filter(|c| **c == "run").count(), 1, "{calls:?}");
}
