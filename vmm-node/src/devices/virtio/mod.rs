//! virtio devices: the virtio-mmio transport ([`mmio`]), virtio-blk slots ([`blk`]) and
//! virtio-net NICs ([`net`]).
//!
//! The VMM has [`VIRTIO_BLK_SLOTS`] fixed block slots; slot `i` has its MMIO window at
//! [`slot_mmio_base`]`(i)` (size [`SLOT_MMIO_SIZE_BYTES`]) and interrupt [`slot_irq`]`(i)`.
//! NIC windows follow the block slots (`net::nic_mmio_base`, `net::nic_irq`).

pub mod blk;
pub mod install;
pub mod mmio;
pub mod net;
pub mod slots;

pub use blk::{BlkStats, SlotBacking, StateDecodeError, VirtioBlk, VirtioBlkError, VirtioBlkState};
pub use install::{install_virtio_slots, raw_file_opener, DiskOpener, VirtioDiskSlots};
pub use slots::{BlkSlots, DetachedDisk, EncodedSlotState, SlotsError};

/// Number of virtio-blk slots every VM has.
pub const VIRTIO_BLK_SLOTS: usize = 8;
/// Guest-physical base of slot 0's MMIO window.
pub const SLOTS_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one slot's MMIO window.
pub const SLOT_MMIO_SIZE_BYTES: u64 = 0x1000;
/// Interrupt line of slot 0 (slot `i` uses `SLOT0_IRQ + i`).
pub const SLOT0_IRQ: u32 = 5;

/// Guest-physical base of slot `slot`'s MMIO window.
pub const fn slot_mmio_base(slot: usize) -> u64 {
    SLOTS_MMIO_BASE + slot as u64 * SLOT_MMIO_SIZE_BYTES
}

/// Interrupt line of slot `slot`.
pub const fn slot_irq(slot: usize) -> u32 {
    SLOT0_IRQ + slot as u32
}

/// The Linux kernel command-line fragment that declares slot `slot`
/// (`virtio_mmio.device=4K@0xd0000000:5`).
pub fn slot_kernel_cmdline(slot: usize) -> String {
    format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        slot_mmio_base(slot),
        slot_irq(slot)
    )
}

#[cfg(test)]
mod tests {
    /// The guest drivers are plain freestanding C; compile them with the flags core's build
    /// script uses (plus `-Wextra`) so a syntax error shows up here too.
    #[test]
    fn guest_driver_compiles_freestanding() {
        for src in ["virtio_blk.c", "virtio_net.c", "net_echo.c"] {
            compile_freestanding(src);
        }
    }

    fn compile_freestanding(src: &str) {
        let guest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guest");
        let out = tempfile::tempdir().unwrap();
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
        let output = std::process::Command::new(cc)
            .args([
                "-ffreestanding",
                "-nostdlib",
                "-fno-pic",
                "-mno-red-zone",
                "-mgeneral-regs-only",
                "-fno-builtin",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-c",
            ])
            .arg(guest.join(src))
            .arg("-I")
            .arg(&guest)
            .arg("-o")
            .arg(out.path().join("driver.o"))
            .output()
            .expect("a C compiler `cc` is required");
        assert!(
            output.status.success(),
            "{src} does not compile:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(out.path().join("driver.o").exists());
    }

    #[test]
    fn slot_layout_matches_the_contract() {
        assert_eq!(super::slot_mmio_base(0), 0xd000_0000);
        assert_eq!(super::slot_mmio_base(7), 0xd000_7000);
        assert_eq!(super::slot_irq(2), 7);
        assert_eq!(
            super::slot_kernel_cmdline(1),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
