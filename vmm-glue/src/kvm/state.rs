//! Device state of the KVM guest as a versioned, fixed little-endian blob.
//!
//! Layout, version 2 (every integer little-endian, no padding):
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `RDMIGKVM` |
//! | 2 | version (2) |
//! | 2 | vCPU count `n` (1..=[`MAX_VCPUS`]) |
//! | 4 | reserved, zero |
//! | 8 + 8 | VMM: dirty rate (bytes/s), pages the guest was handed to dirty so far |
//! | 24 | the guest's parameter block ([`GuestParams::encode`]), or 24 zero bytes if unknown (version 2 only) |
//! | `n` × [`VCPU_RECORD_BYTES`] | per vCPU: `kvm_regs` (18 × u64), `kvm_sregs` (8 segments of 23 bytes, GDT and IDT as base u64 + limit u16, cr0 cr2 cr3 cr4 cr8 efer apic_base, 4 × u64 interrupt bitmap), `kvm_fpu` (8 × 16 bytes fpr, fcw, fsw, ftwx, last_opcode, last_ip, last_dp, 16 × 16 bytes xmm, mxcsr) |
//!
//! The guest runs with interrupts off, no local APIC, no MSRs of its own and no paging, so
//! these registers are its whole CPU state. A reader refuses other magics and versions,
//! a vCPU count out of range, a non-zero reserved field and any length but the exact one.
//!
//! Version 2 carries the guest's parameters so that the destination never has to read them
//! from guest memory before the guest runs: in post-copy the parameter page may still be on
//! the source then, and a VMM thread touching it would block on userfaultfd. Version 1 blobs
//! (without them) are still read; the destination then reads the parameter page.

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use super::control::{GuestParams, MAX_MEM_BYTES};
use crate::error::{Error, Result};

/// Magic at the start of the blob.
pub const MAGIC: [u8; 8] = *b"RDMIGKVM";
/// The version this build writes (it also reads version 1).
pub const VERSION: u16 = 2;
/// Most vCPUs a blob may describe.
pub const MAX_VCPUS: usize = 64;
const HEADER_V1_BYTES: usize = 8 + 2 + 2 + 4 + 16;
const HEADER_BYTES: usize = HEADER_V1_BYTES + GuestParams::BYTES;
const SEGMENT_BYTES: usize = 23;
const REGS_BYTES: usize = 18 * 8;
const SREGS_BYTES: usize = 8 * SEGMENT_BYTES + 2 * 10 + 7 * 8 + 4 * 8;
const FPU_BYTES: usize = 8 * 16 + 2 + 2 + 1 + 2 + 8 + 8 + 16 * 16 + 4;
/// Bytes of one vCPU's record.
pub const VCPU_RECORD_BYTES: usize = REGS_BYTES + SREGS_BYTES + FPU_BYTES;
const _: () = assert!(VCPU_RECORD_BYTES == 144 + 292 + 411);

/// One vCPU's registers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VcpuState {
    /// General-purpose registers, rip, rflags.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers.
    pub sregs: kvm_sregs,
    /// x87 and SSE state.
    pub fpu: kvm_fpu,
}

/// The VMM's own state that travels with the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmmState {
    /// Dirty rate the guest is paced to, bytes/s.
    pub dirty_rate: u64,
    /// Pages the guest has been handed to dirty since it started (on any host).
    pub pages_dirtied: u64,
    /// The guest's parameters (what its parameter page holds), if the VMM knows them.
    /// Checked against the destination's memory size by the restore.
    pub params: Option<GuestParams>,
}

/// Everything [`crate::kvm::KvmVm`] saves at switchover.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceState {
    /// VMM state.
    pub vmm: VmmState,
    /// vCPUs in id order.
    pub vcpus: Vec<VcpuState>,
}

