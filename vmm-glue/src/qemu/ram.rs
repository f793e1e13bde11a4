//! A QEMU's guest RAM, found through QMP and mapped into this process.
//!
//! Discovery: `query-memdev` lists the memory backends (each must be `share=on`), `info ramblock`
//! (through `human-monitor-command`) gives each backend's RAM block offset and length, and
//! `/proc/<qemu pid>/maps` shows where QEMU mapped it and from which file (a `mem-path` file, or
//! a memfd). rdmig then maps the same file `MAP_SHARED` itself, so it sees every write of the
//! guest (and writes the guest will see) with no copy through QEMU. The RAM block offset is the
//! region's address in rdmig's region table; both QEMUs must agree on the list of blocks.
//!
//! Blocks that are not backends (ROMs, firmware, video RAM) stay in QEMU's own migration stream:
//! with `x-ignore-shared` QEMU leaves out exactly the shared blocks rdmig moves.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use rdmig_transport::mem::{GuestAddress, GuestMemoryMap, GuestRegion, PageSize};
use rdmig_transport::vm::MemoryLayout;
use serde_json::json;

use super::qmp::{Pid, Qmp};
use crate::error::{Error, Result};

/// One shared RAM block of a QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    /// The memory backend's id (`-object memory-backend-*,id=...`), also the block's name.
    pub id: String,
    /// The block's offset in QEMU's RAM address space (the region address rdmig uses).
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// Where QEMU maps it in its own address space.
    pub qemu_hva: u64,
    /// The file rdmig opened to map it (`mem-path`, or `/proc/<pid>/map_files/...`).
    pub file: PathBuf,
    /// Offset of the block in that file.
    pub file_offset: u64,
    /// The file's inode number as QEMU's mapping shows it (checked when rdmig opens it).
    pub inode: u64,
}

/// Finds the shared RAM blocks of the QEMU behind `qmp`, with clear errors for RAM rdmig
/// cannot move (no backend, `share=off`).
pub fn discover(qmp: &mut Qmp) -> Result<Vec<RamBlock>> {
    let memdevs = qmp.execute("query-memdev", None)?;
    let memdevs = memdevs.as_array().cloned().unwrap_or_default();
    if memdevs.is_empty() {
        return Err(Error::QemuSetup(
            "QEMU has no memory backend: give it its RAM as a shared backend, e.g. -object \
             memory-backend-file,id=ram0,size=1G,mem-path=/dev/shm/vm0,share=on -machine \
             memory-backend=ram0"
                .into(),
        ));
    }
    let ramblocks = parse_ramblocks(&qmp.hmp("info ramblock")?);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", qmp.pid().0)).map_err(|e| {
        Error::QemuIo {
            context: format!("reading /proc/{}/maps", qmp.pid().0),
            source: e,
        }
    })?;
    let mut out = Vec::new();
    for m in &memdevs {
        let id = m["id"].as_str().unwrap_or_default().to_string();
        let size = m["size"].as_u64().unwrap_or(0);
        if m["share"] != true {
            return Err(Error::QemuSetup(format!(
                "memory backend {id:?} is not shared: rdmig maps the guest RAM itself, so the \
                 backend needs share=on (memory-backend-file with mem-path on /dev/shm or hugetlbfs, \
                 or memory-backend-memfd)"
            )));
        }
        let Some(&(offset, used)) = ramblocks.iter().find(|b| b.0 == id).map(|b| &b.1) else {
            return Err(Error::QemuSetup(format!(
                "memory backend {id:?} has no RAM block in `info ramblock` (is it used by the \
                 machine or a NUMA node?)"
            )));
        };
        if used != size {
            return Err(Error::QemuSetup(format!(
                "RAM block {id:?} uses {used} of its backend's {size} bytes (resizable blocks are \
                 not supported)"
            )));
        }
        let mem_path = qmp
            .execute(
                "qom-get",
                Some(json!({ "path": format!("/objects/{id}"), "property": "mem-path" })),
            )
            .ok()
            .and_then(|v| v.as_str().map(PathBuf::from));
        let map = find_mapping(&maps, &id, size, mem_path.as_ref())
            .map_err(Error::QemuSetup)?
            .ok_or_else(|| {
                Error::QemuSetup(format!(
                    "cannot find QEMU's mapping of memory backend {id:?} ({size} bytes) in \
                     /proc/{}/maps",
                    qmp.pid().0
                ))
            })?;
        if !map.shared {
            return Err(Error::QemuSetup(format!(
                "QEMU maps memory backend {id:?} private: the backend needs share=on"
            )));
        }
        let file = match &map.path {
            Some(p) => p.clone(),
            None => PathBuf::from(format!(
                "/proc/{}/map_files/{:x}-{:x}",
                qmp.pid().0,
                map.start,
                map.start + size
            )),
        };
        out.push(RamBlock {
            id,
            offset,
            size,
            qemu_hva: map.start,
            file,
            file_offset: map.file_offset,
            inode: map.inode,
        });
    }
    out.sort_by_key(|b| b.offset);
    Ok(out)
}

