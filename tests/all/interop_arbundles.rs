//! Interop with npm `arbundles` 0.11.2 (the verifier the legacy AO MU uses), both ways: items
//! the worker builds must verify there under the same id, and items arbundles signs must parse
//! and verify here with every field intact; for both identities: ed25519 (type 2, a fresh key)
//! and an Arweave RSA-4096 wallet (type 1, arbundles' `ArweaveSigner`, the committed test wallet).
//!
//! Needs `node` and `npm ci --ignore-scripts --prefix tests/js`. Without them the tests print a
//! "skipped" line and pass, unless `CI` is set or `REQUIRE_INTEROP=1`, where they fail.

use std::collections::HashMap;

use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::protocol::ans104::{Ans104Error, MAX_TAG_BYTES, MAX_TAG_NAME, MAX_TAG_VALUE, MAX_TAGS};
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder, SignatureType, Tag, b64};
use serde::Deserialize;

use crate::support::{interop_dir, run_node};

/// One line of `verify.js` output.
#[derive(Debug, Deserialize)]
struct Verdict {
    file: String,
    valid: bool,
    id: Option<String>,
    error: Option<String>,
}

/// One line of `sign.js` output: what arbundles put into the item.
#[derive(Debug, Deserialize)]
struct Manifest {
    file: String,
    id: String,
    owner_b64url: String,
    target: Option<String>,
    anchor_hex: Option<String>,
    tags: Vec<Tag>,
    data_hex: String,
}

fn ao_tags() -> Vec<Tag> {
    vec![Tag::new("Data-Protocol", "ao"), Tag::new("Variant", "ao.TN.1"), Tag::new("Type", "Message")]
}

/// 128 tags whose Avro encoding is exactly `MAX_TAG_BYTES` long.
fn max_count_tags() -> Vec<Tag> {
    // Every length stays under 64, so each length is a one-byte varint; the count 128 takes two
    // bytes and the closing block one.
    let names: Vec<String> = (0..MAX_TAGS).map(|i| format!("Tag-{i:03}")).collect();
    let fixed = 2 + 1 + names.iter().map(|n| 2 + n.len()).sum::<usize>();
    let budget = MAX_TAG_BYTES - fixed;
    let (base, extra) = (budget / MAX_TAGS, budget % MAX_TAGS);
    names.into_iter().enumerate().map(|(i, name)| Tag::new(name, "v".repeat(base + usize::from(i < extra)))).collect()
}

/// The items the worker must be able to hand to an arbundles verifier, by file stem.
fn worker_items(key: &Keypair) -> Vec<(&'static str, DataItem)> {
    let unicode = Tag::new("Ünïcödé-Name", "héllo wörld ✓ 🚀 日本語 ".repeat(4));
    let anchor: [u8; 32] = std::array::from_fn(|i| (i * 37 + 11) as u8);
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
    let mib: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let long_name = "N".repeat(MAX_TAG_NAME);
    // One tag: 1 (count) + 2 + name + 2 + value + 1 (end) bytes.
    let value_for_exact_max = "w".repeat(MAX_TAG_BYTES - 6 - MAX_TAG_NAME);
    let shapes = [
        ("empty", DataItemBuilder::new()),
        (
            "ao-message",
            DataItemBuilder::new()
                .target([7; 32])
                .anchor(*b"00000000000000000000000000000042")
                .tags(ao_tags())
                .tag("Action", "Eval")
                .tag("Unicode", "héllo wörld ✓ 🚀 日本語")
                .data("return 1 + 1"),
        ),
        ("binary-anchor-and-data", DataItemBuilder::new().anchor(anchor).data(every_byte)),
        ("target-only", DataItemBuilder::new().target([0xff; 32])),
        (
            "unicode-and-duplicate-tags",
            DataItemBuilder::new().tag(unicode.name.clone(), unicode.value.clone()).tag("Dup", "1").tag("Dup", "2").data("x"),
        ),
        ("max-tag-count", DataItemBuilder::new().tags(max_count_tags()).data("128 tags")),
        ("max-tag-name-exact-max-bytes", DataItemBuilder::new().tag(long_name, value_for_exact_max).data("4096 tag bytes")),
        ("max-tag-value", DataItemBuilder::new().tag("V", "v".repeat(MAX_TAG_VALUE)).target([1; 32]).anchor([2; 32])),
        ("one-mib-data", DataItemBuilder::new().tags(ao_tags()).data(mib)),
    ];
    shapes.into_iter().map(|(name, builder)| (name, builder.sign(key).unwrap_or_else(|e| panic!("{name}: {e}")))).collect()
}

