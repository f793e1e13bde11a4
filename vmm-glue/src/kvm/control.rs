//! The contract between the VMM and the guest program: where things live in guest physical
//! memory, the parameter page the VMM fills before the guest starts, and the I/O ports the
//! guest uses to ask for work and report its self-check.
//!
//! Guest physical layout (one KVM memory slot from GPA 0):
//!
//! | GPA | what |
//! | --- | --- |
//! | `0x1000` | GDT: null, flat 32-bit code (selector `0x08`), flat data (`0x10`) |
//! | `0x2000` | the guest program ([`super::guest::GUEST_CODE`]) |
//! | `0x3000` | parameter page ([`GuestParams`]), read-only for the guest |
//! | `0x4000` | generation table: one little-endian `u32` per data page |
//! | `data_base` | data pages: page `i` is filled with [`page_value`]`(i, 0)` by the VMM; the guest stamps its first and last dword with `page_value(i, gen[i])` |
//!
//! Ports (all 32-bit `in`/`out` with an immediate port number):
//!
//! | port | dir | meaning |
//! | --- | --- | --- |
//! | [`PORT_CMD`] | in | the VMM answers with the number of pages to dirty now, or [`CMD_VERIFY`] |
//! | [`PORT_BAD`] | out | self-check: the index of a page whose content does not match (once per bad page) |
//! | [`PORT_CHECKED`] | out | self-check: data pages checked; ends the report |

/// Size of the pages the guest writes and KVM's dirty log tracks.
pub const GUEST_PAGE: u64 = 4096;
/// GPA of the GDT.
pub const GDT_GPA: u64 = 0x1000;
/// GPA where the guest program is loaded and starts.
pub const CODE_GPA: u64 = 0x2000;
/// GPA of the parameter page.
pub const PARAMS_GPA: u64 = 0x3000;
/// GPA of the generation table.
pub const GEN_GPA: u64 = 0x4000;

/// The guest asks for work here.
pub const PORT_CMD: u16 = 0x10;
/// The guest reports the number of pages it checked; this ends a self-check report.
pub const PORT_CHECKED: u16 = 0x11;
/// The guest reports one bad page (its data page index).
pub const PORT_BAD: u16 = 0x12;
/// Answer to [`PORT_CMD`] that makes the guest verify its memory (sign bit set).
pub const CMD_VERIFY: u32 = 0x8000_0000;
/// Most pages the VMM hands out in one batch.
pub const MAX_BATCH: u32 = 4096;

/// Magic at the start of the parameter page ("RDMG").
pub const PARAMS_MAGIC: u32 = 0x474d_4452;
/// Version of the parameter page layout.
pub const PARAMS_VERSION: u32 = 1;

/// Smallest guest: the fixed pages plus a few data pages.
pub const MIN_MEM_BYTES: u64 = 1 << 20;
/// Largest guest: a 32-bit guest with flat segments must address all of it, below the TSS
/// that KVM needs at [`TSS_GPA`].
pub const MAX_MEM_BYTES: u64 = 3 << 30;
/// GPA of the three pages KVM uses for the real-mode TSS (outside guest memory).
pub const TSS_GPA: usize = 0xfffb_d000;

/// The parameters the VMM writes at [`PARAMS_GPA`] (little-endian `u32` fields in this order:
/// magic, version, data_base, data_pages, ws_pages, gen_base).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestParams {
    /// GPA of data page 0.
    pub data_base: u32,
    /// Number of data pages (all of them are checked).
    pub data_pages: u32,
    /// Number of data pages the guest keeps rewriting (the first ones).
    pub ws_pages: u32,
    /// GPA of the generation table.
    pub gen_base: u32,
}

impl GuestParams {
    /// Bytes of the encoded parameter block.
    pub const BYTES: usize = 24;

    /// Lays out a guest of `mem_bytes` with a working set of `working_set` bytes.
    pub fn for_memory(mem_bytes: u64, working_set: u64) -> Result<GuestParams, String> {
        Self::for_populated(mem_bytes, working_set, None)
    }

