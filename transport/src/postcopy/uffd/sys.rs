//! The kernel's userfaultfd ABI, transcribed from `include/uapi/linux/userfaultfd.h`: the
//! `UFFDIO` ioctl type and numbers, the ioctl request codes built from them with libc's
//! `_IOWR`/`_IOR`/`_IO` (the kernel's own macros, so the direction and size bits are right on
//! every architecture), the argument structs with their sizes asserted at compile time, and the
//! feature, mode and event constants this crate uses.

use libc::{c_ulong, _IO, _IOR, _IOWR};

/// `UFFD_API`: the API version the handshake asks for.
pub(crate) const UFFD_API: u64 = 0xAA;

/// `UFFDIO`: the ioctl type of every userfaultfd ioctl.
const UFFDIO: u32 = 0xAA;
/// `USERFAULTFD_IOC`: the ioctl type of `/dev/userfaultfd`.
const USERFAULTFD_IOC: u32 = 0xAA;

// The ioctl numbers (`_UFFDIO_*`); a range's and the API's `ioctls` masks have bit `1 << nr`
// set for each ioctl they support.
const _UFFDIO_REGISTER: u32 = 0x00;
const _UFFDIO_UNREGISTER: u32 = 0x01;
const _UFFDIO_WAKE: u32 = 0x02;
const _UFFDIO_COPY: u32 = 0x03;
const _UFFDIO_ZEROPAGE: u32 = 0x04;
const _UFFDIO_CONTINUE: u32 = 0x07;
const _UFFDIO_API: u32 = 0x3F;

/// The bit for ioctl number `nr` in an `ioctls` mask.
const fn ioctl_bit(nr: u32) -> u64 {
    1 << nr
}

/// `UFFDIO_API`: the handshake.
pub(crate) const UFFDIO_API: c_ulong = _IOWR::<UffdioApi>(UFFDIO, _UFFDIO_API);
/// `UFFDIO_REGISTER`.
pub(crate) const UFFDIO_REGISTER: c_ulong = _IOWR::<UffdioRegister>(UFFDIO, _UFFDIO_REGISTER);
/// `UFFDIO_UNREGISTER`.
pub(crate) const UFFDIO_UNREGISTER: c_ulong = _IOR::<UffdioRange>(UFFDIO, _UFFDIO_UNREGISTER);
/// `UFFDIO_WAKE`.
pub(crate) const UFFDIO_WAKE: c_ulong = _IOR::<UffdioRange>(UFFDIO, _UFFDIO_WAKE);
/// `UFFDIO_COPY`.
pub(crate) const UFFDIO_COPY: c_ulong = _IOWR::<UffdioCopy>(UFFDIO, _UFFDIO_COPY);
/// `UFFDIO_ZEROPAGE`.
pub(crate) const UFFDIO_ZEROPAGE: c_ulong = _IOWR::<UffdioZeropage>(UFFDIO, _UFFDIO_ZEROPAGE);
/// `UFFDIO_CONTINUE`.
pub(crate) const UFFDIO_CONTINUE: c_ulong = _IOWR::<UffdioContinue>(UFFDIO, _UFFDIO_CONTINUE);
/// `USERFAULTFD_IOC_NEW`: a new userfaultfd from `/dev/userfaultfd`.
pub(crate) const USERFAULTFD_IOC_NEW: c_ulong = _IO(USERFAULTFD_IOC, 0x00);

/// Ioctls the handshake must offer: `UFFDIO_API`, `UFFDIO_REGISTER`, `UFFDIO_UNREGISTER`.
pub(crate) const NEED_API_IOCTLS: u64 =
    ioctl_bit(_UFFDIO_API) | ioctl_bit(_UFFDIO_REGISTER) | ioctl_bit(_UFFDIO_UNREGISTER);
/// Ioctls a range registered in MISSING mode must support.
pub(crate) const NEED_MISSING_IOCTLS: [(u64, &str); 3] = [
    (ioctl_bit(_UFFDIO_WAKE), "UFFDIO_WAKE"),
    (ioctl_bit(_UFFDIO_COPY), "UFFDIO_COPY"),
    (ioctl_bit(_UFFDIO_ZEROPAGE), "UFFDIO_ZEROPAGE"),
];
/// Ioctls a range registered in MINOR mode must support.
pub(crate) const NEED_MINOR_IOCTLS: [(u64, &str); 2] = [
    (ioctl_bit(_UFFDIO_WAKE), "UFFDIO_WAKE"),
    (ioctl_bit(_UFFDIO_CONTINUE), "UFFDIO_CONTINUE"),
];

/// `UFFDIO_REGISTER_MODE_MISSING`.
pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_MINOR`.
pub(crate) const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

/// `UFFD_FEATURE_MISSING_SHMEM`: missing faults on shmem mappings.
pub(crate) const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_MINOR_SHMEM`: minor faults on shmem (memfd) mappings.
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;

/// `UFFD_EVENT_PAGEFAULT`: the event of a `uffd_msg` reporting a fault.
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_copy`: `copy` is the bytes copied, or a negated errno.
#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_zeropage`: `zeropage` is the bytes zero-mapped, or a negated errno.
#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffdio_continue`: `mapped` is the bytes mapped, or a negated errno.
#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioContinue {
    pub range: UffdioRange,
    pub mode: u64,
    pub mapped: i64,
}

/// One `struct uffd_msg` as read from the descriptor, with its `arg` union read as the
/// `pagefault` member (`flags`, `address`, `feat`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub flags: u64,
    pub address: u64,
    pub feat: u64,
}

// The kernel's sizes: a layout that drifted would change the request codes above (the size is
// part of them) and the kernel would reject every call.
const _: () = {
    assert!(size_of::<UffdioApi>() == 24);
    assert!(size_of::<UffdioRange>() == 16);
    assert!(size_of::<UffdioRegister>() == 32);
    assert!(size_of::<UffdioCopy>() == 40);
    assert!(size_of::<UffdioZeropage>() == 32);
    assert!(size_of::<UffdioContinue>() == 32);
    assert!(size_of::<UffdMsg>() == 32);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The request codes match what the kernel's headers expand to on x86-64 (`_IOC_WRITE` = 1,
    /// `_IOC_READ` = 2, 14 size bits).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn request_codes_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
        assert_eq!(UFFDIO_CONTINUE, 0xC020_AA07);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xAA00);
        assert_eq!(NEED_API_IOCTLS, (1 << 0x3F) | 0b11);
    }
}
