//! Loading a kernel into guest memory and setting up the boot vCPU(s).
//!
//! * **PVH** (ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note): `hvm_start_info` at
//!   [`PVH_START_INFO_ADDR`] (memory map right after it), command line at [`CMDLINE_ADDR`],
//!   BSP in 32-bit flat protected mode at the note's entry with `%ebx` = start_info.
//! * **Linux** (bzImage or vmlinux ELF): `boot_params` at [`ZERO_PAGE_ADDR`] with e820 map,
//!   command line and initramfs; BSP in 64-bit mode on identity page tables (first 1 GiB)
//!   at the 64-bit entry (`startup_64`), `%rsi` = boot_params; ACPI tables (MADT) and an MP
//!   table list the vCPUs and the IOAPIC (APs wait for INIT/SIPI from the BSP's LAPIC).
//! * **Test guest APs** (PVH images carrying the test guest header, see `guest/`): started
//!   directly in 64-bit CPL3 at the header's AP entry with `%rdi` = vCPU index.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::config::{BootProtocol, VmConfig};
use crate::memory::{self, MMIO_GAP_START};
use crate::GuestMem;

/// Where kernels are loaded (1 MiB).
pub const HIGHMEM_START: u64 = 0x10_0000;
/// Linux boot_params ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// PVH start_info.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// PVH memory map (after start_info).
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// GDT for the Linux 64-bit entry.
const BOOT_GDT_ADDR: u64 = 0x500;
/// Identity page tables for the Linux 64-bit entry.
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Initial stack for the Linux 64-bit entry.
const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// End of conventional low memory reported in e820.
const EBDA_START: u64 = 0x9fc00;
/// Magic of the test guest header at [`HIGHMEM_START`] ("TGHD").
pub const TEST_GUEST_MAGIC: u32 = 0x4448_4754;
/// Largest kernel image read.
pub const KERNEL_BYTES_MAX: u64 = 512 << 20;

/// Errors of kernel loading and boot setup.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Kernel or initramfs file cannot be opened/read.
    #[error("cannot read {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Kernel is neither ELF nor bzImage.
    #[error("{path} is not a kernel image (neither ELF nor bzImage)")]
    UnknownFormat { path: PathBuf },
    /// Kernel is too big.
    #[error("{path} is {size_bytes} bytes, more than the {KERNEL_BYTES_MAX} accepted")]
    TooBig { path: PathBuf, size_bytes: u64 },
    /// linux-loader rejected the image.
    #[error("cannot load kernel {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// PVH requested but the ELF has no PVH note.
    #[error("{path} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhNote { path: PathBuf },
    /// PVH boot of a bzImage.
    #[error("{path} is a bzImage; PVH needs an ELF image")]
    PvhBzImage { path: PathBuf },
    /// initramfs does not fit below the kernel's limit.
    #[error("initramfs {path} ({size_bytes} bytes) does not fit in guest memory")]
    InitramfsTooBig { path: PathBuf, size_bytes: u64 },
    /// Guest memory write failed.
    #[error("writing boot data at {addr:#x}")]
    Memory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// vCPU register setup failed.
    #[error("setting {what} of vcpu {vcpu}")]
    Vcpu {
        what: &'static str,
        vcpu: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Test guest header (see `guest/head.S`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestGuestHeader {
    pub pml4: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub tss: u64,
    pub ap_entry: u64,
    pub stacks_base: u64,
    pub stack_bytes: u64,
    pub cpus_max: u64,
}

/// How the BSP enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH 32-bit entry.
    Pvh {
        entry: u64,
        test_guest: Option<TestGuestHeader>,
    },
    /// Linux 64-bit entry.
    Linux { entry: u64 },
}

/// Result of loading a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootSetup {
    pub entry: BootEntry,
}

impl BootSetup {
    /// Whether the guest is Linux booted through the Linux protocol.
    pub fn is_linux(&self) -> bool {
        matches!(self.entry, BootEntry::Linux { .. })
    }
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        path: path.to_path_buf(),
        source,
    })
}

fn write<T: vm_memory::ByteValued>(mem: &GuestMem, v: T, addr: u64) -> Result<(), BootError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|source| BootError::Memory { addr, source })
}

fn write_bytes(mem: &GuestMem, b: &[u8], addr: u64) -> Result<(), BootError> {
    mem.write_slice(b, GuestAddress(addr))
        .map_err(|source| BootError::Memory { addr, source })
}

