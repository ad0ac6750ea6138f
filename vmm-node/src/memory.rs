//! Guest physical memory: layout, allocation, snapshot files and dirty tracking helpers.
//!
//! Layout (x86_64): RAM from 0 up to [`MMIO_GAP_START`] (3 GiB); RAM beyond that continues at
//! 4 GiB. The 1 GiB hole holds the virtio-mmio slots (0xd000_0000), the IOAPIC and the LAPIC.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::GuestMem;

/// Smallest guest RAM accepted.
pub const MEMORY_MIB_MIN: u64 = 16;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole (RAM resumes here).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Guest page size used by dirty bitmaps.
pub const PAGE_SIZE_BYTES: usize = 4096;

/// Errors of guest memory handling.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Requested size is outside the supported range.
    #[error("guest memory size {memory_mib} MiB is invalid (minimum {MEMORY_MIB_MIN} MiB, at most the host's {host_mib} MiB)")]
    InvalidSize { memory_mib: u64, host_mib: u64 },
    /// Allocating or mapping guest memory failed.
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// Building the region collection failed.
    #[error("cannot assemble guest memory regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// Memory file I/O.
    #[error("guest memory file {path}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Memory file does not match the expected layout.
    #[error("guest memory file {path} is {actual_bytes} bytes, expected {expected_bytes}")]
    FileSize {
        path: String,
        actual_bytes: u64,
        expected_bytes: u64,
    },
    /// Guest memory access failed.
    #[error("guest memory access at {0:#x}")]
    Access(u64, #[source] vm_memory::GuestMemoryError),
}

/// The (guest address, size) ranges of RAM for a guest of `memory_bytes`.
pub fn ram_ranges(memory_bytes: u64) -> Vec<(u64, u64)> {
    if memory_bytes <= MMIO_GAP_START {
        vec![(0, memory_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, memory_bytes - MMIO_GAP_START),
        ]
    }
}

/// Check a requested guest memory size against limits and the host's memory.
pub fn validate_size(memory_mib: u64, host_mib: u64) -> Result<(), MemoryError> {
    if memory_mib < MEMORY_MIB_MIN || memory_mib > host_mib {
        return Err(MemoryError::InvalidSize {
            memory_mib,
            host_mib,
        });
    }
    Ok(())
}

fn region_from_builder(
    builder: MmapRegionBuilder<AtomicBitmap>,
    guest_addr: u64,
) -> Result<GuestRegionMmap<AtomicBitmap>, MemoryError> {
    let mapping = builder.build().map_err(MemoryError::Mmap)?;
    // Cannot overflow: every range ends below 2^52.
    Ok(GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
        .expect("guest ranges never overflow the address space"))
}

/// Allocate anonymous guest memory of `memory_bytes`, with a write bitmap per region.
pub fn allocate(memory_bytes: u64) -> Result<GuestMem, MemoryError> {
    let regions = ram_ranges(memory_bytes)
        .into_iter()
        .map(|(addr, size)| {
            let size = size as usize;
            let builder = MmapRegionBuilder::new_with_bitmap(
                size,
                AtomicBitmap::new(size, PAGE_SIZE_BYTES.try_into().expect("non-zero")),
            )
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE);
            region_from_builder(builder, addr)
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMem::from_regions(regions).map_err(MemoryError::Regions)
}

/// Map a memory file written by [`save_to_file`] copy-on-write (`MAP_PRIVATE`): restore
/// costs no copy, pages are read from the page cache when the guest first touches them.
///
/// The file must not be modified while the guest runs; snapshots are written to a new
/// file and renamed into place, so re-snapshotting into the same directory is safe.
pub fn map_file(path: &Path, memory_bytes: u64) -> Result<GuestMem, MemoryError> {
    let err = |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    map_fd(&file, path, memory_bytes, libc::MAP_PRIVATE)
}

/// New guest memory of `memory_bytes` in an anonymous memory file (memfd), mapped
/// shared: another process that maps the same file (see [`map_shared`]) sees the same
/// pages. Returns the memory and the file. Live migration into a separate VM process
/// uses it: the receiving process writes pages, the VM's process runs on them.
pub fn allocate_shared(memory_bytes: u64) -> Result<(GuestMem, File), MemoryError> {
    let path = Path::new("memfd:guest-memory");
    let err = |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    };
    let file = crate::kvm::memfd("guest-memory").map_err(err)?;
    file.set_len(memory_bytes).map_err(err)?;
    let mem = map_fd(&file, path, memory_bytes, libc::MAP_SHARED)?;
    Ok((mem, file))
}