#[test]
fn worker_items_verify_with_arbundles() {
    let Some(js) = interop_dir("worker_items_verify_with_arbundles") else { return };
    worker_items_verify(&js, &Keypair::generate().unwrap());
}

#[test]
fn worker_rsa_items_verify_with_arbundles() {
    let Some(js) = interop_dir("worker_rsa_items_verify_with_arbundles") else { return };
    let wallet = crate::support::arweave_test_key();
    worker_items_verify(&js, &wallet);
    // Signed twice, the same item has two ids, and arbundles accepts both.
    let build = || DataItemBuilder::new().tags(ao_tags()).data("twice").sign(&wallet).unwrap();
    let (a, b) = (build(), build());
    assert_ne!(a.id(), b.id());
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<String> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let path = tmp.path().join(format!("twice-{i}.bin"));
            std::fs::write(&path, item.to_bytes()).unwrap();
            path.to_str().unwrap().to_owned()
        })
        .collect();
    let stdout = run_node(&js, "verify.js", &files);
    let verdicts: Vec<Verdict> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(verdicts.len(), 2, "{stdout}");
    for (v, item) in verdicts.iter().zip([&a, &b]) {
        assert!(v.valid, "{v:?}");
        assert_eq!(v.id.as_deref(), Some(item.id().as_str()));
    }
}

fn worker_items_verify(js: &std::path::Path, key: &Keypair) {
    let items = worker_items(key);
    let by_name: HashMap<_, _> = items.iter().map(|(name, item)| (*name, item)).collect();
    assert_eq!(by_name["max-tag-count"].tags.len(), MAX_TAGS);
    assert_eq!(by_name["max-tag-count"].raw_tags().len(), MAX_TAG_BYTES);
    assert_eq!(by_name["max-tag-name-exact-max-bytes"].raw_tags().len(), MAX_TAG_BYTES);
    assert_eq!(by_name["one-mib-data"].data.len(), 1 << 20);

    let tmp = tempfile::tempdir().unwrap();
    let path_of = |stem: &str| tmp.path().join(format!("{stem}.bin")).to_str().expect("UTF-8 temp path").to_owned();
    let mut expected: HashMap<String, (bool, String)> = HashMap::new();
    for (name, item) in &items {
        let bytes = item.to_bytes();
        DataItem::parse_verified(&bytes).unwrap_or_else(|e| panic!("{name}: the worker refuses its own item: {e}"));
        std::fs::write(path_of(name), &bytes).unwrap();
        expected.insert(path_of(name), (true, item.id()));
    }
    // Negative controls, so that a verifier that says yes to everything fails this test.
    let good = by_name["ao-message"];
    let mut bad_signature = good.to_bytes();
    bad_signature[2 + 17] ^= 0x01;
    let mut bad_data = good.to_bytes();
    *bad_data.last_mut().unwrap() ^= 0x01;
    for (name, bytes) in [("corrupt-signature", bad_signature), ("corrupt-data", bad_data)] {
        assert_eq!(DataItem::parse_verified(&bytes), Err(Ans104Error::BadSignature), "{name}");
        std::fs::write(path_of(name), &bytes).unwrap();
        expected.insert(path_of(name), (false, DataItem::parse(&bytes).unwrap().id()));
    }

    let mut files: Vec<String> = expected.keys().cloned().collect();
    files.sort();
    let stdout = run_node(js, "verify.js", &files);
    let verdicts: Vec<Verdict> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad verify.js line {l:?}: {e}"))).collect();
    assert_eq!(verdicts.len(), files.len(), "verify.js output:\n{stdout}");
    for v in &verdicts {
        let (valid, id) = expected.get(&v.file).unwrap_or_else(|| panic!("verify.js reported an unknown file: {v:?}"));
        assert_eq!(v.valid, *valid, "arbundles verdict for {} (error: {:?})", v.file, v.error);
        if *valid {
            assert_eq!(v.id.as_deref(), Some(id.as_str()), "arbundles id for {}", v.file);
        }
    }
}