enum Format {
    Elf,
    BzImage,
}

fn detect(path: &Path, f: &mut File) -> Result<Format, BootError> {
    let err = |source| BootError::Open {
        path: path.to_path_buf(),
        source,
    };
    let size_bytes = f.metadata().map_err(err)?.len();
    if size_bytes > KERNEL_BYTES_MAX {
        return Err(BootError::TooBig {
            path: path.to_path_buf(),
            size_bytes,
        });
    }
    let mut head = [0u8; 0x208];
    let n = read_up_to(f, &mut head).map_err(err)?;
    f.seek(SeekFrom::Start(0)).map_err(err)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(Format::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(Format::BzImage)
    } else {
        Err(BootError::UnknownFormat {
            path: path.to_path_buf(),
        })
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn read_test_guest_header(mem: &GuestMem) -> Option<TestGuestHeader> {
    let rd = |off: u64| mem.read_obj::<u64>(GuestAddress(HIGHMEM_START + off)).ok();
    let magic = mem.read_obj::<u32>(GuestAddress(HIGHMEM_START)).ok()?;
    if magic != TEST_GUEST_MAGIC {
        return None;
    }
    Some(TestGuestHeader {
        pml4: rd(8)?,
        gdt_base: rd(16)?,
        gdt_limit: rd(24)? as u16,
        tss: rd(32)?,
        ap_entry: rd(40)?,
        stacks_base: rd(48)?,
        stack_bytes: rd(56)?,
        cpus_max: rd(64)?,
    })
}

/// Load the kernel (and initramfs) of `config` into `mem` and write the boot structures.
/// `tsc_khz` is passed to the test guest on its command line.
pub fn load(config: &VmConfig, mem: &GuestMem, tsc_khz: u32) -> Result<BootSetup, BootError> {
    let path = &config.kernel;
    let mut f = open(path)?;
    let format = detect(path, &mut f)?;
    let load_err = |source| BootError::Load {
        path: path.to_path_buf(),
        source,
    };
    let result: KernelLoaderResult = match format {
        Format::Elf => {
            Elf::load(mem, None, &mut f, Some(GuestAddress(HIGHMEM_START))).map_err(load_err)?
        }
        Format::BzImage => {
            if config.boot == BootProtocol::Pvh {
                return Err(BootError::PvhBzImage { path: path.clone() });
            }
            BzImage::load(mem, None, &mut f, Some(GuestAddress(HIGHMEM_START))).map_err(load_err)?
        }
    };
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
        _ => None,
    };
    let use_pvh = match (config.boot, pvh_entry, &format) {
        (BootProtocol::Pvh, None, _) => return Err(BootError::NoPvhNote { path: path.clone() }),
        (BootProtocol::Pvh, Some(_), _) => true,
        (BootProtocol::Auto, Some(_), Format::Elf) => config.initramfs.is_none(),
        _ => false,
    };
    let mem_bytes = config.memory_mib << 20;
    if use_pvh {
        let test_guest = read_test_guest_header(mem);
        let mut cmdline = config.cmdline.clone();
        if test_guest.is_some() {
            cmdline.push_str(&format!(
                " tsc_khz={tsc_khz} vcpus={} mem_mib={}",
                config.vcpus, config.memory_mib
            ));
        }
        write_cmdline(mem, cmdline.trim())?;
        // A real PVH kernel (not the test guest) finds CPUs and IOAPIC through ACPI.
        let rsdp = if test_guest.is_none() {
            for (addr, table) in crate::acpi::build(config.vcpus) {
                write_bytes(mem, &table, addr)?;
            }
            crate::acpi::RSDP_ADDR
        } else {
            0
        };
        write_pvh_start_info(mem, mem_bytes, rsdp)?;
        Ok(BootSetup {
            entry: BootEntry::Pvh {
                entry: pvh_entry.expect("checked above"),
                test_guest,
            },
        })
    } else {
        let entry = match format {
            Format::BzImage => result.kernel_load.0 + 0x200,
            Format::Elf => result.kernel_load.0,
        };
        let initrd = match &config.initramfs {
            Some(p) => Some(load_initramfs(mem, p, mem_bytes)?),
            None => None,
        };
        write_cmdline(mem, config.cmdline.trim())?;
        write_linux_boot_params(
            mem,
            result.setup_header,
            mem_bytes,
            config.cmdline.len(),
            initrd,
        )?;
        write_linux_page_tables(mem)?;
        write_bytes(
            mem,
            &crate::mptable::build(config.vcpus),
            crate::mptable::MPTABLE_ADDR,
        )?;
        for (addr, table) in crate::acpi::build(config.vcpus) {
            write_bytes(mem, &table, addr)?;
        }
        Ok(BootSetup {
            entry: BootEntry::Linux { entry },
        })
    }
}

fn write_cmdline(mem: &GuestMem, cmdline: &str) -> Result<(), BootError> {
    let mut b = cmdline.as_bytes().to_vec();
    b.push(0);
    write_bytes(mem, &b, CMDLINE_ADDR)
}

fn e820_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let mut v = vec![(0, EBDA_START)];
    for (start, size) in memory::ram_ranges(mem_bytes) {
        let s = start.max(HIGHMEM_START);
        if start + size > s {
            v.push((s, start + size - s));
        }
    }
    v
}