/// Maps the shared guest memory file at `path` (e.g. `/proc/<pid>/fd/<n>` of a memfd
/// made by [`allocate_shared`]) read-write and shared; it must be `memory_bytes` long.
pub fn map_shared(path: &Path, memory_bytes: u64) -> Result<GuestMem, MemoryError> {
    let err = |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(err)?;
    map_fd(&file, path, memory_bytes, libc::MAP_SHARED)
}

/// Maps `file` (named `path` in errors) as guest memory of `memory_bytes`, regions back
/// to back in the file, with mmap `flags` (`MAP_PRIVATE` or `MAP_SHARED`).
fn map_fd(
    file: &File,
    path: &Path,
    memory_bytes: u64,
    flags: libc::c_int,
) -> Result<GuestMem, MemoryError> {
    let err = |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    };
    let actual_bytes = file.metadata().map_err(err)?.len();
    if actual_bytes != memory_bytes {
        return Err(MemoryError::FileSize {
            path: path.display().to_string(),
            actual_bytes,
            expected_bytes: memory_bytes,
        });
    }
    let mut offset = 0u64;
    let regions = ram_ranges(memory_bytes)
        .into_iter()
        .map(|(addr, size)| {
            let fd = file.try_clone().map_err(err)?;
            let size_usize = size as usize;
            let builder = MmapRegionBuilder::new_with_bitmap(
                size_usize,
                AtomicBitmap::new(size_usize, PAGE_SIZE_BYTES.try_into().expect("non-zero")),
            )
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags | libc::MAP_NORESERVE);
            offset += size;
            region_from_builder(builder, addr)
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMem::from_regions(regions).map_err(MemoryError::Regions)
}

/// Write all guest memory to `path` (regions back to back), sparsely: all-zero pages are
/// left as holes. Writes to `path` directly; callers write to a temporary name and rename.
pub fn save_to_file(mem: &GuestMem, path: &Path) -> Result<u64, MemoryError> {
    let err = |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(err)?;
    const CHUNK_BYTES: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut file_off = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = CHUNK_BYTES.min((len - off) as usize);
            let chunk = &mut buf[..n];
            region
                .read_slice(chunk, MemoryRegionAddress(off))
                .map_err(|e| MemoryError::Access(region.start_addr().0 + off, e))?;
            // Write runs of non-zero pages.
            let mut p = 0;
            while p < n {
                let end = (p + PAGE_SIZE_BYTES).min(n);
                if is_zero(&chunk[p..end]) {
                    p = end;
                    continue;
                }
                let mut q = end;
                while q < n {
                    let qe = (q + PAGE_SIZE_BYTES).min(n);
                    if is_zero(&chunk[q..qe]) {
                        break;
                    }
                    q = qe;
                }
                file.write_all_at(&chunk[p..q], file_off + off + p as u64)
                    .map_err(err)?;
                p = q;
            }
            off += n as u64;
        }
        file_off += len;
    }
    file.seek(SeekFrom::End(0)).map_err(err)?;
    file.flush().map_err(err)?;
    file.sync_data().map_err(err)?;
    Ok(total)
}

/// Whether `b` (at most one page) is all zero; a `memcmp` against a zero page, fast even in
/// debug builds.
fn is_zero(b: &[u8]) -> bool {
    static ZERO_PAGE: [u8; PAGE_SIZE_BYTES] = [0; PAGE_SIZE_BYTES];
    b == &ZERO_PAGE[..b.len()]
}