/// `info ramblock` as (name, (offset, used length)).
fn parse_ramblocks(text: &str) -> Vec<(String, (u64, u64))> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // name, page size value, unit, offset, used, total
            if f.len() < 6 || !f[3].starts_with("0x") {
                return None;
            }
            Some((f[0].to_string(), (hex(f[3])?, hex(f[4])?)))
        })
        .collect()
}

/// A line of `/proc/<pid>/maps` that holds a RAM block.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    shared: bool,
    file_offset: u64,
    inode: u64,
    /// The file's path when it still exists under that name (not a memfd, not deleted).
    path: Option<PathBuf>,
}

/// The name QEMU (7.2, and every release since memfd backends exist) gives the memfds of
/// `memory-backend-memfd` objects: the type name, not the object's id.
const QEMU_MEMFD_NAME: &str = "/memfd:memory-backend-memfd";

/// QEMU's mapping of backend `id` (`size` bytes, `mem_path` for a file backend). A memfd
/// backend's memfd carries QEMU's fixed name rather than the id, so with several memfd
/// backends mapped the one of `id` cannot be told apart: that is an error, not a guess.
fn find_mapping(
    maps: &str,
    id: &str,
    size: u64,
    mem_path: Option<&PathBuf>,
) -> std::result::Result<Option<Mapping>, String> {
    let memfd = format!("/memfd:{id}");
    let mut found: Vec<(Mapping, bool)> = maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.splitn(6, ' ').collect();
            if f.len() < 6 {
                return None;
            }
            let (a, b) = f[0].split_once('-')?;
            let start = u64::from_str_radix(a, 16).ok()?;
            let end = u64::from_str_radix(b, 16).ok()?;
            let path = f[5].trim();
            let deleted = path.ends_with(" (deleted)");
            let named = path.trim_end_matches(" (deleted)");
            let by_id = named.starts_with(&memfd)
                || mem_path.is_some_and(|p| {
                    // mem-path may name a directory (QEMU makes an unlinked file in it).
                    named == p.to_string_lossy() || named.starts_with(&*p.to_string_lossy())
                });
            let by_type = mem_path.is_none() && named == QEMU_MEMFD_NAME;
            if !(by_id || by_type) || end - start < size {
                return None;
            }
            Some((
                Mapping {
                    start,
                    shared: f[1].as_bytes().get(3) == Some(&b's'),
                    file_offset: u64::from_str_radix(f[2], 16).ok()?,
                    inode: f[4].parse().ok()?,
                    path: (!deleted && !named.starts_with("/memfd:")).then(|| PathBuf::from(named)),
                },
                by_id,
            ))
        })
        .collect();
    if let Some(i) = found.iter().position(|(_, by_id)| *by_id) {
        return Ok(Some(found.swap_remove(i).0));
    }
    let mut inodes: Vec<u64> = found.iter().map(|(m, _)| m.inode).collect();
    inodes.sort_unstable();
    inodes.dedup();
    match inodes.len() {
        0 => Ok(None),
        1 => Ok(Some(found.swap_remove(0).0)),
        n => Err(format!(
            "QEMU maps {n} memfds named {QEMU_MEMFD_NAME:?} of at least {size} bytes, and which \
             one is backend {id:?} cannot be told from /proc/<pid>/maps: give each backend its \
             own file (memory-backend-file,mem-path=/dev/shm/...,share=on) instead"
        )),
    }
}

