//! ANS-104 conformance: the published and generated vectors of docs/ao-protocol.md §1.8,
//! round trips over random items, and a corpus of malformed items that must each be
//! refused with a specific error and no panic.

use crate::support;
use ao_gpu_worker::attest::Keypair;
use ao_gpu_worker::protocol::ans104::{Ans104Error, MAX_TAG_BYTES, MAX_TAGS};
use ao_gpu_worker::protocol::avro::AvroError;
use ao_gpu_worker::protocol::{DataItem, DataItemBuilder, SignatureType, Tag, b64};
use proptest::prelude::*;

const A1: &str = "0200eee52fa0c93cb308e907db097a0b47b8833c03e581656abde3be22c7ac4d9c771d44d9a6179e841dee5d2a10f74f937541bf5991e792ce20f78ad575765a3b0bdddfb5e1fe0777a910126e9299ac411c49ca0d92642e0361d0c6db71d67424ff0001456a6e31753673536a3565435131654179784f3735484b5579436a71574a436b01000000000000001a000000000000000218436f6e74656e742d5479706514746578742f706c61696e0048656c6c6f2c2042756e646c7221";
const A2: &str = "02001858abc33bc97694896d801a650353702c915a1f6a6e6fb6d19f0a2af7a2285fa608365f471e386c421abdfa52ab889ad51c6319ff0972fec3bc985f54795b0ddddfb5e1fe0777a910126e9299ac411c49ca0d92642e0361d0c6db71d67424ff00000000000000000000000000000000000048656c6c6f2c2042756e646c7221";
const B1: &str = "02003249da169e71d4c8a254f437414329771cd95ef3e78b0180ddf01755999e07aaa38071f2a1d3aea46a045543c76187bb1636a34f335c58eb51e4e03791289b05d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a01070707070707070707070707070707070707070707070707070707070707070701303030303030303030303030303030303030303030303030303030303030303104000000000000003c00000000000000081a446174612d50726f746f636f6c04616f0e56617269616e740e616f2e544e2e3108547970650e4d6573736167650c416374696f6e08546573740068656c6c6f20616f";
const B2: &str = "02002df8011e6150fbbf50912a2c335f3656335eb819054ced90671fd8105108d0c33dbe5d40ae8993e1440a3ee70101b385fc80f233fa80a59e1abfb4a45dae2208d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a000000000000000000000000000000000000";
const RFC8032_SECRET: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";

fn bytes(hex_text: &str) -> Vec<u8> {
    hex::decode(hex_text).unwrap()
}

fn rfc_key() -> Keypair {
    Keypair::from_secret(&bytes(RFC8032_SECRET).try_into().unwrap())
}

#[test]
fn published_a1_solana_sig() {
    let raw = bytes(A1);
    assert_eq!(raw.len(), 188);
    let item = DataItem::parse_verified(&raw).unwrap();
    assert_eq!(item.signature_type, SignatureType::Ed25519);
    assert_eq!(item.id(), "-SfedX0oChT-v0_Zg35d9fMHFriaSLZJVA89ij9zoqw");
    assert_eq!(item.tags, vec![Tag::new("Content-Type", "text/plain")]);
    assert_eq!(&item.anchor.unwrap(), b"Ejn1u6sSj5eCQ1eAyxO75HKUyCjqWJCk");
    assert_eq!(item.target, None);
    assert_eq!(item.data, b"Hello, Bundlr!");
    assert_eq!(
        hex::encode(item.signature_data()),
        "991cd657ef683babd05088b6fee09550fd39bb1cd02668fadbda957b6e33636dc775970b5b3919a87a2cf05f630cbbeb"
    );
    assert_eq!(item.to_bytes(), raw);
}

#[test]
fn published_a2_algorand_sig() {
    let raw = bytes(A2);
    assert_eq!(raw.len(), 130);
    let item = DataItem::parse_verified(&raw).unwrap();
    assert_eq!(item.id(), "YSF4TUlWnLSNkXSHwkhqGvcR3WH55d8zKP_YubpjzX0");
    assert!(item.tags.is_empty() && item.raw_tags().is_empty());
    assert_eq!((item.target, item.anchor), (None, None));
    assert_eq!(item.data, b"Hello, Bundlr!");
    assert_eq!(item.to_bytes(), raw);
}

