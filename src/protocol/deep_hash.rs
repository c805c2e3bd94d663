//! Arweave deep hash (SHA-384), the 48-byte message that ANS-104 signatures cover.

use sha2::{Digest, Sha384};

/// One node of a deep-hash input: a byte string or a list of nodes.
#[derive(Debug, Clone)]
pub enum Chunk<'a> {
    Blob(&'a [u8]),
    List(Vec<Chunk<'a>>),
}

/// Deep hash of a chunk, as Arweave 2.0 and every ANS-104 implementation compute it.
pub fn deep_hash(chunk: &Chunk<'_>) -> [u8; 48] {
    match chunk {
        Chunk::Blob(bytes) => {
            let tag = sha384_parts(&[b"blob", bytes.len().to_string().as_bytes()]);
            let body = sha384_parts(&[bytes]);
            sha384_parts(&[&tag, &body])
        }
        Chunk::List(items) => {
            let mut acc = sha384_parts(&[b"list", items.len().to_string().as_bytes()]);
            for item in items {
                acc = sha384_parts(&[&acc, &deep_hash(item)]);
            }
            acc
        }
    }
}

/// Deep hash of a list of blobs, the only shape ANS-104 signing uses.
pub fn deep_hash_blobs(blobs: &[&[u8]]) -> [u8; 48] {
    deep_hash(&Chunk::List(blobs.iter().map(|b| Chunk::Blob(b)).collect()))
}

fn sha384_parts(parts: &[&[u8]]) -> [u8; 48] {
    let mut h = Sha384::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from docs/ao-protocol.md §1.5 (arbundles' deepHash spec, re-verified independently).
    #[test]
    fn blob_vectors() {
        assert_eq!(
            hex::encode(deep_hash(&Chunk::Blob(&[1, 2, 3]))),
            "41300af79285f856e833164518c7ec4974f5869ec77ca3458113fe6c587680d050f9f6864fd77f9eb62bd4e2faea9ae8"
        );
        assert_eq!(
            hex::encode(deep_hash(&Chunk::Blob(&[]))),
            "fbf00cc444f5fea9dc3bedf62a13fba8ae87e7445fc910567a23bec4eb82fadb1143c433069314d8362983dc3c2e4a38"
        );
    }

    #[test]
    fn list_vector() {
        assert_eq!(
            hex::encode(deep_hash_blobs(&[&[1, 2, 3], &[4, 5, 6]])),
            "4dacdcc81acd09f38c77a07a2a7ae81f77c61e6b97ee5cc7b92f3a7f258e8d5ba69d14d7d66070797b083873717c9896"
        );
    }

    #[test]
    fn nested_list_differs_from_flat() {
        let nested = Chunk::List(vec![Chunk::List(vec![Chunk::Blob(&[1])])]);
        let flat = Chunk::List(vec![Chunk::Blob(&[1])]);
        assert_ne!(deep_hash(&nested), deep_hash(&flat));
    }
}
