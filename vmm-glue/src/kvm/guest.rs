//! The guest program: 164 bytes of hand-assembled 32-bit protected-mode code, and the flat
//! GDT and initial registers the VMM starts it with (no real-mode boot code).
//!
//! What it does, forever:
//!
//! 1. `in eax, PORT_CMD`: the VMM answers with a page count `n` (pacing the guest to the
//!    configured dirty rate by sleeping before it answers) or with [`CMD_VERIFY`].
//! 2. For `n` pages, starting at the cursor `ebp` (which wraps at `ws_pages`):
//!    `gen[i] += 1`, then stamp the first and last dword of data page `i` with
//!    `page_value(i, gen[i])`. (The VMM filled every dword with `page_value(i, 0)` at start.)
//! 3. On `CMD_VERIFY`: for every data page `i`, check the first and last dword against
//!    `page_value(i, gen[i])` and the middle dword against `page_value(i, 0)`; report each bad
//!    page on `PORT_BAD` and the number checked on `PORT_CHECKED`.
//!
//! Why stamps and not whole pages: on these hosts (paravirtual KVM) the guest's instructions
//! cost about half a microsecond each, so a `rep stosd` over a page takes ~0.5 ms. Two stamps per
//! page dirty it just the same and let the guest reach hundreds of MiB/s of dirtied pages;
//! three compares per page still catch a stale, missing or misplaced page.
//!
//! The guest keeps all its state in registers (`ebp` = cursor) and guest memory, so vCPU
//! registers plus memory are its whole state: exactly what a migration carries.
//! The bytes were produced with `as --32` from the listing in the comments; the unit test
//! disassembles them with `iced-x86` and compares with [`LISTING`].
//!
//! [`CMD_VERIFY`]: super::control::CMD_VERIFY

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::control::{CODE_GPA, GDT_GPA};

