//! The page content scheme: every word of page `p` at generation `g` is a function of
//! `(p, g, word index)`, so any page can be checked on its own.

/// Word `k` of page `p` at generation `g`.
#[inline]
fn word(p: u64, g: u64, k: u64) -> u64 {
    let seed = (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ g.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .rotate_left(17);
    seed.wrapping_add(k.wrapping_mul(0xA24B_AED4_963E_E407))
}

/// Writes the content of page `p` at generation `g` into `len` bytes at `ptr`.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes and 8-byte aligned.
pub unsafe fn fill_page(ptr: *mut u8, len: usize, p: u64, g: u64) {
    let words = ptr.cast::<u64>();
    for k in 0..len / 8 {
        // SAFETY: k*8 < len, within the caller's writable, aligned span.
        unsafe { words.add(k).write_volatile(word(p, g, k as u64)) };
    }
}

/// True if the `len` bytes at `ptr` are page `p` at generation `g`.
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes and 8-byte aligned.
pub unsafe fn page_matches(ptr: *const u8, len: usize, p: u64, g: u64) -> bool {
    let words = ptr.cast::<u64>();
    (0..len / 8).all(|k| {
        // SAFETY: k*8 < len, within the caller's readable, aligned span.
        unsafe { words.add(k).read_volatile() == word(p, g, k as u64) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_generations_differ() {
        let mut a = vec![0u64; 512];
        let ptr = a.as_mut_ptr().cast::<u8>();
        // SAFETY: the buffer is 4096 bytes, u64-aligned.
        unsafe {
            fill_page(ptr, 4096, 7, 3);
            assert!(page_matches(ptr, 4096, 7, 3));
            assert!(!page_matches(ptr, 4096, 7, 4));
            assert!(!page_matches(ptr, 4096, 8, 3));
        }
        a[100] ^= 1;
        // SAFETY: as above.
        assert!(!unsafe { page_matches(ptr, 4096, 7, 3) });
    }
}