fn write_pvh_start_info(mem: &GuestMem, mem_bytes: u64, rsdp: u64) -> Result<(), BootError> {
    let map = e820_ranges(mem_bytes);
    let mut entries = Vec::new();
    for (addr, size) in &map {
        entries.extend_from_slice(&addr.to_le_bytes());
        entries.extend_from_slice(&size.to_le_bytes());
        entries.extend_from_slice(&1u32.to_le_bytes()); // RAM
        entries.extend_from_slice(&0u32.to_le_bytes());
    }
    write_bytes(mem, &entries, PVH_MEMMAP_ADDR)?;
    let mut si = Vec::with_capacity(56);
    si.extend_from_slice(&0x336e_c578u32.to_le_bytes()); // magic
    si.extend_from_slice(&1u32.to_le_bytes()); // version
    si.extend_from_slice(&0u32.to_le_bytes()); // flags
    si.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    si.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    si.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    si.extend_from_slice(&rsdp.to_le_bytes()); // rsdp_paddr
    si.extend_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
    si.extend_from_slice(&(map.len() as u32).to_le_bytes());
    si.extend_from_slice(&0u32.to_le_bytes());
    write_bytes(mem, &si, PVH_START_INFO_ADDR)
}

fn load_initramfs(mem: &GuestMem, path: &Path, mem_bytes: u64) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    // Below min(RAM below the gap, 896 MiB), page aligned, as high as possible.
    let top = mem_bytes.min(MMIO_GAP_START).min(0x3800_0000);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= 16 << 20)
        .ok_or_else(|| BootError::InitramfsTooBig {
            path: path.to_path_buf(),
            size_bytes: size,
        })?;
    write_bytes(mem, &data, addr)?;
    Ok((addr, size))
}

fn write_linux_boot_params(
    mem: &GuestMem,
    header: Option<linux_loader::loader::bootparam::setup_header>,
    mem_bytes: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.loadflags |= 0x01; // LOADED_HIGH
    params.acpi_rsdp_addr = crate::acpi::RSDP_ADDR;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_ranges(mem_bytes);
    for (i, (addr, size)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: 1,
        };
    }
    params.e820_entries = map.len() as u8;
    write(mem, params, ZERO_PAGE_ADDR)
}

fn write_linux_page_tables(mem: &GuestMem) -> Result<(), BootError> {
    // GDT: null, null, code64 (0x10), data (0x18), TSS (0x20).
    let gdt: [u64; 5] = [
        0,
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0080_8b00_0000_0067,
    ];
    for (i, e) in gdt.iter().enumerate() {
        write(mem, *e, BOOT_GDT_ADDR + 8 * i as u64)?;
    }
    write(mem, PDPT_ADDR | 0x3, PML4_ADDR)?;
    write(mem, PD_ADDR | 0x3, PDPT_ADDR)?;
    for i in 0..512u64 {
        write(mem, (i << 21) | 0x83, PD_ADDR + i * 8)?;
    }
    Ok(())
}