/// rdmig's own shared mappings of a QEMU's RAM blocks; unmapped in `Drop`.
#[derive(Debug)]
pub struct SharedRam {
    blocks: Vec<RamBlock>,
    maps: Vec<(*mut u8, usize, File)>,
}

// SAFETY: the mappings are process-wide shared memory; SharedRam hands out only raw pointers
// (through GuestRegion) and never touches the memory itself.
unsafe impl Send for SharedRam {}

impl SharedRam {
    /// Maps every block of `blocks` shared (QEMU `pid` must be the one they came from).
    pub fn map(pid: Pid, blocks: Vec<RamBlock>) -> Result<SharedRam> {
        let mut maps = Vec::new();
        for b in &blocks {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&b.file)
                .map_err(|e| Error::QemuIo {
                    context: format!(
                        "opening the RAM of backend {:?} (QEMU pid {}) at {}",
                        b.id,
                        pid.0,
                        b.file.display()
                    ),
                    source: e,
                })?;
            let meta = file.metadata().map_err(|e| Error::QemuIo {
                context: format!("fstat of {}", b.file.display()),
                source: e,
            })?;
            if meta.ino() != b.inode {
                return Err(Error::QemuSetup(format!(
                    "{} is not the file QEMU maps for backend {:?} (inode {} instead of {}): was \
                     it replaced?",
                    b.file.display(),
                    b.id,
                    meta.ino(),
                    b.inode
                )));
            }
            if meta.len() < b.file_offset + b.size {
                return Err(Error::QemuSetup(format!(
                    "{} holds {} bytes, backend {:?} needs {} from offset {}",
                    b.file.display(),
                    meta.len(),
                    b.id,
                    b.size,
                    b.file_offset
                )));
            }
            let len = usize::try_from(b.size)
                .map_err(|_| Error::QemuSetup(format!("backend {:?} is too big", b.id)))?;
            // The file was checked to be long enough; the result is checked below.
            // SAFETY: a new shared mapping at an address the kernel picks.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    b.file_offset as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(Error::QemuIo {
                    context: format!("mmap of backend {:?}", b.id),
                    source: std::io::Error::last_os_error(),
                });
            }
            maps.push((ptr.cast::<u8>(), len, file));
        }
        Ok(SharedRam { blocks, maps })
    }

    /// The blocks, in offset order.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// The layout these blocks give (4 KiB pages, one region per block at its offset).
    pub fn layout(&self) -> MemoryLayout {
        MemoryLayout {
            page_size: PageSize::KIB4,
            regions: self
                .blocks
                .iter()
                .map(|b| (GuestAddress(b.offset), b.size))
                .collect(),
            vm: None,
        }
    }

    /// The guest memory map over rdmig's mappings.
    ///
    /// The regions borrow the mappings: the map must not be used after `self` is dropped.
    pub fn memory_map(&self) -> Result<GuestMemoryMap> {
        let regions = self
            .blocks
            .iter()
            .zip(&self.maps)
            .map(|(b, (ptr, len, file))| {
                let fd: RawFd = file.as_raw_fd();
                // The mapping and the fd stay until `self` drops, which the owner of the map
                // outlives (QemuSource and QemuDest keep both).
                // SAFETY: ptr..ptr+len is our live shared mapping of `file` at `file_offset`.
                unsafe {
                    GuestRegion::new(GuestAddress(b.offset), *ptr, *len as u64)
                        .with_memfd(fd, b.file_offset)
                }
            })
            .collect();
        GuestMemoryMap::new(regions, PageSize::KIB4).map_err(Error::Memory)
    }
}