impl DeviceState {
    /// Encodes the state (version [`VERSION`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(HEADER_BYTES + self.vcpus.len() * VCPU_RECORD_BYTES);
        w.extend_from_slice(&MAGIC);
        w.extend_from_slice(&VERSION.to_le_bytes());
        w.extend_from_slice(&(self.vcpus.len() as u16).to_le_bytes());
        w.extend_from_slice(&0u32.to_le_bytes());
        w.extend_from_slice(&self.vmm.dirty_rate.to_le_bytes());
        w.extend_from_slice(&self.vmm.pages_dirtied.to_le_bytes());
        match &self.vmm.params {
            Some(p) => w.extend_from_slice(&p.encode()),
            None => w.extend_from_slice(&[0; GuestParams::BYTES]),
        }
        for v in &self.vcpus {
            put_regs(&mut w, &v.regs);
            put_sregs(&mut w, &v.sregs);
            put_fpu(&mut w, &v.fpu);
        }
        w
    }

    /// Parses a blob, checking magic, version, counts and the exact length.
    pub fn decode(b: &[u8]) -> Result<DeviceState> {
        let mut r = Reader { b, pos: 0 };
        if r.bytes::<8>()? != MAGIC {
            return Err(Error::State("not a KVM device state (bad magic)".into()));
        }
        let version = r.u16()?;
        if version != 1 && version != VERSION {
            return Err(Error::State(format!(
                "device state version {version}, this build reads 1 and {VERSION}"
            )));
        }
        let n = usize::from(r.u16()?);
        if n == 0 || n > MAX_VCPUS {
            return Err(Error::State(format!(
                "device state has {n} vCPUs, expected 1..={MAX_VCPUS}"
            )));
        }
        if r.u32()? != 0 {
            return Err(Error::State(
                "device state reserved field is not zero".into(),
            ));
        }
        let header = if version == 1 {
            HEADER_V1_BYTES
        } else {
            HEADER_BYTES
        };
        let want = header + n * VCPU_RECORD_BYTES;
        if b.len() != want {
            return Err(Error::State(format!(
                "device state is {} bytes, {want} expected for {n} vCPUs",
                b.len()
            )));
        }
        let dirty_rate = r.u64()?;
        let pages_dirtied = r.u64()?;
        let params = if version == 1 {
            None
        } else {
            let b = r.bytes::<{ GuestParams::BYTES }>()?;
            if b == [0; GuestParams::BYTES] {
                None
            } else {
                Some(GuestParams::decode(&b, MAX_MEM_BYTES).map_err(Error::State)?)
            }
        };
        let vmm = VmmState {
            dirty_rate,
            pages_dirtied,
            params,
        };
        let mut vcpus = Vec::with_capacity(n);
        for _ in 0..n {
            let regs = get_regs(&mut r)?;
            let sregs = get_sregs(&mut r)?;
            let fpu = get_fpu(&mut r)?;
            vcpus.push(VcpuState { regs, sregs, fpu });
        }
        Ok(DeviceState { vmm, vcpus })
    }
}

/// Encodes the vCPU part only (what the state digest covers).
pub fn encode_vcpus(vcpus: &[VcpuState]) -> Vec<u8> {
    let mut w = Vec::with_capacity(vcpus.len() * VCPU_RECORD_BYTES);
    for v in vcpus {
        put_regs(&mut w, &v.regs);
        put_sregs(&mut w, &v.sregs);
        put_fpu(&mut w, &v.fpu);
    }
    w
}

fn regs_array(r: &kvm_regs) -> [u64; 18] {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ]
}

fn put_regs(w: &mut Vec<u8>, r: &kvm_regs) {
    for v in regs_array(r) {
        w.extend_from_slice(&v.to_le_bytes());
    }
}

fn get_regs(r: &mut Reader<'_>) -> Result<kvm_regs> {
    let mut a = [0u64; 18];
    for v in &mut a {
        *v = r.u64()?;
    }
    let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] =
        a;
    Ok(kvm_regs {
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        rdi,
        rsp,
        rbp,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        rip,
        rflags,
    })
}

fn put_segment(w: &mut Vec<u8>, s: &kvm_segment) {
    w.extend_from_slice(&s.base.to_le_bytes());
    w.extend_from_slice(&s.limit.to_le_bytes());
    w.extend_from_slice(&s.selector.to_le_bytes());
    w.extend_from_slice(&[
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
    ]);
}

fn get_segment(r: &mut Reader<'_>) -> Result<kvm_segment> {
    let (base, limit, selector) = (r.u64()?, r.u32()?, r.u16()?);
    let [type_, present, dpl, db, s, l, g, avl, unusable] = r.bytes::<9>()?;
    Ok(kvm_segment {
        base,
        limit,
        selector,
        type_,
        present,
        dpl,
        db,
        s,
        l,
        g,
        avl,
        unusable,
        padding: 0,
    })
}

fn put_sregs(w: &mut Vec<u8>, s: &kvm_sregs) {
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        put_segment(w, seg);
    }
    for t in [&s.gdt, &s.idt] {
        w.extend_from_slice(&t.base.to_le_bytes());
        w.extend_from_slice(&t.limit.to_le_bytes());
    }
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        w.extend_from_slice(&v.to_le_bytes());
    }
    for v in s.interrupt_bitmap {
        w.extend_from_slice(&v.to_le_bytes());
    }
}

fn get_sregs(r: &mut Reader<'_>) -> Result<kvm_sregs> {
    let mut s = kvm_sregs::default();
    for seg in [
        &mut s.cs, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss, &mut s.tr, &mut s.ldt,
    ] {
        *seg = get_segment(r)?;
    }
    for t in [&mut s.gdt, &mut s.idt] {
        *t = kvm_dtable {
            base: r.u64()?,
            limit: r.u16()?,
            padding: [0; 3],
        };
    }
    for v in [
        &mut s.cr0,
        &mut s.cr2,
        &mut s.cr3,
        &mut s.cr4,
        &mut s.cr8,
        &mut s.efer,
        &mut s.apic_base,
    ] {
        *v = r.u64()?;
    }
    for v in &mut s.interrupt_bitmap {
        *v = r.u64()?;
    }
    Ok(s)
}

