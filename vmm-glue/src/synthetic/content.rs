//! The page content scheme: every word of page `p` at generation `g` is a function of
//! `(p, g, word index)`, so any page can be checked on its own.
//!
//! Some generations are zero pages, as in a real guest, whose memory is mostly zero: at
//! generation 0 the pages past the populated prefix (never written, as in a freshly booted
//! guest), and later the share of writes [`Scheme::zero_share`] asks for (a guest freeing and
//! zeroing memory), picked from `(p, g)` so that both ends agree.

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

/// Which generations of which pages are zero pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheme {
    /// Pages `0..populated` hold data at generation 0; later ones are zero.
    pub populated: u64,
    /// Percent (0..=100) of the writes after generation 0 that write a zero page.
    pub zero_share: u64,
}

impl Scheme {
    /// True if page `p` at generation `g` is all zero.
    pub fn is_zero(&self, p: u64, g: u64) -> bool {
        if g == 0 {
            return p >= self.populated;
        }
        self.zero_share > 0 && word(p, g, 0x5a5a) % 100 < self.zero_share
    }

    /// Writes page `p` at generation `g` into `len` bytes at `ptr`.
    ///
    /// # Safety
    /// As for [`fill_page`].
    pub unsafe fn fill(&self, ptr: *mut u8, len: usize, p: u64, g: u64) {
        if self.is_zero(p, g) {
            for k in 0..len / 8 {
                // SAFETY: k*8 < len, within the caller's writable, aligned span.
                unsafe { ptr.cast::<u64>().add(k).write_volatile(0) };
            }
        } else {
            // SAFETY: the caller's guarantees are fill_page's.
            unsafe { fill_page(ptr, len, p, g) }
        }
    }

    /// True if the `len` bytes at `ptr` are page `p` at generation `g`.
    ///
    /// # Safety
    /// As for [`page_matches`].
    pub unsafe fn matches(&self, ptr: *const u8, len: usize, p: u64, g: u64) -> bool {
        if self.is_zero(p, g) {
            (0..len / 8).all(|k| {
                // SAFETY: k*8 < len, within the caller's readable, aligned span.
                unsafe { ptr.cast::<u64>().add(k).read_volatile() == 0 }
            })
        } else {
            // SAFETY: the caller's guarantees are page_matches's.
            unsafe { page_matches(ptr, len, p, g) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_generations_follow_the_scheme() {
        let s = Scheme {
            populated: 10,
            zero_share: 30,
        };
        assert!(!s.is_zero(9, 0) && s.is_zero(10, 0));
        let zeros = (1..10_000).filter(|&g| s.is_zero(3, g)).count();
        assert!(
            (2000..4000).contains(&zeros),
            "{zeros} of 10000 writes zero"
        );
        let none = Scheme {
            populated: 0,
            zero_share: 0,
        };
        assert!((1..1000).all(|g| !none.is_zero(3, g)));
        let mut a = vec![7u64; 512];
        let ptr = a.as_mut_ptr().cast::<u8>();
        // SAFETY: the buffer is 4096 bytes, u64-aligned.
        unsafe {
            s.fill(ptr, 4096, 20, 0);
            assert!(a.iter().all(|&w| w == 0));
            assert!(s.matches(ptr, 4096, 20, 0));
            assert!(!s.matches(ptr, 4096, 5, 0));
            s.fill(ptr, 4096, 5, 0);
            assert!(s.matches(ptr, 4096, 5, 0) && !s.matches(ptr, 4096, 20, 0));
        }
    }

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
