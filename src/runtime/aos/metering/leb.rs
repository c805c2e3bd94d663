//! Minimal (shortest) LEB128 writers, the encoding the reference toolkit emits for every integer.

pub(super) fn write_u64(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub(super) fn write_u32(out: &mut Vec<u8>, v: u32) {
    write_u64(out, u64::from(v));
}

pub(super) fn write_len(out: &mut Vec<u8>, v: usize) {
    write_u64(out, v as u64);
}

pub(super) fn write_i64(out: &mut Vec<u8>, mut v: i64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        let done = (v == 0 && byte & 0x40 == 0) || (v == -1 && byte & 0x40 != 0);
        if done {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub(super) fn write_i32(out: &mut Vec<u8>, v: i32) {
    write_i64(out, i64::from(v));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(v: u64) -> Vec<u8> {
        let mut o = Vec::new();
        write_u64(&mut o, v);
        o
    }
    fn s(v: i64) -> Vec<u8> {
        let mut o = Vec::new();
        write_i64(&mut o, v);
        o
    }

    #[test]
    fn shortest_encodings() {
        assert_eq!(u(0), [0]);
        assert_eq!(u(127), [0x7f]);
        assert_eq!(u(128), [0x80, 0x01]);
        assert_eq!(u(624_485), [0xe5, 0x8e, 0x26]);
        assert_eq!(u(u64::MAX).len(), 10);
        assert_eq!(s(0), [0]);
        assert_eq!(s(63), [0x3f]);
        assert_eq!(s(64), [0xc0, 0x00]);
        assert_eq!(s(-1), [0x7f]);
        assert_eq!(s(-64), [0x40]);
        assert_eq!(s(-65), [0xbf, 0x7f]);
        assert_eq!(s(-123_456), [0xc0, 0xbb, 0x78]);
        assert_eq!(s(i64::MIN).len(), 10);
    }
}