fn put_fpu(w: &mut Vec<u8>, f: &kvm_fpu) {
    for reg in &f.fpr {
        w.extend_from_slice(reg);
    }
    w.extend_from_slice(&f.fcw.to_le_bytes());
    w.extend_from_slice(&f.fsw.to_le_bytes());
    w.push(f.ftwx);
    w.extend_from_slice(&f.last_opcode.to_le_bytes());
    w.extend_from_slice(&f.last_ip.to_le_bytes());
    w.extend_from_slice(&f.last_dp.to_le_bytes());
    for reg in &f.xmm {
        w.extend_from_slice(reg);
    }
    w.extend_from_slice(&f.mxcsr.to_le_bytes());
}

fn get_fpu(r: &mut Reader<'_>) -> Result<kvm_fpu> {
    let mut f = kvm_fpu::default();
    for reg in &mut f.fpr {
        *reg = r.bytes::<16>()?;
    }
    f.fcw = r.u16()?;
    f.fsw = r.u16()?;
    f.ftwx = r.bytes::<1>()?[0];
    f.last_opcode = r.u16()?;
    f.last_ip = r.u64()?;
    f.last_dp = r.u64()?;
    for reg in &mut f.xmm {
        *reg = r.bytes::<16>()?;
    }
    f.mxcsr = r.u32()?;
    Ok(f)
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self
            .b
            .get(self.pos..self.pos + N)
            .ok_or_else(|| Error::State(format!("device state truncated at byte {}", self.pos)))?;
        self.pos += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16> {
        self.bytes().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.bytes().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceState {
        let mut v = VcpuState::default();
        v.regs.rip = 0x2000;
        v.regs.rbp = 77;
        v.regs.rflags = 0x202;
        v.sregs.cs.selector = 8;
        v.sregs.cs.g = 1;
        v.sregs.gdt.limit = 23;
        v.sregs.cr0 = 0x11;
        v.sregs.interrupt_bitmap[3] = 9;
        v.fpu.fcw = 0x37f;
        v.fpu.mxcsr = 0x1f80;
        v.fpu.xmm[15][15] = 0xaa;
        v.fpu.fpr[7][0] = 5;
        DeviceState {
            vmm: VmmState {
                dirty_rate: 1 << 20,
                pages_dirtied: 12345,
                params: Some(GuestParams::for_memory(64 << 20, 8 << 20).unwrap()),
            },
            vcpus: vec![v, VcpuState::default()],
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let b = s.encode();
        assert_eq!(b.len(), HEADER_BYTES + 2 * VCPU_RECORD_BYTES);
        assert_eq!(DeviceState::decode(&b).unwrap(), s);
        let none = DeviceState {
            vmm: VmmState {
                params: None,
                ..s.vmm
            },
            ..s
        };
        assert_eq!(DeviceState::decode(&none.encode()).unwrap(), none);
    }

    #[test]
    fn reads_version_1_without_params() {
        let s = sample();
        let b = s.encode();
        let mut v1 = [&b[..HEADER_V1_BYTES], &b[HEADER_BYTES..]].concat();
        v1[8] = 1;
        let got = DeviceState::decode(&v1).unwrap();
        assert_eq!(got.vmm.params, None);
        assert_eq!((got.vmm.pages_dirtied, got.vcpus), (12345, s.vcpus));
        // A version-1 header with a version-2 body is refused (wrong length).
        let mut bad = b.clone();
        bad[8] = 1;
        assert!(DeviceState::decode(&bad).is_err());
    }

    #[test]
    fn rejects_bad_blobs() {
        let b = sample().encode();
        for bad in [
            b[..b.len() - 1].to_vec(),
            [b.clone(), vec![0]].concat(),
            {
                let mut x = b.clone();
                x[0] ^= 1;
                x
            },
            {
                let mut x = b.clone();
                x[8] = 3;
                x
            },
            {
                let mut x = b.clone();
                x[10] = 0;
                x[11] = 0;
                x
            },
            {
                let mut x = b.clone();
                x[10] = 65;
                x
            },
            {
                let mut x = b.clone();
                x[12] = 1;
                x
            },
            {
                // A parameter block with a bad magic.
                let mut x = b.clone();
                x[HEADER_V1_BYTES] ^= 1;
                x
            },
            Vec::new(),
        ] {
            assert!(DeviceState::decode(&bad).is_err());
        }
    }
}
