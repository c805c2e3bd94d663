//! Avro encoding of ANS-104 tags: an array of `{name, value}` byte records.
//!
//! Writers emit exactly one positive block followed by the closing `0` (HyperBEAM only
//! reads that form); readers accept several blocks and negative block counts, as the Avro
//! spec and arbundles do. No tags means an empty byte string, not `00`.

use super::Tag;

/// Why a tag field did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AvroError {
    #[error("tag bytes end inside {0}")]
    Truncated(&'static str),
    #[error("varint in tag bytes is longer than 10 bytes")]
    VarintTooLong,
    #[error("negative length {0} in tag bytes")]
    NegativeLength(i64),
    #[error("block of {count} tags cannot fit in the {remaining} bytes left")]
    BlockTooLarge { count: i64, remaining: usize },
    #[error("tag {index} {field} is not valid UTF-8")]
    NotUtf8 { index: usize, field: &'static str },
    #[error("{0} bytes left over after the closing block")]
    TrailingBytes(usize),
}

fn zigzag_encode(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn zigzag_decode(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

fn put_long(out: &mut Vec<u8>, n: i64) {
    let mut z = zigzag_encode(n);
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_long(out, b.len() as i64);
    out.extend_from_slice(b);
}

/// Encodes tags as the Avro bytes of ANS-104 field 10.
pub fn encode_tags(tags: &[Tag]) -> Vec<u8> {
    if tags.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(16 + tags.iter().map(|t| t.name.len() + t.value.len() + 4).sum::<usize>());
    put_long(&mut out, tags.len() as i64);
    for t in tags {
        put_bytes(&mut out, t.name.as_bytes());
        put_bytes(&mut out, t.value.as_bytes());
    }
    put_long(&mut out, 0);
    out
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn long(&mut self, what: &'static str) -> Result<i64, AvroError> {
        let mut z: u64 = 0;
        for i in 0..10 {
            let byte = *self.buf.get(self.pos).ok_or(AvroError::Truncated(what))?;
            self.pos += 1;
            z |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(zigzag_decode(z));
            }
        }
        Err(AvroError::VarintTooLong)
    }

    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], AvroError> {
        let len = self.long(what)?;
        if len < 0 {
            return Err(AvroError::NegativeLength(len));
        }
        let len = usize::try_from(len).map_err(|_| AvroError::Truncated(what))?;
        let end = self.pos.checked_add(len).filter(|&e| e <= self.buf.len()).ok_or(AvroError::Truncated(what))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Decodes the Avro bytes of ANS-104 field 10. An empty slice is zero tags.
pub fn decode_tags(buf: &[u8]) -> Result<Vec<Tag>, AvroError> {
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    let mut r = Reader { buf, pos: 0 };
    let mut tags = Vec::new();
    loop {
        let mut count = r.long("block count")?;
        if count == 0 {
            break;
        }
        if count < 0 {
            count = count.checked_neg().ok_or(AvroError::VarintTooLong)?;
            let _block_size = r.long("block size")?;
        }
        // Each record needs at least two bytes (two zero lengths): refuse counts that cannot fit
        // before allocating anything.
        if count as u128 * 2 > r.remaining() as u128 {
            return Err(AvroError::BlockTooLarge { count, remaining: r.remaining() });
        }
        for _ in 0..count {
            let index = tags.len();
            let name = r.bytes("tag name")?;
            let value = r.bytes("tag value")?;
            let name = std::str::from_utf8(name).map_err(|_| AvroError::NotUtf8 { index, field: "name" })?;
            let value = std::str::from_utf8(value).map_err(|_| AvroError::NotUtf8 { index, field: "value" })?;
            tags.push(Tag::new(name, value));
        }
    }
    if r.remaining() != 0 {
        return Err(AvroError::TrailingBytes(r.remaining()));
    }
    Ok(tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_prefixes() {
        let tags: Vec<Tag> = (0..5).map(|i| Tag::new("Data-Protocol", format!("v{i}"))).collect();
        let enc = encode_tags(&tags);
        assert_eq!(enc[0], 0x0a, "5 tags zigzag-encode to 0a");
        assert_eq!(enc[1], 0x1a, "13-byte name encodes to 1a");
        assert_eq!(*enc.last().unwrap(), 0, "closing block");
        assert_eq!(decode_tags(&enc).unwrap(), tags);
    }

    #[test]
    fn empty_is_empty() {
        assert!(encode_tags(&[]).is_empty());
        assert!(decode_tags(&[]).unwrap().is_empty());
    }

    #[test]
    fn accepts_multiple_and_negative_blocks() {
        // block of 1, then a negative block of 1 with its byte size, then the end.
        let mut buf = Vec::new();
        put_long(&mut buf, 1);
        put_bytes(&mut buf, b"a");
        put_bytes(&mut buf, b"1");
        put_long(&mut buf, -1);
        put_long(&mut buf, 4);
        put_bytes(&mut buf, b"b");
        put_bytes(&mut buf, b"2");
        put_long(&mut buf, 0);
        assert_eq!(decode_tags(&buf).unwrap(), vec![Tag::new("a", "1"), Tag::new("b", "2")]);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode_tags(&[0x02, 0x02, 0x61]), Err(AvroError::Truncated("tag value")));
        assert!(matches!(decode_tags(&[0x02]), Err(AvroError::BlockTooLarge { .. })));
        assert!(matches!(decode_tags(&[0xfe, 0xff, 0xff, 0xff, 0x0f]), Err(AvroError::BlockTooLarge { .. })));
        assert_eq!(decode_tags(&[0xff; 11]), Err(AvroError::VarintTooLong));
        assert_eq!(decode_tags(&[0x02, 0x01, 0x00]), Err(AvroError::NegativeLength(-1)));
        assert_eq!(decode_tags(&[0x00, 0x00]), Err(AvroError::TrailingBytes(1)));
        assert!(matches!(decode_tags(&[0x02, 0x02, 0xff, 0x00, 0x00]), Err(AvroError::NotUtf8 { .. })));
    }
}