#[test]
fn arbundles_items_verify_with_worker() {
    let Some(js) = interop_dir("arbundles_items_verify_with_worker") else { return };
    arbundles_items_verify(&js, None, SignatureType::Ed25519);
}

#[test]
fn arbundles_arweave_signer_items_verify_with_worker() {
    let Some(js) = interop_dir("arbundles_arweave_signer_items_verify_with_worker") else { return };
    let wallet = crate::support::arweave_test_wallet_path();
    let owner = arbundles_items_verify(&js, Some(wallet.to_str().expect("UTF-8 path")), SignatureType::Arweave);
    let key = crate::support::arweave_test_key();
    assert_eq!(owner, key.public_key(), "ArweaveSigner's owner is the wallet's modulus n");
    assert_eq!(ao_gpu_worker::protocol::ans104::address_of(&owner), key.address());
}

/// Has sign.js make its items (with an Arweave wallet when given), checks them here, and
/// returns their (common) owner.
fn arbundles_items_verify(js: &std::path::Path, wallet: Option<&str>, expected_type: SignatureType) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().to_str().expect("UTF-8 temp path").to_owned();
    let count = 6;
    let mut args = vec![out_dir, count.to_string()];
    args.extend(wallet.map(str::to_owned));
    let stdout = run_node(js, "sign.js", &args);
    let manifests: Vec<Manifest> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad sign.js line {l:?}: {e}"))).collect();
    assert_eq!(manifests.len(), count, "sign.js output:\n{stdout}");

    let mut owners = Vec::new();
    for m in &manifests {
        let raw = std::fs::read(&m.file).unwrap_or_else(|e| panic!("{}: {e}", m.file));
        let item = DataItem::parse_verified(&raw).unwrap_or_else(|e| panic!("{}: the worker refuses an arbundles item: {e}", m.file));
        assert_eq!(item.signature_type, expected_type, "{}", m.file);
        assert_eq!(item.id(), m.id, "id of {}", m.file);
        assert_eq!(b64::encode(&item.owner), m.owner_b64url, "owner of {}", m.file);
        assert_eq!(item.target_id(), m.target, "target of {}", m.file);
        assert_eq!(item.anchor.map(hex::encode), m.anchor_hex, "anchor of {}", m.file);
        assert_eq!(item.tags, m.tags, "tags of {}", m.file);
        assert_eq!(hex::encode(&item.data), m.data_hex, "data of {}", m.file);
        assert_eq!(item.to_bytes(), raw, "{} does not re-serialize byte for byte", m.file);
        owners.push(item.owner.clone());

        let mut tampered = raw.clone();
        tampered[2] ^= 0x80;
        assert_eq!(DataItem::parse_verified(&tampered), Err(Ans104Error::BadSignature), "tampered {}", m.file);
    }
    assert!(owners.windows(2).all(|w| w[0] == w[1]), "sign.js should sign every item with one key");
    // The shapes sign.js makes must cover what the worker has to read.
    let covered = |what: &str, f: &dyn Fn(&Manifest) -> bool| {
        assert!(manifests.iter().any(f), "no arbundles item {what}");
    };
    covered("without target", &|m| m.target.is_none());
    covered("with target", &|m| m.target.is_some());
    covered("without anchor", &|m| m.anchor_hex.is_none());
    covered("with anchor", &|m| m.anchor_hex.is_some());
    covered("without tags", &|m| m.tags.is_empty());
    covered("with AO tags", &|m| m.tags.iter().any(|t| t.name == "Data-Protocol" && t.value == "ao"));
    covered("with a non-ASCII tag", &|m| m.tags.iter().any(|t| !t.value.is_ascii()));
    covered("with empty data", &|m| m.data_hex.is_empty());
    covered("with binary data", &|m| hex::decode(&m.data_hex).unwrap().iter().any(|&b| b >= 0x80));
    owners.pop().expect("items were signed")
}