/// The guest program, loaded at [`CODE_GPA`]. Parameter addresses: `0x3008` data_base,
/// `0x300c` data_pages, `0x3010` ws_pages, `0x3014` gen_base (see [`super::control`]).
#[rustfmt::skip]
pub const GUEST_CODE: [u8; 164] = [
    // main:                                  (0x2000)
    0xe5, 0x10,                               // in eax,0x10                 ; ask the VMM for work
    0x85, 0xc0,                               // test eax,eax
    0x78, 0x46,                               // js verify                   ; CMD_VERIFY has the sign bit
    0x89, 0xc3,                               // mov ebx,eax                 ; ebx = pages in this batch
    0x8b, 0x35, 0x14, 0x30, 0x00, 0x00,       // mov esi,[0x3014]              ; esi = gen_base
    0x8b, 0x3d, 0x08, 0x30, 0x00, 0x00,       // mov edi,[0x3008]              ; edi = data_base
    // batch:                                 (0x2014)
    0x85, 0xdb,                               // test ebx,ebx
    0x74, 0xe8,                               // je main
    0xff, 0x04, 0xae,                         // inc dword [esi+ebp*4]       ; gen[cursor] += 1
    0x8b, 0x04, 0xae,                         // mov eax,dword [esi+ebp*4]   ; eax = gen[cursor]
    0x69, 0xc0, 0x77, 0xca, 0xeb, 0x85,       // imul eax,eax,0x85ebca77
    0x69, 0xcd, 0xb1, 0x79, 0x37, 0x9e,       // imul ecx,ebp,0x9e3779b1
    0x31, 0xc8,                               // xor eax,ecx
    0x83, 0xc8, 0x01,                         // or eax,0x1                  ; eax = page_value(cursor, gen)
    0x89, 0xea,                               // mov edx,ebp
    0xc1, 0xe2, 0x0c,                         // shl edx,0xc
    0x01, 0xfa,                               // add edx,edi                 ; edx = data_base + cursor*4096
    0x89, 0x02,                               // mov dword [edx],eax         ; stamp the first dword
    0x89, 0x82, 0xfc, 0x0f, 0x00, 0x00,       // mov dword [edx+0xffc],eax   ; and the last
    0x45,                                     // inc ebp
    0x3b, 0x2d, 0x10, 0x30, 0x00, 0x00,       // cmp ebp,[0x3010]              ; cursor wraps at ws_pages
    0x72, 0x02,                               // jb nowrap
    0x31, 0xed,                               // xor ebp,ebp
    // nowrap:                                (0x2049)
    0x4b,                                     // dec ebx
    0xeb, 0xc8,                               // jmp batch
    // verify:                                (0x204c)
    0x8b, 0x35, 0x14, 0x30, 0x00, 0x00,       // mov esi,[0x3014]
    0x8b, 0x3d, 0x08, 0x30, 0x00, 0x00,       // mov edi,[0x3008]
    0x31, 0xdb,                               // xor ebx,ebx                 ; i = 0
    // vloop:                                 (0x205a)
    0x3b, 0x1d, 0x0c, 0x30, 0x00, 0x00,       // cmp ebx,[0x300c]              ; i < data_pages?
    0x73, 0x39,                               // jae vdone
    0x8b, 0x04, 0x9e,                         // mov eax,dword [esi+ebx*4]   ; eax = gen[i]
    0x69, 0xc0, 0x77, 0xca, 0xeb, 0x85,       // imul eax,eax,0x85ebca77
    0x69, 0xcb, 0xb1, 0x79, 0x37, 0x9e,       // imul ecx,ebx,0x9e3779b1
    0x31, 0xc8,                               // xor eax,ecx
    0x83, 0xc8, 0x01,                         // or eax,0x1                  ; eax = page_value(i, gen[i])
    0x89, 0xda,                               // mov edx,ebx
    0xc1, 0xe2, 0x0c,                         // shl edx,0xc
    0x01, 0xfa,                               // add edx,edi
    0x39, 0x02,                               // cmp dword [edx],eax         ; first dword stamped?
    0x75, 0x13,                               // jne vbad
    0x39, 0x82, 0xfc, 0x0f, 0x00, 0x00,       // cmp dword [edx+0xffc],eax   ; last dword stamped?
    0x75, 0x0b,                               // jne vbad
    0x83, 0xc9, 0x01,                         // or ecx,0x1                  ; ecx = page_value(i, 0)
    0x39, 0x8a, 0x00, 0x08, 0x00, 0x00,       // cmp dword [edx+0x800],ecx   ; middle dword as first filled?
    0x74, 0x04,                               // je vnext
    // vbad:                                  (0x2094)
    0x89, 0xd8,                               // mov eax,ebx
    0xe7, 0x12,                               // out 0x12,eax                ; report bad page i
    // vnext:                                 (0x2098)
    0x43,                                     // inc ebx
    0xeb, 0xbf,                               // jmp vloop
    // vdone:                                 (0x209b)
    0x89, 0xd8,                               // mov eax,ebx
    0xe7, 0x11,                               // out 0x11,eax                ; pages checked; ends the report
    0xe9, 0x5c, 0xff, 0xff, 0xff,             // jmp main
];