impl Drop for SharedRam {
    fn drop(&mut self) {
        for (ptr, len, _) in &self.maps {
            // SAFETY: exactly a mapping made in `map`, unmapped once.
            if unsafe { libc::munmap(ptr.cast(), *len) } != 0 {
                tracing::warn!(
                    "munmap of QEMU RAM failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Checks that the destination QEMU's blocks match the layout the source announced.
pub fn check_layout(mine: &MemoryLayout, announced: &MemoryLayout) -> Result<()> {
    rdmig_transport::vm::VmDescriptor::check(announced, super::KIND, 0..=u32::MAX)
        .map_err(|e| Error::InvalidConfig(e.to_string()))?;
    if mine == announced {
        return Ok(());
    }
    let show = |l: &MemoryLayout| {
        l.regions
            .iter()
            .map(|(a, n)| format!("{:#x}+{n}", a.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(Error::QemuSetup(format!(
        "the two QEMUs' RAM differs: the source has [{}], this destination [{}]; start the \
         destination QEMU with the same -m and memory backends",
        show(announced),
        show(mine)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_ramblock() {
        let text = "              Block Name    PSize              Offset               Used              Total\n\
                    \x20                   ram0    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000\n\
                    \x20                pc.bios    4 KiB  0x0000000010000000 0x0000000000040000 0x0000000000040000\n";
        let b = parse_ramblocks(text);
        assert_eq!(
            b,
            vec![
                ("ram0".into(), (0, 0x1000_0000)),
                ("pc.bios".into(), (0x1000_0000, 0x40000))
            ]
        );
    }

    #[test]
    fn finds_qemus_memfd_by_its_type_name_and_refuses_to_guess() {
        // What QEMU 7.2 shows for `-object memory-backend-memfd,id=ram0,...`.
        let one = "7f53f7fff000-7f5407fff000 rw-s 00000000 00:01 1028                       /memfd:memory-backend-memfd (deleted)\n";
        let m = find_mapping(one, "ram0", 0x1000_0000, None)
            .unwrap()
            .unwrap();
        assert_eq!((m.start, m.inode, m.path), (0x7f53_f7ff_f000, 1028, None));
        // Not for a file backend, and not a smaller memfd.
        assert!(
            find_mapping(one, "ram0", 0x1000_0000, Some(&"/dev/shm/x".into()))
                .unwrap()
                .is_none()
        );
        assert!(find_mapping(one, "ram0", 0x2000_0000, None)
            .unwrap()
            .is_none());
        let two = format!("{one}7f6000000000-7f6010000000 rw-s 00000000 00:01 1029                       /memfd:memory-backend-memfd (deleted)\n");
        let e = find_mapping(&two, "ram0", 0x1000_0000, None).unwrap_err();
        assert!(e.contains("cannot be told"), "{e}");
    }

    #[test]
    fn finds_file_and_memfd_mappings() {
        let maps = "7fe113fff000-7fe123fff000 rw-s 00000000 00:1b 2                          /dev/shm/qx-src\n\
                    7f0000000000-7f0010000000 rw-s 00000000 00:01 77                         /memfd:ram1 (deleted)\n\
                    7f2000000000-7f2010000000 rw-p 00000000 00:01 78                         /dev/shm/priv\n";
        let find = |id, size, p: Option<&str>| {
            find_mapping(maps, id, size, p.map(PathBuf::from).as_ref()).unwrap()
        };
        let m = find("ram0", 0x1000_0000, Some("/dev/shm/qx-src")).unwrap();
        assert_eq!(m.start, 0x7fe1_13ff_f000);
        assert!(m.shared);
        assert_eq!(m.path, Some("/dev/shm/qx-src".into()));
        let m = find("ram1", 0x1000_0000, None).unwrap();
        assert_eq!(m.path, None);
        assert_eq!(m.inode, 77);
        let m = find("x", 0x1000_0000, Some("/dev/shm/priv")).unwrap();
        assert!(!m.shared);
        assert!(find("ram0", 0x2000_0000, Some("/dev/shm/qx-src")).is_none());
    }
}
