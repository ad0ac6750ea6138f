//! Emulated devices and the seams they plug into (see `CONTRACT.md`).

/// A device reached through a guest-physical MMIO window.
pub trait MmioDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` from the window base.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` from the window base.
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

/// An interrupt line into the guest (an irqfd on the in-kernel irqchip in the VMM,
/// a counter in unit tests).
pub trait IrqLine: Send + Sync {
    /// Raise the interrupt (edge).
    fn trigger(&self);
}

pub mod virtio;
