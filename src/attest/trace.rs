//! The op trace of one evaluation: one leaf per `ao_gpu` host call, in call order, and the Merkle
//! root over them that attestations bind (docs/attestation.md, "The trace").
//!
//! A leaf is a canonical line of text (ASCII, no newline) that names the host call, its status and
//! what it did: the ops it ran with their parameters, the dtypes and shapes of their inputs and
//! outputs, the sha256 of every byte range it took from Wasm memory (`data=`) and of every byte
//! range it wrote back into Wasm memory (`read=`). The runtime builds it ([`LeafText`]); this
//! module only hashes.
//!
//! The tree is RFC 6962's Merkle Tree Hash over the leaf texts, with sha256:
//! `MTH({}) = sha256("")`, `MTH({d}) = sha256(0x00 || d)`, and for `n > 1` leaves
//! `MTH(D[n]) = sha256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))` where `k` is the largest power of two
//! smaller than `n`. No odd-node rule is needed: the split is unbalanced on the right. The root is
//! written as 64 lowercase hex digits. An evaluation that makes no `ao_gpu` call (every aos
//! process) has the empty root [`EMPTY_ROOT`].

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The root of the empty trace: sha256 of the empty string.
pub const EMPTY_ROOT: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Read-back bytes kept with a leaf (the `evidence` of a `read`), so that a verifier can measure
/// how far its own output is from the worker's, not only that it differs.
pub const EVIDENCE_MAX_BYTES: usize = 4096;

/// One leaf: the canonical text and up to [`EVIDENCE_MAX_BYTES`] of what it read back. Its hash,
/// `sha256(0x00 || text)`, is computed when needed ([`Leaf::hash`]), not while the call runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaf {
    pub text: String,
    /// The bytes a `read`/`read_f32` wrote into Wasm memory, when at most [`EVIDENCE_MAX_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_hex")]
    pub evidence: Option<Vec<u8>>,
}

impl Leaf {
    pub fn new(text: String, evidence: Option<Vec<u8>>) -> Self {
        Self { text, evidence }
    }

    /// `sha256(0x00 || text)`.
    pub fn hash(&self) -> [u8; 32] {
        leaf_hash(self.text.as_bytes())
    }

    /// [`Leaf::hash`] as hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash())
    }

    /// The host call's name: the text up to the first space.
    pub fn call(&self) -> &str {
        self.text.split(' ').next().unwrap_or("")
    }

    /// The value of the first `key=` field of the text.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.text.split(' ').find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    }
}

/// The trace of one evaluation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub leaves: Vec<Leaf>,
}

impl Trace {
    /// The Merkle root (hex) over the leaves in order.
    pub fn root(&self) -> String {
        let hashes: Vec<[u8; 32]> = self.leaves.iter().map(Leaf::hash).collect();
        hex::encode(root_of(&hashes))
    }

    /// Whether the leaves hash to `root`.
    pub fn proves(&self, root: &str) -> bool {
        self.root() == root
    }
}

/// `sha256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `sha256(0x01 || left || right)`.
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// RFC 6962's Merkle Tree Hash over leaf hashes (already `leaf_hash`ed).
pub fn root_of(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves.len() {
        0 => Sha256::digest(b"").into(),
        1 => leaves[0],
        n => {
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}

/// A leaf under construction: the runtime appends ` key=value` fields as the call proceeds.
#[derive(Debug, Default)]
pub struct LeafText {
    pub text: String,
    pub evidence: Option<Vec<u8>>,
}

impl LeafText {
    pub fn new(call: &str) -> Self {
        let mut text = String::with_capacity(96);
        text.push_str(call);
        Self { text, evidence: None }
    }

    /// Appends ` key=value`.
    pub fn field(&mut self, key: &str, value: impl std::fmt::Display) {
        let _ = write!(self.text, " {key}={value}");
    }

    /// Appends ` key=<sha256 hex of bytes>`.
    pub fn digest(&mut self, key: &str, bytes: &[u8]) {
        let _ = write!(self.text, " {key}={}", hex::encode(Sha256::digest(bytes)));
    }

    /// Appends ` read=<sha256>` and keeps the bytes as evidence when small enough.
    pub fn read_back(&mut self, bytes: &[u8]) {
        self.digest("read", bytes);
        if bytes.len() <= EVIDENCE_MAX_BYTES {
            self.evidence = Some(bytes.to_vec());
        }
    }

    pub fn finish(self, status: impl std::fmt::Display) -> Leaf {
        let mut text = self.text;
        let _ = write!(text, " status={status}");
        Leaf::new(text, self.evidence)
    }
}

mod opt_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| hex::decode(t).map_err(serde::de::Error::custom)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(hex_text: &str) -> [u8; 32] {
        hex::decode(hex_text).unwrap().try_into().unwrap()
    }

    #[test]
    fn the_tree_is_rfc_6962() {
        assert_eq!(hex::encode(root_of(&[])), EMPTY_ROOT);
        assert_eq!(Trace::default().root(), EMPTY_ROOT);
        // RFC 6962's reference vectors (certificate-transparency's merkle tree tests): the
        // leaf inputs "", 0x00, 0x10, 0x2021, 0x3031, 0x40414243, ...
        let inputs: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f],
        ];
        let leaves: Vec<[u8; 32]> = inputs.iter().map(|d| leaf_hash(d)).collect();
        let expected = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        for (n, want) in expected.iter().enumerate() {
            assert_eq!(hex::encode(root_of(&leaves[..n + 1])), *want, "{} leaves", n + 1);
        }
        assert_eq!(node_hash(&h(expected[0]), &leaves[1]), h(expected[1]));
    }

    #[test]
    fn leaves_render_canonically_and_prove_their_root() {
        let mut l = LeafText::new("tensor");
        l.field("in", "f32[2,3]");
        l.digest("data", b"abc");
        let leaf = l.finish(0);
        assert_eq!(leaf.text, "tensor in=f32[2,3] data=ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad status=0");
        assert_eq!((leaf.call(), leaf.field("status"), leaf.field("in")), ("tensor", Some("0"), Some("f32[2,3]")));
        let mut r = LeafText::new("read_f32");
        r.read_back(&[1, 2, 3, 4]);
        let read = r.finish(0);
        assert_eq!(read.evidence.as_deref(), Some(&[1u8, 2, 3, 4][..]));
        let trace = Trace { leaves: vec![leaf, read] };
        let root = trace.root();
        assert!(trace.proves(&root));
        let json = serde_json::to_string(&trace).unwrap();
        let back: Trace = serde_json::from_str(&json).unwrap();
        assert_eq!(back, trace);
        let mut forged = trace.clone();
        forged.leaves[0].text.push('x');
        assert!(!forged.proves(&root));
    }
}
