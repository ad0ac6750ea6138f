//! Emulated devices, the I/O buses the vCPU threads dispatch to, and the seams devices
//! plug into (see `ARCHITECTURE.md` (vmm-node: internal seams)).

pub mod i8042;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Boxed error of a device provider (its own typed error inside).
pub type DeviceError = Box<dyn std::error::Error + Send + Sync>;

/// The virtio-blk slots of a VM as core sees them. Implemented by the virtio module (which
/// owns the devices on the MMIO bus) and installed with `Vm::install_disk_slots`; core routes
/// configuration, control commands, snapshots and migration hand-off through it.
pub trait DiskSlots: Send + Sync {
    /// Hot-add: open `disk.path` and attach it to slot `disk.slot` (config-change interrupt).
    fn attach(&self, disk: &crate::config::DiskSlotConfig) -> Result<(), DeviceError>;
    /// Hot-remove: flush and close the backend of `slot` (config-change interrupt).
    fn detach(&self, slot: u8) -> Result<(), DeviceError>;
    /// Flush and close every backend (source side of a migration).
    fn detach_all(&self) -> Result<(), DeviceError>;
    /// Device state of every slot, for snapshots and migration (VM paused).
    fn save(&self) -> Vec<crate::state::DiskSlotState>;
    /// Load saved slot states; `disks` are the slots' backing files to reopen (VM paused).
    fn restore(
        &self,
        states: &[crate::state::DiskSlotState],
        disks: &[crate::config::DiskSlotConfig],
    ) -> Result<(), DeviceError>;
}

/// The NICs (virtio-net devices) of a VM as core sees them. Implemented by the virtio module
/// (which owns the devices, their TAPs and their I/O threads) and installed with
/// `Vm::install_net_devices`. Unlike vCPUs, a NIC's receive thread writes guest memory on
/// its own, so core pauses and resumes the NICs with the VM.
pub trait NetDevices: Send + Sync {
    /// Stop writing guest memory and raising interrupts; when this returns no NIC touches
    /// guest memory until [`NetDevices::resume`]. Idempotent.
    fn pause(&self);
    /// Go on receiving (and send the announcements a restore scheduled). Idempotent.
    fn resume(&self);
    /// Device state of every NIC, for snapshots and migration (VM paused).
    fn save(&self) -> Vec<crate::state::NicState>;
    /// Load saved NIC states (VM paused); every NIC must be listed exactly once. The next
    /// [`NetDevices::resume`] announces the NICs' MACs on their TAPs (the VM may have
    /// moved: switches must relearn where it is).
    fn restore(&self, states: &[crate::state::NicState]) -> Result<(), DeviceError>;
    /// While paused, announce every NIC's MAC on its TAP now (a migration target as its
    /// state arrives: the VM's frames then wait in this host's TAPs instead of being lost in
    /// the source's). The resume after a restore then sends only the later rounds.
    fn announce_early(&self) {}
    /// Hot add: open `nic.tap_name` and put a NIC into slot `nic.slot` (the lowest free slot
    /// when `None`), raising a configuration-change interrupt on it. Returns the slot.
    fn attach(&self, nic: &crate::config::NicConfig) -> Result<u8, DeviceError>;
    /// Hot remove the NIC with MAC `mac`: its slot becomes empty (device id 0) and its TAP
    /// is closed. Returns its configuration.
    fn detach(&self, mac: &str) -> Result<crate::config::NicConfig, DeviceError>;
    /// The configuration of every NIC present now (slots filled in), in slot order.
    fn configs(&self) -> Vec<crate::config::NicConfig>;
    /// Stop the NICs' threads and close their TAPs (the VM stops for good).
    fn shutdown(&self);
}

/// A device reached through x86 port I/O.
pub trait PioDevice: Send {
    /// Guest `in` of `data.len()` bytes at `offset` from the device's first port.
    fn pio_read(&mut self, offset: u16, data: &mut [u8]);
    /// Guest `out` of `data` at `offset` from the device's first port.
    fn pio_write(&mut self, offset: u16, data: &[u8]);
}

/// Errors of bus registration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps an existing one.
    #[error("range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap { base: u64, len: u64 },
    /// Zero-length range.
    #[error("range at {0:#x} has zero length")]
    Empty(u64),
}

/// Map from address ranges to devices; lookups are `O(log n)`.
pub struct Bus<D: ?Sized> {
    ranges: BTreeMap<u64, (u64, Arc<Mutex<D>>)>,
}

impl<D: ?Sized> Default for Bus<D> {
    fn default() -> Self {
        Self {
            ranges: BTreeMap::new(),
        }
    }
}

impl<D: ?Sized> Bus<D> {
    /// Register `dev` for `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<D>>) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((&b, &(l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    /// Remove the device registered at exactly `base`.
    pub fn remove(&mut self, base: u64) -> Option<Arc<Mutex<D>>> {
        self.ranges.remove(&base).map(|(_, d)| d)
    }

    /// The device covering `addr` and the offset of `addr` in its range.
    pub fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<D>>)> {
        let (&b, (l, d)) = self.ranges.range(..=addr).next_back()?;
        (addr < b + l).then_some((addr - b, d))
    }
}

/// Rate limiter for log lines a guest can trigger: at most `burst` per `period`, then
/// one summary of how many were suppressed.
pub struct RateLimitedLog {
    period: Duration,
    burst: u32,
    window_start: Instant,
    count: u32,
    suppressed: u64,
}

impl RateLimitedLog {
    /// A limiter allowing `burst` lines per `period`.
    pub fn new(burst: u32, period: Duration) -> Self {
        Self {
            period,
            burst,
            window_start: Instant::now(),
            count: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now; returns `Some(suppressed_before)` if yes.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.window_start) >= self.period {
            self.window_start = now;
            self.count = 0;
        }
        if self.count < self.burst {
            self.count += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;
    impl PioDevice for Nop {
        fn pio_read(&mut self, _: u16, _: &mut [u8]) {}
        fn pio_write(&mut self, _: u16, _: &[u8]) {}
    }

    #[test]
    fn bus_finds_devices_and_rejects_overlap() {
        let mut bus: Bus<dyn PioDevice> = Bus::default();
        let d: Arc<Mutex<dyn PioDevice>> = Arc::new(Mutex::new(Nop));
        bus.insert(0x3f8, 8, d.clone()).unwrap();
        bus.insert(0x60, 1, d.clone()).unwrap();
        assert_eq!(
            bus.insert(0x3fa, 2, d.clone()),
            Err(BusError::Overlap {
                base: 0x3fa,
                len: 2
            })
        );
        assert_eq!(
            bus.insert(0x3f0, 9, d.clone()),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        assert_eq!(bus.insert(0x10, 0, d.clone()), Err(BusError::Empty(0x10)));
        assert_eq!(bus.find(0x3fd).map(|(o, _)| o), Some(5));
        assert!(bus.find(0x400).is_none());
        assert!(bus.find(0x61).is_none());
        assert!(bus.remove(0x60).is_some());
        assert!(bus.find(0x60).is_none());
    }

    #[test]
    fn rate_limit_allows_a_burst_then_counts_suppressed() {
        let mut rl = RateLimitedLog::new(2, Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(rl.allow(t), Some(0));
        assert_eq!(rl.allow(t), Some(0));
        assert_eq!(rl.allow(t), None);
        assert_eq!(rl.allow(t), None);
        assert_eq!(rl.allow(t + Duration::from_secs(2)), Some(2));
    }
}