/// Pages of `region` that were provably never written since it was mapped (or were
/// discarded since), so read as zero, as a bitmap (bit `i` of word `i / 64` = page `i` of
/// the region, 4 KiB pages): the pages that the host's page tables of this process hold
/// neither present nor swapped, from `/proc/self/pagemap` (bit 63 present, bit 62 swapped).
///
/// For private anonymous regions (the common case, [`allocate`]) from the page map; for
/// shared mappings of a memory file (a memfd, [`allocate_shared`]: written possibly through
/// another process's mapping) the file's holes instead ([`holes_of_memory_file`]). A private
/// file mapping's untouched page reads the file: `None`. `None` too if the page map or the
/// holes cannot be read (the caller reads the pages). A page written after this call is not seen here:
/// callers read it only once dirty tracking is on.
pub fn never_written_pages(region: &GuestRegionMmap<AtomicBitmap>) -> Option<Vec<u64>> {
    let mapping: &vm_memory::mmap::MmapRegion<AtomicBitmap> = region;
    let flags = mapping.flags();
    if let Some(fo) = mapping.file_offset() {
        // A shared mapping of a memory file (memfd, tmpfs): whatever wrote its pages, from
        // any process, they are in the file; its holes read as zero.
        if flags & libc::MAP_SHARED != 0 && flags & libc::MAP_HUGETLB == 0 {
            let pages = mapping.size() / PAGE_SIZE_BYTES;
            return match holes_of_memory_file(fo.file(), fo.start(), pages) {
                Ok(bits) => bits,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot find the memory file's holes; reading every page");
                    None
                }
            };
        }
        return None;
    }
    // (A file mapping returned above.)
    if !mapping.owned()
        || flags & libc::MAP_HUGETLB != 0
        || flags & libc::MAP_PRIVATE == 0
        || flags & libc::MAP_SHARED != 0
        || flags & libc::MAP_ANONYMOUS == 0
    {
        return None;
    }
    let host = mapping.as_ptr() as usize;
    let pages = mapping.size() / PAGE_SIZE_BYTES;
    if !host.is_multiple_of(PAGE_SIZE_BYTES) {
        return None;
    }
    never_written_in(Path::new("/proc/self/pagemap"), host, pages)
}

/// The pages `[start, start + pages × 4 KiB)` of `file` that lie in its holes (never
/// written through any mapping or call, or punched out), as [`never_written_pages`]'
/// bitmap; `None` unless `file` is on tmpfs (a memfd), whose `SEEK_DATA` counts every page
/// in memory or in swap as data.
fn holes_of_memory_file(
    file: &File,
    start: u64,
    pages: usize,
) -> std::io::Result<Option<Vec<u64>>> {
    if !crate::kvm::is_tmpfs(file)? {
        return Ok(None);
    }
    let page = PAGE_SIZE_BYTES as u64;
    let end = start.saturating_add((pages as u64).saturating_mul(page));
    let seek =
        |off: u64, whence: crate::kvm::Seek| crate::kvm::seek_data_or_hole(file, off, whence);
    let mut bits = vec![0u64; pages.div_ceil(64)];
    let mut mark = |from: u64, to: u64| {
        // Whole pages of the region inside [from, to).
        let first = (from.max(start) - start).div_ceil(page) as usize;
        let last = ((to.min(end)).saturating_sub(start) / page) as usize;
        for p in first..last.min(pages) {
            bits[p / 64] |= 1 << (p % 64);
        }
    };
    let mut pos = start;
    while pos < end {
        let data = seek(pos, crate::kvm::Seek::Data)?.unwrap_or(end);
        if data > pos {
            mark(pos, data);
        }
        if data >= end {
            break;
        }
        // A file's end is a hole, so SEEK_HOLE after data always finds one.
        pos = seek(data, crate::kvm::Seek::Hole)?
            .unwrap_or(end)
            .max(data + 1);
    }
    Ok(Some(bits))
}

/// [`never_written_pages`]' page map look over `path`; `None` on any error.
fn never_written_in(path: &Path, host: usize, pages: usize) -> Option<Vec<u64>> {
    match read_pagemap(path, host, pages) {
        Ok(bits) => Some(bits),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read /proc/self/pagemap; reading every page");
            None
        }
    }
}

