//! Copies of a linear memory that write only the pages that differ.
//!
//! An aos 2.0 memory is ~110 MB, of which ~1–2 MB is not zero (the Lua heap and the data
//! segments; measured on AO's E4 fixture after 600 messages: 416 non-zero 4 KiB pages of 26 832).
//! A plain copy writes all 110 MB (and makes the kernel back every page of the copy); comparing
//! page by page and writing only the pages that differ reads the untouched pages of both sides as
//! the kernel's shared zero page, so a rollback base costs a few MB of writes and of resident
//! memory instead of 110 MB (docs/aos.md "Performance").
//!
//! Contract: after [`sync`] or [`rebase_into`], the destination is byte-for-byte equal to the
//! source; [`sparse_copy`] returns a vector equal to its source. Nothing else is promised (no
//! sharing, no lazy copy: the source may change right after).

/// The unit compared and copied: the x86-64 and aarch64 base page.
const PAGE: usize = 4096;

static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Makes `dst` equal to `src` (same length), writing only the pages that differ.
///
/// # Panics
/// When the lengths differ (a host bug: callers size `dst` first).
pub fn sync(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "snapshot::sync needs equal lengths");
    for (d, s) in dst.chunks_mut(PAGE).zip(src.chunks(PAGE)) {
        if d != s {
            d.copy_from_slice(s);
        }
    }
}

/// A copy of `src` in a zeroed allocation (pages the allocator maps lazily) where only the
/// non-zero pages of `src` are written.
pub fn sparse_copy(src: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    for (d, s) in out.chunks_mut(PAGE).zip(src.chunks(PAGE)) {
        if s != &ZERO_PAGE[..s.len()] {
            d.copy_from_slice(s);
        }
    }
    out
}

/// Makes `dst` equal to `src`: in place page by page when the lengths match (the usual case: the
/// memory did not grow since `dst` was taken), else a fresh [`sparse_copy`].
pub fn rebase_into(dst: &mut Vec<u8>, src: &[u8]) {
    if dst.len() == src.len() {
        sync(dst, src);
    } else {
        *dst = sparse_copy(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| if (i / PAGE).is_multiple_of(3) { 0 } else { (i as u8).wrapping_mul(31).wrapping_add(seed) }).collect()
    }

    #[test]
    fn sync_makes_the_destination_equal_whatever_differs() {
        let src = pattern(10 * PAGE + 123, 7);
        let mut dst = pattern(10 * PAGE + 123, 9);
        dst[5] = 1;
        sync(&mut dst, &src);
        assert_eq!(dst, src);
        // A single byte changed in the last, partial page is seen.
        let mut src2 = src.clone();
        *src2.last_mut().unwrap() ^= 0xff;
        sync(&mut dst, &src2);
        assert_eq!(dst, src2);
    }

    #[test]
    fn sparse_copies_equal_their_source() {
        for len in [0, 1, PAGE - 1, PAGE, 3 * PAGE + 17] {
            let src = pattern(len, 3);
            assert_eq!(sparse_copy(&src), src, "len {len}");
        }
        let mut zeros_but_one = vec![0u8; 4 * PAGE];
        zeros_but_one[2 * PAGE + 9] = 5;
        assert_eq!(sparse_copy(&zeros_but_one), zeros_but_one);
    }

    #[test]
    fn rebase_follows_a_growing_memory() {
        let mut base = pattern(2 * PAGE, 1);
        let grown = pattern(5 * PAGE + 1, 2);
        rebase_into(&mut base, &grown);
        assert_eq!(base, grown);
        let changed = pattern(5 * PAGE + 1, 4);
        rebase_into(&mut base, &changed);
        assert_eq!(base, changed);
    }

    #[test]
    #[should_panic(expected = "equal lengths")]
    fn sync_refuses_different_lengths() {
        sync(&mut [0u8; 3], &[0u8; 4]);
    }
}