fn seg(selector: u16, type_: u8, dpl: u8, l: u8, db: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn verr(what: &'static str, vcpu: u32) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Vcpu { what, vcpu, source }
}

/// Set the registers of the boot vCPU (index 0).
pub fn setup_bsp(fd: &VcpuFd, setup: &BootSetup) -> Result<(), BootError> {
    let mut sregs = fd.get_sregs().map_err(verr("sregs", 0))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match setup.entry {
        BootEntry::Pvh { entry, .. } => {
            let code = seg(0x08, 0xb, 0, 0, 1, 1);
            let data = seg(0x10, 0x3, 0, 0, 1, 1);
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = kvm_segment {
                limit: 0x67,
                type_: 0xb,
                present: 1,
                ..Default::default()
            };
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_START_INFO_ADDR;
        }
        BootEntry::Linux { entry } => {
            let code = seg(0x10, 0xb, 0, 1, 0, 1);
            let data = seg(0x18, 0x3, 0, 0, 1, 1);
            sregs.gdt.base = BOOT_GDT_ADDR;
            sregs.gdt.limit = 5 * 8 - 1;
            sregs.idt.base = 0;
            sregs.idt.limit = 0;
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = kvm_segment {
                selector: 0x20,
                limit: 0x67,
                type_: 0xb,
                present: 1,
                ..Default::default()
            };
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= 0x20; // PAE
            sregs.cr0 |= 0x8000_0001; // PG | PE
            sregs.efer |= 0x500; // LME | LMA
            regs.rip = entry;
            regs.rsi = ZERO_PAGE_ADDR;
            regs.rsp = BOOT_STACK_ADDR;
            regs.rbp = BOOT_STACK_ADDR;
        }
    }
    fd.set_sregs(&sregs).map_err(verr("sregs", 0))?;
    fd.set_regs(&regs).map_err(verr("regs", 0))?;
    Ok(())
}

/// Start application processor `id` of the test guest directly in 64-bit CPL3 at its AP
/// entry (rdi = id, rsp = top of its stack). Returns false when the guest is not the test
/// guest (its APs then wait for INIT/SIPI from the BSP's LAPIC).
pub fn setup_test_guest_ap(fd: &VcpuFd, id: u32, setup: &BootSetup) -> Result<bool, BootError> {
    let h = match setup.entry {
        BootEntry::Pvh {
            test_guest: Some(h),
            ..
        } if u64::from(id) < h.cpus_max => h,
        _ => return Ok(false),
    };
    let mut sregs = fd.get_sregs().map_err(verr("sregs", id))?;
    let code = seg(0x23, 0xb, 3, 1, 0, 1);
    let data = seg(0x1b, 0x3, 3, 0, 1, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: h.tss,
        limit: 0x2068, // TSS with a full I/O permission bitmap
        selector: 0x28,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = h.gdt_base;
    sregs.gdt.limit = h.gdt_limit;
    sregs.cr3 = h.pml4;
    sregs.cr4 = 0x620; // PAE | OSFXSR | OSXMMEXCPT
    sregs.cr0 = 0x8000_0033; // PG | NE | ET | MP | PE
    sregs.efer = 0x500;
    fd.set_sregs(&sregs).map_err(verr("sregs", id))?;
    let regs = kvm_regs {
        rip: h.ap_entry,
        rsp: h.stacks_base + (u64::from(id) + 1) * h.stack_bytes - 8,
        rdi: id.into(),
        rflags: 0x3002, // IOPL=3
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(verr("regs", id))?;
    fd.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .map_err(verr("mp_state", id))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MMIO_GAP_END;

    #[test]
    fn garbage_and_missing_kernels_are_rejected() {
        let mem = memory::allocate(16 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, vec![0x42u8; 10_000]).unwrap();
        let cfg = VmConfig::new(1, 16, &garbage);
        let e = load(&cfg, &mem, 1000).unwrap_err();
        assert!(matches!(e, BootError::UnknownFormat { .. }), "{e}");
        let cfg = VmConfig::new(1, 16, dir.path().join("missing"));
        let e = load(&cfg, &mem, 1000).unwrap_err();
        assert!(matches!(e, BootError::Open { .. }), "{e}");
        // A truncated ELF header.
        let trunc = dir.path().join("trunc");
        std::fs::write(&trunc, b"\x7fELF\x02\x01\x01").unwrap();
        let e = load(&VmConfig::new(1, 16, &trunc), &mem, 1000).unwrap_err();
        assert!(matches!(e, BootError::Load { .. }), "{e}");
    }

    #[test]
    fn e820_skips_legacy_hole_and_mmio_gap() {
        assert_eq!(
            e820_ranges(64 << 20),
            vec![(0, EBDA_START), (HIGHMEM_START, (64 << 20) - HIGHMEM_START)]
        );
        let m = e820_ranges(4 << 30);
        assert_eq!(m[2], (MMIO_GAP_END, 1 << 30));
    }
}
