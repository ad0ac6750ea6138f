//! virtio devices: the virtio-mmio transport ([`mmio`]) and virtio-blk slots ([`blk`]).
//!
//! The VMM has [`VIRTIO_BLK_SLOTS`] fixed block slots; slot `i` has its MMIO window at
//! [`slot_mmio_base`]`(i)` (size [`SLOT_MMIO_SIZE_BYTES`]) and interrupt [`slot_irq`]`(i)`.

pub mod blk;
pub mod mmio;

pub use blk::{BlkStats, SlotBacking, VirtioBlk, VirtioBlkError, VirtioBlkState};

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