/// Reads `pages` page map entries from `path` for the pages starting at host address
/// `host` and returns the bitmap of entries neither present nor swapped.
fn read_pagemap(path: &Path, host: usize, pages: usize) -> std::io::Result<Vec<u64>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    /// Entries read at once (64 KiB).
    const CHUNK_ENTRIES: usize = 8192;
    let file = File::open(path)?;
    let mut bits = vec![0u64; pages.div_ceil(64)];
    let mut buf = vec![0u8; CHUNK_ENTRIES * 8];
    let first = (host / PAGE_SIZE_BYTES) as u64;
    let mut done = 0usize;
    while done < pages {
        let n = CHUNK_ENTRIES.min(pages - done);
        let chunk = &mut buf[..n * 8];
        file.read_exact_at(chunk, (first + done as u64) * 8)?;
        for (i, e) in chunk.chunks_exact(8).enumerate() {
            let entry = u64::from_ne_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            if entry & (PRESENT | SWAPPED) == 0 {
                let p = done + i;
                bits[p / 64] |= 1 << (p % 64);
            }
        }
        done += n;
    }
    Ok(bits)
}

/// Total guest RAM in bytes.
pub fn total_bytes(mem: &GuestMem) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]
        );
    }

    #[test]
    fn size_limits_are_checked() {
        assert!(validate_size(8, 1024).is_err());
        assert!(validate_size(2048, 1024).is_err());
        validate_size(16, 1024).unwrap();
    }

    #[test]
    fn shared_memory_is_seen_through_a_second_mapping_and_sizes_are_checked() {
        use std::os::fd::AsRawFd;
        let (mem, file) = allocate_shared(16 << 20).unwrap();
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let other = map_shared(&path, 16 << 20).unwrap();
        mem.write_obj(0xfeed_u64, GuestAddress(0x5000)).unwrap();
        assert_eq!(other.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0xfeed);
        other
            .write_obj(0x77_u8, GuestAddress((16 << 20) - 1))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress((16 << 20) - 1)).unwrap(),
            0x77
        );
        match map_shared(&path, 32 << 20) {
            Err(MemoryError::FileSize { expected_bytes, .. }) => {
                assert_eq!(expected_bytes, 32 << 20)
            }
            other => panic!("a 16 MiB file mapped as 32 MiB: {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn save_and_map_roundtrip_keeps_content_and_is_sparse() {
        let mem = allocate(16 << 20).unwrap();
        mem.write_obj(0xdead_beef_u64, GuestAddress(0x1234))
            .unwrap();
        mem.write_obj(0x55_u8, GuestAddress((16 << 20) - 1))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        assert_eq!(save_to_file(&mem, &path).unwrap(), 16 << 20);
        let restored = map_file(&path, 16 << 20).unwrap();
        assert_eq!(
            restored.read_obj::<u64>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress((16 << 20) - 1))
                .unwrap(),
            0x55
        );
        // Copy-on-write: writing the restored guest does not touch the file.
        restored.write_obj(1_u64, GuestAddress(0x1234)).unwrap();
        let again = map_file(&path, 16 << 20).unwrap();
        assert_eq!(
            again.read_obj::<u64>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        // Sparse: only two pages hold data.
        use std::os::unix::fs::MetadataExt;
        let blocks_bytes = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            blocks_bytes <= 64 * 1024,
            "file not sparse: {blocks_bytes} bytes allocated"
        );
    }

    fn bit(bits: &[u64], p: usize) -> bool {
        bits[p / 64] & (1 << (p % 64)) != 0
    }

    /// Transparent huge pages set to `always` may make a written page's neighbours present.
    fn thp_always() -> bool {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| s.contains("[always]"))
    }

    #[test]
    fn never_written_pages_are_the_pages_no_one_wrote() {
        let pages = (16 << 20) / PAGE_SIZE_BYTES;
        let mem = allocate(16 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        let fresh = never_written_pages(region).expect("anonymous memory has a page map");
        assert_eq!(fresh.len(), pages / 64);
        assert!(
            (0..pages).all(|p| bit(&fresh, p)),
            "fresh memory: every page never written"
        );
        mem.write_obj(1_u8, GuestAddress(0)).unwrap();
        mem.write_obj(2_u64, GuestAddress(100 * 4096 + 8)).unwrap();
        mem.write_obj(3_u8, GuestAddress((16 << 20) - 1)).unwrap();
        let bits = never_written_pages(region).unwrap();
        for p in [0, 100, pages - 1] {
            assert!(!bit(&bits, p), "page {p} was written");
        }
        let untouched = (0..pages).filter(|&p| bit(&bits, p)).count();
        if thp_always() {
            assert!(untouched >= pages - 3 * 512, "{untouched} of {pages}");
        } else {
            assert_eq!(untouched, pages - 3);
        }
        // A page that is only read may map the zero page: never reported wrongly either way.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(200 * 4096)).unwrap(), 0);
        // An unreadable page map: no answer, so the caller reads every page.
        let host = region.as_ptr() as usize;
        assert_eq!(
            never_written_in(Path::new("/nonexistent/pagemap"), host, pages),
            None
        );
        // A page map shorter than asked for (a regular file): no answer either.
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("pagemap");
        std::fs::write(&short, [0u8; 64]).unwrap();
        assert_eq!(never_written_in(&short, 4096 * 4096, pages), None);
    }

    #[test]
    fn snapshot_memory_is_never_reported_never_written() {
        let mem = allocate(16 << 20).unwrap();
        mem.write_obj(7_u64, GuestAddress(0x3000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        save_to_file(&mem, &path).unwrap();
        // Untouched pages of a private file mapping come from the file.
        let restored = map_file(&path, 16 << 20).unwrap();
        assert!(never_written_pages(restored.iter().next().unwrap()).is_none());
    }

    #[test]
    fn a_memory_files_holes_are_never_written_whoever_wrote_the_rest() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let (shared, file) = allocate_shared(16 << 20).unwrap();
        // Written through this mapping, through another process's view of the file (a
        // second mapping of /proc/self/fd/N) and with pwrite.
        shared.write_obj(7_u64, GuestAddress(3 * 4096)).unwrap();
        let other = map_shared(
            Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())),
            16 << 20,
        )
        .unwrap();
        other
            .write_obj(9_u64, GuestAddress(7 * 4096 + 100))
            .unwrap();
        file.write_all_at(&[1], 9 * 4096 + 4095).unwrap();
        let region = shared.iter().next().unwrap();
        let bits = never_written_pages(region).expect("a memfd's holes are known");
        let pages = region.len() as usize / PAGE_SIZE_BYTES;
        let hole = |p: usize| bits[p / 64] & (1 << (p % 64)) != 0;
        for p in [3, 7, 9] {
            assert!(
                !hole(p),
                "page {p} was written (or read) but is reported never written"
            );
        }
        for p in [0, 1, 2, 4, 8, 10, pages - 1] {
            assert!(hole(p), "page {p} was never written");
        }
        assert_eq!(
            bits.iter().map(|w| w.count_ones() as usize).sum::<usize>(),
            pages - 3
        );
        // A file on a disk filesystem is not asked (its holes need not match its pages).
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        f.set_len(1 << 20).unwrap();
        let on_tmpfs = holes_of_memory_file(&f, 0, 256).unwrap().is_some();
        let fs_is_tmpfs = crate::kvm::is_tmpfs(&f).unwrap();
        assert!(crate::kvm::is_tmpfs(&file).unwrap(), "a memfd is on tmpfs");
        assert_eq!(on_tmpfs, fs_is_tmpfs);
    }

    #[test]
    fn map_file_rejects_wrong_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let e = map_file(&path, 16 << 20).unwrap_err();
        assert!(matches!(e, MemoryError::FileSize { .. }), "{e}");
        let e = map_file(&dir.path().join("missing"), 16 << 20).unwrap_err();
        assert!(matches!(e, MemoryError::File { .. }), "{e}");
    }
}
