//! Reads of guest memory as volatile memory.
//!
//! The guest (or another VMM thread) may write its memory at any moment, so the transport
//! never forms a `&[u8]` over it: a shared reference promises that nothing writes the bytes
//! while it lives, and a racing write would be undefined behaviour (vm-memory's rule for
//! `VolatileSlice`). Guest memory is read through raw pointers with volatile loads instead,
//! aligned `u64` words where the address allows and single bytes elsewhere, into buffers the
//! transport owns, which the hashing code may then borrow. A page torn by a racing write
//! reads as some mix of old and new bytes, which is harmless: the write leaves the page dirty
//! and it moves (and is hashed) again.

/// Copies `dst.len()` bytes from `src` into `dst` with volatile loads and returns the OR of
/// every word read: zero if and only if every byte copied was zero.
///
/// # Safety
/// `src..src + dst.len()` must be mapped readable for the whole call. Other threads or the
/// guest may write it concurrently; `dst` must not overlap it.
pub unsafe fn copy_volatile(src: *const u8, dst: &mut [u8]) -> u64 {
    let len = dst.len();
    let head = ((8 - src.addr() % 8) % 8).min(len);
    let words = (len - head) / 8;
    let body = head + words * 8;
    let mut acc = 0u64;
    for (i, d) in dst[..head].iter_mut().enumerate() {
        // SAFETY: i < len, inside the range the caller vouched for.
        let b = unsafe { src.add(i).read_volatile() };
        *d = b;
        acc |= u64::from(b);
    }
    // SAFETY: head <= len, so the pointer stays inside (or one past) the caller's range.
    let w = unsafe { src.add(head) }.cast::<u64>();
    for (i, d) in dst[head..body].chunks_exact_mut(8).enumerate() {
        // head + 8 * i + 8 <= body <= len, and head brings src to a multiple of 8.
        // SAFETY: so word i lies inside the range and is 8-aligned.
        let v = unsafe { w.add(i).read_volatile() };
        d.copy_from_slice(&v.to_ne_bytes());
        acc |= v;
    }
    for (i, d) in dst[body..].iter_mut().enumerate() {
        // SAFETY: body + i < len, inside the caller's range.
        let b = unsafe { src.add(body + i).read_volatile() };
        *d = b;
        acc |= u64::from(b);
    }
    acc
}

/// True if every byte of `src..src + len` reads zero (volatile loads, OR-ed eight words at a
/// time; stops at the first non-zero block).
///
/// # Safety
/// `src..src + len` must be mapped readable for the whole call. Other threads or the guest may
/// write it concurrently (the answer is then that of some mix of old and new bytes).
pub unsafe fn is_zero_volatile(src: *const u8, len: usize) -> bool {
    let head = ((8 - src.addr() % 8) % 8).min(len);
    let words = (len - head) / 8;
    let body = head + words * 8;
    let byte = |i: usize| {
        // SAFETY: callers pass i < len, inside the caller's range.
        unsafe { src.add(i).read_volatile() }
    };
    if (0..head).any(|i| byte(i) != 0) || (body..len).any(|i| byte(i) != 0) {
        return false;
    }
    // SAFETY: head <= len, so the pointer stays inside (or one past) the caller's range.
    let w = unsafe { src.add(head) }.cast::<u64>();
    let mut i = 0;
    while i < words {
        let n = (words - i).min(8);
        let mut acc = 0u64;
        for k in i..i + n {
            // As in `copy_volatile`:
            // SAFETY: word k < words lies inside the range and is 8-aligned.
            acc |= unsafe { w.add(k).read_volatile() };
        }
        if acc != 0 {
            return false;
        }
        i += n;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_checks_at_every_alignment_and_length() {
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 1) as u8).collect();
        let mut zeroes = [0u8; 200];
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 64, 65, 100, 191 - start] {
                let mut dst = vec![0xeeu8; len];
                // SAFETY: start + len <= 200, inside `src`; `dst` is separate.
                let or = unsafe { copy_volatile(src.as_ptr().add(start), &mut dst) };
                assert_eq!(dst, &src[start..start + len], "start {start} len {len}");
                assert_eq!(or == 0, len == 0, "start {start} len {len}");
                // SAFETY: as above, for `zeroes`.
                assert!(unsafe { is_zero_volatile(zeroes.as_ptr().add(start), len) });
                if len > 0 {
                    for at in [start, start + len / 2, start + len - 1] {
                        zeroes[at] = 0x10;
                        // SAFETY: as above.
                        let z = unsafe { is_zero_volatile(zeroes.as_ptr().add(start), len) };
                        assert!(!z, "start {start} len {len} byte {at}");
                        // SAFETY: as above; `dst` is separate.
                        let or = unsafe { copy_volatile(zeroes.as_ptr().add(start), &mut dst) };
                        assert_ne!(or, 0, "start {start} len {len} byte {at}");
                        zeroes[at] = 0;
                    }
                }
            }
        }
    }
}