#[test]
fn generated_b1_is_reproduced_byte_for_byte() {
    let item = DataItemBuilder::new()
        .target([7; 32])
        .anchor(*b"00000000000000000000000000000001")
        .tag("Data-Protocol", "ao")
        .tag("Variant", "ao.TN.1")
        .tag("Type", "Message")
        .tag("Action", "Test")
        .data(b"hello ao".to_vec())
        .sign(&rfc_key())
        .unwrap();
    assert_eq!(hex::encode(item.to_bytes()), B1);
    assert_eq!(item.len(), 248);
    assert_eq!(item.id(), "nji5A8gERnbUG_xypTB7vHmASh21K9p4vJuejZ_tRfw");
    assert_eq!(
        hex::encode(item.signature_data()),
        "196efa4d3d895ddaeb58c7d0771e8ff85b82eb31627f8aad46dc696b250c4a8c9f9d0fb5aeda63b67104d885b48c0d8b"
    );
    let parsed = DataItem::parse_verified(&bytes(B1)).unwrap();
    assert_eq!(parsed, item);
}

#[test]
fn generated_b2_is_reproduced_byte_for_byte() {
    let item = DataItemBuilder::new().sign(&rfc_key()).unwrap();
    assert_eq!(hex::encode(item.to_bytes()), B2);
    assert_eq!(item.len(), 116);
    assert_eq!(item.id(), "q7yUUVaD2EOTmfRcJHeNP64mzY2VODy89Pe9hjsGht8");
    assert_eq!(
        hex::encode(item.signature_data()),
        "a1f66a3bc7a9f0d1e2c70544c884ba83412ed60f8348de5e6331461dc894d76573091e3e4d1ca9437a3508d73ecc6fea"
    );
    DataItem::parse_verified(&bytes(B2)).unwrap();
}

#[test]
fn flipping_a_byte_breaks_every_vector() {
    // The last byte is data for A1, A2 and B1; B2 has no data, so flip a signature byte.
    for (v, at) in [(A1, None), (A2, None), (B1, None), (B2, Some(10))] {
        let mut raw = bytes(v);
        let at = at.unwrap_or(raw.len() - 1);
        raw[at] ^= 1;
        assert_eq!(DataItem::parse_verified(&raw), Err(Ans104Error::BadSignature), "vector {}", &v[..16]);
    }
}

#[test]
fn owner_address_is_b64url_sha256_of_public_key() {
    let item = DataItem::parse(&bytes(B1)).unwrap();
    assert_eq!(item.owner_address(), rfc_key().address());
    use sha2::Digest;
    let expected = b64::encode(&sha2::Sha256::digest(bytes("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")));
    assert_eq!(item.owner_address(), expected);
}

// ---- malformed corpus -------------------------------------------------------------------

/// Offsets in an ed25519 item with target and anchor present.
const TARGET_FLAG: usize = 2 + 64 + 32;
const ANCHOR_FLAG: usize = TARGET_FLAG + 33;
const TAG_COUNT: usize = ANCHOR_FLAG + 33;
const TAG_BYTES: usize = TAG_COUNT + 8;

