//! Wiring of the virtio-blk slots into a [`Vm`]: [`VirtioDiskSlots`] implements core's
//! [`DiskSlots`] seam over [`BlkSlots`], opening backing disks through a caller-chosen
//! [`DiskOpener`] (raw image files by default; the cluster-agent passes one that opens
//! fenced shared-volume disks).

use std::sync::Arc;

use super::{BlkSlots, EncodedSlotState, SlotBacking};
use crate::config::DiskSlotConfig;
use crate::devices::{DeviceError, DiskSlots};
use crate::disk::{DiskBackend, RawFileDisk};
use crate::state::DiskSlotState;
use crate::vm::{Vm, VmError};

/// Opens the backend of one disk slot.
pub type DiskOpener =
    Arc<dyn Fn(&DiskSlotConfig) -> Result<Box<dyn DiskBackend>, DeviceError> + Send + Sync>;

/// The default opener: the slot's `path` as a raw image file.
pub fn raw_file_opener() -> DiskOpener {
    Arc::new(|d: &DiskSlotConfig| {
        let disk = RawFileDisk::open(&d.path, d.read_only)?;
        Ok(Box::new(disk) as Box<dyn DiskBackend>)
    })
}

/// The eight virtio-blk slots of one VM, as core's [`DiskSlots`].
pub struct VirtioDiskSlots {
    slots: BlkSlots,
    opener: DiskOpener,
}

impl std::fmt::Debug for VirtioDiskSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioDiskSlots")
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl VirtioDiskSlots {
    /// The slots themselves (statistics, backings).
    pub fn slots(&self) -> &BlkSlots {
        &self.slots
    }
}

/// Create the slots of `vm`, put them on its MMIO bus and install them as the VM's
/// [`DiskSlots`]. With `attach_configured` the disks of `vm.config().disks` are opened
/// and attached now (fresh boot); a restore or migration target passes `false` and lets
/// `Vm::restore_state` reopen them through `opener`.
pub fn install_virtio_slots(
    vm: &Vm,
    opener: DiskOpener,
    attach_configured: bool,
) -> Result<Arc<VirtioDiskSlots>, VmError> {
    let slots = BlkSlots::new(vm.memory(), |gsi| vm.irq_line(gsi)).map_err(|e| VmError::Disk {
        slot: 0,
        op: "create slots",
        source: Box::new(e),
    })?;
    for (base, len, dev) in slots.bus_devices() {
        vm.register_mmio_device(base, len, dev)?;
    }
    let installed = Arc::new(VirtioDiskSlots { slots, opener });
    vm.install_disk_slots(installed.clone(), attach_configured)?;
    Ok(installed)
}

impl DiskSlots for VirtioDiskSlots {
    fn attach(&self, disk: &DiskSlotConfig) -> Result<(), DeviceError> {
        let backend = (self.opener)(disk)?;
        self.slots
            .attach(usize::from(disk.slot), backend, disk.read_only)?;
        Ok(())
    }

    fn detach(&self, slot: u8) -> Result<(), DeviceError> {
        // Dropping the returned backend closes it (after the flush `detach` did).
        self.slots.detach(usize::from(slot))?;
        Ok(())
    }

    fn detach_all(&self) -> Result<(), DeviceError> {
        self.slots.detach_all()?;
        Ok(())
    }

    fn save(&self) -> Vec<DiskSlotState> {
        self.slots
            .save()
            .into_iter()
            .map(|(slot, device)| DiskSlotState { slot, device })
            .collect()
    }

    fn restore(
        &self,
        states: &[DiskSlotState],
        disks: &[DiskSlotConfig],
    ) -> Result<(), DeviceError> {
        let saved: Vec<EncodedSlotState> =
            states.iter().map(|s| (s.slot, s.device.clone())).collect();
        // A slot's backing is reopened from the configured disk of that slot; a disk that
        // was hot-added after boot is not in the configuration and is reopened from the
        // path its backend described (for a raw image file, its path).
        let open = |slot: u8, b: &SlotBacking| {
            let cfg = match disks.iter().find(|d| d.slot == slot) {
                Some(d) => DiskSlotConfig {
                    read_only: b.read_only,
                    ..d.clone()
                },
                None => DiskSlotConfig {
                    slot,
                    path: b.description.clone().into(),
                    read_only: b.read_only,
                },
            };
            (self.opener)(&cfg).map_err(OpenError)
        };
        self.slots.restore(&saved, open)?;
        Ok(())
    }
}

/// A disk opener's error, carried through [`BlkSlots::restore`].
#[derive(Debug, thiserror::Error)]
#[error("opening the disk failed")]
struct OpenError(#[source] DeviceError);