    /// As [`GuestParams::for_memory`], with data pages for only about `populated` bytes of
    /// memory (`None`: all of it; at least one page): the VMM fills only those, and the rest
    /// of guest memory stays zero and untouched, as in a freshly booted guest.
    pub fn for_populated(
        mem_bytes: u64,
        working_set: u64,
        populated: Option<u64>,
    ) -> Result<GuestParams, String> {
        if !(MIN_MEM_BYTES..=MAX_MEM_BYTES).contains(&mem_bytes)
            || !mem_bytes.is_multiple_of(GUEST_PAGE)
        {
            return Err(format!(
                "guest memory must be a multiple of 4 KiB between {MIN_MEM_BYTES} and {MAX_MEM_BYTES} bytes, not {mem_bytes}"
            ));
        }
        // gen table of n*4 bytes + n data pages must fit after GEN_GPA.
        let avail = mem_bytes - GEN_GPA;
        let mut data_pages = avail / (GUEST_PAGE + 4);
        let data_base = loop {
            let base = (GEN_GPA + data_pages * 4).div_ceil(GUEST_PAGE) * GUEST_PAGE;
            if base + data_pages * GUEST_PAGE <= mem_bytes {
                break base;
            }
            data_pages -= 1;
        };
        if let Some(p) = populated {
            let want = (p.saturating_sub(data_base) / GUEST_PAGE).max(1);
            if want < data_pages {
                data_pages = want;
            }
        }
        let ws_pages = (working_set / GUEST_PAGE).min(data_pages);
        if working_set > data_pages * GUEST_PAGE {
            return Err(format!(
                "working set of {working_set} bytes does not fit in the {} bytes of data pages{}",
                data_pages * GUEST_PAGE,
                if populated.is_some() {
                    " (the populated part of memory)"
                } else {
                    ""
                }
            ));
        }
        Ok(GuestParams {
            data_base: data_base as u32,
            data_pages: data_pages as u32,
            ws_pages: ws_pages as u32,
            gen_base: GEN_GPA as u32,
        })
    }

    /// The encoded parameter block.
    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        let fields = [
            PARAMS_MAGIC,
            PARAMS_VERSION,
            self.data_base,
            self.data_pages,
            self.ws_pages,
            self.gen_base,
        ];
        for (chunk, f) in out.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&f.to_le_bytes());
        }
        out
    }

    /// Parses and checks a parameter block read from a guest of `mem_bytes`.
    pub fn decode(b: &[u8], mem_bytes: u64) -> Result<GuestParams, String> {
        if b.len() < Self::BYTES {
            return Err("parameter page is truncated".into());
        }
        let f = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        if f(0) != PARAMS_MAGIC || f(1) != PARAMS_VERSION {
            return Err(format!("parameter page has magic {:#x} version {}, expected {PARAMS_MAGIC:#x} {PARAMS_VERSION}", f(0), f(1)));
        }
        let p = GuestParams {
            data_base: f(2),
            data_pages: f(3),
            ws_pages: f(4),
            gen_base: f(5),
        };
        let data_end = u64::from(p.data_base) + u64::from(p.data_pages) * GUEST_PAGE;
        let gen_end = u64::from(p.gen_base) + u64::from(p.data_pages) * 4;
        if p.ws_pages > p.data_pages
            || data_end > mem_bytes
            || gen_end > u64::from(p.data_base)
            || u64::from(p.gen_base) < GEN_GPA
        {
            return Err(format!(
                "parameter page {p:?} does not fit a guest of {mem_bytes} bytes"
            ));
        }
        Ok(p)
    }
}

/// The value stamped into data page `page` at generation `gen` (never zero, so a page that
/// never arrived is caught). The guest computes the same with two `imul`s, a `xor` and an `or`.
pub fn page_value(page: u32, gen: u32) -> u32 {
    (gen.wrapping_mul(0x85eb_ca77) ^ page.wrapping_mul(0x9e37_79b1)) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_and_round_trips() {
        for mem in [MIN_MEM_BYTES, 64 << 20, 1 << 30, MAX_MEM_BYTES] {
            let p = GuestParams::for_memory(mem, 512 << 10).unwrap();
            assert_eq!(GuestParams::decode(&p.encode(), mem).unwrap(), p);
            assert!(u64::from(p.data_base) + u64::from(p.data_pages) * GUEST_PAGE <= mem);
            assert!(GEN_GPA + u64::from(p.data_pages) * 4 <= u64::from(p.data_base));
            assert!(
                mem - (u64::from(p.data_base) + u64::from(p.data_pages) * GUEST_PAGE)
                    < 2 * GUEST_PAGE
            );
        }
        assert!(GuestParams::for_memory(MIN_MEM_BYTES - 4096, 0).is_err());
        assert!(GuestParams::for_memory(MAX_MEM_BYTES + 4096, 0).is_err());
        assert!(GuestParams::for_memory(1 << 20, 2 << 20).is_err());
    }

    #[test]
    fn decode_rejects_bad_blocks() {
        let p = GuestParams::for_memory(1 << 20, 0).unwrap();
        let mut b = p.encode();
        b[0] ^= 1;
        assert!(GuestParams::decode(&b, 1 << 20).is_err());
        assert!(GuestParams::decode(&p.encode(), 1 << 19).is_err());
        assert!(GuestParams::decode(&p.encode()[..10], 1 << 20).is_err());
    }

    #[test]
    fn page_value_is_never_zero() {
        assert_ne!(page_value(0, 0), 0);
        assert_ne!(page_value(0, 1), page_value(0, 0));
        assert_ne!(page_value(1, 0), page_value(0, 0));
    }
}