/// A malformed item: its name, its bytes, and the error it must be refused with.
type Case = (&'static str, Vec<u8>, Box<dyn Fn(&Ans104Error) -> bool>);

#[test]
fn malformed_corpus_is_refused_with_specific_errors() {
    let good = bytes(B1);
    let mut cases: Vec<Case> = Vec::new();

    cases.push(("empty", vec![], Box::new(|e| matches!(e, Ans104Error::Empty { len: 0 }))));
    cases.push(("one byte", vec![2], Box::new(|e| matches!(e, Ans104Error::Empty { len: 1 }))));
    cases.push((
        "unknown signature type",
        [&[9u8, 0][..], &good[2..]].concat(),
        Box::new(|e| matches!(e, Ans104Error::UnknownSignatureType(9))),
    ));
    for cut in [10, 70, TARGET_FLAG, TARGET_FLAG + 10, ANCHOR_FLAG + 5, TAG_COUNT + 3, TAG_BYTES + 4, TAG_BYTES + 8 + 20] {
        let what = format!("truncated at {cut}");
        cases.push((Box::leak(what.into_boxed_str()), good[..cut].to_vec(), Box::new(|e| matches!(e, Ans104Error::Truncated { .. }))));
    }
    let mut bad_target = good.clone();
    bad_target[TARGET_FLAG] = 2;
    cases.push((
        "bad target presence byte",
        bad_target,
        Box::new(|e| matches!(e, Ans104Error::BadPresenceByte { field: "target", value: 2 })),
    ));
    let mut bad_anchor = good.clone();
    bad_anchor[ANCHOR_FLAG] = 0xff;
    cases.push((
        "bad anchor presence byte",
        bad_anchor,
        Box::new(|e| matches!(e, Ans104Error::BadPresenceByte { field: "anchor", value: 0xff })),
    ));
    let mut count_high = good.clone();
    count_high[TAG_COUNT] = 5;
    cases.push(("tag count above decoded", count_high, Box::new(|e| matches!(e, Ans104Error::TagCountMismatch { header: 5, decoded: 4 }))));
    // The header's tag count is checked before anything is decoded or allocated for the tags.
    let mut count_huge = good.clone();
    count_huge[TAG_COUNT..TAG_COUNT + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(("a tag count of 2^64 - 1", count_huge, Box::new(|e| matches!(e, Ans104Error::TooManyTags { .. }))));
    let mut count_zero = good.clone();
    count_zero[TAG_COUNT] = 0;
    cases.push((
        "tag count zero with tags",
        count_zero,
        Box::new(|e| matches!(e, Ans104Error::TagCountMismatch { header: 0, decoded: 4 })),
    ));
    let mut huge_tag_len = good.clone();
    huge_tag_len[TAG_BYTES..TAG_BYTES + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(("tag byte count past the end", huge_tag_len, Box::new(|e| matches!(e, Ans104Error::Truncated { field: "tags", .. }))));
    let mut short_tag_len = good.clone();
    short_tag_len[TAG_BYTES] = 0x3b; // one byte short: the closing 0 becomes data
    cases.push(("tag bytes cut inside the avro", short_tag_len, Box::new(|e| matches!(e, Ans104Error::Tags(AvroError::Truncated(_))))));
    let mut flipped_sig = good.clone();
    flipped_sig[5] ^= 0x40;
    cases.push(("flipped signature byte", flipped_sig, Box::new(|e| matches!(e, Ans104Error::BadSignature))));
    let mut flipped_owner = good.clone();
    flipped_owner[2 + 64] ^= 1;
    cases.push(("flipped owner byte", flipped_owner, Box::new(|e| matches!(e, Ans104Error::BadSignature | Ans104Error::InvalidOwner(_)))));
    let mut flipped_tag = good.clone();
    flipped_tag[TAG_BYTES + 8 + 3] ^= 0x20;
    cases.push(("flipped tag byte", flipped_tag, Box::new(|e| matches!(e, Ans104Error::BadSignature))));
    cases.push(("oversized tags", oversized_tag_item(), Box::new(|e| matches!(e, Ans104Error::TagBytesTooLarge { .. }))));
    cases.push(("too many tags", too_many_tags_item(), Box::new(|e| matches!(e, Ans104Error::TooManyTags { count: 129 }))));
    cases.push((
        "rsa-shaped junk does not verify",
        rsa_shaped_item(),
        Box::new(|e| matches!(e, Ans104Error::InvalidOwner(_) | Ans104Error::BadSignature)),
    ));

    for (name, raw, expect) in &cases {
        let result = std::panic::catch_unwind(|| DataItem::parse_verified(raw));
        let result = result.unwrap_or_else(|_| panic!("{name}: panicked"));
        let err = result.err().unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(expect(&err), "{name}: unexpected error {err:?}");
        assert!(!err.to_string().is_empty());
    }
}

/// Re-serializes an item with the given tags, keeping the (now wrong) signature: the tag
/// checks come before the signature check.
fn with_tags(tags: &[Tag]) -> Vec<u8> {
    let raw_tags = ao_gpu_worker::protocol::avro::encode_tags(tags);
    let mut out = vec![2, 0];
    out.extend_from_slice(&[1; 64]);
    out.extend_from_slice(&rfc_key().public_key());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(tags.len() as u64).to_le_bytes());
    out.extend_from_slice(&(raw_tags.len() as u64).to_le_bytes());
    out.extend_from_slice(&raw_tags);
    out
}

fn oversized_tag_item() -> Vec<u8> {
    with_tags(&[Tag::new("a", "x".repeat(3000)), Tag::new("b", "y".repeat(3000))])
}

fn too_many_tags_item() -> Vec<u8> {
    with_tags(&(0..=MAX_TAGS).map(|i| Tag::new(format!("t{i}"), "v")).collect::<Vec<_>>())
}

fn rsa_shaped_item() -> Vec<u8> {
    let mut out = vec![1, 0];
    out.extend_from_slice(&[3; 512]);
    out.extend_from_slice(&[4; 512]);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(b"data");
    out
}

#[test]
fn rsa_shaped_junk_parses_but_does_not_verify() {
    let raw = rsa_shaped_item();
    let item = DataItem::parse(&raw).unwrap();
    assert_eq!(item.signature_type, SignatureType::Arweave);
    assert_eq!(item.to_bytes(), raw);
    // An even "modulus" is no RSA key at all.
    assert_eq!(item.verify(), Err(Ans104Error::InvalidOwner("arweave (rsa-4096)")));
}

#[test]
fn builder_refuses_what_some_verifier_rejects() {
    let key = rfc_key();
    let empty_value = DataItemBuilder::new().tag("Action", "").sign(&key);
    assert!(matches!(empty_value, Err(Ans104Error::EmptyTag { index: 0, field: "value" })));
    let long_name = DataItemBuilder::new().tag("n".repeat(1025), "v").sign(&key);
    assert!(matches!(long_name, Err(Ans104Error::TagTooLong { field: "name", .. })));
    let long_value = DataItemBuilder::new().tag("n", "v".repeat(3073)).sign(&key);
    assert!(matches!(long_value, Err(Ans104Error::TagTooLong { field: "value", .. })));
    let too_many_bytes = DataItemBuilder::new().tags((0..3).map(|i| Tag::new(format!("n{i}"), "v".repeat(1500)))).sign(&key);
    assert!(matches!(too_many_bytes, Err(Ans104Error::TagBytesTooLarge { len }) if len > MAX_TAG_BYTES));
}

// ---- property tests -----------------------------------------------------------------------

fn arb_tag() -> impl Strategy<Value = Tag> {
    ("[A-Za-z-]{1,24}", "\\PC{1,40}").prop_map(|(n, v)| Tag::new(n, v))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn parse_serialize_round_trip(
        seed in any::<[u8; 32]>(),
        target in proptest::option::of(any::<[u8; 32]>()),
        anchor in proptest::option::of(any::<[u8; 32]>()),
        tags in proptest::collection::vec(arb_tag(), 0..12),
        data in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut b = DataItemBuilder::new().tags(tags).data(data);
        if let Some(t) = target { b = b.target(t); }
        if let Some(a) = anchor { b = b.anchor(a); }
        let item = b.sign(&Keypair::from_secret(&seed)).unwrap();
        let raw = item.to_bytes();
        prop_assert_eq!(raw.len(), item.len());
        let parsed = DataItem::parse_verified(&raw).unwrap();
        prop_assert_eq!(&parsed, &item);
        prop_assert_eq!(parsed.to_bytes(), raw);
    }

    #[test]
    fn parser_never_panics_on_mutations(pos in 0usize..248, byte in any::<u8>(), cut in 0usize..260) {
        let mut raw = bytes(B1);
        raw[pos] = byte;
        raw.truncate(cut);
        let _ = DataItem::parse_verified(&raw);
    }

    #[test]
    fn parser_never_panics_on_noise(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = DataItem::parse_verified(&raw);
    }
}

// ---- published RSA items (the AO scheduler's own test data) -------------------------------

fn rsa_vector(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors").join(name);
    b64::decode(std::fs::read_to_string(&path).unwrap().trim()).unwrap()
}

#[test]
fn published_rsa_items_parse_with_their_ids_and_verify() {
    let cases = [
        ("su_rsa_message.b64", 1152, "6oYAxVAnH8yKsZKpMgHSbRv7uVWey68PAqYuSXeZBbg", Some("4QKhXnyl1z3HEPprMKfTeXrWPRuQjK6O99k5SFKGuck")),
        ("su_rsa_assignment.b64", 1303, "P_N-NEMtNRpNXemOHMNu9Gjx4AbNhAl-7_5CGtPC6PM", None),
        ("su_rsa_process.b64", 1262, "boxXWZqkBaZmOKJ3Vh7PZzC07Q9OXmxF4QT_ikodfNY", Some("4QKhXnyl1z3HEPprMKfTeXrWPRuQjK6O99k5SFKGuck")),
    ];
    for (file, len, id, owner) in cases {
        let raw = rsa_vector(file);
        assert_eq!(raw.len(), len, "{file}");
        let item = DataItem::parse(&raw).unwrap();
        assert_eq!(item.signature_type, SignatureType::Arweave);
        assert_eq!(item.id(), id, "{file}");
        if let Some(owner) = owner {
            assert_eq!(item.owner_address(), owner, "{file}");
        }
        assert_eq!(item.to_bytes(), raw, "{file} round trip");
        item.verify().unwrap_or_else(|e| panic!("{file}: {e}"));
        DataItem::parse_verified(&raw).unwrap();
        // Any flipped bit after the signature type breaks it (signature, owner, tags, data).
        for at in [2, 2 + 511, 2 + 512 + 7, len - 1] {
            let mut tampered = raw.clone();
            tampered[at] ^= 0x10;
            let err = DataItem::parse_verified(&tampered).err().unwrap_or_else(|| panic!("{file}: byte {at} flipped, still verifies"));
            assert!(
                matches!(err, Ans104Error::BadSignature | Ans104Error::InvalidOwner(_) | Ans104Error::Tags(_)),
                "{file} byte {at}: {err:?}"
            );
        }
    }
    let message = DataItem::parse(&rsa_vector("su_rsa_message.b64")).unwrap();
    assert_eq!(message.target_id().as_deref(), Some("-oM8CYgbqsRcpI3tE_cpGM3kgDlamnYjSGA4nptPao0"));
    assert_eq!(message.data, b"6583");
    assert_eq!(message.tags.len(), 5);
    assert!(message.raw_tags().starts_with(&hex::decode("0a1a446174612d").unwrap()));
    assert!(message.raw_tags().ends_with(&hex::decode("04616f00").unwrap()));
    let assignment = DataItem::parse(&rsa_vector("su_rsa_assignment.b64")).unwrap();
    for (name, value) in [("Epoch", "0"), ("Nonce", "1"), ("Block-Height", "000001393008"), ("Timestamp", "1711676638471")] {
        assert_eq!(assignment.tag(name), Some(value), "{name}");
    }
}

// ---- signing with an Arweave RSA-4096 wallet (type 1) -------------------------------------

#[test]
fn arweave_wallet_signs_type_1_items_that_verify_and_differ_each_time() {
    let wallet = support::arweave_test_key();
    let build = || {
        DataItemBuilder::new()
            .target([9; 32])
            .anchor([8; 32])
            .tags([Tag::new("Data-Protocol", "ao"), Tag::new("Type", "Message")])
            .data(b"rsa".to_vec())
            .sign(&wallet)
            .unwrap()
    };
    let (a, b) = (build(), build());
    for item in [&a, &b] {
        assert_eq!(item.signature_type, SignatureType::Arweave);
        assert_eq!((item.owner.len(), item.signature.len()), (512, 512));
        assert_eq!(item.owner_address(), wallet.address());
        let raw = item.to_bytes();
        assert_eq!(&raw[..2], &[1, 0]);
        assert_eq!(DataItem::parse_verified(&raw).unwrap(), *item);
    }
    assert_eq!(a.signature_data(), b.signature_data(), "same content");
    assert_ne!(a.id(), b.id(), "RSA-PSS is randomized: signing twice gives two ids");
}