/// The disassembly of [`GUEST_CODE`] (iced-x86, Intel syntax), checked by a unit test.
pub const LISTING: &[&str] = &[
    "2000 in eax,10h",
    "2002 test eax,eax",
    "2004 js short 0000204Ch",
    "2006 mov ebx,eax",
    "2008 mov esi,[3014h]",
    "200E mov edi,[3008h]",
    "2014 test ebx,ebx",
    "2016 je short 00002000h",
    "2018 inc dword ptr [esi+ebp*4]",
    "201B mov eax,[esi+ebp*4]",
    "201E imul eax,85EBCA77h",
    "2024 imul ecx,ebp,9E3779B1h",
    "202A xor eax,ecx",
    "202C or eax,1",
    "202F mov edx,ebp",
    "2031 shl edx,0Ch",
    "2034 add edx,edi",
    "2036 mov [edx],eax",
    "2038 mov [edx+0FFCh],eax",
    "203E inc ebp",
    "203F cmp ebp,[3010h]",
    "2045 jb short 00002049h",
    "2047 xor ebp,ebp",
    "2049 dec ebx",
    "204A jmp short 00002014h",
    "204C mov esi,[3014h]",
    "2052 mov edi,[3008h]",
    "2058 xor ebx,ebx",
    "205A cmp ebx,[300Ch]",
    "2060 jae short 0000209Bh",
    "2062 mov eax,[esi+ebx*4]",
    "2065 imul eax,85EBCA77h",
    "206B imul ecx,ebx,9E3779B1h",
    "2071 xor eax,ecx",
    "2073 or eax,1",
    "2076 mov edx,ebx",
    "2078 shl edx,0Ch",
    "207B add edx,edi",
    "207D cmp [edx],eax",
    "207F jne short 00002094h",
    "2081 cmp [edx+0FFCh],eax",
    "2087 jne short 00002094h",
    "2089 or ecx,1",
    "208C cmp [edx+800h],ecx",
    "2092 je short 00002098h",
    "2094 mov eax,ebx",
    "2096 out 12h,eax",
    "2098 inc ebx",
    "2099 jmp short 0000205Ah",
    "209B mov eax,ebx",
    "209D out 11h,eax",
    "209F jmp 00002000h",
];

/// Selector of the flat code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the flat data segment.
pub const DATA_SELECTOR: u16 = 0x10;

/// The GDT: null, flat 4 GiB 32-bit code (execute/read, accessed), flat 4 GiB data
/// (read/write, accessed), as raw little-endian descriptors.
pub const GDT: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// The GDT as bytes to copy to [`GDT_GPA`].
pub fn gdt_bytes() -> [u8; 24] {
    let mut b = [0u8; 24];
    for (chunk, d) in b.chunks_exact_mut(8).zip(GDT) {
        chunk.copy_from_slice(&d.to_le_bytes());
    }
    b
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` in 32-bit protected mode with flat segments matching [`GDT`], paging off.
pub fn setup_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = flat_segment(CODE_SELECTOR, 0xb);
    let data = flat_segment(DATA_SELECTOR, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr0 = (sregs.cr0 | 1) & !(1 << 31); // PE on, PG off
    sregs.efer = 0;
}

/// The registers the guest starts with: at [`CODE_GPA`], cursor 0, interrupts off.
pub fn initial_regs() -> kvm_regs {
    kvm_regs {
        rip: CODE_GPA,
        rflags: 0x2,
        rsp: CODE_GPA,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    #[test]
    fn code_disassembles_to_the_listing() {
        let mut dec = Decoder::with_ip(32, &GUEST_CODE, CODE_GPA, DecoderOptions::NONE);
        let mut fmt = IntelFormatter::new();
        let mut got = Vec::new();
        for ins in &mut dec {
            assert!(!ins.is_invalid(), "invalid instruction at {:#x}", ins.ip());
            let mut s = String::new();
            fmt.format(&ins, &mut s);
            got.push(format!("{:04X} {s}", ins.ip()));
        }
        assert_eq!(
            got,
            LISTING,
            "got:\n{}",
            got.iter()
                .map(|l| format!("    \"{l}\","))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    #[test]
    fn gdt_matches_the_segments_the_vmm_loads() {
        // Base 0, limit 0xfffff pages, G=1, D=1, P=1, DPL 0, S=1.
        for (d, ty) in [(GDT[1], 0xb_u64), (GDT[2], 0x3)] {
            assert_eq!(d & 0xffff, 0xffff);
            assert_eq!((d >> 48) & 0xf, 0xf);
            assert_eq!((d >> 40) & 0xf, ty);
            assert_eq!((d >> 44) & 0x1, 1);
            assert_eq!((d >> 47) & 0x1, 1);
            assert_eq!((d >> 54) & 0x3, 0x3);
        }
    }
}
